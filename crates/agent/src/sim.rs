//! One simulated SQL Server database, as far as `BACKUP` and `RESTORE` can tell.
//!
//! The model follows SQL Server's documented rules rather than anything backvault assumes:
//! a full backup begins with a checkpoint, and on a database with open transactions its
//! `first_lsn` (the oldest active transaction) lies below that checkpoint; a full that is
//! not copy-only becomes the differential base (checkpoint and base GUID), whoever took
//! it; log backups chain among themselves, a full never breaks that chain, a switch to
//! SIMPLE does, and after switching back `BACKUP LOG` waits for a full or differential
//! (Msg 4214). Every backup enters the history (`msdb.dbo.backupset`) the moment it is
//! taken: nothing here can undo one. A restore replays the steps it is given against that
//! history and refuses what SQL Server refuses, then starts a new recovery fork.

use std::collections::BTreeSet;

use backvault_domain::agent::{RecoveryModel, RecoveryPointType};
use backvault_domain::lsn::Lsn;
use backvault_domain::restore::{Recovery, RestoreStatement, RestoreStep};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Failure codes: Azure Backup's where it has one, otherwise named after what SQL Server
/// refused. The SQL Server message number goes in the message.
pub mod codes {
    pub const NOT_SUPPORTED: &str = "UserErrorSQLPODoesNotSupportBackupType";
    pub const PARENT_FULL_MISSING: &str = "UserErrorParentFullBackupMissing";
    pub const DOES_NOT_EXIST: &str = "UserErrorSQLPODoesNotExist";
    pub const EXISTING_DATABASE: &str = "UserErrorCannotRestoreExistingDBWithoutForceOverwrite";
    pub const BULK_LOGGED_STOP: &str =
        "UserErrorRestoreNotPossibleBecauseLogBackupContainsBulkLoggedChanges";
    pub const BACKUP_SET_NOT_FOUND: &str = "UserErrorRestoreBackupSetNotFound";
    pub const STEP_MISMATCH: &str = "UserErrorRestoreStepDoesNotMatchBackupSet";
    pub const SEQUENCE_INVALID: &str = "UserErrorRestoreSequenceInvalid";
    pub const DIFFERENTIAL_BASE_MISMATCH: &str = "UserErrorRestoreDifferentialBaseMismatch";
    pub const LOG_TOO_EARLY: &str = "UserErrorRestoreLogBackupTooEarly";
    pub const LOG_TOO_RECENT: &str = "UserErrorRestoreLogBackupTooRecent";
    pub const FORK_MISMATCH: &str = "UserErrorRestoreRecoveryForkMismatch";
    pub const STOP_AT_TOO_EARLY: &str = "UserErrorRestoreStopAtTooEarly";
    pub const STOP_AT_BEYOND_LOG: &str = "UserErrorRestoreStopAtBeyondLogBackup";
}

/// What SQL Server refused, as a job failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

fn refuse(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

const VLF_FACTOR: u128 = 1_000_000_000_000_000;
const BLOCK_FACTOR: u128 = 100_000;
const MAX_BLOCK: u128 = 0xffff_ffff;
const MAX_SLOT: u128 = 0xffff;
/// Log records a busy database writes between two backups (and while a data backup
/// runs): enough that its LSNs visibly move.
const ACTIVITY_RECORDS: u128 = 1_000;

/// The smallest LSN at or above `n` whose block and slot SQL Server could have written, so
/// that every LSN the agent hands out also has the textual form.
fn writable_at_or_above(n: u128) -> Lsn {
    let (mut vlf, mut block, mut slot) = (
        n / VLF_FACTOR,
        (n % VLF_FACTOR) / BLOCK_FACTOR,
        n % BLOCK_FACTOR,
    );
    if slot > MAX_SLOT {
        block += 1;
        slot = 0;
    }
    if block > MAX_BLOCK {
        vlf += 1;
        block = 0;
        slot = 0;
    }
    Lsn(vlf * VLF_FACTOR + block * BLOCK_FACTOR + slot)
}

/// A log position that grows with the clock: a virtual log file per 10^10 µs (under three
/// hours), a block per 10 ms. Far above the first version's LSNs (microseconds), so a
/// state file written by it is below whatever comes next.
fn lsn_at_micros(micros: u128) -> Lsn {
    let vlf = micros / 10_000_000_000;
    let rest = micros % 10_000_000_000;
    Lsn(vlf * VLF_FACTOR + (rest / 10_000) * BLOCK_FACTOR + rest % 10_000)
}

/// Hands out strictly increasing LSNs, derived from the clock so that they also increase
/// across restarts of an agent without a state file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LsnClock {
    last: Lsn,
}

impl LsnClock {
    pub fn next(&mut self) -> Lsn {
        let micros = u128::try_from(Utc::now().timestamp_micros()).unwrap_or(0);
        self.next_at(micros)
    }

    fn next_at(&mut self, micros: u128) -> Lsn {
        let floor = self.last.0 + 1;
        self.last = writable_at_or_above(lsn_at_micros(micros).0.max(floor));
        self.last
    }

    /// Log records written by the database's own work, not by a backup.
    fn advance(&mut self, records: u128) {
        self.last = writable_at_or_above(self.last.0 + records);
    }

