//! Doing a job, as a SQL Server VM would, from the inventory file and the simulated
//! databases ([`crate::sim`]).

use std::collections::HashSet;
use std::time::Duration;

use backvault_domain::agent::protocol::{ClaimedJob, ScheduledBackup};
use backvault_domain::agent::{
    JobResult, RecoveryModel, RecoveryPointReport, RecoveryPointType, ReplicaRole, SqlDatabase,
    SynchronizationHealth,
};
use backvault_domain::jobs::JobKind;
use backvault_domain::lsn::Lsn;
use backvault_domain::restore::RestoreStep;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::config::{DatabaseEntry, InventoryFile, InventorySource};
use crate::sim::{self, BackupSet, Database, Refusal, RestoreRecord, Taking, codes};
use crate::store::{DbKey, Saving, SharedDb, SimState, Store};

#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per job, moved once into its report: boxing buys nothing"
)]
pub enum Outcome {
    Complete {
        result: JobResult,
        warnings: Vec<String>,
    },
    Fail(Failure),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: &'static str,
    pub message: String,
    pub retryable: bool,
}

fn fail(code: &'static str, message: impl Into<String>, retryable: bool) -> Outcome {
    Outcome::Fail(Failure {
        code,
        message: message.into(),
        retryable,
    })
}

/// SQL Server refuses the same statement again on a retry: not worth retrying.
fn refused(refusal: Refusal) -> Outcome {
    fail(refusal.code, refusal.message, false)
}

/// The agent cannot tell what SQL Server would do now; it may later.
fn state_unreadable(e: &anyhow::Error) -> Outcome {
    fail(
        "AgentStateUnreadable",
        format!("The agent cannot read the state of its simulated databases: {e:#}"),
        true,
    )
}

fn inventory_unreadable(e: &anyhow::Error) -> Outcome {
    fail(
        "AgentInventoryUnreadable",
        format!("The agent cannot read its inventory file: {e:#}"),
        true,
    )
}

fn complete(result: JobResult) -> Outcome {
    Outcome::Complete {
        result,
        warnings: Vec::new(),
    }
}

/// What time a backup is stamped with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackupClock {
    /// The agent's clock, as a real SQL Server stamps its backups.
    Clock,
    /// A scheduled job's `scheduled_at` (other jobs: the clock).
    Schedule,
}

impl BackupClock {
    fn now(self, job: &ClaimedJob) -> DateTime<Utc> {
        let scheduled = || serde_json::from_value::<ScheduledBackup>(job.payload.clone()).ok();
        match self {
            BackupClock::Schedule => scheduled().map_or_else(Utc::now, |s| s.scheduled_at),
            BackupClock::Clock => Utc::now(),
        }
    }
}

/// Runs `job`, reporting progress in percent. Cancellation is the caller's: it drops the
/// future. Whatever a job did to a simulated database stays done even then.
pub async fn execute(
    job: &ClaimedJob,
    inventory: &InventorySource,
    store: &Store,
    clock: BackupClock,
    progress: impl Fn(u8),
) -> Outcome {
    let file = if job.kind == JobKind::Discovery {
        // Discovery must report what the file says now, never an older version.
        match inventory.reload() {
            Ok(file) => file,
            Err(e) => return inventory_unreadable(&e),
        }
    } else {
        // Re-read too: a recovery model switched or another tool's backup added since the
        // last job happens to the database before this one.
        inventory.current()
    };

    let started_at = clock.now(job);
    simulate_work(Duration::from_millis(file.faults.backup_millis), &progress).await;
    if rand::random::<f64>() < file.faults.failure_rate {
        return fail(
            "UserErrorOpeningSQLConnection",
            "Cannot open a connection to SQL Server (simulated transient fault).",
            true,
        );
    }

    match job.kind {
        JobKind::Discovery => {
            if let Err(e) = observe(&file, store, started_at).await {
                return state_unreadable(&e);
            }
            discover(&file)
        }
        JobKind::ConfigureProtection => complete(JobResult::ConfigureProtection {}),
        JobKind::BackupFull | JobKind::BackupDifferential | JobKind::BackupLog => {
            backup(job, inventory, store, started_at, clock).await
        }
        JobKind::Restore => restore(job, &file, store, started_at, clock).await,
    }
}

/// Sleeps `total` in steps, so that heartbeats carry some progress on long jobs.
async fn simulate_work(total: Duration, progress: &impl Fn(u8)) {
    const STEPS: u8 = 10;
    progress(0);
    if total.is_zero() {
        return;
    }
    for step in 1..=STEPS {
        tokio::time::sleep(total / u32::from(STEPS)).await;
        progress(step * (100 / STEPS));
    }
}

fn discover(file: &InventoryFile) -> Outcome {
    if !file.sysadmin() {
        return fail(
            "UserErrorSQLNoSysAdminMembership",
            "The backup service account (NT SERVICE\\AzureWLBackupPluginSvc) is not a member \
             of the sysadmin server role on this VM's SQL Server instances. Grant it sysadmin, \
             then run discovery again.",
            false,
        );
    }
    complete(JobResult::Discovery {
        inventory: file.sql_inventory(),
    })
}

fn backup_type(job: &ClaimedJob) -> RecoveryPointType {
    match job.kind {
        JobKind::BackupDifferential => RecoveryPointType::Differential,
        JobKind::BackupLog => RecoveryPointType::Log,
        _ if job.payload.get("copy_only").and_then(|v| v.as_bool()) == Some(true) => {
            RecoveryPointType::CopyOnlyFull
        }
        _ => RecoveryPointType::Full,
    }
}

fn backup_size(db: &SqlDatabase, kind: RecoveryPointType) -> i64 {
    match kind {
        RecoveryPointType::Full | RecoveryPointType::CopyOnlyFull => db.size_bytes,
        RecoveryPointType::Differential => db.size_bytes / 10,
        RecoveryPointType::Log => db.size_bytes / 100,
    }
}

/// A backup set as the point report describes it, LSNs in the form the database's
/// `textual_lsns` knob asks for.
fn report(instance: &str, database: &str, set: &BackupSet, textual: bool) -> RecoveryPointReport {
    let lsn = |lsn: Lsn| match textual.then(|| lsn.textual()).flatten() {
        Some(text) => text,
        None => lsn.to_string(),
    };
    let base = set.reported_base();
    RecoveryPointReport {
        instance: instance.to_owned(),
        database: database.to_owned(),
        backup_type: set.kind,
        started_at: set.started_at,
        backup_time: set.backup_time,
        first_lsn: lsn(set.first_lsn),
        last_lsn: lsn(set.last_lsn),
        database_backup_lsn: lsn(set.database_backup_lsn),
        size_bytes: set.size_bytes,
        checkpoint_lsn: set.checkpoint_lsn.map(lsn),
        differential_base_lsn: base.map(|b| lsn(b.checkpoint_lsn)),
        differential_base_guid: base.map(|b| b.guid),
        backup_set_uuid: Some(set.backup_set_uuid),
        is_copy_only: Some(set.kind == RecoveryPointType::CopyOnlyFull),
        begins_log_chain: Some(set.begins_log_chain),
        has_bulk_logged_data: Some(set.has_bulk_logged_data),
        recovery_model: Some(set.recovery_model),
        recovery_fork_guid: Some(set.recovery_fork_guid),
        fork_point_lsn: set.fork_point_lsn.map(lsn),
        database_guid: Some(set.database_guid),
    }
}

/// Brings a database up to what the inventory says happened to it since the last job:
/// its recovery model, its own work, another tool's backups (each once).
fn prepare(sim: &mut SimState, key: &DbKey, entry: &DatabaseEntry, at: DateTime<Utc>) {
    let SimState {
        clock, databases, ..
    } = sim;
    let db = databases
        .entry(key.clone())
        .or_insert_with(|| Database::new(Some(entry.sql.recovery_model)));
    db.set_recovery_model(entry.sql.recovery_model);
    db.note_activity(entry.activity());
    for external in &entry.sim.external_backups {
        if !db.applied_external.insert(external.id.clone()) {
            continue;
        }
        let taking = Taking {
            started_at: at,
            backup_time: at,
            size_bytes: backup_size(&entry.sql, external.kind),
            job_id: None,
            external_id: Some(external.id.clone()),
        };
        match db.backup(
            &entry.sql.name,
            external.kind,
            entry.activity(),
            taking,
            clock,
        ) {
            Ok(set) => tracing::info!(
                database = entry.sql.name,
                id = external.id,
                backup_set_uuid = %set.backup_set_uuid,
                "another tool took a backup"
            ),
            // The other tool's job failed; it is not ours to report.
            Err(refusal) => tracing::warn!(
                database = entry.sql.name,
                id = external.id,
                code = refusal.code,
                message = refusal.message,
                "another tool's backup was refused"
            ),
        }
    }
}

/// Discovery looks at SQL Server: whatever the file says happened to a database (a
/// recovery model switch, another tool's backup) has happened by now, whether or not a
/// job touched the database since. A switch to simple and back between two backups still
/// breaks the log chain.
async fn observe(file: &InventoryFile, store: &Store, at: DateTime<Utc>) -> anyhow::Result<()> {
    let entries: Vec<(DbKey, &DatabaseEntry)> = file
        .databases
        .iter()
        .map(|e| (file.db_key(&e.sql.instance, &e.sql.name), e))
        .collect();
    let locked = store
        .lock(
            entries.iter().map(|(key, _)| key.clone()),
            file.shared_databases(),
        )
        .await?;
    let ((), saving) = locked.apply(|sim| {
        for (key, entry) in &entries {
            prepare(sim, key, entry, at);
        }
    });
    saved(saving).await;
    Ok(())
}

/// Waits for the state file to hold what a job did. A failed save is logged, not failed:
/// the backups exist either way, and the server is better off knowing them.
async fn saved(saving: Saving) {
    if let Err(e) = saving.finished().await {
        tracing::error!(error = format!("{e:#}"), "cannot save the simulation state");
    }
}

async fn backup(
    job: &ClaimedJob,
    inventory: &InventorySource,
    store: &Store,
    started_at: DateTime<Utc>,
    clock: BackupClock,
) -> Outcome {
    // Read again now that the job's work is done: a failover since it started decides
    // what this VM's replica may back up.
    let file = match inventory.reload() {
        Ok(file) => file,
        Err(e) => {
            let last = inventory.last_good();
            let in_group = job.items.iter().any(|item| {
                last.database(&item.instance, &item.database)
                    .is_some_and(|d| d.sql.availability_group.is_some())
            });
            // An old role is a wrong answer; another attempt may read the file whole.
            if in_group {
                return inventory_unreadable(&e);
            }
            tracing::warn!(
                error = format!("{e:#}"),
                "inventory unreadable, using the last good one"
            );
            last
        }
    };
    let kind = backup_type(job);
    let keys: Vec<DbKey> = job
        .items
        .iter()
        .map(|item| file.db_key(&item.instance, &item.database))
        .collect();
    let shared: Vec<SharedDb> = file
        .shared_databases()
        .into_iter()
        .filter(|db| keys.contains(&db.key))
        .collect();
    let locked = match store.lock(keys.iter().cloned(), shared).await {
        Ok(locked) => locked,
        Err(e) => return state_unreadable(&e),
    };
    let backup_time = clock.now(job);
    let (outcome, saving) =
        locked.apply(|sim| back_up_now(sim, job, &file, &keys, kind, (started_at, backup_time)));
    saved(saving).await;
    outcome
}

