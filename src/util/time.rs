//! Wall-clock time since the Unix epoch, for timestamps that leave the process (function
//! metadata, log lines, deadlines sent to the guest), and civil dates of day counts.
//! Intervals use `Instant` instead.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// Milliseconds since the Unix epoch at an earlier instant `at` (an event
/// loop's cached "now"), never later than the clock read then: a deadline sent
/// to a guest counted from a wall-clock reading taken after `at` would grant
/// more than the timeout by the time in between (CI caught a handler seeing
/// 2,001 ms left of a 2,000 ms timeout). The clock is read before the instant,
/// so the ordering errs to the early side too.
pub fn unix_time_ms_at(at: Instant) -> u64 {
    let wall = since_unix_epoch();
    let since = Instant::now().saturating_duration_since(at);
    wall.saturating_sub(since).as_millis() as u64
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's method).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (Howard Hinnant's method).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
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

    #[test]
    fn the_time_at_an_earlier_instant_is_not_read_later() {
        let at = Instant::now();
        let then = unix_time_ms();
        std::thread::sleep(Duration::from_millis(30));
        let ms = unix_time_ms_at(at);
        assert!(ms <= then, "{ms} <= {then}");
        assert!(then - ms < 1000, "{ms} is close to {then}");
        assert!(unix_time_ms_at(Instant::now() + Duration::from_secs(1)) >= then);
    }
}
