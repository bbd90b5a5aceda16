//! `hearth bench plot`: charts from the JSON reports of `hearth bench --json`,
//! each written as PNG and SVG — latency by percentile (log percentile axis,
//! as HdrHistogram plots it), answers per second over time, and, for rate
//! sweeps, p50/p99 latency against offered load with each system's knee.
//!
//! Text in PNGs is drawn with `ab_glyph` from a font compiled into the binary
//! (DejaVu Sans cut down to ASCII and a few signs, 10 KiB; licence in
//! `font/LICENSE`), so neither fontconfig nor any system font is needed.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::args::PlotArgs;
use super::stats::{Output, RunReport, FORMAT};

/// Most JSON inputs one plot takes.
const INPUTS_MAX: usize = 32;
/// Largest JSON input, bytes.
const INPUT_BYTES_MAX: u64 = 64 << 20;
/// Chart size, pixels.
const SIZE: (u32, u32) = (1200, 720);
/// Highest percentile drawn: 99.9999 % (six nines).
const NINES_MAX: f64 = 6.0;
/// The font text is drawn with.
static FONT: &[u8] = include_bytes!("font/DejaVuSans-subset.ttf");

type Fallible = Result<(), String>;

/// One line in a chart.
struct Series<'a> {
    name: String,
    run: &'a RunReport,
}

/// Draws one chart as `<name>.png` and `<name>.svg` in `dir`, with `$draw`
/// called on each backend's drawing area; evaluates to the two paths.
macro_rules! both {
    ($dir:expr, $name:expr, |$root:ident| $draw:expr) => {{
        let png = $dir.join(format!("{}.png", $name));
        let svg = $dir.join(format!("{}.svg", $name));
        {
            let $root = BitMapBackend::new(&png, SIZE).into_drawing_area();
            $draw?;
            $root
                .present()
                .map_err(|e| format!("{}: {e}", png.display()))?;
        }
        {
            let $root = SVGBackend::new(&svg, SIZE).into_drawing_area();
            $draw?;
            $root
                .present()
                .map_err(|e| format!("{}: {e}", svg.display()))?;
        }
        [png, svg]
    }};
}

/// Reads the inputs and writes every chart that applies into `--out`.
pub fn run(a: &PlotArgs) -> Fallible {
    if a.inputs.len() > INPUTS_MAX {
        return Err(format!("at most {INPUTS_MAX} JSON files at once"));
    }
    let outputs = a
        .inputs
        .iter()
        .map(|p| read(p))
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(&a.out)
        .map_err(|e| format!("cannot create {}: {e}", a.out.display()))?;
    register_font()?;
    let series: Vec<Series<'_>> = outputs
        .iter()
        .flat_map(|o| {
            o.runs.iter().map(move |run| Series {
                name: match (o.sweep, run.rate_rps) {
                    (true, Some(rate)) => format!("{} @ {rate:.0}/s", o.label),
                    _ => o.label.clone(),
                },
                run,
            })
        })
        .collect();
    let mut written = Vec::new();
    written.extend(both!(&a.out, "latency", |root| latency_chart(
        &root, &series
    )));
    written.extend(both!(&a.out, "throughput", |root| throughput_chart(
        &root, &series
    )));
    let sweeps: Vec<&Output> = outputs.iter().filter(|o| o.sweep).collect();
    if !sweeps.is_empty() {
        written.extend(both!(&a.out, "sweep", |root| sweep_chart(&root, &sweeps)));
    }
    for p in written {
        println!("{}", p.display());
    }
    Ok(())
}

fn read(path: &Path) -> Result<Output, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    if len > INPUT_BYTES_MAX {
        return Err(format!("{} is larger than 64 MiB", path.display()));
    }
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let out: Output = serde_json::from_slice(&text).map_err(|e| {
        format!(
            "{} is not a `hearth bench --json` report: {e}",
            path.display()
        )
    })?;
    if out.format != FORMAT || out.runs.is_empty() {
        return Err(format!(
            "{} has format {:?} with {} runs; expected {FORMAT:?} with at least one",
            path.display(),
            out.format,
            out.runs.len()
        ));
    }
    Ok(out)
}

fn register_font() -> Fallible {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| "the embedded font cannot be read".to_string());
    });
    result
}

fn err<E: std::fmt::Display>(e: E) -> String {
    format!("drawing failed: {e}")
}

/// "Nines" of a percentile: 90 % is 1, 99 % is 2, 99.9 % is 3.
fn nines(percentile: f64) -> f64 {
    (-(1.0 - percentile / 100.0).log10()).clamp(0.0, NINES_MAX)
}

/// The percentile a number of nines stands for, as an axis label.
fn nines_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let decimals = (x.round() as usize).saturating_sub(2);
    format!("{p:.decimals$}%")
}

/// A log axis range covering `lo..hi` (both above 0) with some room.
fn log_range(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let lo = lo.max(1e-3);
    (lo * 0.8)..(hi.max(lo) * 1.25)
}