    pub fn observe(&mut self, lsn: Lsn) {
        self.last = self.last.max(lsn);
    }

    pub fn last(&self) -> Lsn {
        self.last
    }
}

/// LSNs in the state file as decimal strings, as on the wire (JSON numbers lose digits).
pub mod lsn_text {
    use backvault_domain::lsn::Lsn;
    use serde::{Deserialize, Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(lsn)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let raw = String::deserialize(d)?;
        Lsn::parse(&raw).ok_or_else(|| de::Error::custom(format!("bad LSN {raw:?}")))
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(lsn: &Option<Lsn>, s: S) -> Result<S::Ok, S::Error> {
            match lsn {
                Some(lsn) => s.collect_str(lsn),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Lsn>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|raw| {
                    Lsn::parse(&raw).ok_or_else(|| de::Error::custom(format!("bad LSN {raw:?}")))
                })
                .transpose()
        }
    }
}

/// What a differential backup is taken against: the checkpoint of the last full backup
/// that was not copy-only, and the GUID that full gave the data files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DifferentialBase {
    #[serde(with = "lsn_text")]
    pub checkpoint_lsn: Lsn,
    pub guid: Uuid,
}

/// Where the log backups stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChain {
    /// Where the next log backup begins; `None` while `BACKUP LOG` has no current database
    /// backup to follow (Msg 4214) or the model is SIMPLE.
    #[serde(default, with = "lsn_text::option")]
    pub next_first_lsn: Option<Lsn>,
    /// The next log backup is the first of its chain.
    #[serde(default)]
    pub next_begins_chain: bool,
    /// A full backup that was not copy-only was ever taken (a copy-only one does not end
    /// a new database's pseudo-simple state).
    #[serde(default)]
    pub full_taken: bool,
    /// A switch to SIMPLE broke the chain, and no full or differential has restarted it.
    #[serde(default)]
    pub broken_by_simple: bool,
}

/// The recovery path the database is on: a restore starts a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fork {
    pub guid: Uuid,
    /// Where this fork left its parent; `None` for the fork the database was created on.
    #[serde(default, with = "lsn_text::option")]
    pub point_lsn: Option<Lsn>,
}

/// One row of the simulated `msdb.dbo.backupset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupSet {
    pub backup_set_uuid: Uuid,
    pub kind: RecoveryPointType,
    #[serde(with = "lsn_text")]
    pub first_lsn: Lsn,
    #[serde(with = "lsn_text")]
    pub last_lsn: Lsn,
    /// Data backups only.
    #[serde(default, with = "lsn_text::option")]
    pub checkpoint_lsn: Option<Lsn>,
    #[serde(with = "lsn_text")]
    pub database_backup_lsn: Lsn,
    /// The base the data files carry in this backup: a full's own, a differential's, the
    /// database's at the time for a copy-only full or a log (reported for fulls and
    /// differentials only, as `msdb` does).
    #[serde(default)]
    pub differential_base: Option<DifferentialBase>,
    #[serde(default)]
    pub begins_log_chain: bool,
    #[serde(default)]
    pub has_bulk_logged_data: bool,
    pub recovery_model: RecoveryModel,
    pub recovery_fork_guid: Uuid,
    #[serde(default, with = "lsn_text::option")]
    pub fork_point_lsn: Option<Lsn>,
    pub database_guid: Uuid,
    pub started_at: DateTime<Utc>,
    pub backup_time: DateTime<Utc>,
    pub size_bytes: i64,
    /// The job it was taken for; `None` when another tool took it.
    #[serde(default)]
    pub job_id: Option<Uuid>,
    /// The inventory's `external_backups` id, for another tool's backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
}

impl BackupSet {
    /// `differential_base_lsn`/`_guid` as `msdb` reports them: a full establishes its own
    /// base, a differential names its base; copy-only fulls and logs have none.
    pub fn reported_base(&self) -> Option<DifferentialBase> {
        match self.kind {
            RecoveryPointType::Full | RecoveryPointType::Differential => self.differential_base,
            RecoveryPointType::CopyOnlyFull | RecoveryPointType::Log => None,
        }
    }
}

/// A restore that ran onto this database, so that a retry of its job reports it again
/// instead of restoring twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreRecord {
    pub job_id: Uuid,
    pub restored_database: String,
    #[serde(default)]
    pub tail_log_backup: Option<Uuid>,
    pub fork_guid: Uuid,
}

/// Backup sets kept per database: older ones are gone, as after `sp_delete_backuphistory`
/// and the files' deletion. Keeps the state file, rewritten after every job, bounded.
pub const MAX_HISTORY: usize = 10_000;
const MAX_RESTORE_RECORDS: usize = 100;

/// The inventory's knobs that shape what a backup looks like.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    /// Transactions are open while backups run: a full's `first_lsn` lies below its
    /// checkpoint, and the log moves between backups.
    pub busy: bool,
    /// Minimally logged operations run (they are, in the bulk-logged model).
    pub bulk_operations: bool,
}

/// Who takes a backup, and when.
#[derive(Debug, Clone)]
pub struct Taking {
    pub started_at: DateTime<Utc>,
    pub backup_time: DateTime<Utc>,
    pub size_bytes: i64,
    pub job_id: Option<Uuid>,
    pub external_id: Option<String>,
}

