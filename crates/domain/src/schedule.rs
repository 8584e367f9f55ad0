//! When backups run. Full and differential backups run at a local time of day in the
//! policy's zone; log backups run every N minutes of elapsed time.
//!
//! Daylight saving time, decided once here and documented in `docs/rules.md`:
//! - A local time that does not exist (02:30 on a spring-forward day in Europe) runs at the
//!   same distance past the jump, i.e. shifted forward by the gap (03:30 local).
//! - A local time that exists twice (02:30 on an autumn fall-back day) runs once, at the
//!   first occurrence.
//! - Log backups are elapsed-time intervals aligned to multiples of the frequency since
//!   1970-01-01T00:00Z, so the recovery-point objective holds across a change; in zones with
//!   whole-hour offsets they fall on the local clock's quarter, half or whole hours.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Days, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

use crate::jobs::JobKind;
use crate::policy::{Policy, Weekday};

/// The instant of a local wall-clock time, with the DST rules of this module.
pub fn resolve_local(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    if let Some(at) = tz.from_local_datetime(&local).earliest() {
        return at.with_timezone(&Utc);
    }
    // In a gap: apply the offset in force before the jump, which lands past the gap by the
    // same distance. Transitions are months apart, so a day earlier is before it.
    let before = local
        .checked_sub_signed(chrono::Duration::days(1))
        .unwrap_or(local);
    let offset = tz
        .from_local_datetime(&before)
        .earliest()
        .map(|d| d.offset().fix())
        .unwrap_or_else(|| tz.offset_from_utc_datetime(&local).fix());
    let utc = local.checked_sub_offset(offset).unwrap_or(local);
    Utc.from_utc_datetime(&utc)
}

use chrono::Offset;

/// Slots at `time` local on the given weekdays, strictly after `after`, in increasing order.
pub fn weekly_slots(
    tz: Tz,
    days: &BTreeSet<Weekday>,
    time: NaiveTime,
    after: DateTime<Utc>,
) -> impl Iterator<Item = DateTime<Utc>> + '_ {
    // Start a day early: a slot on the previous local date can still be after `after` when
    // a gap shift moves it forward.
    let local = after.with_timezone(&tz).date_naive();
    let start = local.checked_sub_days(Days::new(1)).unwrap_or(local);
    let dates = (0..).map_while(move |i| start.checked_add_days(Days::new(i)));
    dates
        .filter(move |date: &NaiveDate| days.contains(&Weekday::from(date.weekday())))
        .map(move |date| resolve_local(tz, date.and_time(time)))
        .filter(move |at| *at > after)
}

/// A log interval in seconds; never zero, so a policy that escaped validation cannot divide
/// by it.
fn interval_seconds(frequency_minutes: u32) -> i64 {
    i64::from(frequency_minutes.max(1)).saturating_mul(60)
}

/// Log slots every `frequency_minutes`, strictly after `after`.
pub fn interval_slots(
    frequency_minutes: u32,
    after: DateTime<Utc>,
) -> impl Iterator<Item = DateTime<Utc>> {
    let step = interval_seconds(frequency_minutes);
    let first = after
        .timestamp()
        .div_euclid(step)
        .saturating_add(1)
        .saturating_mul(step);
    (0..).map_while(move |i: i64| {
        i.checked_mul(step)
            .and_then(|offset| first.checked_add(offset))
            .and_then(|at| DateTime::from_timestamp(at, 0))
    })
}

/// The latest interval slot at or before `at`.
pub fn interval_slot_at_or_before(frequency_minutes: u32, at: DateTime<Utc>) -> DateTime<Utc> {
    let step = interval_seconds(frequency_minutes);
    DateTime::from_timestamp(at.timestamp().div_euclid(step).saturating_mul(step), 0).unwrap_or(at)
}

impl Policy {
    pub fn full_runs(&self, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        weekly_slots(self.time_zone, &self.full.days, self.full.time, after)
    }

