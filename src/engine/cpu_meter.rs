//! A core's CPU use over the last tick, read from `/proc/stat`: the sample the
//! scheduler's scale-out and scale-in decisions take (see
//! [`crate::functions::sched::Tick`]).

/// Busy and total jiffies of one CPU at the last sample, and the busy share between the last two.
#[derive(Default)]
pub struct CpuMeter {
    busy: u64,
    total: u64,
    busy_pct: u64,
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
