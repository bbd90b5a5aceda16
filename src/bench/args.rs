//! The command line of `hearth bench`, and its validation into a [`Plan`]: the
//! plain description of a run that the driver executes. Every bound a user can
//! raise is named here, with its ceiling.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use super::request::{self, RequestSpec};

/// Most connections one run may open.
pub const CONNECTIONS_MAX: usize = 20_000;
/// Most event-loop threads.
pub const THREADS_MAX: usize = 256;
/// Longest measured window (and longest warm-up).
pub const DURATION_MAX: Duration = Duration::from_secs(3600);
/// Most requests `--requests` may ask for.
pub const REQUESTS_MAX: u64 = 1_000_000_000;
/// Highest offered rate, requests per second.
pub const RATE_MAX: f64 = 10_000_000.0;
/// Most rates in one `--sweep`.
pub const SWEEP_RATES_MAX: usize = 100;
/// Ceiling of `--response-bytes-max`.
pub const RESPONSE_BYTES_CEILING: usize = 1 << 30;

/// `hearth bench`: an HTTP/1.1 load generator, or `hearth bench plot`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    /// Target: http://host[:port][/path?query] (plain HTTP/1.1, no TLS).
    #[arg(required = true)]
    pub url: Option<String>,
    /// Keep-alive connections, split over the threads (at most 20000).
    #[arg(short = 'c', long, default_value_t = 10)]
    pub connections: usize,
    /// Event-loop threads, one per core given (default: the online cores, at
    /// most one per connection; at most 256).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Measured time after the warm-up, e.g. 10s, 500ms, 2m (at most 1h;
    /// default 10s unless --requests is given).
    #[arg(long, value_parser = parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Stop after this many measured requests instead of after a time (at most 10^9).
    #[arg(short = 'n', long)]
    pub requests: Option<u64>,
    /// Load before the measured window, excluded from every result (at most 1h).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub warmup: Duration,
    /// Open loop: send this many requests per second in total, on schedule,
    /// and measure each latency from the request's intended send time
    /// (coordinated-omission corrected). Without it: closed loop, every
    /// connection sends its next request as soon as the previous answer is in.
    #[arg(long, conflicts_with = "sweep")]
    pub rate: Option<f64>,
    /// Open-loop runs at several rates, one after the other: "R1,R2,..." or
    /// "START:STOP:STEP" (at most 100 rates). Each run lasts --duration after
    /// --warmup.
    #[arg(long)]
    pub sweep: Option<String>,
    /// A request with no complete answer after this long counts as a timeout
    /// error and its connection is reopened (at most 1h).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub timeout: Duration,
    /// HTTP method.
    #[arg(short = 'X', long, default_value = "GET")]
    pub method: String,
    /// Request header "Name: value" (repeatable).
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    /// Request body.
    #[arg(short = 'd', long, conflicts_with = "body_file")]
    pub data: Option<String>,
    /// Request body read from a file (at most 64 MiB).
    #[arg(long)]
    pub body_file: Option<PathBuf>,
    /// A list of requests sent in turn on every connection, one a line:
    /// "METHOD /path [@body-file | body text]"; blank lines and lines starting
    /// with # are skipped; -H headers apply to each (at most 10000 requests).
    #[arg(long, conflicts_with_all = ["data", "body_file"])]
    pub requests_file: Option<PathBuf>,
    /// Largest answer accepted (head and body), bytes; a larger one counts as
    /// malformed (at most 1 GiB). Answer heads are limited to 64 KiB.
    #[arg(long, default_value_t = 16 << 20)]
    pub response_bytes_max: usize,
    /// Print the results as JSON (the input of `hearth bench plot`).
    #[arg(long)]
    pub json: bool,
    /// Name of this run in plots (default: the URL).
    #[arg(long)]
    pub label: Option<String>,
}

/// Subcommands of `hearth bench`.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Draw charts from JSON results of `hearth bench --json`: latency by
    /// percentile, throughput over time and, for sweeps, latency against offered load.
    Plot(PlotArgs),
    /// Draw flame graphs and list the top symbols of a profile: the output of
    /// `perf script` for a `perf record -g` run, split into hearth, its guest
    /// agents and Node.
    Flame(super::flame::FlameArgs),
}

/// Arguments of `hearth bench plot`.
#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// JSON files written by `hearth bench --json` (at most 32).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Directory the charts are written to (created if missing).
    #[arg(short = 'o', long, default_value = "bench-plots")]
    pub out: PathBuf,
}

/// Where requests go.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The resolved address connected to.
    pub addr: SocketAddr,
    /// The `Host` header value (host and port as written in the URL).
    pub host: String,
    /// Path and query.
    pub path: String,
}