fn latency_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    series: &[Series<'_>],
) -> Fallible {
    root.fill(&WHITE).map_err(err)?;
    let points: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.run
                .percentiles
                .iter()
                .map(|p| (nines(p.percentile), p.latency_us as f64 / 1e3))
                .collect()
        })
        .collect();
    let all = points.iter().flatten();
    let x_max = all.clone().map(|p| p.0).fold(2.0, f64::max).ceil();
    let y_lo = all.clone().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_hi = all.map(|p| p.1).fold(0.0, f64::max);
    let y_lo = if y_lo.is_finite() { y_lo } else { 0.001 };
    let mut chart = ChartBuilder::on(root)
        .caption("Latency by percentile", ("sans-serif", 28))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, log_range(y_lo, y_hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(x_max as usize + 1)
        .x_label_formatter(&|x| nines_label(*x))
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .draw()
        .map_err(err)?;
    for (i, (s, pts)) in series.iter().zip(points).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(err)?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

fn legend<'a, DB: DrawingBackend + 'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    at: SeriesLabelPosition,
) -> Fallible {
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(err)
}

fn throughput_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    series: &[Series<'_>],
) -> Fallible {
    root.fill(&WHITE).map_err(err)?;
    let x_max = series
        .iter()
        .map(|s| s.run.per_second.len())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let y_max = series
        .iter()
        .flat_map(|s| s.run.per_second.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut chart = ChartBuilder::on(root)
        .caption("Throughput over time", ("sans-serif", 28))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max * 1.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("second of the measured window")
        .y_desc("answers per second")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts = s
            .run
            .per_second
            .iter()
            .enumerate()
            .map(|(t, &n)| (t as f64 + 0.5, n as f64));
        // Points as well as lines: a one-second run is a single point.
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)).point_size(3))
            .map_err(err)?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

/// The knee of a sweep: the highest offered rate before the first one that is
/// not kept up with (under 95 % answered) or whose p99 is ten times the
/// lowest rate's.
pub fn knee(runs: &[RunReport]) -> Option<&RunReport> {
    let base = runs.first()?.latency_us.p99.max(1);
    let mut knee = None;
    for r in runs {
        let offered = r.rate_rps.unwrap_or(0.0);
        let kept_up = r.throughput_rps >= 0.95 * offered;
        if !kept_up || r.latency_us.p99 > 10 * base {
            break;
        }
        knee = Some(r);
    }
    knee
}

fn sweep_chart<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, sweeps: &[&Output]) -> Fallible {
    root.fill(&WHITE).map_err(err)?;
    let runs = sweeps.iter().flat_map(|o| o.runs.iter());
    let x_max = runs.clone().filter_map(|r| r.rate_rps).fold(1.0, f64::max);
    let y_lo = runs
        .clone()
        .map(|r| r.latency_us.p50 as f64 / 1e3)
        .fold(f64::INFINITY, f64::min);
    let y_hi = runs
        .map(|r| r.latency_us.p99 as f64 / 1e3)
        .fold(0.0, f64::max);
    let y_lo = if y_lo.is_finite() { y_lo } else { 0.001 };
    let mut chart = ChartBuilder::on(root)
        .caption("Latency against offered load", ("sans-serif", 28))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max * 1.05, log_range(y_lo, y_hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("offered load (requests/s)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("latency (ms), p99 solid, p50 thin")
        .draw()
        .map_err(err)?;
    for (i, o) in sweeps.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let point = |r: &RunReport, v: u64| (r.rate_rps.unwrap_or(0.0), v as f64 / 1e3);
        let p99: Vec<_> = o.runs.iter().map(|r| point(r, r.latency_us.p99)).collect();
        let p50: Vec<_> = o.runs.iter().map(|r| point(r, r.latency_us.p50)).collect();
        chart
            .draw_series(LineSeries::new(p99.clone(), color.stroke_width(3)))
            .map_err(err)?
            .label(o.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart
            .draw_series(p99.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(p50, color.stroke_width(1)))
            .map_err(err)?;
        if let Some(k) = knee(&o.runs) {
            let at = point(k, k.latency_us.p99);
            chart
                .draw_series([EmptyElement::at(at)
                    + Circle::new((0, 0), 9, color.stroke_width(2))
                    + Text::new(
                        format!("knee {:.0}/s", k.rate_rps.unwrap_or(0.0)),
                        (10, -22),
                        ("sans-serif", 16),
                    )])
                .map_err(err)?;
        }
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_axis_counts_nines() {
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(100.0), NINES_MAX);
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(2.0), "99%");
        assert_eq!(nines_label(3.0), "99.9%");
    }

    fn run(rate: f64, answered: f64, p99: u64) -> RunReport {
        let mut r: RunReport = serde_json::from_value(serde_json::json!({
            "label": "x", "url": "u", "method": "GET", "mode": "open", "rate_rps": rate,
            "connections": 1, "threads": 1, "warmup_s": 0.0, "duration_s": 1.0,
            "requests": 0, "ok": 0, "throughput_rps": answered,
            "errors": {"connect": 0, "timeout": 0, "non_2xx": 0, "malformed": 0, "io": 0},
            "status": {}, "latency_us": {"min": 0, "mean": 0.0, "stdev": 0.0, "p50": 0,
            "p90": 0, "p99": 0, "p999": 0, "max": 0}, "percentiles": [], "per_second": []
        }))
        .unwrap();
        r.latency_us.p99 = p99;
        r
    }

    #[test]
    fn the_knee_is_the_last_rate_kept_up_with() {
        let runs = vec![
            run(100.0, 100.0, 500),
            run(200.0, 199.0, 600),
            run(300.0, 250.0, 900),
        ];
        assert_eq!(knee(&runs).unwrap().rate_rps, Some(200.0));
        let runs = vec![run(100.0, 100.0, 500), run(200.0, 200.0, 50_000)];
        assert_eq!(knee(&runs).unwrap().rate_rps, Some(100.0));
        assert!(knee(&[]).is_none());
    }
}