/// Why SQL Server would refuse, on this VM's replica of the database's availability
/// group, a backup of `kind` now. Retryable: after a failover the server sends the job to
/// the replica that can take it, or this one can again.
fn replica_refusal(
    file: &InventoryFile,
    entry: &DatabaseEntry,
    kind: RecoveryPointType,
) -> Option<Refusal> {
    let ag = file.group_of(&entry.sql)?;
    let local = file
        .local_replica(ag)
        .expect("validated: every group has this VM's replica");
    let (name, group) = (&entry.sql.name, &ag.group.name);
    let message = match (local.role, kind) {
        (ReplicaRole::Primary, _) => return None,
        (ReplicaRole::Resolving, _) => format!(
            "Database {name} cannot be backed up: this VM's replica of availability group \
             {group} is resolving (a failover is under way, or it lost its quorum), and a \
             resolving replica takes no backup. It can once it is primary or secondary again."
        ),
        (ReplicaRole::Secondary, RecoveryPointType::Full | RecoveryPointType::Differential) => {
            format!(
                "This BACKUP or RESTORE command is not supported on a database mirror or \
                 secondary replica (SQL Server Msg 3059): database {name} is a secondary \
                 database of availability group {group} here, where only copy-only full and \
                 log backups run. A {} backup runs on the primary replica.",
                match kind {
                    RecoveryPointType::Differential => "differential",
                    _ => "full",
                }
            )
        }
        (ReplicaRole::Secondary, RecoveryPointType::Log)
            if local.synchronization_health == SynchronizationHealth::NotHealthy =>
        {
            format!(
                "BACKUP LOG of database {name} cannot run here: this VM's replica of \
                 availability group {group} is not healthy, and a secondary database that is \
                 NOT SYNCHRONIZING cannot back up its log. It can once the replica \
                 synchronizes, and the primary or a healthy secondary can now."
            )
        }
        (ReplicaRole::Secondary, _) => return None,
    };
    Some(Refusal {
        code: codes::NOT_SUPPORTED,
        message,
    })
}

fn back_up_now(
    sim: &mut SimState,
    job: &ClaimedJob,
    file: &InventoryFile,
    keys: &[DbKey],
    kind: RecoveryPointType,
    (started_at, backup_time): (DateTime<Utc>, DateTime<Utc>),
) -> Outcome {
    let entries: Vec<Option<&DatabaseEntry>> = job
        .items
        .iter()
        .map(|item| file.database(&item.instance, &item.database))
        .collect();
    for (key, entry) in keys.iter().zip(&entries) {
        if let Some(entry) = entry {
            prepare(sim, key, entry, started_at);
        }
    }

    // A retry of a job that already took its backups (its completion never reached the
    // server): SQL Server has them, so they are reported again, not taken again.
    let mut again: Vec<Option<BackupSet>> = Vec::with_capacity(keys.len());
    let mut seen = HashSet::new();
    for key in keys {
        let set = sim.databases.get(key).and_then(|db| {
            db.sets_of_job(job.job_id, kind)
                .find(|s| !seen.contains(&s.backup_set_uuid))
                .cloned()
        });
        if let Some(set) = &set {
            seen.insert(set.backup_set_uuid);
        }
        again.push(set);
    }

    // Check every database before backing any up: a job fails or succeeds as a whole.
    for (((item, key), entry), again) in job.items.iter().zip(keys).zip(&entries).zip(&again) {
        if again.is_some() {
            continue;
        }
        let Some(entry) = entry else {
            return fail(
                codes::DOES_NOT_EXIST,
                format!(
                    "Database {} does not exist on SQL instance {} of this VM; it may have \
                     been dropped or renamed.",
                    item.database, item.instance
                ),
                false,
            );
        };
        if let Some(refusal) = replica_refusal(file, entry, kind) {
            return fail(refusal.code, refusal.message, true);
        }
        let db = sim.database(key, entry.sql.recovery_model);
        if let Err(refusal) = db.check_backup(&entry.sql.name, kind) {
            return refused(refusal);
        }
    }

    let mut recovery_points = Vec::with_capacity(job.items.len());
    for (((item, key), entry), again) in job.items.iter().zip(keys).zip(&entries).zip(again) {
        let set = match again {
            Some(set) => {
                tracing::info!(
                    database = item.database,
                    backup_set_uuid = %set.backup_set_uuid,
                    "reporting the backup this job took on an earlier attempt"
                );
                set
            }
            None => {
                let entry = entry.expect("checked above");
                let taking = Taking {
                    started_at,
                    backup_time,
                    size_bytes: backup_size(&entry.sql, kind),
                    job_id: Some(job.job_id),
                    external_id: None,
                };
                let SimState {
                    clock, databases, ..
                } = &mut *sim;
                let db = databases.get_mut(key).expect("prepared above");
                match db.backup(&entry.sql.name, kind, entry.activity(), taking, clock) {
                    Ok(set) => set,
                    Err(refusal) => return refused(refusal),
                }
            }
        };
        let textual = entry.is_some_and(|e| e.sim.textual_lsns);
        // Named as the job named it, so the server can match the point to the item.
        recovery_points.push(report(&item.instance, &item.database, &set, textual));
    }
    let warnings = if job.items.is_empty() {
        vec!["The job lists no databases; nothing was backed up.".to_owned()]
    } else {
        Vec::new()
    };
    Outcome::Complete {
        result: JobResult::Backup { recovery_points },
        warnings,
    }
}

/// A restore job's payload. Every field may be missing, as in payloads older than it.
#[derive(Debug, Default, Deserialize)]
struct RestorePayload {
    /// Else the item's database.
    target_database: Option<String>,
    /// Else the item's instance.
    target_instance: Option<String>,
    /// A database of that name exists and is replaced.
    #[serde(default)]
    overwrite: bool,
    /// Take a tail-log backup of the database being overwritten first.
    #[serde(default)]
    tail_log_backup: bool,
    /// `RESTORE … WITH REPLACE`: overwrite without a tail-log backup.
    #[serde(default)]
    replace: bool,
    /// Typed steps ([`RestoreStep`]), or the ids and times of payloads before them.
    #[serde(default)]
    steps: Vec<serde_json::Value>,
}

/// Steps the agent can replay: all of them typed. A payload from before typed steps has
/// nothing to check its restore against.
fn typed_steps(raw: &[serde_json::Value]) -> Option<Vec<RestoreStep>> {
    if raw.is_empty() {
        return None;
    }
    raw.iter()
        .map(|step| serde_json::from_value(step.clone()).ok())
        .collect()
}

const SYSTEM_DATABASES: [&str; 4] = ["master", "model", "msdb", "tempdb"];

/// Where a restore writes.
struct Target<'a> {
    /// As the job named them.
    instance: &'a str,
    database: &'a str,
    key: DbKey,
    entry: Option<&'a DatabaseEntry>,
}

/// Restores onto the target, unless SQL Server would refuse to.
async fn restore(
    job: &ClaimedJob,
    file: &InventoryFile,
    store: &Store,
    started_at: DateTime<Utc>,
    clock: BackupClock,
) -> Outcome {
    let payload = match serde_json::from_value::<Option<RestorePayload>>(job.payload.clone()) {
        Ok(payload) => payload.unwrap_or_default(),
        Err(e) => {
            return fail(
                "AgentInvalidPayload",
                format!("The restore job's payload is malformed: {e}."),
                false,
            );
        }
    };
    let item = job.items.first();
    let database = payload
        .target_database
        .as_deref()
        .or_else(|| item.map(|item| item.database.as_str()));
    let instance = payload
        .target_instance
        .as_deref()
        .or_else(|| item.map(|item| item.instance.as_str()));
    let (Some(database), Some(instance)) = (database, instance) else {
        return fail(
            "AgentInvalidPayload",
            "The restore job names no target: it has no item, and its payload lacks \
             target_database or target_instance.",
            false,
        );
    };
    if let Some(why) = invalid_name(database) {
        return fail(
            "UserErrorInvalidRestoreTargetName",
            format!("Cannot restore as database {database:?}: {why}. Choose another target name."),
            false,
        );
    }
    let Some(found) = file.instance(instance) else {
        return fail(
            "UserErrorSQLInstanceNotFound",
            format!(
                "SQL instance {instance} does not exist on this VM. Choose one of its \
                 instances, or run discovery again if it was just installed."
            ),
            false,
        );
    };
    // Ignoring case whatever the collation: a name that reads as a system database's is
    // refused even where the collation would make it another database.
    if SYSTEM_DATABASES
        .iter()
        .any(|system| system.eq_ignore_ascii_case(database))
    {
        return fail(
            "UserErrorRestoreSystemDatabase",
            format!(
                "{database} is a system database of SQL instance {}; a backup cannot be \
                 restored over it. Restore under another database name.",
                found.name
            ),
            false,
        );
    }
    let existing = file.database(&found.name, database);
    if !payload.overwrite && existing.is_some() {
        return fail(
            codes::EXISTING_DATABASE,
            format!(
                "Database {database} already exists on SQL instance {} (SQL Server Msg 3154). \
                 Restore with overwrite to replace it, or under another database name.",
                found.name
            ),
            false,
        );
    }
    let Some(steps) = typed_steps(&payload.steps) else {
        // Overwrite meant REPLACE before payloads said which.
        return complete(JobResult::Restore {
            tail_log_backup: None,
            restored_database: database.to_owned(),
        });
    };
    let target = Target {
        instance,
        database,
        key: file.db_key(&found.name, database),
        entry: existing,
    };
    let source = item.map(|item| {
        (
            file.db_key(&item.instance, &item.database),
            file.database(&item.instance, &item.database),
        )
    });
    let keys = source
        .iter()
        .map(|(key, _)| key.clone())
        .chain([target.key.clone()]);
    // Every shared file: a restore may read the backup sets another replica took.
    let locked = match store.lock(keys, file.shared_databases()).await {
        Ok(locked) => locked,
        Err(e) => return state_unreadable(&e),
    };
    let backup_time = clock.now(job);
    let (outcome, saving) = locked.apply(|sim| {
        if let Some((key, Some(entry))) = &source {
            prepare(sim, key, entry, started_at);
        }
        restore_now(
            sim,
            job,
            &payload,
            steps,
            &target,
            (started_at, backup_time),
        )
    });
    saved(saving).await;
    outcome
}