/// Closed or open loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Each connection sends as fast as answers come back.
    Closed,
    /// Requests go out on a fixed schedule, this many per second in total.
    Open { rate_per_s: f64 },
}

/// When a run stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    /// After this long measured.
    After(Duration),
    /// After this many measured requests.
    Requests(u64),
}

/// A validated run: everything the driver needs, nothing it must re-check.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: Target,
    pub url: String,
    pub label: String,
    /// The method of the first request (for reports).
    pub method: String,
    /// Serialised requests, sent in turn.
    pub requests: Vec<request::Raw>,
    pub connections: usize,
    pub threads: usize,
    pub load: Load,
    pub stop: Stop,
    pub warmup: Duration,
    pub timeout: Duration,
    pub response_bytes_max: usize,
    /// Rates of a sweep; empty for a single run.
    pub sweep: Vec<f64>,
}

/// Parses "10s", "250ms", "2m", "1h", "1.5s", "500us" or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use us, ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs < 0.0 || secs > DURATION_MAX.as_secs_f64() {
        return Err(format!("{s:?} is out of range (0 to 1h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a sweep: "R1,R2,..." or "START:STOP:STEP" (STOP included).
pub fn parse_sweep(s: &str) -> Result<Vec<f64>, String> {
    let num = |t: &str| -> Result<f64, String> {
        t.trim()
            .parse::<f64>()
            .map_err(|_| format!("--sweep: {t:?} is not a number"))
    };
    let rates: Vec<f64> = if s.contains(':') {
        let parts: Vec<&str> = s.split(':').collect();
        let [start, stop, step] = parts[..] else {
            return Err(format!("--sweep {s:?}: use START:STOP:STEP or R1,R2,..."));
        };
        let (start, stop, step) = (num(start)?, num(stop)?, num(step)?);
        if step <= 0.0 || stop < start {
            return Err(format!(
                "--sweep {s:?}: STEP must be positive and STOP at least START"
            ));
        }
        let count = ((stop - start) / step).floor() as usize + 1;
        if count > SWEEP_RATES_MAX {
            return Err(format!(
                "--sweep {s:?} has {count} rates; at most {SWEEP_RATES_MAX}"
            ));
        }
        (0..count).map(|i| start + step * i as f64).collect()
    } else {
        s.split(',').map(num).collect::<Result<_, _>>()?
    };
    if rates.is_empty() || rates.len() > SWEEP_RATES_MAX {
        return Err(format!("--sweep takes 1 to {SWEEP_RATES_MAX} rates"));
    }
    for &r in &rates {
        check_rate(r)?;
    }
    Ok(rates)
}

fn check_rate(r: f64) -> Result<(), String> {
    if !(r.is_finite() && r > 0.0 && r <= RATE_MAX) {
        return Err(format!(
            "rate {r} is out of range (above 0, at most {RATE_MAX})"
        ));
    }
    Ok(())
}

/// Splits `http://host[:port][/path]` into a [`Target`], resolving the host.
pub fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs are supported (no TLS)"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("{url:?}: expected http://host[:port]/path"));
    }
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let with_port = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority:?} resolves to no address"))?;
    Ok(Target {
        addr,
        host: authority.to_string(),
        path,
    })
}

impl BenchArgs {
    /// Checks every argument and builds the plan (reads body and request files).
    pub fn plan(&self) -> Result<Plan, String> {
        let url = self.url.clone().ok_or("a target URL is required")?;
        let target = parse_url(&url)?;
        if self.connections == 0 || self.connections > CONNECTIONS_MAX {
            return Err(format!(
                "--connections {} is out of range (1 to {CONNECTIONS_MAX})",
                self.connections
            ));
        }
        let threads = self
            .threads
            .unwrap_or_else(crate::config::online_cores)
            .min(self.connections);
        if threads == 0 || threads > THREADS_MAX {
            return Err(format!("--threads is out of range (1 to {THREADS_MAX})"));
        }
        let stop = match self.requests {
            Some(0) => return Err("--requests must be at least 1".into()),
            Some(n) if n > REQUESTS_MAX => {
                return Err(format!("--requests {n} is above {REQUESTS_MAX}"))
            }
            Some(n) => Stop::Requests(n),
            None => Stop::After(self.duration.unwrap_or(Duration::from_secs(10))),
        };
        if stop == Stop::After(Duration::ZERO) {
            return Err("--duration must be above 0".into());
        }
        let load = match self.rate {
            Some(r) => {
                check_rate(r)?;
                Load::Open { rate_per_s: r }
            }
            None => Load::Closed,
        };
        let sweep = match &self.sweep {
            Some(s) => parse_sweep(s)?,
            None => Vec::new(),
        };
        if self.timeout.is_zero() {
            return Err("--timeout must be above 0".into());
        }
        if self.response_bytes_max == 0 || self.response_bytes_max > RESPONSE_BYTES_CEILING {
            return Err(format!(
                "--response-bytes-max is out of range (1 to {RESPONSE_BYTES_CEILING})"
            ));
        }
        let specs = self.request_specs()?;
        let headers = request::parse_headers(&self.headers)?;
        let requests = specs
            .iter()
            .map(|s| request::serialise(s, &target, &headers))
            .collect::<Vec<_>>();
        Ok(Plan {
            label: self.label.clone().unwrap_or_else(|| url.clone()),
            url,
            method: specs[0].method.clone(),
            target,
            requests,
            connections: self.connections,
            threads,
            load,
            stop,
            warmup: self.warmup,
            timeout: self.timeout,
            response_bytes_max: self.response_bytes_max,
            sweep,
        })
    }