/// One simulated database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Database {
    pub database_guid: Uuid,
    /// `None` in a state written before models were simulated, until the inventory says.
    #[serde(default)]
    pub recovery_model: Option<RecoveryModel>,
    /// The last LSN the database logged.
    #[serde(default, with = "lsn_text")]
    pub position: Lsn,
    #[serde(default)]
    pub differential_base: Option<DifferentialBase>,
    #[serde(default)]
    pub log_chain: LogChain,
    pub fork: Fork,
    /// Minimally logged changes since the last log backup: the next one holds them.
    #[serde(default)]
    pub bulk_changes_pending: bool,
    #[serde(default)]
    pub history: Vec<BackupSet>,
    /// The inventory's `external_backups` ids already taken.
    #[serde(default)]
    pub applied_external: BTreeSet<String>,
    #[serde(default)]
    pub restores: Vec<RestoreRecord>,
}

fn is_named(name: &str, system: &str) -> bool {
    name.eq_ignore_ascii_case(system)
}

fn kind_name(kind: RecoveryPointType) -> &'static str {
    match kind {
        RecoveryPointType::Full => "full",
        RecoveryPointType::CopyOnlyFull => "copy-only full",
        RecoveryPointType::Differential => "differential",
        RecoveryPointType::Log => "log",
    }
}

impl Database {
    /// A database as created: no backup yet, on its first recovery fork.
    pub fn new(recovery_model: Option<RecoveryModel>) -> Self {
        Self {
            database_guid: Uuid::new_v4(),
            recovery_model,
            position: Lsn(0),
            differential_base: None,
            log_chain: LogChain::default(),
            fork: Fork {
                guid: Uuid::new_v4(),
                point_lsn: None,
            },
            bulk_changes_pending: false,
            history: Vec::new(),
            applied_external: BTreeSet::new(),
            restores: Vec::new(),
        }
    }

    /// A database the first version of the state file knew by two LSNs: its last full's
    /// `first_lsn`, which that version reported as the differential base (an idle
    /// database's checkpoint), and where its next log began.
    pub fn from_first_version(full_first_lsn: Option<Lsn>, next_log_lsn: Option<Lsn>) -> Self {
        let mut db = Self::new(None);
        if let Some(checkpoint_lsn) = full_first_lsn {
            db.differential_base = Some(DifferentialBase {
                checkpoint_lsn,
                guid: Uuid::new_v4(),
            });
            db.log_chain.full_taken = true;
            db.log_chain.next_first_lsn = next_log_lsn;
        }
        db.position = full_first_lsn.max(next_log_lsn).unwrap_or_default();
        db
    }

    pub fn model(&self) -> RecoveryModel {
        self.recovery_model.unwrap_or(RecoveryModel::Full)
    }

    /// `ALTER DATABASE … SET RECOVERY`: the inventory's model is the truth. The first time
    /// a database's model is known it is adopted as it was created.
    pub fn set_recovery_model(&mut self, model: RecoveryModel) {
        let Some(old) = self.recovery_model.replace(model) else {
            if model == RecoveryModel::Simple {
                self.log_chain.next_first_lsn = None;
            }
            return;
        };
        if old == model {
            return;
        }
        if model == RecoveryModel::Simple {
            // Checkpoints truncate the log from now on: what the next log backup would
            // have started from is gone.
            self.log_chain.next_first_lsn = None;
            self.log_chain.next_begins_chain = false;
            self.log_chain.broken_by_simple = true;
            self.bulk_changes_pending = false;
        }
        // Back from SIMPLE the chain stays broken until a full or differential restarts it.
    }

    /// The database's own work since the last job: minimally logged changes, in the
    /// bulk-logged model, land in the next log backup.
    pub fn note_activity(&mut self, activity: Activity) {
        if activity.bulk_operations && self.model() == RecoveryModel::BulkLogged {
            self.bulk_changes_pending = true;
        }
    }

