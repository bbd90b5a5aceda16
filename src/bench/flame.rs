//! `hearth bench flame`: flame graphs and top symbols from a profile.
//!
//! Reads the text `perf script` prints for a `perf record -g` run, folds the
//! stacks (`inferno`'s perf collapser: kernel frames marked `_[k]`, JIT frames
//! that Node's `--perf-basic-prof` map names marked `_[j]`), groups them by
//! component (the command name of the sampled thread: `agent` or
//! `hearth-agent` are the guest agents, other `hearth*` threads hearth, `node` the Node.js runtimes, the rest
//! other) and writes, into the output directory, `all.svg` plus one
//! `<component>.svg` per component that was sampled, the folded stacks
//! (`folded.txt`) and `top.txt`: per component, the functions the samples
//! were in (self time), most first. Samples weigh their event period, which
//! for `cpu-clock` is nanoseconds of CPU. The input is read as a stream; what is
//! held is one line per distinct stack.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use inferno::collapse::perf::{Folder, Options as FoldOptions};
use inferno::collapse::Collapse;
use inferno::flamegraph::{self, Options as FlameOptions};

/// Symbols listed per component in `top.txt`.
pub const TOP_SYMBOLS: usize = 30;

/// Arguments of `hearth bench flame`.
#[derive(clap::Args, Debug)]
pub struct FlameArgs {
    /// Output of `perf script` for a `perf record -g` profile ("-": stdin).
    pub input: PathBuf,
    /// Directory the graphs and `top.txt` are written to (created if missing).
    #[arg(short = 'o', long, default_value = "flame")]
    pub out: PathBuf,
    /// Title over the graphs.
    #[arg(long, default_value = "hearth profile")]
    pub title: String,
}

/// Which part of the system a sampled thread belongs to, by its command name.
pub fn component(comm: &str) -> &'static str {
    if comm == "agent" || comm == "hearth-agent" {
        "agent"
    } else if comm.starts_with("hearth") {
        "hearth"
    } else if comm == "node" {
        "node"
    } else {
        "other"
    }
}

/// Folded stacks grouped by component: `(component, stack without the
/// command name, samples)`.
struct Folded {
    lines: Vec<(&'static str, String, u64)>,
}

impl Folded {
    /// Splits inferno's folded lines (`comm;frame;…;frame count`).
    fn parse(text: &str) -> Folded {
        let lines = text
            .lines()
            .filter_map(|l| {
                let (stack, n) = l.rsplit_once(' ')?;
                let n: u64 = n.parse().ok()?;
                let (comm, frames) = stack.split_once(';').unwrap_or((stack, ""));
                Some((component(comm), frames.to_string(), n))
            })
            .collect();
        Folded { lines }
    }

    /// Samples per component, and in all.
    fn totals(&self) -> BTreeMap<&'static str, u64> {
        let mut t = BTreeMap::new();
        for (c, _, n) in &self.lines {
            *t.entry(*c).or_default() += n;
        }
        t
    }

    /// Folded lines of one component (or all, with the component as the
    /// root frame), as the flame graph reads them.
    fn lines_of(&self, which: Option<&str>) -> Vec<String> {
        self.lines
            .iter()
            .filter(|(c, _, _)| which.is_none_or(|w| w == *c))
            .map(|(c, stack, n)| match which {
                None if stack.is_empty() => format!("{c} {n}"),
                None => format!("{c};{stack} {n}"),
                Some(_) if stack.is_empty() => format!("[unknown] {n}"),
                Some(_) => format!("{stack} {n}"),
            })
            .collect()
    }