    /// The requests to send: the list file's, or the one the flags describe.
    fn request_specs(&self) -> Result<Vec<RequestSpec>, String> {
        if let Some(path) = &self.requests_file {
            return request::read_list(path);
        }
        let body = match (&self.data, &self.body_file) {
            (Some(d), _) => d.clone().into_bytes(),
            (None, Some(p)) => request::read_body(p)?,
            (None, None) => Vec::new(),
        };
        Ok(vec![RequestSpec {
            method: request::check_method(&self.method)?,
            path: None,
            body,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let mut argv = vec!["bench"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .bench
            .plan()
    }

    #[test]
    fn durations_take_common_units() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("500us").unwrap(), Duration::from_micros(500));
        assert!(parse_duration("2h").is_err(), "above the 1h ceiling");
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn sweeps_take_a_list_or_a_range() {
        assert_eq!(
            parse_sweep("100,200,400").unwrap(),
            vec![100.0, 200.0, 400.0]
        );
        assert_eq!(
            parse_sweep("1000:3000:1000").unwrap(),
            vec![1000.0, 2000.0, 3000.0]
        );
        assert!(parse_sweep("1:1000000:1").is_err(), "too many rates");
        assert!(parse_sweep("5:1:1").is_err());
        assert!(parse_sweep("0,10").is_err(), "a zero rate");
        assert!(parse_sweep("a,b").is_err());
    }

    #[test]
    fn urls_split_into_address_host_and_path() {
        let t = parse_url("http://127.0.0.1:8080/f/x?q=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.host, "127.0.0.1:8080");
        assert_eq!(t.path, "/f/x?q=1");
        let t = parse_url("http://127.0.0.1").unwrap();
        assert_eq!(t.addr.port(), 80);
        assert_eq!(t.path, "/");
        let t = parse_url("http://[::1]:9000?x").unwrap();
        assert_eq!(t.addr, "[::1]:9000".parse().unwrap());
        assert_eq!(t.path, "/?x");
        assert!(parse_url("https://127.0.0.1/").is_err());
        assert!(parse_url("http:///x").is_err());
    }

    #[test]
    fn defaults_are_a_closed_ten_second_run() {
        let p = plan(&["http://127.0.0.1:1/", "-t", "2"]).unwrap();
        assert_eq!(p.load, Load::Closed);
        assert_eq!(p.stop, Stop::After(Duration::from_secs(10)));
        assert_eq!((p.connections, p.threads), (10, 2));
        assert_eq!(p.requests.len(), 1);
        assert!(p.sweep.is_empty());
    }

    #[test]
    fn threads_never_outnumber_connections() {
        let p = plan(&["http://127.0.0.1:1/", "-c", "1", "-t", "8"]).unwrap();
        assert_eq!(p.threads, 1);
    }

    #[test]
    fn limits_are_enforced() {
        assert!(plan(&["http://127.0.0.1:1/", "-c", "0"]).is_err());
        assert!(plan(&["http://127.0.0.1:1/", "-c", "20001"]).is_err());
        assert!(plan(&["http://127.0.0.1:1/", "--rate", "0"]).is_err());
        assert!(plan(&["http://127.0.0.1:1/", "-n", "0"]).is_err());
        assert!(plan(&["http://127.0.0.1:1/", "--response-bytes-max", "0"]).is_err());
        assert!(plan(&["http://127.0.0.1:1/", "--duration", "1s", "-n", "5"]).is_err());
        assert!(plan(&["http://127.0.0.1:1/", "--rate", "5", "--sweep", "1,2"]).is_err());
    }

    #[test]
    fn open_loop_and_request_count_are_parsed() {
        let p = plan(&["http://127.0.0.1:1/", "--rate", "250", "-n", "100"]).unwrap();
        assert_eq!(p.load, Load::Open { rate_per_s: 250.0 });
        assert_eq!(p.stop, Stop::Requests(100));
    }
}