    /// Differential runs; empty when the policy has none.
    pub fn differential_runs(
        &self,
        after: DateTime<Utc>,
    ) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        self.differential
            .iter()
            .flat_map(move |d| weekly_slots(self.time_zone, &d.days, d.time, after))
    }

    /// Log runs; empty when the policy has none.
    pub fn log_runs(&self, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        self.log
            .iter()
            .flat_map(move |l| interval_slots(l.frequency_minutes, after))
    }
}

/// What the scheduler needs of one backup type at an instant: the latest slot at or
/// before it (due unless already taken) and the first slot after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotWindow {
    pub due: Option<DateTime<Utc>>,
    pub next: DateTime<Utc>,
}

impl Policy {
    fn window(
        &self,
        now: DateTime<Utc>,
        runs: impl Fn(DateTime<Utc>) -> Option<DateTime<Utc>>,
        lookback: chrono::Duration,
    ) -> Option<SlotWindow> {
        let next = runs(now)?;
        let mut due = None;
        let mut cursor = crate::instants::earlier(now, lookback);
        while let Some(run) = runs(cursor).filter(|r| *r <= now) {
            due = Some(run);
            cursor = run;
        }
        Some(SlotWindow { due, next })
    }

    pub fn full_window(&self, now: DateTime<Utc>) -> SlotWindow {
        self.window(now, |t| self.full_runs(t).next(), chrono::Duration::days(8))
            .expect("a valid policy has full runs")
    }

    pub fn differential_window(&self, now: DateTime<Utc>) -> Option<SlotWindow> {
        self.window(
            now,
            |t| self.differential_runs(t).next(),
            chrono::Duration::days(8),
        )
    }

    pub fn log_window(&self, now: DateTime<Utc>) -> Option<SlotWindow> {
        let log = self.log?;
        Some(SlotWindow {
            due: Some(interval_slot_at_or_before(log.frequency_minutes, now)),
            next: interval_slots(log.frequency_minutes, now).next()?,
        })
    }

    /// The backup types whose slot a scheduler tick at `now` claims, each with the slot
    /// after `now`: those whose schedule has not started (`next_at` gives `None`) and those
    /// whose next slot has come.
    pub fn slots_to_claim(
        &self,
        now: DateTime<Utc>,
        next_at: impl Fn(JobKind) -> Option<DateTime<Utc>>,
    ) -> Vec<(JobKind, DateTime<Utc>)> {
        [
            (JobKind::BackupFull, Some(self.full_window(now))),
            (JobKind::BackupDifferential, self.differential_window(now)),
            (JobKind::BackupLog, self.log_window(now)),
        ]
        .into_iter()
        .filter_map(|(kind, window)| Some((kind, window?.next)))
        .filter(|(kind, _)| next_at(*kind).is_none_or(|next| next <= now))
        .collect()
    }

    /// The backup types whose slots this version of a policy moves compared with `before`:
    /// their schedules start afresh (the first run is the next slot of the new schedule).
    /// The others keep their place, so a retention-only change skips no due slot.
    pub fn rescheduled_since(&self, before: &Policy) -> Vec<JobKind> {
        let zone_moved = self.time_zone != before.time_zone;
        let mut kinds = Vec::new();
        if zone_moved || self.full != before.full {
            kinds.push(JobKind::BackupFull);
        }
        let differential_slots =
            |p: &Policy| p.differential.as_ref().map(|d| (d.days.clone(), d.time));
        if zone_moved || differential_slots(self) != differential_slots(before) {
            kinds.push(JobKind::BackupDifferential);
        }
        // Log slots are elapsed-time intervals: the zone does not move them.
        let log_slots = |p: &Policy| p.log.map(|l| l.frequency_minutes);
        if log_slots(self) != log_slots(before) {
            kinds.push(JobKind::BackupLog);
        }
        kinds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicySpec, Weekday::*};
    use chrono::Timelike;
    use proptest::prelude::*;
    use serde_json::json;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn policy(v: serde_json::Value) -> Policy {
        serde_json::from_value::<PolicySpec>(v)
            .unwrap()
            .validate("")
            .unwrap()
    }

