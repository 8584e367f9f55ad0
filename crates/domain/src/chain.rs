//! The recovery chain in SQL Server's terms: what a new backup does to a database's chain,
//! which instants the recorded backups can restore to, and the exact restore sequence
//! that reaches one. All three follow the rules SQL Server applies at `RESTORE` time:
//!
//! - A restore sequence starts with a full or copy-only full (`RESTORE DATABASE`).
//! - A differential applies on top of its base only: the full whose `checkpoint_lsn` is
//!   the differential's `differential_base_lsn` (and whose base GUID is its
//!   `differential_base_guid`, when both are known). A copy-only full is never a base; a
//!   full backvault never recorded (another tool's) makes later differentials unusable.
//! - Logs chain by LSN alone, independently of fulls: each log's `first_lsn` is the
//!   previous log's `last_lsn`. The first log applied after a data backup is the one whose
//!   range contains that backup's `last_lsn`.
//! - A data backup taken in the simple recovery model starts no log sequence; a log with
//!   bulk-logged changes restores to its end only, never to an instant inside it.
//! - Backups of different recovery forks never combine.
//!
//! A data backup with no log on it is one restorable instant, not a range.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::agent::{RecoveryModel, RecoveryPointReport, RecoveryPointType};
use crate::lsn::Lsn;
use crate::restore::{Recovery, RestoreStatement};

/// A recorded backup, as the chain sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub id: Uuid,
    pub backup_type: RecoveryPointType,
    pub backup_time: DateTime<Utc>,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    /// Data backups: the checkpoint they began with; unknown from first-version agents.
    pub checkpoint_lsn: Option<Lsn>,
    /// Differentials: their base's checkpoint (first-version agents: their
    /// `database_backup_lsn`, which SQL Server sets to the same).
    pub differential_base_lsn: Option<Lsn>,
    /// Differentials: their base's GUID; fulls: the GUID of the base they establish.
    pub differential_base_guid: Option<Uuid>,
    pub has_bulk_logged_data: bool,
    pub recovery_model: Option<RecoveryModel>,
    pub recovery_fork_guid: Option<Uuid>,
}

/// How sure a differential's match with a full is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseMatch {
    /// By the full's checkpoint LSN (and GUID where both sides have one).
    Verified,
    /// The full's checkpoint is unknown (a first-version agent): the base lies within the
    /// full's LSN range, which a checkpoint always does.
    Plausible,
    No,
}

