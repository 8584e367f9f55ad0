//! Restoring from recovery points: which continuous time ranges a database can be
//! restored to, the ordered list of points that brings it to a given instant, and where a
//! restore may write.
//!
//! A log backup covers the instants after the previous log backup up to its own end; it
//! applies on top of a full or differential when its log-sequence range contains the end
//! of that base. A break in the log-sequence chain ends a range.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::agent::RecoveryPointType;
use crate::violation::{Violation, Violations};

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Point {
    pub id: Uuid,
    pub backup_type: RecoveryPointType,
    pub backup_time: DateTime<Utc>,
    /// Logs: the end of the previous log backup.
    pub log_from: Option<DateTime<Utc>>,
    pub first_lsn: u128,
    pub last_lsn: u128,
    pub full_id: Option<Uuid>,
    pub size_bytes: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct TimeRange {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// How a step of a restore sequence ends: `WITH NORECOVERY` leaves the database restoring,
/// ready for the next step; `WITH RECOVERY` (the last step only) brings it online.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Recovery {
    NoRecovery,
    Recovery,
}

/// The statement a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RestoreStatement {
    /// `RESTORE DATABASE` from a full, copy-only full or differential backup.
    RestoreDatabase,
    /// `RESTORE LOG`.
    RestoreLog,
}

/// One statement of a restore sequence, in order: exactly what the agent runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RestoreStep {
    pub recovery_point_id: Uuid,
    pub statement: RestoreStatement,
    pub backup_type: RecoveryPointType,
    pub backup_time: DateTime<Utc>,
    /// The backup set to read (`msdb`'s identifier), when its agent reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_set_uuid: Option<Uuid>,
    pub first_lsn: String,
    pub last_lsn: String,
    pub recovery: Recovery,
    /// `STOPAT`: the last log step, when the target instant lies inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_at: Option<DateTime<Utc>>,
}

/// A restore job's payload: the target, what to do with a database already there, and
/// the statements to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RestoreJobPayload {
    pub target_database: String,
    pub target_instance: String,
    /// A database of that name exists on the target and is replaced.
    pub overwrite: bool,
    /// Before the first step: `BACKUP LOG … WITH NORECOVERY` of the database being
    /// overwritten, so no work since its last log backup is lost; reported as the result's
    /// `tail_log_backup`.
    #[serde(default)]
    pub tail_log_backup: bool,
    /// The first step runs `WITH REPLACE`: the database is overwritten without a tail-log
    /// backup (what it logged since its last log backup is lost).
    #[serde(default)]
    pub replace: bool,
    pub restores_to: DateTime<Utc>,
    pub steps: Vec<RestoreStep>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// No full backup before the instant.
    NoFullBefore,
    /// The log chain does not reach the instant (a gap, or no log yet).
    NotCovered { restorable: Vec<TimeRange> },
}

/// Continuous ranges a database can be restored to: from each full (or differential)
/// through the logs that chain on it. `points` in any order.
pub fn restorable_ranges(points: &[Point]) -> Vec<TimeRange> {
    let mut sorted: Vec<&Point> = points.iter().collect();
    // At the same instant a log ends before a full or differential begins.
    sorted.sort_by_key(|p| (p.backup_time, p.backup_type != RecoveryPointType::Log));
    let mut ranges: Vec<TimeRange> = Vec::new();
    // The open range and the LSN its next log must start at.
    let mut open: Option<(TimeRange, u128)> = None;
    let close = |open: &mut Option<(TimeRange, u128)>, ranges: &mut Vec<TimeRange>| {
        if let Some((r, _)) = open.take() {
            ranges.push(r);
        }
    };
    for p in sorted {
        match p.backup_type {
            RecoveryPointType::Full | RecoveryPointType::Differential => match &mut open {
                Some((r, _)) => r.to = r.to.max(p.backup_time),
                None => {
                    open = Some((
                        TimeRange {
                            from: p.backup_time,
                            to: p.backup_time,
                        },
                        p.last_lsn,
                    ));
                }
            },
            RecoveryPointType::Log => match &mut open {
                Some((r, next)) if p.first_lsn <= *next && *next <= p.last_lsn => {
                    r.to = p.backup_time;
                    *next = p.last_lsn;
                }
                Some(_) => close(&mut open, &mut ranges),
                None => {}
            },
            RecoveryPointType::CopyOnlyFull => ranges.push(TimeRange {
                from: p.backup_time,
                to: p.backup_time,
            }),
        }
    }
    close(&mut open, &mut ranges);
    ranges.sort_by_key(|r| r.from);
    // Copy-only points inside a range add nothing.
    let mut merged: Vec<TimeRange> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.from <= last.to => last.to = last.to.max(r.to),
            _ => merged.push(r),
        }
    }
    merged
}

