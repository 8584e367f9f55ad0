//! Instant arithmetic that cannot panic. chrono's `+` and `-` panic past year ±262143;
//! every instant backvault accepts is bounded (`text::check_instant`), so these saturate
//! only for values no request can carry, and no input can crash a caller.

use chrono::{DateTime, TimeDelta, Utc};

/// `at + by`, or the latest instant chrono holds.
pub fn later(at: DateTime<Utc>, by: TimeDelta) -> DateTime<Utc> {
    at.checked_add_signed(by)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `at - by`, or the earliest instant chrono holds.
pub fn earlier(at: DateTime<Utc>, by: TimeDelta) -> DateTime<Utc> {
    at.checked_sub_signed(by)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `minutes` as a duration, saturating at chrono's bounds.
pub fn minutes(minutes: i64) -> TimeDelta {
    TimeDelta::try_minutes(minutes).unwrap_or(if minutes < 0 {
        TimeDelta::MIN
    } else {
        TimeDelta::MAX
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_at_the_ends_of_time() {
        let at: DateTime<Utc> = "2026-11-30T10:00:00Z".parse().unwrap();
        assert_eq!(later(at, TimeDelta::hours(1)), at + TimeDelta::hours(1));
        assert_eq!(earlier(at, TimeDelta::hours(1)), at - TimeDelta::hours(1));
        assert_eq!(
            later(DateTime::<Utc>::MAX_UTC, TimeDelta::days(1)),
            DateTime::<Utc>::MAX_UTC
        );
        assert_eq!(
            earlier(DateTime::<Utc>::MIN_UTC, TimeDelta::days(1)),
            DateTime::<Utc>::MIN_UTC
        );
        assert_eq!(minutes(i64::MAX), TimeDelta::MAX);
        assert_eq!(minutes(i64::MIN), TimeDelta::MIN);
        assert_eq!(minutes(90), TimeDelta::minutes(90));
    }
}