fn same_fork(a: Option<Uuid>, b: Option<Uuid>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// Whether `full` is the base of a differential with these facts.
pub fn base_match(
    full_checkpoint: Option<Lsn>,
    full_range: (Lsn, Lsn),
    full_guid: Option<Uuid>,
    diff_base: Option<Lsn>,
    diff_guid: Option<Uuid>,
) -> BaseMatch {
    let Some(base) = diff_base else {
        return BaseMatch::No;
    };
    if let (Some(a), Some(b)) = (full_guid, diff_guid)
        && a != b
    {
        return BaseMatch::No;
    }
    match full_checkpoint {
        Some(checkpoint) if checkpoint == base => BaseMatch::Verified,
        Some(_) => BaseMatch::No,
        None if full_range.0 <= base && base <= full_range.1 => BaseMatch::Plausible,
        None => BaseMatch::No,
    }
}

impl Point {
    /// The chain's view of a reported backup; `None` when its LSNs are not LSNs (a report
    /// that passed [`RecoveryPointReport::violations`] always has them).
    pub fn from_report(id: Uuid, r: &RecoveryPointReport) -> Option<Point> {
        let optional = |raw: &Option<String>| match raw {
            Some(raw) => Lsn::parse(raw).map(Some),
            None => Some(None),
        };
        let database_backup_lsn = Lsn::parse(&r.database_backup_lsn)?;
        let differential_base_lsn = match optional(&r.differential_base_lsn)? {
            // SQL Server sets a differential's database_backup_lsn to its base's checkpoint.
            None if r.backup_type == RecoveryPointType::Differential => Some(database_backup_lsn),
            other => other,
        };
        Some(Point {
            id,
            backup_type: r.backup_type,
            backup_time: r.backup_time,
            first_lsn: Lsn::parse(&r.first_lsn)?,
            last_lsn: Lsn::parse(&r.last_lsn)?,
            checkpoint_lsn: optional(&r.checkpoint_lsn)?,
            differential_base_lsn,
            differential_base_guid: r.differential_base_guid,
            has_bulk_logged_data: r.has_bulk_logged_data == Some(true),
            recovery_model: r.recovery_model,
            recovery_fork_guid: r.recovery_fork_guid,
        })
    }

    fn is_data(&self) -> bool {
        self.backup_type != RecoveryPointType::Log
    }

    fn starts_logs(&self) -> bool {
        self.recovery_model != Some(RecoveryModel::Simple)
    }

    fn is_base_of(&self, diff: &Point) -> bool {
        self.backup_type == RecoveryPointType::Full
            && same_fork(self.recovery_fork_guid, diff.recovery_fork_guid)
            && base_match(
                self.checkpoint_lsn,
                (self.first_lsn, self.last_lsn),
                self.differential_base_guid,
                diff.differential_base_lsn,
                diff.differential_base_guid,
            ) != BaseMatch::No
    }

    /// The first log to restore after this data backup: it holds the backup's `last_lsn`
    /// and goes past it (a log ending there adds nothing: SQL Server calls it too early).
    fn enters(&self, log: &Point) -> bool {
        log.first_lsn <= self.last_lsn
            && self.last_lsn < log.last_lsn
            && same_fork(self.recovery_fork_guid, log.recovery_fork_guid)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TimeRange {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// The recorded backups of one database, indexed for walking its chains.
pub struct Catalogue<'a> {
    points: &'a [Point],
    /// Logs by `first_lsn`, each list in time order.
    logs_from: HashMap<Lsn, Vec<usize>>,
    /// Logs in `last_lsn` order.
    logs_by_end: Vec<usize>,
    /// Each differential's base full, where the catalogue holds it.
    bases: HashMap<usize, usize>,
}

/// A restore sequence: data backups, then logs, the last to `restores_to`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub steps: Vec<Step>,
    pub restores_to: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// An index into the points given.
    pub point: usize,
    pub statement: RestoreStatement,
    pub recovery: Recovery,
    pub stop_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// No full backup at or before the instant.
    NoFullBefore,
    /// No restore sequence reaches the instant.
    NotCovered { restorable: Vec<TimeRange> },
    /// The instant lies inside a log backup holding bulk-logged changes, and no other
    /// sequence reaches it: SQL Server restores such a log to its end only.
    InsideBulkLoggedLog {
        log_from: DateTime<Utc>,
        log_to: DateTime<Utc>,
    },
}

/// Why one walk does not reach an instant.
enum Miss {
    NotReached,
    InsideBulkLoggedLog(DateTime<Utc>, DateTime<Utc>),
}

/// One data backup to start from and the logs that chain on it.
struct Walk {
    data: Vec<usize>,
    logs: Vec<usize>,
}

impl<'a> Catalogue<'a> {
    pub fn new(points: &'a [Point]) -> Self {
        let mut logs_from: HashMap<Lsn, Vec<usize>> = HashMap::new();
        let mut logs_by_end = Vec::new();
        for (i, p) in points.iter().enumerate() {
            if p.backup_type == RecoveryPointType::Log {
                logs_from.entry(p.first_lsn).or_default().push(i);
                logs_by_end.push(i);
            }
        }
        for list in logs_from.values_mut() {
            list.sort_by_key(|&i| (points[i].backup_time, i));
        }
        logs_by_end.sort_by_key(|&i| (points[i].last_lsn, points[i].backup_time, i));
        let fulls: Vec<usize> = (0..points.len())
            .filter(|&i| points[i].backup_type == RecoveryPointType::Full)
            .collect();
        let mut bases = HashMap::new();
        for (d, diff) in points.iter().enumerate() {
            if diff.backup_type != RecoveryPointType::Differential {
                continue;
            }
            // The latest matching full before it: a checkpoint LSN names one full.
            if let Some(&f) = fulls
                .iter()
                .filter(|&&f| points[f].backup_time <= diff.backup_time)
                .filter(|&&f| points[f].is_base_of(diff))
                .max_by_key(|&&f| (points[f].backup_time, f))
            {
                bases.insert(d, f);
            }
        }
        Self {
            points,
            logs_from,
            logs_by_end,
            bases,
        }
    }

    /// The full a differential restores on, if the catalogue holds it.
    pub fn base_of(&self, diff: usize) -> Option<usize> {
        self.bases.get(&diff).copied()
    }

    /// The data backups a restore sequence can start from (in restore order), for every
    /// full, copy-only full and differential whose base is here.
    fn starts(&self) -> impl Iterator<Item = Vec<usize>> + '_ {
        self.points
            .iter()
            .enumerate()
            .filter_map(move |(i, p)| match p.backup_type {
                RecoveryPointType::Full | RecoveryPointType::CopyOnlyFull => Some(vec![i]),
                RecoveryPointType::Differential => self.base_of(i).map(|f| vec![f, i]),
                RecoveryPointType::Log => None,
            })
    }

    /// The log entered after data backup `d`: the earliest-ending log that holds its last
    /// LSN and ended no earlier than it.
    fn entry_log(&self, d: usize) -> Option<usize> {
        let data = &self.points[d];
        if !data.starts_logs() {
            return None;
        }
        let from = self
            .logs_by_end
            .partition_point(|&i| self.points[i].last_lsn <= data.last_lsn);
        self.logs_by_end[from..]
            .iter()
            .copied()
            .filter(|&i| data.enters(&self.points[i]))
            .find(|&i| self.points[i].backup_time >= data.backup_time)
    }

    /// The log that continues `log`'s chain.
    fn next_log(&self, log: usize) -> Option<usize> {
        let p = &self.points[log];
        self.logs_from.get(&p.last_lsn)?.iter().copied().find(|&n| {
            n != log
                && self.points[n].backup_time >= p.backup_time
                && same_fork(p.recovery_fork_guid, self.points[n].recovery_fork_guid)
        })
    }

    fn walk(&self, data: Vec<usize>, until: Option<DateTime<Utc>>) -> Walk {
        let mut logs = Vec::new();
        let last = *data.last().expect("a walk starts from a data backup");
        let mut next = self.entry_log(last);
        while let Some(log) = next {
            logs.push(log);
            if until.is_some_and(|t| self.points[log].backup_time >= t)
                || logs.len() > self.points.len()
            {
                break;
            }
            next = self.next_log(log);
        }
        Walk { data, logs }
    }

    /// The instants a restore can reach, as closed ranges in time order (a range with
    /// `from == to` is a single instant).
    pub fn restorable_ranges(&self) -> Vec<TimeRange> {
        let mut pieces: Vec<TimeRange> = Vec::new();
        // A log's chain after it is the same whichever backup it was entered from: walked
        // once.
        let mut walked = vec![false; self.points.len()];
        for data in self.starts() {
            let last = *data.last().expect("non-empty");
            let start = self.points[last].backup_time;
            pieces.push(TimeRange {
                from: start,
                to: start,
            });
            let mut reached = start;
            let mut next = self.entry_log(last);
            let mut first = true;
            while let Some(log) = next {
                if !first && walked[log] {
                    break;
                }
                let p = &self.points[log];
                if !p.has_bulk_logged_data {
                    pieces.push(TimeRange {
                        from: reached,
                        to: p.backup_time,
                    });
                }
                pieces.push(TimeRange {
                    from: p.backup_time,
                    to: p.backup_time,
                });
                if walked[log] {
                    break;
                }
                walked[log] = true;
                first = false;
                reached = p.backup_time;
                next = self.next_log(log);
            }
        }
        merge(pieces)
    }

    /// The restore sequence that reaches `at`: the one starting from the latest data
    /// backup that reaches it (fewest logs to apply).
    pub fn plan_to(&self, at: DateTime<Utc>) -> Result<Sequence, PlanError> {
        let mut starts: Vec<Vec<usize>> = self
            .starts()
            .filter(|data| self.points[*data.last().expect("non-empty")].backup_time <= at)
            .collect();
        if starts.is_empty() {
            return Err(PlanError::NoFullBefore);
        }
        starts.sort_by_key(|data| {
            let last = *data.last().expect("non-empty");
            // Latest first; at one instant a differential (it holds more) before a full.
            std::cmp::Reverse((self.points[last].backup_time, data.len(), last))
        });
        let mut bulk = None;
        for data in starts {
            match self.sequence(self.walk(data, Some(at)), at) {
                Ok(sequence) => return Ok(sequence),
                Err(Miss::InsideBulkLoggedLog(from, to)) => bulk = bulk.or(Some((from, to))),
                Err(Miss::NotReached) => {}
            }
        }
        Err(match bulk {
            Some((log_from, log_to)) => PlanError::InsideBulkLoggedLog { log_from, log_to },
            None => PlanError::NotCovered {
                restorable: self.restorable_ranges(),
            },
        })
    }

    /// The steps of `walk` that stop at `at`, if it reaches `at`.
    fn sequence(&self, walk: Walk, at: DateTime<Utc>) -> Result<Sequence, Miss> {
        let last = *walk.data.last().ok_or(Miss::NotReached)?;
        let data_time = self.points[last].backup_time;
        let mut steps: Vec<Step> = walk
            .data
            .iter()
            .map(|&point| Step {
                point,
                statement: RestoreStatement::RestoreDatabase,
                recovery: Recovery::NoRecovery,
                stop_at: None,
            })
            .collect();
        if at != data_time {
            let mut reached = data_time;
            let mut found = false;
            for &log in &walk.logs {
                let p = &self.points[log];
                let inside = reached < at && at < p.backup_time;
                if inside && p.has_bulk_logged_data {
                    return Err(Miss::InsideBulkLoggedLog(reached, p.backup_time));
                }
                steps.push(Step {
                    point: log,
                    statement: RestoreStatement::RestoreLog,
                    recovery: Recovery::NoRecovery,
                    stop_at: inside.then_some(at),
                });
                if at <= p.backup_time {
                    found = true;
                    break;
                }
                reached = p.backup_time;
            }
            if !found {
                return Err(Miss::NotReached);
            }
        }
        steps.last_mut().ok_or(Miss::NotReached)?.recovery = Recovery::Recovery;
        Ok(Sequence {
            steps,
            restores_to: at,
        })
    }
}

/// Sorts closed ranges and joins those that overlap or touch.
fn merge(mut pieces: Vec<TimeRange>) -> Vec<TimeRange> {
    pieces.sort_by_key(|r| (r.from, r.to));
    let mut merged: Vec<TimeRange> = Vec::with_capacity(pieces.len());
    for r in pieces {
        match merged.last_mut() {
            Some(last) if r.from <= last.to => last.to = last.to.max(r.to),
            _ => merged.push(r),
        }
    }
    merged
}

/// What the next scheduled backup must be, whatever its slot's type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Needs {
    Nothing,
    /// A differential (or a full) before the next log: the log chain broke while the
    /// differential base is intact.
    Differential,
    /// No usable full: a new chain (nothing recorded yet), or one broken beyond a
    /// differential's reach.
    #[default]
    Full,
}