fn restore_now(
    sim: &mut SimState,
    job: &ClaimedJob,
    payload: &RestorePayload,
    steps: Vec<RestoreStep>,
    target: &Target<'_>,
    (started_at, backup_time): (DateTime<Utc>, DateTime<Utc>),
) -> Outcome {
    if let Some(entry) = target.entry {
        prepare(sim, &target.key, entry, started_at);
    }
    let textual = target.entry.is_some_and(|e| e.sim.textual_lsns);
    let tail_report = |set: &BackupSet| report(target.instance, target.database, set, textual);

    // A retry of a restore that already ran: report it again rather than run it twice.
    if let Some(done) = sim
        .databases
        .get(&target.key)
        .and_then(|db| db.restore_of_job(job.job_id))
    {
        let tail = done
            .tail_log_backup
            .and_then(|uuid| sim.backup_set(uuid))
            .map(tail_report);
        return complete(JobResult::Restore {
            restored_database: done.restored_database.clone(),
            tail_log_backup: tail.map(Box::new),
        });
    }

    let mut resolved = Vec::with_capacity(steps.len());
    let mut unverified = None;
    for (i, step) in steps.into_iter().enumerate() {
        let set = match step.backup_set_uuid {
            Some(uuid) => sim.backup_set(uuid).cloned(),
            None => find_by_lsns(sim, &step).cloned(),
        };
        match (set, step.backup_set_uuid) {
            (Some(set), _) => resolved.push((step, set)),
            (None, Some(uuid)) => {
                return refused(Refusal {
                    code: codes::BACKUP_SET_NOT_FOUND,
                    message: format!(
                        "Step {}: backup set {uuid} is not on this VM: the backup device \
                         cannot be opened, the file is not found (SQL Server Msg 3201).",
                        i + 1
                    ),
                });
            }
            (None, None) => {
                unverified = Some(i + 1);
                break;
            }
        }
    }
    let replayed = match unverified {
        Some(_) => None,
        None => match sim::replay(&resolved) {
            Ok(replayed) => Some(replayed),
            Err(refusal) => return refused(refusal),
        },
    };

    let model = sim
        .databases
        .get(&target.key)
        .map_or(RecoveryModel::Simple, Database::model);
    if payload.overwrite
        && target.entry.is_some()
        && model != RecoveryModel::Simple
        && !payload.replace
        && !payload.tail_log_backup
    {
        return fail(
            codes::EXISTING_DATABASE,
            format!(
                "Database {} on SQL instance {} uses the {} recovery model and the tail of its \
                 log has not been backed up (SQL Server Msg 3159). Restore with a tail-log \
                 backup, or with replace to discard what it logged since its last log backup.",
                target.database,
                target.instance,
                match model {
                    RecoveryModel::BulkLogged => "bulk-logged",
                    _ => "full",
                }
            ),
            false,
        );
    }

    let tail = if payload.tail_log_backup {
        let Some(entry) = target.entry else {
            return fail(
                codes::DOES_NOT_EXIST,
                format!(
                    "Database {} does not exist on SQL instance {}: there is no log to take a \
                     tail-log backup of.",
                    target.database, target.instance
                ),
                false,
            );
        };
        let taking = Taking {
            started_at,
            backup_time,
            size_bytes: backup_size(&entry.sql, RecoveryPointType::Log),
            job_id: Some(job.job_id),
            external_id: None,
        };
        let SimState {
            clock, databases, ..
        } = &mut *sim;
        let db = databases.get_mut(&target.key).expect("prepared above");
        // `BACKUP LOG … WITH NORECOVERY`: it leaves the database restoring, which the
        // restore that follows at once ends.
        match db.backup(
            &entry.sql.name,
            RecoveryPointType::Log,
            entry.activity(),
            taking,
            clock,
        ) {
            Ok(set) => Some(set),
            Err(refusal) => return refused(refusal),
        }
    } else {
        None
    };

    let mut warnings = Vec::new();
    let SimState {
        clock, databases, ..
    } = &mut *sim;
    let db = databases
        .entry(target.key.clone())
        .or_insert_with(|| Database::new(replayed.as_ref().map(|r| r.recovery_model)));
    match &replayed {
        Some(replayed) => {
            db.restored(replayed, clock);
            tracing::info!(
                steps = resolved.len(),
                redo_lsn = %replayed.redo_lsn,
                reached = %replayed.reached,
                fork = %db.fork.guid,
                "restore replayed"
            );
        }
        None => warnings.push(format!(
            "Step {} names no backup set the agent knows, so the restore was not replayed \
             against the backup history.",
            unverified.unwrap_or_default()
        )),
    }
    db.record_restore(RestoreRecord {
        job_id: job.job_id,
        restored_database: target.database.to_owned(),
        tail_log_backup: tail.as_ref().map(|set| set.backup_set_uuid),
        fork_guid: db.fork.guid,
    });
    Outcome::Complete {
        result: JobResult::Restore {
            restored_database: target.database.to_owned(),
            tail_log_backup: tail.as_ref().map(tail_report).map(Box::new),
        },
        warnings,
    }
}

/// A step from a point reported without a `backup_set_uuid`: the backup set with its type
/// and LSNs, if this VM took it.
fn find_by_lsns<'a>(sim: &'a SimState, step: &RestoreStep) -> Option<&'a BackupSet> {
    let (first, last) = (Lsn::parse(&step.first_lsn)?, Lsn::parse(&step.last_lsn)?);
    sim.databases.values().find_map(|db| {
        db.history
            .iter()
            .find(|s| s.kind == step.backup_type && s.first_lsn == first && s.last_lsn == last)
    })
}