    /// Why SQL Server would refuse a backup of `kind` now. `name` is the database's name.
    pub fn check_backup(&self, name: &str, kind: RecoveryPointType) -> Result<(), Refusal> {
        if is_named(name, "tempdb") {
            return Err(refuse(
                codes::NOT_SUPPORTED,
                format!(
                    "{name} cannot be backed up: SQL Server allows no backup or restore of \
                     tempdb (SQL Server Msg 3147). Do not protect it."
                ),
            ));
        }
        if is_named(name, "master") {
            match kind {
                RecoveryPointType::Differential => {
                    return Err(refuse(
                        codes::NOT_SUPPORTED,
                        format!(
                            "{name} takes full backups only; a differential backup of master \
                             is refused (SQL Server Msg 3024)."
                        ),
                    ));
                }
                RecoveryPointType::Log => {
                    return Err(refuse(
                        codes::NOT_SUPPORTED,
                        format!(
                            "{name} takes full backups only; the log of master cannot be \
                             backed up (SQL Server Msg 4212)."
                        ),
                    ));
                }
                RecoveryPointType::Full | RecoveryPointType::CopyOnlyFull => {}
            }
        }
        match kind {
            RecoveryPointType::Differential if self.differential_base.is_none() => Err(refuse(
                codes::PARENT_FULL_MISSING,
                format!(
                    "Database {name} has no full backup for a differential backup to be based \
                     on (SQL Server Msg 3035). Take a full backup first."
                ),
            )),
            RecoveryPointType::Log if self.model() == RecoveryModel::Simple => Err(refuse(
                codes::NOT_SUPPORTED,
                format!(
                    "Database {name} uses the simple recovery model, where BACKUP LOG is not \
                     allowed (SQL Server Msg 4208). Switch it to the full or bulk-logged model, \
                     then take a full backup."
                ),
            )),
            RecoveryPointType::Log if self.log_chain.next_first_lsn.is_none() => {
                let why = if self.log_chain.broken_by_simple {
                    "it was switched from the simple recovery model since its last full or \
                     differential backup"
                } else if self.log_chain.full_taken {
                    "no full or differential backup was taken in a model that keeps the log"
                } else {
                    "it never had a full backup (a copy-only one does not count)"
                };
                Err(refuse(
                    codes::PARENT_FULL_MISSING,
                    format!(
                        "BACKUP LOG of database {name} found no current database backup: {why} \
                         (SQL Server Msg 4214). Take a full or differential backup first."
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Takes a backup of `kind`: it is in the history, and the database has moved, from
    /// now on.
    pub fn backup(
        &mut self,
        name: &str,
        kind: RecoveryPointType,
        activity: Activity,
        taking: Taking,
        clock: &mut LsnClock,
    ) -> Result<BackupSet, Refusal> {
        self.check_backup(name, kind)?;
        self.note_activity(activity);
        let model = self.model();
        clock.observe(self.position);
        if activity.busy {
            clock.advance(ACTIVITY_RECORDS);
        }
        let base_before = self.differential_base;
        let base_lsn = base_before.map_or(Lsn(0), |b| b.checkpoint_lsn);
        let mut set = BackupSet {
            backup_set_uuid: Uuid::new_v4(),
            kind,
            first_lsn: Lsn(0),
            last_lsn: Lsn(0),
            checkpoint_lsn: None,
            database_backup_lsn: base_lsn,
            differential_base: base_before,
            begins_log_chain: false,
            has_bulk_logged_data: false,
            recovery_model: model,
            recovery_fork_guid: self.fork.guid,
            fork_point_lsn: self.fork.point_lsn,
            database_guid: self.database_guid,
            started_at: taking.started_at,
            backup_time: taking.backup_time,
            size_bytes: taking.size_bytes,
            job_id: taking.job_id,
            external_id: taking.external_id,
        };
        if kind == RecoveryPointType::Log {
            let first = self
                .log_chain
                .next_first_lsn
                .expect("checked: the chain has a start");
            set.first_lsn = first;
            set.last_lsn = clock.next();
            set.begins_log_chain = self.log_chain.next_begins_chain;
            set.has_bulk_logged_data = self.bulk_changes_pending;
            self.log_chain.next_first_lsn = Some(set.last_lsn);
            self.log_chain.next_begins_chain = false;
            self.bulk_changes_pending = false;
        } else {
            // The oldest active transaction; on an idle database, the checkpoint itself.
            let first = clock.next();
            let checkpoint = if activity.busy {
                clock.advance(ACTIVITY_RECORDS);
                clock.next()
            } else {
                first
            };
            set.first_lsn = first;
            set.checkpoint_lsn = Some(checkpoint);
            set.last_lsn = clock.next();
            if kind == RecoveryPointType::Full {
                let base = DifferentialBase {
                    checkpoint_lsn: checkpoint,
                    guid: Uuid::new_v4(),
                };
                set.differential_base = Some(base);
                self.differential_base = Some(base);
                self.log_chain.full_taken = true;
            }
            let restarts_chain = matches!(
                kind,
                RecoveryPointType::Full | RecoveryPointType::Differential
            );
            if restarts_chain
                && model != RecoveryModel::Simple
                && self.log_chain.next_first_lsn.is_none()
            {
                // The log is kept from this backup's start on: the first log backup
                // reaches back to it, so it holds every data backup's last_lsn since.
                self.log_chain.next_first_lsn = Some(first);
                self.log_chain.next_begins_chain = true;
                self.log_chain.broken_by_simple = false;
            }
        }
        self.position = set.last_lsn;
        self.history.push(set.clone());
        if self.history.len() > MAX_HISTORY {
            let excess = self.history.len() - MAX_HISTORY;
            self.history.drain(..excess);
        }
        Ok(set)
    }

    /// The backup sets of `kind` taken for `job_id`, oldest first.
    pub fn sets_of_job(
        &self,
        job_id: Uuid,
        kind: RecoveryPointType,
    ) -> impl Iterator<Item = &BackupSet> {
        self.history
            .iter()
            .filter(move |s| s.job_id == Some(job_id) && s.kind == kind)
    }

    pub fn backup_set(&self, uuid: Uuid) -> Option<&BackupSet> {
        self.history.iter().find(|s| s.backup_set_uuid == uuid)
    }

    pub fn restore_of_job(&self, job_id: Uuid) -> Option<&RestoreRecord> {
        self.restores.iter().find(|r| r.job_id == job_id)
    }

    /// The database after a successful restore: a new recovery fork from the LSN it was
    /// brought to, the restored data's differential base, and a log chain that continues
    /// from there (a log backup may follow at once).
    pub fn restored(&mut self, replayed: &Replayed, clock: &mut LsnClock) {
        // Restoring a database over itself keeps its identity; anything else is a new one.
        if replayed.database_guid != self.database_guid {
            self.database_guid = Uuid::new_v4();
        }
        self.recovery_model = Some(replayed.recovery_model);
        self.differential_base = replayed.differential_base;
        self.fork = Fork {
            guid: Uuid::new_v4(),
            point_lsn: Some(replayed.redo_lsn),
        };
        let keeps_log = replayed.recovery_model != RecoveryModel::Simple;
        self.log_chain = LogChain {
            next_first_lsn: keeps_log.then_some(replayed.redo_lsn),
            next_begins_chain: false,
            full_taken: true,
            broken_by_simple: false,
        };
        self.bulk_changes_pending = false;
        self.position = clock.next();
    }

    pub fn record_restore(&mut self, record: RestoreRecord) {
        self.restores.push(record);
        if self.restores.len() > MAX_RESTORE_RECORDS {
            self.restores.remove(0);
        }
    }
}

/// What a replayed restore sequence brought the database to.
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    /// The LSN recovery ran to: the new fork's point.
    pub redo_lsn: Lsn,
    /// The instant the data is as of.
    pub reached: DateTime<Utc>,
    pub differential_base: Option<DifferentialBase>,
    pub recovery_model: RecoveryModel,
    /// The database the backups are of.
    pub database_guid: Uuid,
    /// The recovery fork of the last backup applied.
    pub fork_guid: Uuid,
    /// `STOPAT` stopped inside a log backup.
    pub stopped_inside_log: bool,
}

/// Where a replay stands between steps: the database is restoring.
struct Restoring {
    redo_lsn: Lsn,
    reached: DateTime<Utc>,
    base: Option<DifferentialBase>,
    fork_guid: Uuid,
    model: RecoveryModel,
    database_guid: Uuid,
    stopped_inside_log: bool,
}

fn statement_name(statement: RestoreStatement) -> &'static str {
    match statement {
        RestoreStatement::RestoreDatabase => "RESTORE DATABASE",
        RestoreStatement::RestoreLog => "RESTORE LOG",
    }
}

/// The LSN a `STOPAT` inside a log backup stops at: the log's records spread evenly over
/// the time it covers.
fn lsn_at_time(from: (Lsn, DateTime<Utc>), to: (Lsn, DateTime<Utc>), at: DateTime<Utc>) -> Lsn {
    let span = (to.1 - from.1).num_microseconds().unwrap_or(i64::MAX);
    let into = (at - from.1).num_microseconds().unwrap_or(0);
    if span <= 0 || into <= 0 {
        return from.0;
    }
    let (span, into) = (span as u128, (into as u128).min(span as u128));
    let lsn =
        from.0.0 + (to.0.0 - from.0.0) / span * into + (to.0.0 - from.0.0) % span * into / span;
    writable_at_or_above(lsn).min(to.0).max(from.0)
}

/// Runs a restore sequence against the backup sets it names, in order, as SQL Server
/// would, and says what it brought the database to, or why SQL Server stops.
pub fn replay(steps: &[(RestoreStep, BackupSet)]) -> Result<Replayed, Refusal> {
    let mut restoring: Option<Restoring> = None;
    let mut previous: Option<Recovery> = None;
    for (i, (step, set)) in steps.iter().enumerate() {
        let n = i + 1;
        let uuid = set.backup_set_uuid;
        let described = (
            step.backup_type,
            Lsn::parse(&step.first_lsn),
            Lsn::parse(&step.last_lsn),
        );
        if described != (set.kind, Some(set.first_lsn), Some(set.last_lsn)) {
            return Err(refuse(
                codes::STEP_MISMATCH,
                format!(
                    "Step {n} describes backup set {uuid} as a {} backup of LSNs {}–{}, but \
                     the backup set is a {} backup of LSNs {}–{}.",
                    kind_name(step.backup_type),
                    step.first_lsn,
                    step.last_lsn,
                    kind_name(set.kind),
                    set.first_lsn,
                    set.last_lsn
                ),
            ));
        }
        let is_log = set.kind == RecoveryPointType::Log;
        if is_log != (step.statement == RestoreStatement::RestoreLog) {
            return Err(refuse(
                codes::SEQUENCE_INVALID,
                format!(
                    "Step {n}: backup set {uuid} holds a {} backup, which {} cannot use \
                     (SQL Server Msg 3135).",
                    kind_name(set.kind),
                    statement_name(step.statement)
                ),
            ));
        }
        if previous == Some(Recovery::Recovery) {
            return Err(refuse(
                codes::SEQUENCE_INVALID,
                format!(
                    "Step {n}: the step before it ran WITH RECOVERY, so the database is no \
                     longer restoring and nothing more can be applied (SQL Server Msg 4306). \
                     Every step but the last runs WITH NORECOVERY."
                ),
            ));
        }
        previous = Some(step.recovery);
        match set.kind {
            RecoveryPointType::Full | RecoveryPointType::CopyOnlyFull => {
                if let Some(stop) = step.stop_at
                    && stop < set.backup_time
                {
                    return Err(refuse(
                        codes::STOP_AT_TOO_EARLY,
                        format!(
                            "Step {n}: STOPAT {stop} lies before the end of the {} backup \
                             ({}) it restores (SQL Server Msg 4335).",
                            kind_name(set.kind),
                            set.backup_time
                        ),
                    ));
                }
                restoring = Some(Restoring {
                    redo_lsn: set.last_lsn,
                    reached: set.backup_time,
                    base: set.differential_base,
                    fork_guid: set.recovery_fork_guid,
                    model: set.recovery_model,
                    database_guid: set.database_guid,
                    stopped_inside_log: false,
                });
            }
            RecoveryPointType::Differential => {
                let Some(db) = restoring.as_mut() else {
                    return Err(nothing_to_roll_forward(n, set.kind));
                };
                let fits = set.differential_base.is_some() && set.differential_base == db.base;
                if !fits || set.last_lsn < db.redo_lsn {
                    let base = |b: Option<DifferentialBase>| {
                        b.map_or("no differential base".to_owned(), |b| {
                            format!(
                                "the base of checkpoint LSN {} ({})",
                                b.checkpoint_lsn, b.guid
                            )
                        })
                    };
                    let why = if fits {
                        format!(
                            "the database is already rolled forward to LSN {}, past the \
                             differential's end",
                            db.redo_lsn
                        )
                    } else {
                        format!(
                            "the differential is taken against {}, the restored data carries {}",
                            base(set.differential_base),
                            base(db.base)
                        )
                    };
                    return Err(refuse(
                        codes::DIFFERENTIAL_BASE_MISMATCH,
                        format!(
                            "Step {n}: differential backup {uuid} cannot be restored because the \
                             database has not been restored to the correct earlier state: {why} \
                             (SQL Server Msg 3136)."
                        ),
                    ));
                }
                db.redo_lsn = set.last_lsn;
                db.reached = set.backup_time;
                db.fork_guid = set.recovery_fork_guid;
                db.model = set.recovery_model;
            }
            RecoveryPointType::Log => {
                let Some(db) = restoring.as_mut() else {
                    return Err(nothing_to_roll_forward(n, set.kind));
                };
                if set.database_guid != db.database_guid {
                    return Err(refuse(
                        codes::SEQUENCE_INVALID,
                        format!(
                            "Step {n}: log backup {uuid} is of another database ({}) than the \
                             restored data ({}).",
                            set.database_guid, db.database_guid
                        ),
                    ));
                }
                if set.last_lsn <= db.redo_lsn {
                    return Err(refuse(
                        codes::LOG_TOO_EARLY,
                        format!(
                            "Step {n}: log backup {uuid} ends at LSN {}, too early to apply to \
                             a database rolled forward to LSN {}; a later log backup holds \
                             what follows (SQL Server Msg 4326).",
                            set.last_lsn, db.redo_lsn
                        ),
                    ));
                }
                if set.first_lsn > db.redo_lsn {
                    return Err(refuse(
                        codes::LOG_TOO_RECENT,
                        format!(
                            "Step {n}: log backup {uuid} begins at LSN {}, too recent to apply \
                             to a database rolled forward to LSN {}; a log backup holding LSN \
                             {} is missing (SQL Server Msg 4305).",
                            set.first_lsn, db.redo_lsn, db.redo_lsn
                        ),
                    ));
                }
                if set.recovery_fork_guid != db.fork_guid {
                    // A log of a later fork applies only to data not rolled past the
                    // point where that fork left.
                    let follows = set.fork_point_lsn.is_some_and(|point| db.redo_lsn <= point);
                    if !follows {
                        return Err(refuse(
                            codes::FORK_MISMATCH,
                            format!(
                                "Step {n}: log backup {uuid} is on recovery fork {}, which the \
                                 restored data (fork {}, at LSN {}) did not take.",
                                set.recovery_fork_guid, db.fork_guid, db.redo_lsn
                            ),
                        ));
                    }
                    db.fork_guid = set.recovery_fork_guid;
                }
                match step.stop_at {
                    Some(stop) if stop < db.reached => {
                        return Err(refuse(
                            codes::STOP_AT_TOO_EARLY,
                            format!(
                                "Step {n}: STOPAT {stop} is too early: the database is already \
                                 rolled forward to {} (SQL Server Msg 4335).",
                                db.reached
                            ),
                        ));
                    }
                    Some(stop) if stop < set.backup_time => {
                        if set.has_bulk_logged_data {
                            return Err(refuse(
                                codes::BULK_LOGGED_STOP,
                                format!(
                                    "Step {n}: log backup {uuid} holds bulk-logged changes, so \
                                     it restores to its end ({}) only, not to {stop} (SQL \
                                     Server Msg 4341).",
                                    set.backup_time
                                ),
                            ));
                        }
                        db.redo_lsn = lsn_at_time(
                            (db.redo_lsn, db.reached),
                            (set.last_lsn, set.backup_time),
                            stop,
                        );
                        db.reached = stop;
                        db.stopped_inside_log = true;
                    }
                    Some(stop) if stop > set.backup_time && step.recovery == Recovery::Recovery => {
                        return Err(refuse(
                            codes::STOP_AT_BEYOND_LOG,
                            format!(
                                "Step {n}: STOPAT {stop} lies after the end of log backup \
                                 {uuid} ({}): SQL Server would apply all of it and leave the \
                                 database restoring, not recover it.",
                                set.backup_time
                            ),
                        ));
                    }
                    _ => {
                        db.redo_lsn = set.last_lsn;
                        db.reached = set.backup_time;
                    }
                }
                db.model = set.recovery_model;
            }
        }
    }
    if previous != Some(Recovery::Recovery) {
        return Err(refuse(
            codes::SEQUENCE_INVALID,
            "The last step does not run WITH RECOVERY: the database would be left restoring.",
        ));
    }
    let db = restoring.expect("a step ran, and the first one restored data");
    Ok(Replayed {
        redo_lsn: db.redo_lsn,
        reached: db.reached,
        differential_base: db.base,
        recovery_model: db.model,
        database_guid: db.database_guid,
        fork_guid: db.fork_guid,
        stopped_inside_log: db.stopped_inside_log,
    })
}

fn nothing_to_roll_forward(n: usize, kind: RecoveryPointType) -> Refusal {
    refuse(
        codes::SEQUENCE_INVALID,
        format!(
            "Step {n}: a {} backup cannot be restored before a full backup: no files are ready \
             to roll forward (SQL Server Msg 3117). A restore sequence begins with RESTORE \
             DATABASE from a full or copy-only full backup.",
            kind_name(kind)
        ),
    )
}

#[cfg(test)]
mod tests {
    use RecoveryPointType::{Differential, Full, Log};

    use super::*;

    #[test]
    fn lsns_strictly_increase_even_if_the_clock_stalls() {
        let mut clock = LsnClock::default();
        let t = 1_790_000_000_000_000;
        let a = clock.next_at(t);
        assert_eq!(clock.next_at(t).0, a.0 + 1);
        assert_eq!(clock.next_at(t - 1_000_000).0, a.0 + 2);
        assert!(clock.next_at(t + 1) > Lsn(a.0 + 2));
        let (x, y) = (clock.next(), clock.next());
        assert!(x > a && y > x);
    }

    #[test]
    fn every_lsn_handed_out_has_the_textual_form() {
        assert_eq!(
            writable_at_or_above(42_000_000_001_600_001),
            Lsn(42_000_000_001_600_001)
        );
        let full_slot = 42 * VLF_FACTOR + 16 * BLOCK_FACTOR + MAX_SLOT;
        assert_eq!(
            writable_at_or_above(full_slot + 1),
            Lsn(42 * VLF_FACTOR + 17 * BLOCK_FACTOR)
        );
        let full_block = 42 * VLF_FACTOR + MAX_BLOCK * BLOCK_FACTOR + MAX_SLOT;
        assert_eq!(writable_at_or_above(full_block + 1), Lsn(43 * VLF_FACTOR));
        let mut clock = LsnClock::default();
        clock.observe(Lsn(full_slot - 2));
        for _ in 0..5 {
            let lsn = clock.next_at(0);
            assert!(lsn.textual().is_some(), "{lsn}");
        }
        clock.advance(ACTIVITY_RECORDS * 100);
        assert!(clock.last().textual().is_some());
        for micros in [
            0,
            1,
            9_999,
            10_000,
            9_999_999_999,
            10_000_000_000,
            1_790_000_000_123_456,
        ] {
            let lsn = lsn_at_micros(micros);
            assert!(lsn.textual().is_some(), "{micros}");
            assert!(lsn < lsn_at_micros(micros + 1), "{micros}");
        }
    }

    #[test]
    fn a_stop_inside_a_log_lands_between_its_ends() {
        let t = |m: i64| DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::minutes(m);
        let (from, to) = ((Lsn(1_000), t(0)), (Lsn(4_000), t(30)));
        assert_eq!(lsn_at_time(from, to, t(10)), Lsn(2_000));
        assert_eq!(lsn_at_time(from, to, t(0)), Lsn(1_000));
        assert_eq!(
            lsn_at_time(from, to, t(45)),
            Lsn(4_000),
            "never past its end"
        );
        assert_eq!(lsn_at_time(from, (Lsn(4_000), t(0)), t(0)), Lsn(1_000));
    }

    /// The simulation models SQL Server on its own. Where it refuses a backup type in
    /// every state of a database (master's differentials and logs, logs in the simple
    /// recovery model), the domain's rule must refuse the same, or the scheduler and
    /// on-demand checks would send jobs SQL Server fails; and where the rule allows a type,
    /// the simulation must take it once a full exists.
    #[test]
    fn backup_type_refusals_agree_with_the_domain_rule() {
        use backvault_domain::configure::backup_type_allowed;
        let names = [
            "master",
            "MASTER",
            "mAsTeR",
            "master2",
            "amaster",
            "ma\u{17F}ter",
            "sales",
            "model",
            "msdb",
            "MASTER\u{130}",
        ];
        for name in names {
            for model in RecoveryModel::ALL {
                for kind in RecoveryPointType::ALL {
                    let mut db = Database::new(Some(model));
                    let mut clock = LsnClock::default();
                    db.backup(name, Full, Activity::default(), taking(0), &mut clock)
                        .expect("a full is always taken");
                    let sim = db.check_backup(name, kind);
                    let rule = backup_type_allowed(name, model, kind);
                    match (&sim, rule) {
                        (Ok(()), Ok(())) => {}
                        (Err(refusal), Err(refused)) => {
                            assert_eq!(refusal.code, refused.code(), "{name} {model:?} {kind:?}")
                        }
                        _ => panic!(
                            "{name:?} in {model:?}, {kind:?}: simulation {sim:?}, rule {rule:?}"
                        ),
                    }
                }
            }
        }
    }

    fn taking(minute: i64) -> Taking {
        let at = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::minutes(minute);
        Taking {
            started_at: at,
            backup_time: at,
            size_bytes: 1,
            job_id: Some(Uuid::new_v4()),
            external_id: None,
        }
    }

    fn step(set: &BackupSet, recovery: Recovery) -> RestoreStep {
        RestoreStep {
            recovery_point_id: Uuid::new_v4(),
            statement: if set.kind == Log {
                RestoreStatement::RestoreLog
            } else {
                RestoreStatement::RestoreDatabase
            },
            backup_type: set.kind,
            backup_time: set.backup_time,
            backup_set_uuid: Some(set.backup_set_uuid),
            first_lsn: set.first_lsn.to_string(),
            last_lsn: set.last_lsn.to_string(),
            recovery,
            stop_at: None,
        }
    }

    fn sequence(sets: &[&BackupSet]) -> Vec<(RestoreStep, BackupSet)> {
        sets.iter()
            .enumerate()
            .map(|(i, set)| {
                let recovery = if i + 1 == sets.len() {
                    Recovery::Recovery
                } else {
                    Recovery::NoRecovery
                };
                (step(set, recovery), (*set).clone())
            })
            .collect()
    }

    #[test]
    fn replay_follows_the_redo_point() {
        let mut clock = LsnClock::default();
        let busy = Activity {
            busy: true,
            bulk_operations: false,
        };
        let mut db = Database::new(Some(RecoveryModel::Full));
        let mut take = |db: &mut Database, kind, minute| {
            db.backup("sales", kind, busy, taking(minute), &mut clock)
                .unwrap()
        };
        let full = take(&mut db, Full, 0);
        let log1 = take(&mut db, Log, 15);
        let diff = take(&mut db, Differential, 20);
        let log2 = take(&mut db, Log, 30);
        assert!(full.first_lsn < full.checkpoint_lsn.unwrap());
        assert_eq!(diff.differential_base, full.differential_base);
        assert_eq!(
            log1.first_lsn, full.first_lsn,
            "the chain starts with the full"
        );

        let replayed = replay(&sequence(&[&full, &diff, &log2])).unwrap();
        assert_eq!(replayed.redo_lsn, log2.last_lsn);
        assert_eq!(replayed.differential_base, full.differential_base);
        assert_eq!(replayed.database_guid, db.database_guid);
        assert!(!replayed.stopped_inside_log);
        replay(&sequence(&[&full, &log1, &log2])).unwrap();
        // The differential after the logs that passed it.
        let late = replay(&sequence(&[&full, &log1, &log2, &diff])).unwrap_err();
        assert_eq!(late.code, codes::DIFFERENTIAL_BASE_MISMATCH);
        assert!(
            late.message.contains("already rolled forward"),
            "{}",
            late.message
        );

        // Another database's log, at LSNs that would fit.
        let mut other = Database::new(Some(RecoveryModel::Full));
        other
            .backup("hr", Full, busy, taking(0), &mut clock)
            .unwrap();
        let mut stranger = other
            .backup("hr", Log, busy, taking(31), &mut clock)
            .unwrap();
        stranger.first_lsn = log1.first_lsn;
        let refused = replay(&sequence(&[&full, &stranger])).unwrap_err();
        assert_eq!(refused.code, codes::SEQUENCE_INVALID);
        assert!(
            refused.message.contains("another database"),
            "{}",
            refused.message
        );

        let empty = replay(&[]).unwrap_err();
        assert_eq!(empty.code, codes::SEQUENCE_INVALID);
    }

    #[test]
    fn a_restored_database_is_a_new_fork_of_its_restore_point() {
        let mut clock = LsnClock::default();
        let mut db = Database::new(Some(RecoveryModel::Full));
        let idle = Activity::default();
        let full = db
            .backup("sales", Full, idle, taking(0), &mut clock)
            .unwrap();
        let log = db
            .backup("sales", Log, idle, taking(15), &mut clock)
            .unwrap();
        let first_fork = db.fork;
        let replayed = replay(&sequence(&[&full, &log])).unwrap();

        let mut copy = Database::new(None);
        copy.restored(&replayed, &mut clock);
        assert_ne!(copy.database_guid, db.database_guid, "another database");
        assert_eq!(copy.fork.point_lsn, Some(log.last_lsn));
        assert_ne!(copy.fork.guid, first_fork.guid);
        let next = copy
            .backup("copy", Log, idle, taking(20), &mut clock)
            .unwrap();
        assert_eq!(next.first_lsn, log.last_lsn);
        assert_eq!(next.fork_point_lsn, Some(log.last_lsn));

        let guid = db.database_guid;
        db.restored(&replayed, &mut clock);
        assert_eq!(db.database_guid, guid, "over itself");
        assert_eq!(db.history.len(), 2, "msdb keeps the history");
    }
}