/// The differential base SQL Server holds, as far as backvault saw: the latest full that
/// was not copy-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    pub point_id: Uuid,
    pub checkpoint_lsn: Option<Lsn>,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    pub guid: Option<Uuid>,
}

/// Where a protected database's chain stands between backups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainState {
    #[serde(default)]
    pub base: Option<Base>,
    /// The end of the latest log.
    #[serde(default)]
    pub log_end: Option<Lsn>,
    /// That log's chain goes back to a data backup backvault holds.
    #[serde(default)]
    pub log_anchored: bool,
    /// The `last_lsn` of the latest data backup a log sequence can start from.
    #[serde(default)]
    pub anchor: Option<Lsn>,
    #[serde(default)]
    pub fork: Option<Uuid>,
    #[serde(default)]
    pub needs: Needs,
}

/// Why a new backup does not continue the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChainBreak {
    /// The log does not continue the previous log and holds no data backup's end: a log
    /// backup was taken that backvault never saw.
    LogChainBroken,
    /// The differential's base is not a full backvault holds: another tool took a full.
    DifferentialBaseUnknown,
    /// A log with no full under it.
    NoFullBackup,
    /// The backup belongs to a new recovery fork (the database was restored over).
    RecoveryForkChanged,
}

impl ChainBreak {
    pub const ALL: [ChainBreak; 4] = [
        ChainBreak::LogChainBroken,
        ChainBreak::DifferentialBaseUnknown,
        ChainBreak::NoFullBackup,
        ChainBreak::RecoveryForkChanged,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.as_str() == s)
    }

    /// As on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            ChainBreak::LogChainBroken => "log_chain_broken",
            ChainBreak::DifferentialBaseUnknown => "differential_base_unknown",
            ChainBreak::NoFullBackup => "no_full_backup",
            ChainBreak::RecoveryForkChanged => "recovery_fork_changed",
        }
    }
}