    /// The leaf frames of one component by samples, most first.
    fn top(&self, which: &str) -> Vec<(String, u64)> {
        let mut by: BTreeMap<&str, u64> = BTreeMap::new();
        for (c, stack, n) in &self.lines {
            if *c == which {
                let leaf = stack.rsplit(';').next().filter(|l| !l.is_empty());
                *by.entry(leaf.unwrap_or("[unknown]")).or_default() += n;
            }
        }
        let mut v: Vec<(String, u64)> = by.into_iter().map(|(k, n)| (k.to_string(), n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

/// Runs `hearth bench flame`.
pub fn run(a: &FlameArgs) -> Result<(), String> {
    let mut folded = Vec::new();
    let mut fold = FoldOptions::default();
    fold.annotate_jit = true;
    fold.annotate_kernel = true;
    let mut folder = Folder::from(fold);
    let result = if a.input == Path::new("-") {
        folder.collapse(std::io::stdin().lock(), &mut folded)
    } else {
        let f = File::open(&a.input).map_err(|e| format!("{}: {e}", a.input.display()))?;
        folder.collapse(BufReader::new(f), &mut folded)
    };
    result.map_err(|e| format!("{}: not perf script output: {e}", a.input.display()))?;
    let text = String::from_utf8_lossy(&folded);
    let f = Folded::parse(&text);
    let totals = f.totals();
    let all: u64 = totals.values().sum();
    if all == 0 {
        return Err(format!("{}: no stack samples", a.input.display()));
    }
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    write_file(&a.out.join("folded.txt"), folded.as_slice())?;
    graph(&a.out.join("all.svg"), &a.title, &f.lines_of(None))?;
    let mut top = String::new();
    for (c, n) in &totals {
        let title = format!("{} — {c}", a.title);
        graph(
            &a.out.join(format!("{c}.svg")),
            &title,
            &f.lines_of(Some(c)),
        )?;
        top.push_str(&format!(
            "## {c}: {:.1}% of all ({n} sampled events: ns of CPU for cpu-clock)\n",
            100.0 * *n as f64 / all as f64
        ));
        for (sym, s) in f.top(c).into_iter().take(TOP_SYMBOLS) {
            let pct = 100.0 * s as f64 / *n as f64;
            top.push_str(&format!("{pct:6.2}% {s:>8}  {sym}\n"));
        }
        top.push('\n');
    }
    write_file(&a.out.join("top.txt"), top.as_bytes())?;
    print!("{top}");
    println!("flame graphs: {}/{{all,{}}}.svg", a.out.display(), {
        let names: Vec<&str> = totals.keys().copied().collect();
        names.join(",")
    });
    Ok(())
}

/// Writes one flame graph SVG from folded lines.
fn graph(path: &Path, title: &str, lines: &[String]) -> Result<(), String> {
    let mut opts = FlameOptions::default();
    opts.title = title.to_string();
    opts.count_name = "events".to_string();
    let file = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut w = BufWriter::new(file);
    flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut w)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    w.flush().map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes `bytes` to `path` through a temporary file renamed into place.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two samples in `perf script` form: hearth in the kernel, node in JIT code.
    const SCRIPT: &str = "\
hearth-w0  1234/1236  [000] 100.000001:     250000 cpu-clock:pppH: 
\tffffffff81000010 tcp_sendmsg+0x10 ([kernel.kallsyms])
\t    55555555a000 hearth::engine::uring::run+0x20 (/usr/bin/hearth)
\t    55555555b000 main+0x5 (/usr/bin/hearth)

node  2000/2000  [001] 100.000002:     250000 cpu-clock:pppH: 
\t    7f0000001000 LazyCompile:*handler /var/task/index.js:3 (/tmp/perf-2000.map)
\t    7f0000002000 uv_run+0x30 (/usr/bin/node)

node  2000/2000  [001] 100.000003:     250000 cpu-clock:pppH: 
\t    7f0000001000 LazyCompile:*handler /var/task/index.js:3 (/tmp/perf-2000.map)
\t    7f0000002000 uv_run+0x30 (/usr/bin/node)

";

    #[test]
    fn profiles_become_graphs_and_top_symbols_by_component() {
        let dir = std::env::temp_dir().join(format!("hearth-flame-{}", std::process::id()));
        let input = dir.join("perf.txt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&input, SCRIPT).unwrap();
        let out = dir.join("out");
        run(&FlameArgs {
            input,
            out: out.clone(),
            title: "t".into(),
        })
        .unwrap();
        let top = std::fs::read_to_string(out.join("top.txt")).unwrap();
        assert!(
            top.contains("## hearth: 33.3% of all (250000 sampled"),
            "{top}"
        );
        assert!(
            top.contains("## node: 66.7% of all (500000 sampled"),
            "{top}"
        );
        assert!(
            top.contains("100.00%   500000  LazyCompile:*handler"),
            "{top}"
        );
        assert!(top.contains("tcp_sendmsg_[k]"), "{top}");
        for svg in ["all.svg", "hearth.svg", "node.svg"] {
            let text = std::fs::read_to_string(out.join(svg)).unwrap();
            assert!(text.starts_with("<?xml"), "{svg}");
            assert!(text.contains("uv_run") == (svg != "hearth.svg"), "{svg}");
        }
        assert!(!out.join("agent.svg").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_profiles_are_refused() {
        let dir = std::env::temp_dir().join(format!("hearth-flame-e-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("perf.txt");
        std::fs::write(&input, "").unwrap();
        let e = run(&FlameArgs {
            input,
            out: dir.join("out"),
            title: "t".into(),
        })
        .unwrap_err();
        assert!(e.contains("no stack samples"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
