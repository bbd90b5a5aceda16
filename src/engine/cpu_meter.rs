//! A core's CPU use over the last tick, read from `/proc/stat`, and the worker
//! thread's own share of it: the samples the scheduler's scale-out and
//! scale-in decisions take (see [`crate::functions::sched::Tick`]).

use std::time::Duration;

/// Busy and total jiffies of one CPU at the last sample, and the busy share
/// between the last two; the calling thread's CPU time at its last sample.
#[derive(Default)]
pub struct CpuMeter {
    busy: u64,
    total: u64,
    busy_pct: u64,
    own_ns: Option<u64>,
}

impl CpuMeter {
    /// Takes a sample for `cpu`; returns its busy percentage since the previous
    /// one (the last known value if `/proc/stat` cannot be read).
    pub fn sample(&mut self, cpu: usize) -> u64 {
        if let Some((busy, total)) = read(cpu) {
            if self.total > 0 && total > self.total {
                self.busy_pct = (busy - self.busy.min(busy)) * 100 / (total - self.total);
            }
            self.busy = busy;
            self.total = total;
        }
        self.busy_pct
    }

    /// CPU time the calling thread (the core's worker) used since its previous
    /// call; zero on the first.
    pub fn own_cpu(&mut self) -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec we pass and nothing else.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
            return Duration::ZERO;
        }
        let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        let since = self.own_ns.map_or(0, |prev| now.saturating_sub(prev));
        self.own_ns = Some(now);
        Duration::from_nanos(since)
    }
}

/// Busy (everything but idle and iowait) and total jiffies of `cpu`.
fn read(cpu: usize) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let name = format!("cpu{cpu} ");
    let line = stat.lines().find(|l| l.starts_with(&name))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4]; // idle + iowait
    Some((total - idle, total))
}