/// The points to restore, in order, to reach `at`: the latest full at or before it, the
/// latest differential on that full at or before it, then the logs up to the one that
/// covers `at`.
pub fn plan_to(points: &[Point], at: DateTime<Utc>) -> Result<Vec<Point>, PlanError> {
    let mut fulls: Vec<&Point> = points
        .iter()
        .filter(|p| {
            matches!(
                p.backup_type,
                RecoveryPointType::Full | RecoveryPointType::CopyOnlyFull
            ) && p.backup_time <= at
        })
        .collect();
    fulls.sort_by_key(|p| std::cmp::Reverse(p.backup_time));
    if fulls.is_empty() {
        return Err(PlanError::NoFullBefore);
    }
    // Try the latest full first; an older one may still reach `at` through its logs.
    for full in fulls {
        if full.backup_time == at {
            return Ok(vec![full.clone()]);
        }
        if full.backup_type == RecoveryPointType::CopyOnlyFull {
            continue;
        }
        let base = points
            .iter()
            .filter(|p| {
                p.backup_type == RecoveryPointType::Differential
                    && p.full_id == Some(full.id)
                    && p.backup_time <= at
            })
            .max_by_key(|p| p.backup_time);
        let mut plan = vec![full.clone()];
        let mut next_lsn = full.last_lsn;
        let mut reached = full.backup_time;
        if let Some(diff) = base {
            plan.push(diff.clone());
            next_lsn = diff.last_lsn;
            reached = diff.backup_time;
        }
        if reached == at {
            return Ok(plan);
        }
        let mut logs: Vec<&Point> = points
            .iter()
            .filter(|p| p.backup_type == RecoveryPointType::Log && p.backup_time > reached)
            .collect();
        logs.sort_by_key(|p| p.backup_time);
        for log in logs {
            if !(log.first_lsn <= next_lsn && next_lsn <= log.last_lsn) {
                break;
            }
            plan.push(log.clone());
            next_lsn = log.last_lsn;
            if log.backup_time >= at {
                return Ok(plan);
            }
        }
    }
    Err(PlanError::NotCovered {
        restorable: restorable_ranges(points),
    })
}

/// Where a database's backup chain stands before a new point arrives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainTip {
    /// First LSN of the latest full: what a differential's base must be.
    pub full_first_lsn: Option<u128>,
    /// Where the next log must start: the previous log's end, or (before any log) the
    /// latest full's end, which a first log may start at or before.
    pub log_end_lsn: Option<u128>,
    pub log_chain_started: bool,
}

/// Whether a new point breaks the chain: a differential whose base is not the latest full,
/// or a log that does not continue the log chain (another tool took a log backup) or has
/// no full under it. Fulls and copy-only fulls never break it.
pub fn breaks_chain(
    tip: ChainTip,
    kind: RecoveryPointType,
    first_lsn: u128,
    database_backup_lsn: u128,
) -> bool {
    match kind {
        RecoveryPointType::Full | RecoveryPointType::CopyOnlyFull => false,
        RecoveryPointType::Differential => tip.full_first_lsn != Some(database_backup_lsn),
        RecoveryPointType::Log => match (tip.full_first_lsn, tip.log_end_lsn) {
            (None, _) | (_, None) => true,
            (Some(_), Some(end)) if tip.log_chain_started => first_lsn != end,
            (Some(_), Some(end)) => first_lsn > end,
        },
    }
}

/// Databases SQL Server needs to run; restoring over one takes the instance down or is
/// refused outright, so backvault never offers it.
pub const SYSTEM_DATABASES: [&str; 4] = ["master", "model", "msdb", "tempdb"];

pub fn is_system_database(name: &str) -> bool {
    SYSTEM_DATABASES
        .iter()
        .any(|s| s.eq_ignore_ascii_case(name))
}

/// What the server knows of the instance a restore would write to.
#[derive(Debug, Clone, Copy)]
pub struct RestoreTargetFacts<'a> {
    pub database: &'a str,
    pub overwrite: bool,
    /// The instance exists on the target VM (at its latest discovery).
    pub instance_found: bool,
    /// Present databases of the target instance at its latest discovery.
    pub existing_databases: &'a [&'a str],
}

