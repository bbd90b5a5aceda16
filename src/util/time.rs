//! Wall-clock time since the Unix epoch, for timestamps that leave the process (function
//! metadata, log lines, deadlines sent to the guest). Intervals use `Instant` instead.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since 1970-01-01T00:00:00Z; zero if the clock is set before it.
pub fn since_unix_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

/// Milliseconds since the Unix epoch; zero if the clock is set before it.
pub fn unix_time_ms() -> u64 {
    since_unix_epoch().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_agree_with_the_system_clock() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ms = unix_time_ms();
        let after = since_unix_epoch().as_millis() as u64;
        assert!(before <= ms && ms <= after, "{before} <= {ms} <= {after}");
        // Later than 2020-01-01: the value is in milliseconds, not seconds.
        assert!(ms > 1_577_836_800_000);
    }
}