    fn weekly_amsterdam(time: &str) -> Policy {
        policy(json!({
            "time_zone": "Europe/Amsterdam",
            "full": {"frequency": "weekly", "days": ["sunday"], "time": time},
            "differential": {"days": ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday"], "time": time, "retention_days": 30},
            "log": {"frequency_minutes": 15, "retention_days": 30},
            "retention": {"weekly": {"weeks": 8}}
        }))
    }

    #[test]
    fn a_tick_claims_unstarted_and_due_schedules_only() {
        let p = weekly_amsterdam("22:00");
        let now = utc("2027-01-04T10:07:00Z");
        let kinds = |next: [Option<&str>; 3]| -> Vec<(JobKind, DateTime<Utc>)> {
            p.slots_to_claim(now, |kind| {
                let i = JobKind::SCHEDULED.iter().position(|k| *k == kind).unwrap();
                next[i].map(utc)
            })
        };
        let all = kinds([None, None, None]);
        assert_eq!(
            all,
            [
                (JobKind::BackupFull, utc("2027-01-10T21:00:00Z")),
                (JobKind::BackupDifferential, utc("2027-01-04T21:00:00Z")),
                (JobKind::BackupLog, utc("2027-01-04T10:15:00Z")),
            ],
            "schedules start at the slot after now"
        );
        let later = kinds([
            Some("2027-01-10T21:00:00Z"),
            Some("2027-01-04T21:00:00Z"),
            Some("2027-01-04T10:15:00Z"),
        ]);
        assert!(later.is_empty(), "nothing due: {later:?}");
        let log_due = kinds([
            Some("2027-01-10T21:00:00Z"),
            Some("2027-01-04T21:00:00Z"),
            Some("2027-01-04T10:00:00Z"),
        ]);
        assert_eq!(log_due, [(JobKind::BackupLog, utc("2027-01-04T10:15:00Z"))]);
        let daily_no_log = policy(json!({
            "time_zone": "UTC",
            "full": {"frequency": "daily", "time": "00:00"},
            "retention": {"daily": {"days": 7}}
        }));
        assert_eq!(
            daily_no_log
                .slots_to_claim(now, |_| None)
                .iter()
                .map(|(k, _)| *k)
                .collect::<Vec<_>>(),
            [JobKind::BackupFull],
            "no differential or log schedule, no claim"
        );
    }

    #[test]
    fn only_moved_schedules_start_afresh() {
        let base = weekly_amsterdam("02:30");
        let spec = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = json!({
                "time_zone": "Europe/Amsterdam",
                "full": {"frequency": "weekly", "days": ["sunday"], "time": "02:30"},
                "differential": {"days": ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday"], "time": "02:30", "retention_days": 30},
                "log": {"frequency_minutes": 15, "retention_days": 30},
                "retention": {"weekly": {"weeks": 8}}
            });
            f(&mut v);
            policy(v)
        };
        assert!(spec(&|_| {}).rescheduled_since(&base).is_empty());
        let retention_only = spec(&|v| {
            v["log"]["retention_days"] = json!(7);
            v["differential"]["retention_days"] = json!(14);
            v["retention"]["weekly"]["weeks"] = json!(4);
        });
        assert!(retention_only.rescheduled_since(&base).is_empty());
        assert_eq!(
            spec(&|v| v["full"]["time"] = json!("03:00")).rescheduled_since(&base),
            [JobKind::BackupFull]
        );
        assert_eq!(
            spec(&|v| v["log"]["frequency_minutes"] = json!(60)).rescheduled_since(&base),
            [JobKind::BackupLog]
        );
        assert_eq!(
            spec(&|v| v["differential"]["days"] = json!(["monday"])).rescheduled_since(&base),
            [JobKind::BackupDifferential]
        );
        assert_eq!(
            spec(&|v| v["time_zone"] = json!("UTC")).rescheduled_since(&base),
            [JobKind::BackupFull, JobKind::BackupDifferential],
            "a zone moves local times, not log intervals"
        );
        assert_eq!(
            spec(&|v| {
                v.as_object_mut().unwrap().remove("log");
            })
            .rescheduled_since(&base),
            [JobKind::BackupLog]
        );
    }

    #[test]
    fn daily_full_runs_at_local_time() {
        let p = policy(json!({
            "time_zone": "America/New_York",
            "full": {"frequency": "daily", "time": "22:30"},
            "retention": {"daily": {"days": 30}}
        }));
        // 2026-11-24T00:00Z is 19:00 on Nov 23 in New York: the first run is that evening.
        let runs: Vec<_> = p.full_runs(utc("2026-11-24T00:00:00Z")).take(3).collect();
        assert_eq!(
            runs,
            [
                utc("2026-11-24T03:30:00Z"),
                utc("2026-11-25T03:30:00Z"),
                utc("2026-11-26T03:30:00Z")
            ]
        );
    }

    #[test]
    fn runs_are_strictly_after_the_given_instant() {
        let p = weekly_amsterdam("22:00");
        // Sunday 2026-11-22 22:00 CET is 21:00Z; asking from exactly then gives the next week.
        let next = p.full_runs(utc("2026-11-22T21:00:00Z")).next().unwrap();
        assert_eq!(next, utc("2026-11-29T21:00:00Z"));
    }

    #[test]
    fn spring_forward_gap_shifts_the_run_forward() {
        // Europe/Amsterdam jumps from 02:00 to 03:00 on Sunday 2027-03-28.
        let p = weekly_amsterdam("02:30");
        let run = p.full_runs(utc("2027-03-27T00:00:00Z")).next().unwrap();
        assert_eq!(run, utc("2027-03-28T01:30:00Z"));
        let local = run.with_timezone(&p.time_zone);
        assert_eq!((local.hour(), local.minute()), (3, 30));
        // The next week is back at 02:30 local (now CEST, +02:00).
        let next = p.full_runs(run).next().unwrap();
        assert_eq!(next, utc("2027-04-04T00:30:00Z"));
    }

    #[test]
    fn fall_back_repeated_hour_runs_once_at_first_occurrence() {
        // Europe/Amsterdam repeats 02:00–03:00 on Sunday 2026-10-25.
        let p = weekly_amsterdam("02:30");
        let runs: Vec<_> = p.full_runs(utc("2026-10-24T00:00:00Z")).take(2).collect();
        assert_eq!(
            runs[0],
            utc("2026-10-25T00:30:00Z"),
            "first 02:30, still CEST"
        );
        assert_eq!(runs[1], utc("2026-11-01T01:30:00Z"));
    }

    #[test]
    fn differentials_never_run_on_full_days() {
        let p = weekly_amsterdam("22:00");
        let runs: Vec<_> = p
            .differential_runs(utc("2026-11-22T00:00:00Z"))
            .take(12)
            .collect();
        assert_eq!(runs.len(), 12);
        for run in runs {
            assert_ne!(
                run.with_timezone(&p.time_zone).weekday(),
                chrono::Weekday::Sun
            );
        }
    }

    #[test]
    fn log_runs_are_elapsed_time_intervals_across_dst() {
        let p = weekly_amsterdam("22:00");
        let runs: Vec<_> = p.log_runs(utc("2027-03-28T00:50:00Z")).take(8).collect();
        assert_eq!(runs[0], utc("2027-03-28T01:00:00Z"));
        for pair in runs.windows(2) {
            assert_eq!(pair[1] - pair[0], chrono::Duration::minutes(15));
        }
    }

    #[test]
    fn windows_give_the_due_and_next_slots() {
        let p = weekly_amsterdam("22:00");
        // Wednesday 2026-11-25 12:00Z: the last full was Sunday 22:00 CET, the next is the
        // coming Sunday; the last differential was Tuesday 22:00.
        let now = utc("2026-11-25T12:00:00Z");
        let full = p.full_window(now);
        assert_eq!(full.due, Some(utc("2026-11-22T21:00:00Z")));
        assert_eq!(full.next, utc("2026-11-29T21:00:00Z"));
        let diff = p.differential_window(now).unwrap();
        assert_eq!(diff.due, Some(utc("2026-11-24T21:00:00Z")));
        assert_eq!(diff.next, utc("2026-11-25T21:00:00Z"));
        let log = p.log_window(utc("2026-11-25T12:07:00Z")).unwrap();
        assert_eq!(
            (log.due, log.next),
            (
                Some(utc("2026-11-25T12:00:00Z")),
                utc("2026-11-25T12:15:00Z")
            )
        );
    }

    #[test]
    fn policies_without_differential_or_log_have_no_runs() {
        let p = policy(json!({
            "time_zone": "UTC",
            "full": {"frequency": "daily", "time": "00:00"},
            "retention": {"daily": {"days": 7}}
        }));
        let now = utc("2026-01-01T00:00:00Z");
        assert_eq!(p.differential_runs(now).count(), 0);
        assert_eq!(p.log_runs(now).next(), None);
    }

    const ZONES: [&str; 6] = [
        "UTC",
        "Europe/Amsterdam",
        "America/New_York",
        "Australia/Lord_Howe",
        "Asia/Kolkata",
        "America/Santiago",
    ];
    const DAYS: [Weekday; 7] = [
        Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday,
    ];

    fn day_set(mask: u8) -> Vec<Weekday> {
        DAYS.iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, d)| *d)
            .collect()
    }

    prop_compose! {
        fn arb_policy()(zone in 0..ZONES.len(), full_mask in 1u8..127, hour in 0u32..24, half in any::<bool>(),
                        diff_hour in 0u32..24, log in 0..8usize) -> Policy {
            let full_days = day_set(full_mask);
            let diff_days = day_set(!full_mask & 0x7f);
            let time = format!("{hour:02}:{}", if half { "30" } else { "00" });
            let mut spec = json!({
                "time_zone": ZONES[zone],
                "full": {"frequency": "weekly", "days": full_days, "time": time},
                "log": {"frequency_minutes": crate::policy::ALLOWED_LOG_FREQUENCIES[log], "retention_days": 14},
                "retention": {"weekly": {"weeks": 4}}
            });
            if !diff_days.is_empty() {
                spec["differential"] = json!({"days": diff_days, "time": format!("{diff_hour:02}:00"), "retention_days": 14});
            }
            policy(spec)
        }
    }

    proptest! {
        #[test]
        fn schedules_increase_and_land_on_their_local_time(p in arb_policy(), start in 1_700_000_000i64..1_900_000_000) {
            let after = DateTime::from_timestamp(start, 0).unwrap();
            let fulls: Vec<_> = p.full_runs(after).take(20).collect();
            prop_assert_eq!(fulls.len(), 20);
            prop_assert!(fulls[0] > after);
            for pair in fulls.windows(2) {
                prop_assert!(pair[0] < pair[1]);
            }
            for run in &fulls {
                let local = run.with_timezone(&p.time_zone);
                prop_assert!(p.full.days.contains(&Weekday::from(local.weekday())));
                if local.time() != p.full.time {
                    // Only a spring-forward gap may move a run, and only forward.
                    prop_assert!(p.time_zone.from_local_datetime(&local.date_naive().and_time(p.full.time)).earliest().is_none());
                    prop_assert!(local.time() > p.full.time);
                }
            }
            let diffs: Vec<_> = p.differential_runs(after).take(20).collect();
            for pair in diffs.windows(2) {
                prop_assert!(pair[0] < pair[1]);
            }
            for run in &diffs {
                let day = Weekday::from(run.with_timezone(&p.time_zone).weekday());
                prop_assert!(!p.full.days.contains(&day), "differential on a full day");
                prop_assert!(p.differential.as_ref().unwrap().days.contains(&day));
            }
            let logs: Vec<_> = p.log_runs(after).take(20).collect();
            prop_assert!(logs[0] > after);
            let step = chrono::Duration::minutes(p.log.unwrap().frequency_minutes.into());
            prop_assert!(logs[0] - after <= step);
            for pair in logs.windows(2) {
                prop_assert_eq!(pair[1] - pair[0], step);
            }
        }
    }
}