/// Every reason a restore may not write `database` on the target instance. The name
/// obeys the rules of a protectable database name and SQL Server's `sysname`; system
/// databases are never targets; a database that exists there is overwritten only when
/// asked (SQL Server would refuse without `REPLACE`, Msg 3154; comparing names ignoring
/// case, as SQL Server's default collation does).
pub fn check_restore_target(t: RestoreTargetFacts<'_>) -> Vec<Violation> {
    let mut v = Violations::default();
    let chars = t.database.chars().count();
    if chars == 0 || chars > crate::agent::MAX_SQL_NAME_CHARS {
        v.push(
            "/target_database",
            "restore_target_name_invalid",
            "a database name has 1 to 128 characters (SQL Server's sysname)",
        );
    } else if t.database.chars().any(char::is_control)
        || crate::protection::name_issue(t.database)
            == Some(crate::protection::NameIssue::UnsupportedCharacters)
    {
        v.push(
            "/target_database",
            "restore_target_name_invalid",
            "a database name has no control characters, no leading or trailing spaces, no trailing '!', and none of ']' ';' '/'",
        );
    }
    if is_system_database(t.database) {
        v.push(
            "/target_database",
            "restore_target_system_database",
            "master, model, msdb and tempdb are never restore targets; restore under another name",
        );
    }
    if !t.instance_found {
        v.push(
            "/target_instance",
            "restore_target_instance_not_found",
            "the target VM has no such SQL Server instance at its latest discovery; rediscover it or choose another",
        );
    } else if !t.overwrite
        && t.existing_databases
            .iter()
            .any(|d| d.eq_ignore_ascii_case(t.database))
    {
        v.push(
            "/overwrite",
            "UserErrorCannotRestoreExistingDBWithoutForceOverwrite",
            "a database of this name exists on the target instance; set overwrite: true to replace it, or choose another name",
        );
    }
    v.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(minutes: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap()
            + chrono::Duration::minutes(minutes)
    }

    /// A chain like the reference agent makes: a full at 0 (LSN 100..110), logs every 15
    /// minutes continuing the log chain, a differential at 60.
    fn chain() -> Vec<Point> {
        let full = Point {
            id: Uuid::from_u128(1),
            backup_type: RecoveryPointType::Full,
            backup_time: t(0),
            log_from: None,
            first_lsn: 100,
            last_lsn: 110,
            full_id: None,
            size_bytes: 1000,
        };
        let mut points = vec![full];
        let mut lsn = 90;
        for i in 1..=6 {
            let next = 100 + i * 20;
            points.push(Point {
                id: Uuid::from_u128(10 + i),
                backup_type: RecoveryPointType::Log,
                backup_time: t(i as i64 * 15),
                log_from: Some(t((i as i64 - 1) * 15)),
                first_lsn: lsn,
                last_lsn: next,
                full_id: Some(Uuid::from_u128(1)),
                size_bytes: 10,
            });
            lsn = next;
        }
        points.push(Point {
            id: Uuid::from_u128(2),
            backup_type: RecoveryPointType::Differential,
            backup_time: t(60),
            log_from: None,
            first_lsn: 181,
            last_lsn: 185,
            full_id: Some(Uuid::from_u128(1)),
            size_bytes: 100,
        });
        points
    }

    fn ids(plan: &[Point]) -> Vec<u128> {
        plan.iter().map(|p| p.id.as_u128()).collect()
    }

    #[test]
    fn plan_uses_full_then_logs() {
        let plan = plan_to(&chain(), t(40)).unwrap();
        assert_eq!(ids(&plan), [1, 11, 12, 13]);
    }

    #[test]
    fn plan_prefers_the_latest_differential() {
        let plan = plan_to(&chain(), t(80)).unwrap();
        assert_eq!(ids(&plan), [1, 2, 15, 16]);
        assert_eq!(ids(&plan_to(&chain(), t(60)).unwrap()), [1, 2]);
    }

    #[test]
    fn uncovered_instants_are_errors_with_the_ranges() {
        assert_eq!(plan_to(&chain(), t(-5)), Err(PlanError::NoFullBefore));
        match plan_to(&chain(), t(200)) {
            Err(PlanError::NotCovered { restorable }) => assert_eq!(
                restorable,
                [TimeRange {
                    from: t(0),
                    to: t(90)
                }]
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_log_gap_ends_the_range() {
        let mut points = chain();
        // Another tool took a log backup: the log at 45 does not continue the chain.
        let gap = points.iter_mut().find(|p| p.id.as_u128() == 13).unwrap();
        gap.first_lsn = 155;
        gap.last_lsn = 160;
        let ranges = restorable_ranges(&points);
        assert_eq!(
            ranges,
            [
                TimeRange {
                    from: t(0),
                    to: t(30)
                },
                TimeRange {
                    from: t(60),
                    to: t(90)
                }
            ],
            "the gap ends a range; the differential at 60 starts the next"
        );
        assert!(plan_to(&points, t(50)).is_err());
        assert_eq!(ids(&plan_to(&points, t(75)).unwrap()), [1, 2, 15]);
    }

    #[test]
    fn chain_breaks() {
        use RecoveryPointType::*;
        let after_full = ChainTip {
            full_first_lsn: Some(100),
            log_end_lsn: Some(110),
            log_chain_started: false,
        };
        assert!(
            !breaks_chain(after_full, Log, 110, 100),
            "a first log may start at the full's end"
        );
        assert!(!breaks_chain(after_full, Log, 90, 100), "or before it");
        assert!(breaks_chain(after_full, Log, 111, 100), "not after it");
        let logging = ChainTip {
            log_chain_started: true,
            ..after_full
        };
        assert!(!breaks_chain(logging, Log, 110, 100));
        assert!(
            breaks_chain(logging, Log, 90, 100),
            "a later log continues exactly"
        );
        assert!(!breaks_chain(logging, Differential, 120, 100));
        assert!(
            breaks_chain(logging, Differential, 120, 99),
            "a differential of another full"
        );
        assert!(
            breaks_chain(ChainTip::default(), Log, 1, 1),
            "no full under it"
        );
        assert!(!breaks_chain(ChainTip::default(), Full, 1, 1));
    }

    proptest! {
        /// Every instant inside a restorable range has a plan, and every plan ends at or
        /// after its instant, in time order, starting with a full.
        #[test]
        fn ranges_and_plans_agree(minute in 0i64..=90) {
            let points = chain();
            let at = t(minute);
            let covered = restorable_ranges(&points).iter().any(|r| r.from <= at && at <= r.to);
            let plan = plan_to(&points, at);
            prop_assert_eq!(covered, plan.is_ok());
            if let Ok(plan) = plan {
                prop_assert_eq!(plan[0].backup_type, RecoveryPointType::Full);
                prop_assert!(plan.last().unwrap().backup_time >= at);
                prop_assert!(plan.windows(2).all(|w| w[0].backup_time < w[1].backup_time));
            }
        }
    }

    fn target_codes(database: &str, overwrite: bool, instance_found: bool) -> Vec<&'static str> {
        check_restore_target(RestoreTargetFacts {
            database,
            overwrite,
            instance_found,
            existing_databases: &["sales", "Orders"],
        })
        .into_iter()
        .map(|v| v.code)
        .collect()
    }

    #[test]
    fn a_new_name_on_a_known_instance_is_a_fine_target() {
        assert!(target_codes("sales_copy", false, true).is_empty());
    }

    #[test]
    fn existing_databases_are_overwritten_only_when_asked() {
        assert_eq!(
            target_codes("SALES", false, true),
            ["UserErrorCannotRestoreExistingDBWithoutForceOverwrite"]
        );
        assert!(target_codes("orders", true, true).is_empty());
    }

    #[test]
    fn system_databases_are_never_targets() {
        for name in ["master", "MSDB", "model", "tempdb"] {
            assert_eq!(
                target_codes(name, true, true),
                ["restore_target_system_database"],
                "{name}"
            );
        }
    }

    #[test]
    fn names_follow_sysname_and_the_name_rules() {
        for bad in [
            "",
            "x]; DROP DATABASE y; --",
            " lead",
            "trail!",
            "tab\tname",
            &"d".repeat(129),
        ] {
            assert_eq!(
                target_codes(bad, false, true),
                ["restore_target_name_invalid"],
                "{bad:?}"
            );
        }
        assert!(target_codes(&"d".repeat(128), false, true).is_empty());
    }

    #[test]
    fn the_instance_must_exist() {
        assert_eq!(
            target_codes("sales_copy", false, false),
            ["restore_target_instance_not_found"]
        );
    }
}