/// Why SQL Server would not take `name` for a database.
fn invalid_name(name: &str) -> Option<&'static str> {
    // Names are `sysname`, nvarchar(128): 128 UTF-16 code units.
    const MAX_UTF16_UNITS: usize = 128;
    if name.is_empty() {
        Some("the name is empty")
    } else if name.encode_utf16().count() > MAX_UTF16_UNITS {
        Some("the name is longer than the 128 characters SQL Server allows")
    } else if name.chars().any(char::is_control) {
        Some("the name contains control characters")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use backvault_domain::agent::JobItem;
    use backvault_domain::restore::{Recovery, RestoreStatement};
    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::config::supports_log_backup;

    /// The sample inventory, without the simulated delay, in a file of its own.
    struct TempInventory(PathBuf);

    impl TempInventory {
        fn new(edit: impl FnOnce(String) -> String) -> Self {
            let sample = include_str!("../sample-inventory.toml");
            let text = edit(sample.replace("backup_millis = 200", "backup_millis = 0"));
            let name = format!("backvault-inventory-{}.toml", Uuid::new_v4());
            let path = std::env::temp_dir().join(name);
            std::fs::write(&path, text).unwrap();
            Self(path)
        }

        fn source(&self) -> InventorySource {
            InventorySource::open(self.0.clone()).unwrap()
        }

        /// Changes the file, as someone would while the agent runs.
        fn edit(&self, edit: impl FnOnce(String) -> String) {
            let text = std::fs::read_to_string(&self.0).unwrap();
            let edited = edit(text.clone());
            assert_ne!(edited, text, "the edit changes the file");
            std::fs::write(&self.0, edited).unwrap();
        }
    }

    impl Drop for TempInventory {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// `hr`'s table gets `line`.
    fn hr_gets(line: &str) -> impl FnOnce(String) -> String {
        let line = line.to_owned();
        move |s| s.replace("name = \"hr\"\n", &format!("name = \"hr\"\n{line}\n"))
    }

    fn hr_model(from: &str, to: &str) -> impl FnOnce(String) -> String {
        let (from, to) = (from.to_owned(), to.to_owned());
        move |s| {
            s.replace(
                &format!("name = \"hr\"\nrecovery_model = \"{from}\""),
                &format!("name = \"hr\"\nrecovery_model = \"{to}\""),
            )
        }
    }

    fn job(kind: JobKind, dbs: &[(&str, &str)], payload: serde_json::Value) -> ClaimedJob {
        ClaimedJob {
            job_id: Uuid::new_v4(),
            kind,
            lease: 1,
            lease_expires_at: Utc::now(),
            attempt: 1,
            items: dbs
                .iter()
                .map(|(instance, database)| JobItem {
                    instance: (*instance).to_owned(),
                    database: (*database).to_owned(),
                    protected_item_id: None,
                })
                .collect(),
            payload,
        }
    }

    async fn run(job: &ClaimedJob, inventory: &InventorySource, store: &Store) -> Outcome {
        execute(job, inventory, store, BackupClock::Clock, |_| {}).await
    }

    async fn backed_up(
        job: &ClaimedJob,
        inventory: &InventorySource,
        store: &Store,
    ) -> Vec<RecoveryPointReport> {
        backed_up_by(BackupClock::Clock, job, inventory, store).await
    }

    async fn backed_up_by(
        clock: BackupClock,
        job: &ClaimedJob,
        inventory: &InventorySource,
        store: &Store,
    ) -> Vec<RecoveryPointReport> {
        match execute(job, inventory, store, clock, |_| {}).await {
            Outcome::Complete {
                result: JobResult::Backup { recovery_points },
                ..
            } => {
                for (i, p) in recovery_points.iter().enumerate() {
                    let pointer = format!("/result/recovery_points/{i}");
                    assert_eq!(p.violations(&pointer), [], "the server accepts {p:?}");
                }
                recovery_points
            }
            other => panic!("expected recovery points, got {other:?}"),
        }
    }

    /// One backup of one database of MSSQLSERVER, stamped `at` (a scheduled instant).
    async fn backup_at(
        kind: JobKind,
        db: &str,
        at: &str,
        inventory: &InventorySource,
        store: &Store,
    ) -> RecoveryPointReport {
        let payload = json!({"slot_at": at, "scheduled_at": at});
        let job = job(kind, &[("MSSQLSERVER", db)], payload);
        let mut points = backed_up_by(BackupClock::Schedule, &job, inventory, store).await;
        assert_eq!(points.len(), 1);
        points.remove(0)
    }

    async fn one(
        kind: JobKind,
        db: &str,
        inventory: &InventorySource,
        store: &Store,
    ) -> RecoveryPointReport {
        let mut points = backed_up(
            &job(kind, &[("MSSQLSERVER", db)], json!({})),
            inventory,
            store,
        )
        .await;
        points.remove(0)
    }

    async fn failure_in(job: &ClaimedJob, inventory: &InventorySource, store: &Store) -> Failure {
        match run(job, inventory, store).await {
            Outcome::Fail(failure) => failure,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    async fn failure(job: &ClaimedJob, inventory: &InventorySource) -> Failure {
        failure_in(job, inventory, &Store::in_memory()).await
    }

    /// The failure of a backup of `db`, with its code and SQL Server message number.
    async fn refused_backup(
        kind: JobKind,
        db: &str,
        payload: serde_json::Value,
        inventory: &InventorySource,
        store: &Store,
    ) -> (&'static str, String) {
        let f = failure_in(
            &job(kind, &[("MSSQLSERVER", db)], payload),
            inventory,
            store,
        )
        .await;
        assert!(!f.retryable, "{f:?}");
        (f.code, f.message)
    }

    fn lsn(text: &str) -> Lsn {
        Lsn::parse(text).unwrap_or_else(|| panic!("{text:?} is an LSN"))
    }

    fn key(db: &str) -> DbKey {
        DbKey::new("MSSQLSERVER", db)
    }

    async fn discovered(inventory: &InventorySource) -> Vec<SqlDatabase> {
        let discovery = job(JobKind::Discovery, &[], json!({}));
        match run(&discovery, inventory, &Store::in_memory()).await {
            Outcome::Complete {
                result: JobResult::Discovery { inventory },
                ..
            } => inventory.databases,
            other => panic!("expected an inventory, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn discovery_reads_the_file_again() {
        let temp = TempInventory::new(|s| s);
        let inventory = temp.source();
        assert_eq!(discovered(&inventory).await.len(), 6);

        temp.edit(|s| {
            s + "\n[[databases]]\ninstance = \"MSSQLSERVER\"\nname = \"new\"\n\
                 recovery_model = \"full\"\nsize_bytes = 1\n"
        });
        assert!(discovered(&inventory).await.iter().any(|d| d.name == "new"));
    }

    #[tokio::test]
    async fn discovery_needs_sysadmin() {
        let temp = TempInventory::new(|s| s.replace("sysadmin = true", "sysadmin = false"));
        let f = failure(&job(JobKind::Discovery, &[], json!(null)), &temp.source()).await;
        assert_eq!(
            (f.code, f.retryable),
            ("UserErrorSQLNoSysAdminMembership", false)
        );
        assert!(f.message.contains("sysadmin"));
    }

    #[tokio::test]
    async fn a_rehearsal_stamps_scheduled_backups_with_the_schedulers_instant() {
        let temp = TempInventory::new(|s| s);
        let (inventory, store) = (temp.source(), Store::in_memory());
        let dbs = [("MSSQLSERVER", "sales")];
        let scheduled_at: DateTime<Utc> = "2031-11-16T00:00:00Z".parse().unwrap();
        let payload = json!({"slot_at": "2031-11-15T23:45:00Z", "scheduled_at": scheduled_at});
        let full = job(JobKind::BackupFull, &dbs, payload.clone());
        let rehearsed = backed_up_by(BackupClock::Schedule, &full, &inventory, &store).await;
        assert_eq!(
            (rehearsed[0].started_at, rehearsed[0].backup_time),
            (scheduled_at, scheduled_at)
        );
        let before = Utc::now();
        let log = job(JobKind::BackupLog, &dbs, payload);
        let clocked = backed_up_by(BackupClock::Clock, &log, &inventory, &store).await;
        assert!(clocked[0].backup_time >= before, "the clock by default");
        let on_demand = job(JobKind::BackupLog, &dbs, json!({}));
        let unscheduled = backed_up_by(BackupClock::Schedule, &on_demand, &inventory, &store).await;
        assert!(
            unscheduled[0].backup_time >= before,
            "no schedule, the clock"
        );
    }

    /// The LSNs of a log chain and a differential, as `msdb` has them.
    #[tokio::test]
    async fn backups_chain_as_sql_servers_do() {
        let temp = TempInventory::new(|s| s);
        let (inventory, store) = (temp.source(), Store::in_memory());
        let dbs = [("MSSQLSERVER", "sales"), ("MSSQLSERVER", "hr")];
        let full = backed_up(
            &job(JobKind::BackupFull, &dbs, json!({})),
            &inventory,
            &store,
        )
        .await;
        assert_eq!(full.len(), 2);
        for p in &full {
            assert_eq!(p.backup_type, RecoveryPointType::Full);
            assert_eq!(p.database_backup_lsn, "0", "no full before it");
            assert_eq!(p.differential_base_lsn, p.checkpoint_lsn, "its own base");
            assert!(p.differential_base_guid.is_some() && p.backup_set_uuid.is_some());
            assert_eq!(
                (p.is_copy_only, p.begins_log_chain, p.has_bulk_logged_data),
                (Some(false), Some(false), Some(false))
            );
            assert_eq!(p.recovery_model, Some(RecoveryModel::Full));
            assert!(p.recovery_fork_guid.is_some() && p.database_guid.is_some());
            assert_eq!(p.fork_point_lsn, None, "never restored");
        }
        assert_ne!(full[0].database_guid, full[1].database_guid);

        let log = job(JobKind::BackupLog, &[("mssqlserver", "SALES")], json!({}));
        let log = backed_up(&log, &inventory, &store).await.remove(0);
        assert_eq!(
            log.database, "SALES",
            "points name databases as the job did"
        );
        assert!(
            lsn(&full[0].first_lsn) <= lsn(&log.first_lsn)
                && lsn(&log.first_lsn) <= lsn(&full[0].last_lsn),
            "the first log reaches back to the full: {log:?}"
        );
        assert!(lsn(&log.last_lsn) > lsn(&full[0].last_lsn));
        assert_eq!(log.begins_log_chain, Some(true));
        assert_eq!(log.checkpoint_lsn, None);
        assert_eq!(
            log.database_backup_lsn,
            full[0].checkpoint_lsn.clone().unwrap()
        );
        assert_eq!(
            (
                log.differential_base_lsn.as_ref(),
                log.differential_base_guid
            ),
            (None, None)
        );
        assert_eq!(log.size_bytes, full[0].size_bytes / 100);
        let log2 = one(JobKind::BackupLog, "sales", &inventory, &store).await;
        assert_eq!(log2.first_lsn, log.last_lsn);
        assert_eq!(log2.begins_log_chain, Some(false));

        let copy = job(JobKind::BackupFull, &dbs[1..], json!({"copy_only": true}));
        let copy = backed_up(&copy, &inventory, &store).await.remove(0);
        assert_eq!(copy.backup_type, RecoveryPointType::CopyOnlyFull);
        assert_eq!(copy.is_copy_only, Some(true));
        assert_eq!(copy.differential_base_lsn, None, "establishes no base");
        assert_eq!(
            copy.database_backup_lsn,
            full[1].checkpoint_lsn.clone().unwrap()
        );

        let diff = one(JobKind::BackupDifferential, "hr", &inventory, &store).await;
        assert_eq!(diff.backup_type, RecoveryPointType::Differential);
        assert_eq!(
            diff.differential_base_lsn, full[1].checkpoint_lsn,
            "not the copy's"
        );
        assert_eq!(diff.differential_base_guid, full[1].differential_base_guid);
        assert_eq!(
            diff.database_backup_lsn,
            full[1].checkpoint_lsn.clone().unwrap()
        );
        assert_eq!(diff.size_bytes, full[1].size_bytes / 10);

        let log3 = one(JobKind::BackupLog, "sales", &inventory, &store).await;
        let full2 = one(JobKind::BackupFull, "sales", &inventory, &store).await;
        assert_eq!(
            full2.database_backup_lsn,
            full[0].checkpoint_lsn.clone().unwrap(),
            "the previous full's checkpoint"
        );
        assert_ne!(full2.differential_base_guid, full[0].differential_base_guid);
        let log4 = one(JobKind::BackupLog, "sales", &inventory, &store).await;
        assert_eq!(
            log4.first_lsn, log3.last_lsn,
            "a full does not break the log chain"
        );
        assert_eq!(log4.database_backup_lsn, full2.checkpoint_lsn.unwrap());
    }

    /// `sales` is busy in the sample, `hr` idle.
    #[tokio::test]
    async fn a_busy_databases_checkpoint_is_not_its_first_lsn() {
        let temp = TempInventory::new(|s| s);
        let (inventory, store) = (temp.source(), Store::in_memory());
        let busy = one(JobKind::BackupFull, "sales", &inventory, &store).await;
        let checkpoint = lsn(busy.checkpoint_lsn.as_ref().unwrap());
        assert!(lsn(&busy.first_lsn) < checkpoint, "{busy:?}");
        assert!(checkpoint < lsn(&busy.last_lsn));
        let idle = one(JobKind::BackupFull, "hr", &inventory, &store).await;
        assert_eq!(idle.checkpoint_lsn.as_ref(), Some(&idle.first_lsn));

        let diff = one(JobKind::BackupDifferential, "sales", &inventory, &store).await;
        assert_eq!(diff.differential_base_lsn, busy.checkpoint_lsn);
        assert_ne!(
            diff.differential_base_lsn.as_ref(),
            Some(&busy.first_lsn),
            "matched by checkpoint, never by first LSN"
        );
        assert!(lsn(diff.checkpoint_lsn.as_ref().unwrap()) > lsn(&diff.first_lsn));
        let log1 = one(JobKind::BackupLog, "sales", &inventory, &store).await;
        let log2 = one(JobKind::BackupLog, "sales", &inventory, &store).await;
        assert_eq!(log2.first_lsn, log1.last_lsn);
        assert!(
            lsn(&log2.last_lsn).0 > lsn(&log2.first_lsn).0 + 1,
            "the log moved between backups"
        );
    }

    #[tokio::test]
    async fn backups_refuse_what_sql_server_would() {
        let temp = TempInventory::new(|s| s);
        let (inventory, store) = (temp.source(), Store::in_memory());
        let missing = [("MSSQLSERVER", "sales"), ("MSSQLSERVER", "gone")];
        let f = failure_in(
            &job(JobKind::BackupFull, &missing, json!({})),
            &inventory,
            &store,
        )
        .await;
        assert_eq!((f.code, f.retryable), ("UserErrorSQLPODoesNotExist", false));
        assert!(
            store
                .database(&key("sales"))
                .is_none_or(|db| db.history.is_empty()),
            "all or nothing"
        );

        let simple = inventory
            .current()
            .databases
            .iter()
            .find(|d| !supports_log_backup(&d.sql) && !d.sql.system)
            .cloned()
            .unwrap();
        let log = job(
            JobKind::BackupLog,
            &[(&simple.sql.instance, &simple.sql.name)],
            json!({}),
        );
        let f = failure(&log, &inventory).await;
        assert_eq!(
            (f.code, f.retryable),
            ("UserErrorSQLPODoesNotSupportBackupType", false)
        );
        assert!(f.message.contains("Msg 4208"), "{}", f.message);

        let (code, message) =
            refused_backup(JobKind::BackupLog, "sales", json!({}), &inventory, &store).await;
        assert_eq!(code, "UserErrorParentFullBackupMissing");
        assert!(message.contains("Msg 4214"), "{message}");
        let (code, message) = refused_backup(
            JobKind::BackupDifferential,
            "sales",
            json!({}),
            &inventory,
            &store,
        )
        .await;
        assert_eq!(code, "UserErrorParentFullBackupMissing");
        assert!(message.contains("Msg 3035"), "{message}");

        // A copy-only full is neither a differential base nor the start of a log chain.
        let copy_only = job(
            JobKind::BackupFull,
            &[("MSSQLSERVER", "sales")],
            json!({"copy_only": true}),
        );
        backed_up(&copy_only, &inventory, &store).await;
        for kind in [JobKind::BackupLog, JobKind::BackupDifferential] {
            let (code, _) = refused_backup(kind, "sales", json!({}), &inventory, &store).await;
            assert_eq!(code, "UserErrorParentFullBackupMissing", "{kind:?}");
        }
    }

    #[tokio::test]
    async fn tempdb_is_never_backed_up_and_master_only_in_full() {
        let temp = TempInventory::new(|s| {
            s + "\n[[databases]]\ninstance = \"MSSQLSERVER\"\nname = \"tempdb\"\n\
                 recovery_model = \"simple\"\nsystem = true\nsize_bytes = 1\n"
        });
        let (inventory, store) = (temp.source(), Store::in_memory());
        for kind in [
            JobKind::BackupFull,
            JobKind::BackupDifferential,
            JobKind::BackupLog,
        ] {
            let (code, message) =
                refused_backup(kind, "TempDB", json!({}), &inventory, &store).await;
            assert_eq!(code, "UserErrorSQLPODoesNotSupportBackupType");
            assert!(message.contains("Msg 3147"), "{message}");
        }
        let copy = json!({"copy_only": true});
        let (code, message) = refused_backup(
            JobKind::BackupFull,
            "tempdb",
            copy.clone(),
            &inventory,
            &store,
        )
        .await;
        assert_eq!(
            (code, message.contains("Msg 3147")),
            ("UserErrorSQLPODoesNotSupportBackupType", true)
        );

        one(JobKind::BackupFull, "master", &inventory, &store).await;
        let master = job(JobKind::BackupFull, &[("MSSQLSERVER", "master")], copy);
        backed_up(&master, &inventory, &store).await;
        for (kind, msg) in [
            (JobKind::BackupDifferential, "Msg 3024"),
            (JobKind::BackupLog, "Msg 4212"),
        ] {
            let (code, message) =
                refused_backup(kind, "master", json!({}), &inventory, &store).await;
            assert_eq!(code, "UserErrorSQLPODoesNotSupportBackupType");
            assert!(message.contains(msg), "{message}");
        }
        // Even in the full recovery model: by name.
        temp.edit(|s| {
            s.replacen(
                "recovery_model = \"simple\"",
                "recovery_model = \"full\"",
                1,
            )
        });
        let (code, _) =
            refused_backup(JobKind::BackupLog, "master", json!({}), &inventory, &store).await;
        assert_eq!(code, "UserErrorSQLPODoesNotSupportBackupType");
    }

    #[tokio::test]
    async fn a_full_by_another_tool_becomes_the_differential_base() {
        let temp = TempInventory::new(|s| s);
        let (inventory, store) = (temp.source(), Store::in_memory());
        let ours = one(JobKind::BackupFull, "hr", &inventory, &store).await;
        temp.edit(hr_gets(
            "external_backups = [{ id = \"x1\", type = \"full\" }]",
        ));
        let diff = one(JobKind::BackupDifferential, "hr", &inventory, &store).await;

        let db = store.database(&key("hr")).unwrap();
        let foreign: Vec<&BackupSet> = db
            .history
            .iter()
            .filter(|s| s.external_id.as_deref() == Some("x1"))
            .collect();
        assert_eq!(foreign.len(), 1);
        assert_eq!(foreign[0].job_id, None);
        let base = foreign[0].differential_base.unwrap();
        assert_eq!(
            diff.differential_base_lsn,
            Some(base.checkpoint_lsn.to_string())
        );
        assert_eq!(diff.differential_base_guid, Some(base.guid));
        assert_ne!(diff.differential_base_guid, ours.differential_base_guid);
        assert_eq!(diff.database_backup_lsn, base.checkpoint_lsn.to_string());

        let again = one(JobKind::BackupDifferential, "hr", &inventory, &store).await;
        assert_eq!(
            again.differential_base_guid,
            Some(base.guid),
            "applied once"
        );
        assert_eq!(store.database(&key("hr")).unwrap().history.len(), 4);

        // What SQL Server then refuses: our full with that differential.
        let f = restore_failure(&[&ours, &diff], json!({}), &inventory, &store).await;
        assert_eq!(f.code, "UserErrorRestoreDifferentialBaseMismatch");
        assert!(f.message.contains("Msg 3136"), "{}", f.message);
    }

    #[tokio::test]
    async fn a_log_by_another_tool_takes_its_place_in_the_chain() {
        let temp = TempInventory::new(|s| s);
        let (inventory, store) = (temp.source(), Store::in_memory());
        let full = one(JobKind::BackupFull, "hr", &inventory, &store).await;
        let log1 = one(JobKind::BackupLog, "hr", &inventory, &store).await;
        temp.edit(hr_gets(
            "external_backups = [{ id = \"x2\", type = \"log\" }, { id = \"x3\", type = \"copy_only_full\" }]",
        ));
        let log2 = one(JobKind::BackupLog, "hr", &inventory, &store).await;
        let db = store.database(&key("hr")).unwrap();
        let foreign = db
            .history
            .iter()
            .find(|s| s.external_id.as_deref() == Some("x2"))
            .unwrap();
        assert_ne!(
            log2.first_lsn, log1.last_lsn,
            "a gap in what backvault sees"
        );
        assert_eq!(foreign.first_lsn.to_string(), log1.last_lsn);
        assert_eq!(log2.first_lsn, foreign.last_lsn.to_string());
        let diff = one(JobKind::BackupDifferential, "hr", &inventory, &store).await;
        assert_eq!(
            diff.differential_base_guid, full.differential_base_guid,
            "a foreign copy-only full moves no base"
        );

        let f = restore_failure(&[&full, &log1, &log2], json!({}), &inventory, &store).await;
        assert_eq!(f.code, "UserErrorRestoreLogBackupTooRecent");
        assert!(f.message.contains("Msg 4305"), "{}", f.message);
    }

    /// A switch seen only by a discovery (no backup ran while the database was in simple)
    /// happened all the same.
    #[tokio::test]
    async fn a_switch_to_simple_and_back_between_backups_still_breaks_the_chain() {
        let temp = TempInventory::new(|s| s);
        let (inventory, store) = (temp.source(), Store::in_memory());
        one(JobKind::BackupFull, "hr", &inventory, &store).await;
        one(JobKind::BackupLog, "hr", &inventory, &store).await;
        let discovery = job(JobKind::Discovery, &[], json!({}));
        temp.edit(hr_model("full", "simple"));
        run(&discovery, &inventory, &store).await;
        temp.edit(hr_model("simple", "full"));
        run(&discovery, &inventory, &store).await;
        let (code, message) =
            refused_backup(JobKind::BackupLog, "hr", json!({}), &inventory, &store).await;
        assert_eq!(code, "UserErrorParentFullBackupMissing");
        assert!(message.contains("Msg 4214"), "{message}");
    }

    #[tokio::test]
    async fn switching_to_simple_breaks_the_log_chain_until_a_full_or_differential() {
        let temp = TempInventory::new(|s| s);
        let (inventory, store) = (temp.source(), Store::in_memory());
        one(JobKind::BackupFull, "hr", &inventory, &store).await;
        one(JobKind::BackupLog, "hr", &inventory, &store).await;

        temp.edit(hr_model("full", "simple"));
        let (code, message) =
            refused_backup(JobKind::BackupLog, "hr", json!({}), &inventory, &store).await;
        assert_eq!(code, "UserErrorSQLPODoesNotSupportBackupType");
        assert!(message.contains("Msg 4208"), "{message}");
        let diff = one(JobKind::BackupDifferential, "hr", &inventory, &store).await;
        assert_eq!(diff.recovery_model, Some(RecoveryModel::Simple));

        temp.edit(hr_model("simple", "full"));
        let (code, message) =
            refused_backup(JobKind::BackupLog, "hr", json!({}), &inventory, &store).await;
        assert_eq!(code, "UserErrorParentFullBackupMissing");
        assert!(
            message.contains("Msg 4214") && message.contains("simple"),
            "{message}"
        );
        let copy = job(
            JobKind::BackupFull,
            &[("MSSQLSERVER", "hr")],
            json!({"copy_only": true}),
        );
        backed_up(&copy, &inventory, &store).await;
        let (code, _) =
            refused_backup(JobKind::BackupLog, "hr", json!({}), &inventory, &store).await;
        assert_eq!(
            code, "UserErrorParentFullBackupMissing",
            "a copy-only full does not do"
        );

        let diff = one(JobKind::BackupDifferential, "hr", &inventory, &store).await;
        let log = one(JobKind::BackupLog, "hr", &inventory, &store).await;
        assert_eq!(log.begins_log_chain, Some(true), "a new chain");
        assert!(lsn(&log.first_lsn) <= lsn(&diff.last_lsn));
        assert_eq!(log.recovery_model, Some(RecoveryModel::Full));

        // Bulk-logged and back keeps the chain.
        temp.edit(hr_model("full", "bulk_logged"));
        let bulk = one(JobKind::BackupLog, "hr", &inventory, &store).await;
        assert_eq!(bulk.first_lsn, log.last_lsn);
        assert_eq!(
            bulk.has_bulk_logged_data,
            Some(false),
            "no bulk operations on hr"
        );
        temp.edit(hr_model("bulk_logged", "full"));
        assert_eq!(
            one(JobKind::BackupLog, "hr", &inventory, &store)
                .await
                .first_lsn,
            bulk.last_lsn
        );
    }

    /// `warehouse` (SQL2012) is bulk-logged with bulk operations in the sample.
    #[tokio::test]
    async fn bulk_logged_changes_restore_to_the_end_of_their_log_only() {
        let temp = TempInventory::new(|s| s);
        let (inventory, store) = (temp.source(), Store::in_memory());
        let on = |kind, at: &'static str| {
            let payload = json!({"slot_at": at, "scheduled_at": at});
            job(kind, &[("SQL2012", "warehouse")], payload)
        };
        let full = backed_up_by(
            BackupClock::Schedule,
            &on(JobKind::BackupFull, "2031-01-06T10:00:00Z"),
            &inventory,
            &store,
        )
        .await
        .remove(0);
        let log = backed_up_by(
            BackupClock::Schedule,
            &on(JobKind::BackupLog, "2031-01-06T11:00:00Z"),
            &inventory,
            &store,
        )
        .await
        .remove(0);
        assert_eq!(log.has_bulk_logged_data, Some(true));
        assert_eq!(log.recovery_model, Some(RecoveryModel::BulkLogged));

        let mut inside = plan(&[&full, &log]);
        inside[1].stop_at = Some("2031-01-06T10:30:00Z".parse().unwrap());
        let f = restore_steps_failure(
            &inside,
            json!({"target_database": "wh_copy", "target_instance": "SQL2012"}),
            &inventory,
            &store,
        )
        .await;
        assert_eq!(
            f.code,
            "UserErrorRestoreNotPossibleBecauseLogBackupContainsBulkLoggedChanges"
        );
        assert!(f.message.contains("Msg 4341"), "{}", f.message);
        restored(
            &plan(&[&full, &log]),
            json!({"target_database": "wh_copy", "target_instance": "SQL2012"}),
            &inventory,
            &store,
        )
        .await;

        temp.edit(|s| {
            s.replace(
                "recovery_model = \"bulk_logged\"",
                "recovery_model = \"full\"",
            )
        });
        let full_model = backed_up_by(
            BackupClock::Schedule,
            &on(JobKind::BackupLog, "2031-01-06T12:00:00Z"),
            &inventory,
            &store,
        )
        .await
        .remove(0);
        assert_eq!(
            full_model.has_bulk_logged_data,
            Some(false),
            "fully logged now"
        );
        let mut inside = plan(&[&full, &log, &full_model]);
        inside[2].stop_at = Some("2031-01-06T11:30:00Z".parse().unwrap());
        restored(
            &inside,
            json!({"target_database": "wh_copy2", "target_instance": "SQL2012"}),
            &inventory,
            &store,
        )
        .await;
    }

    #[tokio::test]
    async fn textual_lsns_name_the_same_log_positions() {
        let temp = TempInventory::new(hr_gets("textual_lsns = true"));
        let (inventory, store) = (temp.source(), Store::in_memory());
        let full = one(JobKind::BackupFull, "hr", &inventory, &store).await;
        let log = one(JobKind::BackupLog, "hr", &inventory, &store).await;
        for text in [
            &full.first_lsn,
            &full.last_lsn,
            full.checkpoint_lsn.as_ref().unwrap(),
            full.differential_base_lsn.as_ref().unwrap(),
            &log.first_lsn,
            &log.last_lsn,
        ] {
            assert_eq!(text.split(':').count(), 3, "{text}");
            assert_eq!(lsn(text).textual().as_ref(), Some(text));
        }
        assert_eq!(full.database_backup_lsn, "00000000:00000000:0000");
        assert_eq!(
            lsn(&log.database_backup_lsn),
            lsn(full.checkpoint_lsn.as_ref().unwrap())
        );
        let db = store.database(&key("hr")).unwrap();
        assert_eq!(lsn(&log.last_lsn), db.history[1].last_lsn);
        // A plan the server writes in decimal still names these backups.
        let mut steps = plan(&[&full, &log]);
        for step in &mut steps {
            step.first_lsn = lsn(&step.first_lsn).to_string();
            step.last_lsn = lsn(&step.last_lsn).to_string();
        }
        restored(
            &steps,
            json!({"target_database": "hr_copy"}),
            &inventory,
            &store,
        )
        .await;
        let sales = one(JobKind::BackupFull, "sales", &inventory, &store).await;
        assert!(!sales.first_lsn.contains(':'), "the knob is per database");
    }

    /// A lease lost after the backup was taken: the retry reports the same backup.
    #[tokio::test]
    async fn a_retried_job_reports_the_backups_it_took_instead_of_taking_new_ones() {
        let temp = TempInventory::new(|s| s);
        let (inventory, store) = (temp.source(), Store::in_memory());
        let dbs = [("MSSQLSERVER", "sales"), ("MSSQLSERVER", "hr")];
        backed_up(
            &job(JobKind::BackupFull, &dbs, json!({})),
            &inventory,
            &store,
        )
        .await;
        let lost = job(JobKind::BackupLog, &dbs, json!({}));
        let first = backed_up(&lost, &inventory, &store).await;
        let mut retry = lost.clone();
        (retry.attempt, retry.lease) = (2, 2);
        let again = backed_up(&retry, &inventory, &store).await;
        assert_eq!(again, first, "same backup sets, LSNs and times");
        for db in ["sales", "hr"] {
            let sets = store
                .database(&key(db))
                .unwrap()
                .history
                .iter()
                .filter(|s| s.job_id == Some(lost.job_id))
                .count();
            assert_eq!(sets, 1, "{db}: taken once");
        }
        // Never rewound: the next log follows the one the server may never have seen.
        let next = one(JobKind::BackupLog, "hr", &inventory, &store).await;
        assert_eq!(next.first_lsn, first[1].last_lsn);

        // A database switched to simple since keeps the backup it had.
        temp.edit(hr_model("full", "simple"));
        assert_eq!(backed_up(&retry, &inventory, &store).await, first);
    }

    /// A restore step for a reported point, as the server plans it.
    fn step(point: &RecoveryPointReport, recovery: Recovery) -> RestoreStep {
        RestoreStep {
            recovery_point_id: Uuid::new_v4(),
            statement: if point.backup_type == RecoveryPointType::Log {
                RestoreStatement::RestoreLog
            } else {
                RestoreStatement::RestoreDatabase
            },
            backup_type: point.backup_type,
            backup_time: point.backup_time,
            backup_set_uuid: point.backup_set_uuid,
            first_lsn: point.first_lsn.clone(),
            last_lsn: point.last_lsn.clone(),
            recovery,
            stop_at: None,
        }
    }

    /// Every point in order, all WITH NORECOVERY but the last.
    fn plan(points: &[&RecoveryPointReport]) -> Vec<RestoreStep> {
        points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let last = i + 1 == points.len();
                step(
                    p,
                    if last {
                        Recovery::Recovery
                    } else {
                        Recovery::NoRecovery
                    },
                )
            })
            .collect()
    }

    /// A restore job of `hr` (to `hr_copy` unless `extra` says otherwise).
    fn restore_job(steps: &[RestoreStep], extra: serde_json::Value) -> ClaimedJob {
        let mut payload = json!({"target_database": "hr_copy", "target_instance": "MSSQLSERVER",
            "overwrite": false, "restores_to": Utc::now(), "steps": steps});
        for (k, v) in extra.as_object().unwrap() {
            payload[k] = v.clone();
        }
        job(JobKind::Restore, &[("MSSQLSERVER", "hr")], payload)
    }

    async fn restored(
        steps: &[RestoreStep],
        extra: serde_json::Value,
        inventory: &InventorySource,
        store: &Store,
    ) -> (String, Option<RecoveryPointReport>) {
        match run(&restore_job(steps, extra), inventory, store).await {
            Outcome::Complete {
                result:
                    JobResult::Restore {
                        restored_database,
                        tail_log_backup,
                    },
                warnings,
            } => {
                assert_eq!(warnings, Vec::<String>::new());
                (restored_database, tail_log_backup.map(|t| *t))
            }
            other => panic!("expected a restore, got {other:?}"),
        }
    }

    async fn restore_steps_failure(
        steps: &[RestoreStep],
        extra: serde_json::Value,
        inventory: &InventorySource,
        store: &Store,
    ) -> Failure {
        let f = failure_in(&restore_job(steps, extra), inventory, store).await;
        assert!(!f.retryable);
        f
    }

    async fn restore_failure(
        points: &[&RecoveryPointReport],
        extra: serde_json::Value,
        inventory: &InventorySource,
        store: &Store,
    ) -> Failure {
        restore_steps_failure(&plan(points), extra, inventory, store).await
    }

    /// `hr`: a full, two logs, a second full, a differential on it and a log, a quarter
    /// of an hour apart.
    struct History {
        full: RecoveryPointReport,
        log1: RecoveryPointReport,
        log2: RecoveryPointReport,
        full2: RecoveryPointReport,
        diff2: RecoveryPointReport,
        log3: RecoveryPointReport,
    }

    async fn history(inventory: &InventorySource, store: &Store) -> History {
        let at = |kind, t| backup_at(kind, "hr", t, inventory, store);
        History {
            full: at(JobKind::BackupFull, "2031-01-06T10:00:00Z").await,
            log1: at(JobKind::BackupLog, "2031-01-06T10:15:00Z").await,
            log2: at(JobKind::BackupLog, "2031-01-06T10:30:00Z").await,
            full2: at(JobKind::BackupFull, "2031-01-06T10:45:00Z").await,
            diff2: at(JobKind::BackupDifferential, "2031-01-06T11:00:00Z").await,
            log3: at(JobKind::BackupLog, "2031-01-06T11:15:00Z").await,
        }
    }

    fn instant(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn restores_replay_their_steps_and_refuse_what_sql_server_refuses() {
        let temp = TempInventory::new(|s| s);
        let (inventory, store) = (temp.source(), Store::in_memory());
        let h = history(&inventory, &store).await;
        let none = json!({});

        type Edit = fn(&mut Vec<RestoreStep>);
        fn e(edit: Edit) -> Edit {
            edit
        }
        let cases: Vec<(Vec<&RecoveryPointReport>, Edit, &str, &str)> = vec![
            (
                vec![&h.log1, &h.log2],
                e(|_| {}),
                "UserErrorRestoreSequenceInvalid",
                "Msg 3117",
            ),
            (
                vec![&h.diff2, &h.log3],
                e(|_| {}),
                "UserErrorRestoreSequenceInvalid",
                "Msg 3117",
            ),
            (
                vec![&h.full, &h.log2],
                e(|_| {}),
                "UserErrorRestoreLogBackupTooRecent",
                "Msg 4305",
            ),
            (
                vec![&h.full, &h.log1, &h.log1],
                e(|_| {}),
                "UserErrorRestoreLogBackupTooEarly",
                "Msg 4326",
            ),
            (
                vec![&h.full, &h.diff2],
                e(|_| {}),
                "UserErrorRestoreDifferentialBaseMismatch",
                "Msg 3136",
            ),
            (
                vec![&h.full, &h.log1, &h.log2],
                e(|s| s[1].recovery = Recovery::Recovery),
                "UserErrorRestoreSequenceInvalid",
                "Msg 4306",
            ),
            (
                vec![&h.full, &h.log1],
                e(|s| s[1].recovery = Recovery::NoRecovery),
                "UserErrorRestoreSequenceInvalid",
                "restoring",
            ),
            (
                vec![&h.full, &h.log1],
                e(|s| s[1].backup_set_uuid = Some(Uuid::new_v4())),
                "UserErrorRestoreBackupSetNotFound",
                "Msg 3201",
            ),
            (
                vec![&h.full, &h.log1],
                e(|s| s[1].statement = RestoreStatement::RestoreDatabase),
                "UserErrorRestoreSequenceInvalid",
                "Msg 3135",
            ),
            (
                vec![&h.full, &h.log1],
                e(|s| s[1].stop_at = Some(instant("2031-01-06T09:59:00Z"))),
                "UserErrorRestoreStopAtTooEarly",
                "Msg 4335",
            ),
            (
                vec![&h.full, &h.log1],
                e(|s| s[1].stop_at = Some(instant("2031-01-06T10:20:00Z"))),
                "UserErrorRestoreStopAtBeyondLogBackup",
                "restoring",
            ),
            (
                vec![&h.full, &h.log1],
                e(|s| s[1].last_lsn = "1".into()),
                "UserErrorRestoreStepDoesNotMatchBackupSet",
                "LSNs",
            ),
        ];
        for (points, edit, code, msg) in cases {
            let mut steps = plan(&points);
            edit(&mut steps);
            let f = restore_steps_failure(&steps, none.clone(), &inventory, &store).await;
            assert_eq!(f.code, code, "{}", f.message);
            assert!(f.message.contains(msg), "{}", f.message);
        }
        assert!(
            store.database(&key("hr_copy")).is_none(),
            "nothing restored"
        );

        // Overwriting a database in the full recovery model: with replace or a tail-log
        // backup only.
        let over = json!({"target_database": "hr", "overwrite": true});
        let f = restore_failure(&[&h.full, &h.log1], over.clone(), &inventory, &store).await;
        assert_eq!(
            f.code,
            "UserErrorCannotRestoreExistingDBWithoutForceOverwrite"
        );
        assert!(f.message.contains("Msg 3159"), "{}", f.message);
        let f = restore_failure(
            &[&h.full],
            json!({"target_database": "hr"}),
            &inventory,
            &store,
        )
        .await;
        assert!(f.message.contains("Msg 3154"), "{}", f.message);

        for (points, target) in [
            (vec![&h.full], "hr_a"),
            (vec![&h.full, &h.log1, &h.log2], "hr_b"),
            (vec![&h.full2, &h.diff2, &h.log3], "hr_c"),
            (vec![&h.full, &h.log1, &h.log2, &h.log3], "hr_d"),
            (vec![&h.full2, &h.log3], "hr_e"),
        ] {
            let (name, tail) = restored(
                &plan(&points),
                json!({"target_database": target}),
                &inventory,
                &store,
            )
            .await;
            assert_eq!((name.as_str(), tail), (target, None));
            let db = store.database(&key(target)).unwrap();
            let last = points.last().unwrap();
            assert_eq!(db.fork.point_lsn, Some(lsn(&last.last_lsn)), "{target}");
        }
    }

    #[tokio::test]
    async fn a_restore_starts_a_new_recovery_fork() {
        // Busy, so that a log's LSNs spread over enough records to stop inside.
        let temp = TempInventory::new(hr_gets("busy = true"));
        let (inventory, store) = (temp.source(), Store::in_memory());
        let h = history(&inventory, &store).await;
        let before = store.database(&key("hr")).unwrap();

        // Overwrite hr as of 10:20, inside its second log, after a tail-log backup.
        let mut steps = plan(&[&h.full, &h.log1, &h.log2]);
        steps[2].stop_at = Some(instant("2031-01-06T10:20:00Z"));
        let over = json!({"target_database": "hr", "overwrite": true, "tail_log_backup": true});
        let retried = restore_job(&steps, over);
        let (name, tail) = match run(&retried, &inventory, &store).await {
            Outcome::Complete {
                result:
                    JobResult::Restore {
                        restored_database,
                        tail_log_backup,
                    },
                ..
            } => (restored_database, tail_log_backup),
            other => panic!("{other:?}"),
        };
        assert_eq!(name, "hr");
        let tail = tail.expect("the tail-log backup is reported");
        assert_eq!(tail.backup_type, RecoveryPointType::Log);
        assert_eq!(
            tail.first_lsn, h.log3.last_lsn,
            "it continues hr's log chain"
        );
        assert_eq!(tail.recovery_fork_guid, before.fork.guid.into());
        assert_eq!(tail.violations("/result/tail_log_backup"), []);

        let after = store.database(&key("hr")).unwrap();
        assert_ne!(after.fork.guid, before.fork.guid);
        assert_eq!(
            after.database_guid, before.database_guid,
            "restored over itself"
        );
        let point = after.fork.point_lsn.unwrap();
        assert!(
            lsn(&h.log2.first_lsn) < point && point < lsn(&h.log2.last_lsn),
            "{point}"
        );
        assert_eq!(
            after.differential_base.map(|b| b.guid),
            h.full.differential_base_guid,
            "the restored full's base, not full2's"
        );
        assert!(
            after
                .history
                .iter()
                .any(|s| Some(s.backup_set_uuid) == tail.backup_set_uuid),
            "the tail log is in the history"
        );

        // A retry of the same job reports the same restore and takes nothing more.
        let mut again = retried.clone();
        again.attempt = 2;
        match run(&again, &inventory, &store).await {
            Outcome::Complete {
                result:
                    JobResult::Restore {
                        tail_log_backup, ..
                    },
                ..
            } => {
                assert_eq!(tail_log_backup.as_ref(), Some(&tail));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(store.database(&key("hr")).unwrap(), after);

        // The log chain goes on in the new fork, from the point restored to.
        let log = backup_at(
            JobKind::BackupLog,
            "hr",
            "2031-01-06T12:00:00Z",
            &inventory,
            &store,
        )
        .await;
        assert_eq!(lsn(&log.first_lsn), point);
        assert_eq!(log.begins_log_chain, Some(false));
        assert_eq!(log.recovery_fork_guid, Some(after.fork.guid));
        assert_eq!(log.fork_point_lsn, Some(point.to_string()));
        let diff = backup_at(
            JobKind::BackupDifferential,
            "hr",
            "2031-01-06T12:15:00Z",
            &inventory,
            &store,
        )
        .await;
        assert_eq!(diff.differential_base_guid, h.full.differential_base_guid);

        // That log follows the restored point and nothing past it: not the old fork's
        // whole second log.
        let mut through_fork = plan(&[&h.full, &h.log1, &h.log2, &log]);
        through_fork[2].stop_at = Some(instant("2031-01-06T10:20:00Z"));
        restored(
            &through_fork,
            json!({"target_database": "hr_fork"}),
            &inventory,
            &store,
        )
        .await;
        let f = restore_failure(
            &[&h.full, &h.log1, &h.log2, &log],
            json!({"target_database": "hr_fork2"}),
            &inventory,
            &store,
        )
        .await;
        assert_eq!(
            f.code, "UserErrorRestoreRecoveryForkMismatch",
            "{}",
            f.message
        );
        // The tail-log backup ends the old fork's chain.
        let tail_steps = plan(&[&h.full, &h.log1, &h.log2, &h.log3, &tail]);
        restored(
            &tail_steps,
            json!({"target_database": "hr_old"}),
            &inventory,
            &store,
        )
        .await;
        // With replace, no tail-log backup is taken.
        let (_, tail) = restored(
            &plan(&[&h.full2]),
            json!({"target_database": "hr", "overwrite": true, "replace": true}),
            &inventory,
            &store,
        )
        .await;
        assert_eq!(tail, None);
    }

    #[tokio::test]
    async fn a_tail_log_backup_is_refused_as_any_log_backup_would_be() {
        let temp = TempInventory::new(|s| s);
        let (inventory, store) = (temp.source(), Store::in_memory());
        let h = history(&inventory, &store).await;
        temp.edit(hr_model("full", "simple"));
        let tail = json!({"target_database": "hr", "overwrite": true, "tail_log_backup": true});
        let f = restore_failure(&[&h.full], tail, &inventory, &store).await;
        assert_eq!(f.code, "UserErrorSQLPODoesNotSupportBackupType");
        assert!(f.message.contains("Msg 4208"), "{}", f.message);
        // Simple: nothing to lose, no REPLACE needed.
        restored(
            &plan(&[&h.full]),
            json!({"target_database": "hr", "overwrite": true}),
            &inventory,
            &store,
        )
        .await;
        let f = restore_failure(
            &[&h.full],
            json!({"target_database": "nowhere", "overwrite": true, "tail_log_backup": true}),
            &inventory,
            &store,
        )
        .await;
        assert_eq!(f.code, "UserErrorSQLPODoesNotExist");
    }

    #[tokio::test]
    async fn a_copy_only_full_starts_a_log_restore() {
        let temp = TempInventory::new(|s| s);
        let (inventory, store) = (temp.source(), Store::in_memory());
        backup_at(
            JobKind::BackupFull,
            "hr",
            "2031-01-06T10:00:00Z",
            &inventory,
            &store,
        )
        .await;
        let payload = json!({"copy_only": true, "slot_at": "2031-01-06T10:10:00Z", "scheduled_at": "2031-01-06T10:10:00Z"});
        let copy = backed_up_by(
            BackupClock::Schedule,
            &job(JobKind::BackupFull, &[("MSSQLSERVER", "hr")], payload),
            &inventory,
            &store,
        )
        .await
        .remove(0);
        let log = backup_at(
            JobKind::BackupLog,
            "hr",
            "2031-01-06T10:15:00Z",
            &inventory,
            &store,
        )
        .await;
        restored(&plan(&[&copy, &log]), json!({}), &inventory, &store).await;
        assert_eq!(
            store.database(&key("hr_copy")).unwrap().fork.point_lsn,
            Some(lsn(&log.last_lsn))
        );
    }

    #[tokio::test]
    async fn old_restore_steps_are_restored_as_before() {
        let temp = TempInventory::new(|s| s);
        let (inventory, store) = (temp.source(), Store::in_memory());
        let h = history(&inventory, &store).await;
        let old = json!({"target_database": "hr_old", "restores_to": "2031-01-06T10:00:00Z",
            "steps": [{"recovery_point_id": Uuid::new_v4(), "backup_type": "full", "backup_time": "2031-01-06T10:00:00Z"}]});
        let restore = job(JobKind::Restore, &[("MSSQLSERVER", "hr")], old);
        assert!(
            matches!(run(&restore, &inventory, &store).await, Outcome::Complete { warnings, .. } if warnings.is_empty())
        );
        assert!(store.database(&key("hr_old")).is_none());

        // Typed, from a point reported without a backup set id: found by its LSNs.
        let mut steps = plan(&[&h.full, &h.log1]);
        steps[0].backup_set_uuid = None;
        restored(
            &steps,
            json!({"target_database": "hr_lsns"}),
            &inventory,
            &store,
        )
        .await;
        // Not found: restored without replaying, and said so.
        steps[1].backup_set_uuid = None;
        steps[1].first_lsn = "5".into();
        match run(
            &restore_job(&steps, json!({"target_database": "hr_blind"})),
            &inventory,
            &store,
        )
        .await
        {
            Outcome::Complete { warnings, .. } => assert_eq!(warnings.len(), 1, "{warnings:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn faults_fail_jobs_retryably() {
        let temp = TempInventory::new(|s| s.replace("failure_rate = 0.0", "failure_rate = 1.0"));
        let f = failure(
            &job(JobKind::ConfigureProtection, &[], json!({})),
            &temp.source(),
        )
        .await;
        assert_eq!(
            (f.code, f.retryable),
            ("UserErrorOpeningSQLConnection", true)
        );
    }

    /// The sample inventory with a case-sensitive instance holding `Sales` and `sales`.
    fn with_case_sensitive_instance(sample: String) -> String {
        sample
            + "\n[[instances]]\nname = \"CS\"\nversion = \"2022\"\ncase_sensitive = true\n\
               \n[[databases]]\ninstance = \"CS\"\nname = \"Sales\"\nrecovery_model = \"full\"\n\
               size_bytes = 1000\n\
               \n[[databases]]\ninstance = \"CS\"\nname = \"sales\"\nrecovery_model = \"full\"\n\
               size_bytes = 2000\n"
    }

    #[tokio::test]
    async fn a_case_sensitive_instance_backs_up_names_differing_by_case_apart() {
        let temp = TempInventory::new(with_case_sensitive_instance);
        let (inventory, store) = (temp.source(), Store::in_memory());
        let both = [("CS", "Sales"), ("cs", "sales")];
        let full = backed_up(
            &job(JobKind::BackupFull, &both, json!({})),
            &inventory,
            &store,
        )
        .await;
        assert_eq!(
            (full[0].size_bytes, full[1].size_bytes),
            (1000, 2000),
            "two databases"
        );
        assert_ne!(full[0].database_guid, full[1].database_guid);

        let log = job(JobKind::BackupLog, &both[..1], json!({}));
        let log = backed_up(&log, &inventory, &store).await;
        assert_eq!(
            log[0].first_lsn, full[0].first_lsn,
            "each has its own chain"
        );
        let log = job(JobKind::BackupLog, &both[1..], json!({}));
        let log = backed_up(&log, &inventory, &store).await;
        assert_eq!(log[0].first_lsn, full[1].first_lsn);

        let wrong_case = job(JobKind::BackupFull, &[("CS", "SALES")], json!({}));
        let f = failure(&wrong_case, &inventory).await;
        assert_eq!((f.code, f.retryable), ("UserErrorSQLPODoesNotExist", false));
    }

    async fn restored_name(job: &ClaimedJob, inventory: &InventorySource) -> String {
        match run(job, inventory, &Store::in_memory()).await {
            Outcome::Complete {
                result:
                    JobResult::Restore {
                        restored_database, ..
                    },
                ..
            } => restored_database,
            other => panic!("expected a restore, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn restore_reports_the_target() {
        let temp = TempInventory::new(with_case_sensitive_instance);
        let inventory = temp.source();
        for (payload, expected) in [
            (
                json!({"target_database": "sales_restored"}),
                "sales_restored",
            ),
            (json!({"overwrite": true}), "sales"),
            (
                json!({"target_database": "sales", "target_instance": "sql2012"}),
                "sales",
            ),
            (
                json!({"target_database": "SALES", "target_instance": "CS"}),
                "SALES",
            ),
            (
                json!({"target_database": "sales", "target_instance": "CS", "overwrite": true}),
                "sales",
            ),
            // As the service sent it before restore steps were typed.
            (
                json!({"target_database": "sales_copy", "overwrite": false,
                       "restores_to": "2025-11-20T12:00:00Z", "steps": []}),
                "sales_copy",
            ),
        ] {
            let restore = job(JobKind::Restore, &[("MSSQLSERVER", "sales")], payload);
            assert_eq!(restored_name(&restore, &inventory).await, expected);
        }
        let unnamed = job(JobKind::Restore, &[("MSSQLSERVER", "new_db")], json!(null));
        assert_eq!(restored_name(&unnamed, &inventory).await, "new_db");
    }

    #[tokio::test]
    async fn restore_refuses_what_sql_server_would() {
        let temp = TempInventory::new(with_case_sensitive_instance);
        let inventory = temp.source();
        let too_long = "x".repeat(129);
        let (max, max_wide) = ("x".repeat(128), "\u{1F600}".repeat(64));
        for (payload, code) in [
            (
                json!({}),
                "UserErrorCannotRestoreExistingDBWithoutForceOverwrite",
            ),
            (
                json!({"target_database": "SALES"}),
                "UserErrorCannotRestoreExistingDBWithoutForceOverwrite",
            ),
            (
                json!({"target_database": "Sales", "target_instance": "CS", "overwrite": false}),
                "UserErrorCannotRestoreExistingDBWithoutForceOverwrite",
            ),
            (
                json!({"target_database": "MSDB", "overwrite": true}),
                "UserErrorRestoreSystemDatabase",
            ),
            (
                json!({"target_database": "master", "target_instance": "CS"}),
                "UserErrorRestoreSystemDatabase",
            ),
            (
                json!({"target_database": "tempdb", "target_instance": "nowhere"}),
                "UserErrorSQLInstanceNotFound",
            ),
            (
                json!({"target_database": ""}),
                "UserErrorInvalidRestoreTargetName",
            ),
            (
                json!({"target_database": too_long}),
                "UserErrorInvalidRestoreTargetName",
            ),
            (
                json!({"target_database": format!("{max}y")}),
                "UserErrorInvalidRestoreTargetName",
            ),
            (
                json!({"target_database": format!("{max_wide}y")}),
                "UserErrorInvalidRestoreTargetName",
            ),
            (
                json!({"target_database": "sales\nrestored"}),
                "UserErrorInvalidRestoreTargetName",
            ),
            (json!({"overwrite": "yes"}), "AgentInvalidPayload"),
        ] {
            let restore = job(
                JobKind::Restore,
                &[("MSSQLSERVER", "sales")],
                payload.clone(),
            );
            let f = failure(&restore, &inventory).await;
            assert_eq!((f.code, f.retryable), (code, false), "{payload}");
            assert!(!f.message.is_empty());
        }
        let f = failure(
            &job(JobKind::Restore, &[("SQL2019", "sales")], json!({})),
            &inventory,
        )
        .await;
        assert_eq!(
            f.code, "UserErrorSQLInstanceNotFound",
            "the item's instance"
        );

        for name in [max, max_wide] {
            let payload = json!({"target_database": name});
            let restore = job(JobKind::Restore, &[("MSSQLSERVER", "sales")], payload);
            assert_eq!(
                restored_name(&restore, &inventory).await,
                name,
                "sysname holds 128"
            );
        }
    }

    /// The sample VM renamed `vm`, hosting a replica (MSSQLSERVER, in `role`) of
    /// `ag-orders`, which holds database `orders` and has replicas on `sqlvm-a` and
    /// `sqlvm-b`; its state shared in `shared`, if given.
    fn ag_replica(vm: &str, role: &str, shared: Option<&Path>) -> impl FnOnce(String) -> String {
        let shared = shared.map_or(String::new(), |path| {
            format!("shared_state = '{}'\n", path.display())
        });
        let (vm, role) = (vm.to_owned(), role.to_owned());
        move |sample| {
            sample.replace("name = \"sqlvm-01\"", &format!("name = \"{vm}\""))
                + &format!(
                    "\n[[availability_groups]]\nname = \"ag-orders\"\n\
                     group_id = \"2f4e8a3c-55c1-4c6e-9a57-0d3b7e1f9a64\"\n\
                     backup_preference = \"prefer_secondary\"\nreplicas = [\n\
                     {{ vm_name = \"sqlvm-a\", resource_group = \"rg-sql\", instance = \"MSSQLSERVER\" }},\n\
                     {{ vm_name = \"sqlvm-b\", resource_group = \"rg-sql\", instance = \"MSSQLSERVER\" }},\n]\n\
                     local = {{ instance = \"MSSQLSERVER\", role = \"{role}\", \
                     synchronization_health = \"healthy\", backup_priority = 50 }}\n{shared}\
                     \n[[databases]]\ninstance = \"MSSQLSERVER\"\nname = \"orders\"\n\
                     recovery_model = \"full\"\nsize_bytes = 1048576\navailability_group = \"ag-orders\"\n"
                )
        }
    }

    /// A failover, or a replica losing its partners, as the file shows it.
    fn set_replica(from: &str, to: &str) -> impl FnOnce(String) -> String {
        let (from, to) = (from.to_owned(), to.to_owned());
        move |s| s.replace(&from, &to)
    }

    /// The failure of a backup of `orders`: retryable, with SQL Server's code.
    async fn refused_on_replica(
        kind: JobKind,
        payload: serde_json::Value,
        inventory: &InventorySource,
        store: &Store,
    ) -> String {
        let f = failure_in(
            &job(kind, &[("MSSQLSERVER", "orders")], payload),
            inventory,
            store,
        )
        .await;
        assert_eq!(
            (f.code, f.retryable),
            (codes::NOT_SUPPORTED, true),
            "{kind:?}: {f:?}"
        );
        f.message
    }

    fn copy_only() -> serde_json::Value {
        json!({"copy_only": true})
    }

    #[tokio::test]
    async fn a_secondary_replica_takes_only_copy_only_fulls_and_logs() {
        let temp = TempInventory::new(ag_replica("sqlvm-a", "primary", None));
        let (inventory, store) = (temp.source(), Store::in_memory());
        let full = one(JobKind::BackupFull, "orders", &inventory, &store).await;

        temp.edit(set_replica("role = \"primary\"", "role = \"secondary\""));
        for kind in [JobKind::BackupFull, JobKind::BackupDifferential] {
            let message = refused_on_replica(kind, json!({}), &inventory, &store).await;
            assert!(
                message.contains("Msg 3059") && message.contains("secondary replica"),
                "{message}"
            );
        }
        let copy = backed_up(
            &job(
                JobKind::BackupFull,
                &[("MSSQLSERVER", "orders")],
                copy_only(),
            ),
            &inventory,
            &store,
        )
        .await;
        assert_eq!(copy[0].backup_type, RecoveryPointType::CopyOnlyFull);
        let log = one(JobKind::BackupLog, "orders", &inventory, &store).await;
        assert_eq!(log.first_lsn, full.first_lsn, "the chain the primary began");
        let history = |store: &Store| store.database(&key("orders")).unwrap().history.len();
        assert_eq!(history(&store), 3, "the refused backups took nothing");

        // The VM's other databases are in no group: a full is a full.
        one(JobKind::BackupFull, "hr", &inventory, &store).await;

        temp.edit(set_replica(
            "synchronization_health = \"healthy\"",
            "synchronization_health = \"not_healthy\"",
        ));
        let message = refused_on_replica(JobKind::BackupLog, json!({}), &inventory, &store).await;
        assert!(message.contains("NOT SYNCHRONIZING"), "{message}");
        backed_up(
            &job(
                JobKind::BackupFull,
                &[("MSSQLSERVER", "orders")],
                copy_only(),
            ),
            &inventory,
            &store,
        )
        .await;

        temp.edit(set_replica("role = \"secondary\"", "role = \"resolving\""));
        for (kind, payload) in [
            (JobKind::BackupFull, json!({})),
            (JobKind::BackupFull, copy_only()),
            (JobKind::BackupDifferential, json!({})),
            (JobKind::BackupLog, json!({})),
        ] {
            let message = refused_on_replica(kind, payload, &inventory, &store).await;
            assert!(
                message.contains("resolving") && !message.contains("3059"),
                "{message}"
            );
        }
        assert_eq!(history(&store), 4);

        // A job for two databases fails whole: the standalone one is not backed up either.
        let both = job(
            JobKind::BackupLog,
            &[("MSSQLSERVER", "hr"), ("MSSQLSERVER", "orders")],
            json!({}),
        );
        let hr_before = store.database(&key("hr")).unwrap().history.len();
        assert!(failure_in(&both, &inventory, &store).await.retryable);
        assert_eq!(store.database(&key("hr")).unwrap().history.len(), hr_before);

        temp.edit(set_replica("role = \"resolving\"", "role = \"primary\""));
        let diff = one(JobKind::BackupDifferential, "orders", &inventory, &store).await;
        assert_eq!(diff.differential_base_lsn, full.checkpoint_lsn);
        one(JobKind::BackupFull, "orders", &inventory, &store).await;
        one(JobKind::BackupLog, "orders", &inventory, &store).await;
    }

    /// Two agents (two inventories, two stores) playing the two replicas of `ag-orders`,
    /// sharing its state in a file.
    struct TwoReplicas {
        a: TempInventory,
        b: TempInventory,
        shared: PathBuf,
    }

    impl TwoReplicas {
        fn new() -> Self {
            let shared = std::env::temp_dir().join(format!("backvault-ag-{}.json", Uuid::new_v4()));
            Self {
                a: TempInventory::new(ag_replica("sqlvm-a", "primary", Some(&shared))),
                b: TempInventory::new(ag_replica("sqlvm-b", "secondary", Some(&shared))),
                shared,
            }
        }

        /// `orders` as the shared file holds it.
        fn orders(&self) -> Database {
            Store::shared_database(&self.shared, "orders").unwrap()
        }
    }

    impl Drop for TwoReplicas {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.shared);
            let mut lock = self.shared.as_os_str().to_owned();
            lock.push(".lock");
            let _ = std::fs::remove_file(lock);
        }
    }

    /// An availability database has one log: its chain and differential base continue
    /// from replica to replica, across a failover.
    #[tokio::test]
    async fn replicas_sharing_a_state_file_continue_one_log_chain() {
        let ag = TwoReplicas::new();
        let (a, store_a) = (ag.a.source(), Store::in_memory());
        let (b, store_b) = (ag.b.source(), Store::in_memory());

        let full = one(JobKind::BackupFull, "orders", &a, &store_a).await;
        let log1 = one(JobKind::BackupLog, "orders", &b, &store_b).await;
        assert_eq!(log1.first_lsn, full.first_lsn, "the chain the full began");
        assert_eq!(log1.begins_log_chain, Some(true));
        assert_eq!(log1.database_guid, full.database_guid, "one database");
        let log2 = one(JobKind::BackupLog, "orders", &a, &store_a).await;
        assert_eq!(log2.first_lsn, log1.last_lsn);
        assert_eq!(log2.begins_log_chain, Some(false));
        let log3 = one(JobKind::BackupLog, "orders", &b, &store_b).await;
        assert_eq!(log3.first_lsn, log2.last_lsn);
        assert!(
            store_a.database(&key("orders")).is_none(),
            "kept in the file only"
        );
        assert_eq!(ag.orders().history.len(), 4);

        // A failover: b is primary now, a secondary.
        ag.a.edit(set_replica("role = \"primary\"", "role = \"secondary\""));
        ag.b.edit(set_replica("role = \"secondary\"", "role = \"primary\""));
        refused_on_replica(JobKind::BackupDifferential, json!({}), &a, &store_a).await;
        let diff = one(JobKind::BackupDifferential, "orders", &b, &store_b).await;
        assert_eq!(diff.differential_base_lsn, full.checkpoint_lsn, "a's full");
        assert_eq!(diff.differential_base_guid, full.differential_base_guid);
        assert_eq!(
            diff.database_backup_lsn,
            full.checkpoint_lsn.clone().unwrap()
        );
        assert!(
            lsn(&diff.first_lsn) > lsn(&log3.last_lsn),
            "LSNs go on growing"
        );
        let log4 = one(JobKind::BackupLog, "orders", &a, &store_a).await;
        assert_eq!(
            log4.first_lsn, log3.last_lsn,
            "a full or differential breaks no chain"
        );
        let full2 = one(JobKind::BackupFull, "orders", &b, &store_b).await;
        assert_eq!(
            full2.database_backup_lsn,
            full.checkpoint_lsn.clone().unwrap()
        );

        // b restores what a took, by backup set.
        let restored = restored_orders(&plan(&[&full, &log1, &log2]), &b, &store_b).await;
        assert_eq!(restored, "orders_copy");
        let copy = store_b.database(&key("orders_copy")).unwrap();
        assert_eq!(copy.fork.point_lsn, Some(lsn(&log2.last_lsn)));

        // What an unreadable file hides is not guessed at.
        std::fs::write(&ag.shared, "{").unwrap();
        let f = failure_in(
            &job(JobKind::BackupLog, &[("MSSQLSERVER", "orders")], json!({})),
            &a,
            &store_a,
        )
        .await;
        assert_eq!(
            (f.code, f.retryable),
            ("AgentStateUnreadable", true),
            "{f:?}"
        );
    }

    /// Restores `orders` as `orders_copy` by `steps`, replayed against the history.
    async fn restored_orders(
        steps: &[RestoreStep],
        inventory: &InventorySource,
        store: &Store,
    ) -> String {
        let payload = json!({"target_database": "orders_copy", "target_instance": "MSSQLSERVER",
            "overwrite": false, "steps": steps});
        let restore = job(JobKind::Restore, &[("MSSQLSERVER", "orders")], payload);
        match run(&restore, inventory, store).await {
            Outcome::Complete {
                result:
                    JobResult::Restore {
                        restored_database, ..
                    },
                warnings,
            } => {
                assert_eq!(
                    warnings,
                    Vec::<String>::new(),
                    "replayed against the history"
                );
                restored_database
            }
            other => panic!("expected a restore, got {other:?}"),
        }
    }

    /// A database backed up before its group shared a file keeps its chain there.
    #[tokio::test]
    async fn a_database_moves_into_its_groups_shared_file() {
        let shared = std::env::temp_dir().join(format!("backvault-ag-{}.json", Uuid::new_v4()));
        let temp = TempInventory::new(ag_replica("sqlvm-a", "primary", None));
        let (inventory, store) = (temp.source(), Store::in_memory());
        one(JobKind::BackupFull, "orders", &inventory, &store).await;
        let log = one(JobKind::BackupLog, "orders", &inventory, &store).await;

        let line = format!("shared_state = '{}'\n", shared.display());
        temp.edit(|s| s.replace("\nlocal = {", &format!("\n{line}local = {{")));
        let next = one(JobKind::BackupLog, "orders", &inventory, &store).await;
        assert_eq!(next.first_lsn, log.last_lsn);
        assert!(store.database(&key("orders")).is_none());
        assert_eq!(
            Store::shared_database(&shared, "orders")
                .unwrap()
                .history
                .len(),
            3
        );
        std::fs::remove_file(&shared).unwrap();
        let mut lock = shared.into_os_string();
        lock.push(".lock");
        std::fs::remove_file(lock).unwrap();
    }

    /// Two agents backing up one availability database's log at once: each job reads the
    /// file after the other's write, so no backup is lost and none starts where another
    /// did.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_log_backups_on_two_replicas_keep_one_chain() {
        const PER_REPLICA: usize = 10;
        let ag = TwoReplicas::new();
        let a = std::sync::Arc::new((ag.a.source(), Store::in_memory()));
        let b = std::sync::Arc::new((ag.b.source(), Store::in_memory()));
        let full = one(JobKind::BackupFull, "orders", &a.0, &a.1).await;

        let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let tasks: Vec<_> = [a, b]
            .into_iter()
            .map(|replica| {
                let start = std::sync::Arc::clone(&start);
                tokio::spawn(async move {
                    start.wait().await;
                    let mut points = Vec::new();
                    for _ in 0..PER_REPLICA {
                        points
                            .push(one(JobKind::BackupLog, "orders", &replica.0, &replica.1).await);
                    }
                    points
                })
            })
            .collect();
        let mut logs = Vec::new();
        for task in tasks {
            logs.extend(task.await.unwrap());
        }

        logs.sort_by_key(|p| lsn(&p.first_lsn));
        assert_eq!(logs.len(), 2 * PER_REPLICA);
        assert_eq!(logs[0].first_lsn, full.first_lsn);
        for pair in logs.windows(2) {
            assert_eq!(pair[1].first_lsn, pair[0].last_lsn, "{pair:?}");
        }
        let history = ag.orders().history;
        assert_eq!(history.len(), 1 + 2 * PER_REPLICA, "none lost");
        assert_eq!(
            history.last().map(|s| s.last_lsn.to_string()),
            logs.last().map(|p| p.last_lsn.clone())
        );
    }
}