/// A checks the server could not make, for reports without the second-version facts.
pub const UNVERIFIED_CHECKPOINT: &str = "checkpoint_lsn";
pub const UNVERIFIED_DIFFERENTIAL_BASE: &str = "differential_base";
pub const UNVERIFIED_RECOVERY_MODEL: &str = "recovery_model";
pub const UNVERIFIED_FORK: &str = "recovery_fork";

/// What applying a backup changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub state: ChainState,
    pub chain_break: Option<ChainBreak>,
    /// The full this backup depends on for retention: a differential's base, a log's
    /// latest full.
    pub full_id: Option<Uuid>,
    pub unverified: Vec<&'static str>,
}

/// Applies a new backup (`point`, with the id it is recorded under) to the chain.
/// `has_differential`: the item's policy takes differentials, so a broken log chain with
/// an intact base heals with one.
pub fn apply(state: ChainState, point: &Point, has_differential: bool) -> Applied {
    let mut s = state;
    let mut chain_break = None;
    let mut unverified = Vec::new();
    if point.recovery_model.is_none() {
        unverified.push(UNVERIFIED_RECOVERY_MODEL);
    }
    if point.recovery_fork_guid.is_none() {
        unverified.push(UNVERIFIED_FORK);
    }
    if point.is_data() && point.checkpoint_lsn.is_none() {
        unverified.push(UNVERIFIED_CHECKPOINT);
    }
    if let Some(fork) = point.recovery_fork_guid {
        if s.fork.is_some_and(|known| known != fork) {
            s = ChainState {
                needs: Needs::Full,
                ..ChainState::default()
            };
            if point.backup_type != RecoveryPointType::Full {
                chain_break = Some(ChainBreak::RecoveryForkChanged);
            }
        }
        s.fork = Some(fork);
    }
    let anchor = point.starts_logs().then_some(point.last_lsn);
    let mut full_id = None;
    match point.backup_type {
        RecoveryPointType::Full => {
            s.base = Some(Base {
                point_id: point.id,
                checkpoint_lsn: point.checkpoint_lsn,
                first_lsn: point.first_lsn,
                last_lsn: point.last_lsn,
                guid: point.differential_base_guid,
            });
            s.needs = Needs::Nothing;
            s.anchor = anchor;
            if anchor.is_none() {
                s.log_end = None;
                s.log_anchored = false;
            }
        }
        RecoveryPointType::CopyOnlyFull => {
            s.anchor = anchor.or(s.anchor);
        }
        RecoveryPointType::Differential => {
            let matched = s.base.map(|b| {
                (
                    b.point_id,
                    base_match(
                        b.checkpoint_lsn,
                        (b.first_lsn, b.last_lsn),
                        b.guid,
                        point.differential_base_lsn,
                        point.differential_base_guid,
                    ),
                )
            });
            match matched {
                Some((full, m)) if m != BaseMatch::No => {
                    if m == BaseMatch::Plausible || point.differential_base_guid.is_none() {
                        unverified.push(UNVERIFIED_DIFFERENTIAL_BASE);
                    }
                    full_id = Some(full);
                    s.anchor = anchor.or(s.anchor);
                    if s.needs == Needs::Differential {
                        s.needs = Needs::Nothing;
                    }
                }
                _ => {
                    chain_break = chain_break.or(Some(ChainBreak::DifferentialBaseUnknown));
                    // SQL Server's base is a full backvault does not hold.
                    s.base = None;
                    s.needs = Needs::Full;
                }
            }
        }
        RecoveryPointType::Log => {
            full_id = s.base.map(|b| b.point_id);
            let continues = s.log_end == Some(point.first_lsn);
            let starts = s
                .anchor
                .is_some_and(|a| point.first_lsn <= a && a <= point.last_lsn);
            if starts || (continues && s.log_anchored) {
                s.log_anchored = true;
            } else if continues {
                // Still after the same break: not a new one.
            } else {
                s.log_anchored = false;
                let why = if s.base.is_none() && s.anchor.is_none() {
                    ChainBreak::NoFullBackup
                } else {
                    ChainBreak::LogChainBroken
                };
                chain_break = chain_break.or(Some(why));
                let need = if s.base.is_some() && has_differential {
                    Needs::Differential
                } else {
                    Needs::Full
                };
                s.needs = s.needs.max(need);
            }
            s.log_end = Some(point.last_lsn);
        }
    }
    Applied {
        state: s,
        chain_break,
        full_id,
        unverified,
    }
}

/// The database's recovery model changed (seen by discovery). To simple: the log chain
/// ends there. Back from simple: SQL Server refuses log backups (Msg 4214) until a full
/// or differential is taken.
pub fn model_changed(
    state: ChainState,
    from: RecoveryModel,
    to: RecoveryModel,
    has_differential: bool,
) -> ChainState {
    let mut s = state;
    if from == to {
        return s;
    }
    if to == RecoveryModel::Simple {
        s.log_end = None;
        s.log_anchored = false;
        s.anchor = None;
    } else if from == RecoveryModel::Simple {
        s.log_end = None;
        s.log_anchored = false;
        s.anchor = None;
        let need = if s.base.is_some() && has_differential {
            Needs::Differential
        } else {
            Needs::Full
        };
        s.needs = s.needs.max(need);
    }
    s
}

/// The database was restored over: a new recovery fork, whose first backup must be a full.
pub fn overwritten() -> ChainState {
    ChainState {
        needs: Needs::Full,
        ..ChainState::default()
    }
}

#[cfg(test)]
mod tests;
