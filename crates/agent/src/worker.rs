//! Doing a job, as a SQL Server VM would, from the inventory file.

use std::time::Duration;

use backvault_domain::agent::protocol::{ClaimedJob, ScheduledBackup};
use backvault_domain::agent::{JobResult, RecoveryPointReport, RecoveryPointType, SqlDatabase};
use backvault_domain::jobs::JobKind;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::chain::{ChainError, ChainStore, PendingChain};
use crate::config::{InventoryFile, InventorySource, supports_log_backup};

#[derive(Debug)]
pub enum Outcome {
    Complete {
        result: JobResult,
        warnings: Vec<String>,
        /// Applied once the server accepts the result.
        chain: PendingChain,
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

fn complete(result: JobResult) -> Outcome {
    Outcome::Complete {
        result,
        warnings: Vec::new(),
        chain: PendingChain::none(),
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
/// future.
pub async fn execute(
    job: &ClaimedJob,
    inventory: &InventorySource,
    chains: &ChainStore,
    clock: BackupClock,
    progress: impl Fn(u8),
) -> Outcome {
    let file = if job.kind == JobKind::Discovery {
        // Discovery must report what the file says now, never an older version.
        match inventory.reload() {
            Ok(file) => file,
            Err(e) => {
                return fail(
                    "AgentInventoryUnreadable",
                    format!("The agent cannot read its inventory file: {e:#}"),
                    true,
                );
            }
        }
    } else {
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
        JobKind::Discovery => discover(&file),
        JobKind::ConfigureProtection => complete(JobResult::ConfigureProtection {}),
        JobKind::BackupFull | JobKind::BackupDifferential | JobKind::BackupLog => {
            backup(job, &file, chains, started_at, clock).await
        }
        JobKind::Restore => restore(job, &file),
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

/// Why `db` cannot have a backup of `kind`, as SQL Server would refuse it.
fn unsupported(db: &SqlDatabase, kind: RecoveryPointType) -> Option<&'static str> {
    let full = matches!(
        kind,
        RecoveryPointType::Full | RecoveryPointType::CopyOnlyFull
    );
    if db.system && db.name.eq_ignore_ascii_case("master") && !full {
        return Some("only full backups of the master database are possible");
    }
    if kind == RecoveryPointType::Log && !supports_log_backup(db) {
        return Some(
            "it uses the simple recovery model, which allows no log backups; switch it to \
             the full recovery model and take a full backup first",
        );
    }
    None
}

fn backup_size(db: &SqlDatabase, kind: RecoveryPointType) -> i64 {
    match kind {
        RecoveryPointType::Full | RecoveryPointType::CopyOnlyFull => db.size_bytes,
        RecoveryPointType::Differential => db.size_bytes / 10,
        RecoveryPointType::Log => db.size_bytes / 100,
    }
}

async fn backup(
    job: &ClaimedJob,
    file: &InventoryFile,
    chains: &ChainStore,
    started_at: DateTime<Utc>,
    clock: BackupClock,
) -> Outcome {
    let kind = backup_type(job);
    // Check every database before backing any up: a job fails or succeeds as a whole.
    let mut databases = Vec::with_capacity(job.items.len());
    for item in &job.items {
        let Some(db) = file.database(&item.instance, &item.database) else {
            return fail(
                "UserErrorSQLPODoesNotExist",
                format!(
                    "Database {} does not exist on SQL instance {} of this VM; it may have \
                     been dropped or renamed.",
                    item.database, item.instance
                ),
                false,
            );
        };
        if let Some(why) = unsupported(db, kind) {
            return fail(
                "UserErrorSQLPODoesNotSupportBackupType",
                format!(
                    "Database {}/{} does not support this backup type: {why}.",
                    item.instance, item.database
                ),
                false,
            );
        }
        databases.push(db);
    }

    let mut planner = chains
        .planner(databases.iter().map(|db| file.chain_key(db)))
        .await;
    let backup_time = clock.now(job);
    let mut recovery_points = Vec::with_capacity(job.items.len());
    for (item, db) in job.items.iter().zip(databases) {
        let lsns = match planner.plan(&file.chain_key(db), kind) {
            Ok(lsns) => lsns,
            Err(ChainError::NoFullBackup) => {
                return fail(
                    "UserErrorSQLNoFullBackup",
                    format!(
                        "Database {}/{} has no full backup for this backup to build on; take a \
                         full backup first.",
                        item.instance, item.database
                    ),
                    false,
                );
            }
        };
        recovery_points.push(RecoveryPointReport {
            // As the job named it, so the server can match the point to the item.
            instance: item.instance.clone(),
            database: item.database.clone(),
            backup_type: kind,
            started_at,
            backup_time,
            first_lsn: lsns.first.to_string(),
            last_lsn: lsns.last.to_string(),
            database_backup_lsn: lsns.database_backup.to_string(),
            size_bytes: backup_size(db, kind),
            checkpoint_lsn: None,
            differential_base_lsn: None,
            differential_base_guid: None,
            backup_set_uuid: None,
            is_copy_only: None,
            begins_log_chain: None,
            has_bulk_logged_data: None,
            recovery_model: None,
            recovery_fork_guid: None,
            fork_point_lsn: None,
            database_guid: None,
        });
    }
    let warnings = if job.items.is_empty() {
        vec!["The job lists no databases; nothing was backed up.".to_owned()]
    } else {
        Vec::new()
    };
    Outcome::Complete {
        result: JobResult::Backup { recovery_points },
        warnings,
        chain: planner.finish(),
    }
}

/// A restore job's payload. Every field may be missing, as in payloads older than it.
#[derive(Debug, Default, Deserialize)]
struct RestorePayload {
    /// Else the item's database.
    target_database: Option<String>,
    /// Else the item's instance.
    target_instance: Option<String>,
    /// Replace a database that exists (`RESTORE ... WITH REPLACE`).
    #[serde(default)]
    overwrite: bool,
}

const SYSTEM_DATABASES: [&str; 4] = ["master", "model", "msdb", "tempdb"];

/// Restores onto the target, unless SQL Server would refuse to.
fn restore(job: &ClaimedJob, file: &InventoryFile) -> Outcome {
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
    let Some(instance) = file.instance(instance) else {
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
                instance.name
            ),
            false,
        );
    }
    if !payload.overwrite && file.database(&instance.name, database).is_some() {
        return fail(
            "UserErrorCannotRestoreExistingDBWithoutForceOverwrite",
            format!(
                "Database {database} already exists on SQL instance {} (SQL Server Msg 3154). \
                 Restore with overwrite to replace it, or under another database name.",
                instance.name
            ),
            false,
        );
    }
    complete(JobResult::Restore {
        tail_log_backup: None,
        restored_database: database.to_owned(),
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
    use std::path::PathBuf;

    use backvault_domain::agent::JobItem;
    use serde_json::json;
    use uuid::Uuid;

    use super::*;

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
    }

    impl Drop for TempInventory {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
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

    /// Runs a backup job and commits its chain, as when the server accepts the result.
    async fn backed_up(
        job: &ClaimedJob,
        inventory: &InventorySource,
        chains: &ChainStore,
    ) -> Vec<RecoveryPointReport> {
        backed_up_by(BackupClock::Clock, job, inventory, chains).await
    }

    async fn backed_up_by(
        clock: BackupClock,
        job: &ClaimedJob,
        inventory: &InventorySource,
        chains: &ChainStore,
    ) -> Vec<RecoveryPointReport> {
        match execute(job, inventory, chains, clock, |_| {}).await {
            Outcome::Complete {
                result: JobResult::Backup { recovery_points },
                chain,
                ..
            } => {
                chains.commit(chain).await.unwrap();
                recovery_points
            }
            other => panic!("expected recovery points, got {other:?}"),
        }
    }

    async fn failure(job: &ClaimedJob, inventory: &InventorySource) -> Failure {
        match execute(
            job,
            inventory,
            &ChainStore::in_memory(),
            BackupClock::Clock,
            |_| {},
        )
        .await
        {
            Outcome::Fail(failure) => failure,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    async fn discovered(inventory: &InventorySource) -> Vec<SqlDatabase> {
        let discovery = job(JobKind::Discovery, &[], json!({}));
        match execute(
            &discovery,
            inventory,
            &ChainStore::in_memory(),
            BackupClock::Clock,
            |_| {},
        )
        .await
        {
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

        let added = std::fs::read_to_string(&temp.0).unwrap()
            + "\n[[databases]]\ninstance = \"MSSQLSERVER\"\nname = \"new\"\n\
               recovery_model = \"full\"\nsize_bytes = 1\n";
        std::fs::write(&temp.0, added).unwrap();
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
        let (inventory, chains) = (temp.source(), ChainStore::in_memory());
        let dbs = [("MSSQLSERVER", "sales")];
        let scheduled_at: DateTime<Utc> = "2031-11-16T00:00:00Z".parse().unwrap();
        let payload = json!({"slot_at": "2031-11-15T23:45:00Z", "scheduled_at": scheduled_at});
        let full = job(JobKind::BackupFull, &dbs, payload.clone());
        let rehearsed = backed_up_by(BackupClock::Schedule, &full, &inventory, &chains).await;
        assert_eq!(
            (rehearsed[0].started_at, rehearsed[0].backup_time),
            (scheduled_at, scheduled_at)
        );
        let before = Utc::now();
        let log = job(JobKind::BackupLog, &dbs, payload);
        let clocked = backed_up_by(BackupClock::Clock, &log, &inventory, &chains).await;
        assert!(clocked[0].backup_time >= before, "the clock by default");
        let on_demand = job(JobKind::BackupLog, &dbs, json!({}));
        let unscheduled =
            backed_up_by(BackupClock::Schedule, &on_demand, &inventory, &chains).await;
        assert!(
            unscheduled[0].backup_time >= before,
            "no schedule, the clock"
        );
    }

    #[tokio::test]
    async fn backups_chain_per_database() {
        let temp = TempInventory::new(|s| s);
        let (inventory, chains) = (temp.source(), ChainStore::in_memory());
        let dbs = [("MSSQLSERVER", "sales"), ("MSSQLSERVER", "hr")];
        let full = backed_up(
            &job(JobKind::BackupFull, &dbs, json!({})),
            &inventory,
            &chains,
        )
        .await;
        assert_eq!(full.len(), 2);
        assert!(
            full.iter()
                .all(|p| p.backup_type == RecoveryPointType::Full)
        );
        assert!(full.iter().all(|p| p.started_at <= p.backup_time));

        let log = job(JobKind::BackupLog, &[("mssqlserver", "SALES")], json!({}));
        let log = backed_up(&log, &inventory, &chains).await;
        assert_eq!(
            log[0].database, "SALES",
            "points name databases as the job did"
        );
        assert_eq!(log[0].first_lsn, full[0].last_lsn);
        assert_eq!(log[0].database_backup_lsn, full[0].first_lsn);
        assert_eq!(log[0].size_bytes, full[0].size_bytes / 100);

        let copy = job(JobKind::BackupFull, &dbs[1..], json!({"copy_only": true}));
        let copy = backed_up(&copy, &inventory, &chains).await;
        assert_eq!(copy[0].backup_type, RecoveryPointType::CopyOnlyFull);

        let diff = job(JobKind::BackupDifferential, &dbs[1..], json!({}));
        let diff = backed_up(&diff, &inventory, &chains).await;
        assert_eq!(diff[0].backup_type, RecoveryPointType::Differential);
        assert_eq!(diff[0].database_backup_lsn, full[1].first_lsn);
        assert_eq!(diff[0].size_bytes, full[1].size_bytes / 10);
    }

    #[tokio::test]
    async fn backups_refuse_what_sql_server_would() {
        let temp = TempInventory::new(|s| s);
        let inventory = temp.source();
        let missing = [("MSSQLSERVER", "sales"), ("MSSQLSERVER", "gone")];
        let f = failure(&job(JobKind::BackupFull, &missing, json!({})), &inventory).await;
        assert_eq!((f.code, f.retryable), ("UserErrorSQLPODoesNotExist", false));

        let simple = inventory
            .current()
            .databases
            .iter()
            .find(|d| !supports_log_backup(d))
            .cloned()
            .unwrap();
        let log = job(
            JobKind::BackupLog,
            &[(&simple.instance, &simple.name)],
            json!({}),
        );
        let f = failure(&log, &inventory).await;
        assert_eq!(
            (f.code, f.retryable),
            ("UserErrorSQLPODoesNotSupportBackupType", false)
        );

        let log = job(JobKind::BackupLog, &[("MSSQLSERVER", "sales")], json!({}));
        let f = failure(&log, &inventory).await;
        assert_eq!((f.code, f.retryable), ("UserErrorSQLNoFullBackup", false));
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
        let (inventory, chains) = (temp.source(), ChainStore::in_memory());
        let both = [("CS", "Sales"), ("cs", "sales")];
        let full = backed_up(
            &job(JobKind::BackupFull, &both, json!({})),
            &inventory,
            &chains,
        )
        .await;
        assert_eq!(
            (full[0].size_bytes, full[1].size_bytes),
            (1000, 2000),
            "two databases"
        );

        let log = job(JobKind::BackupLog, &both[..1], json!({}));
        let log = backed_up(&log, &inventory, &chains).await;
        assert_eq!(log[0].first_lsn, full[0].last_lsn, "each has its own chain");
        let log = job(JobKind::BackupLog, &both[1..], json!({}));
        let log = backed_up(&log, &inventory, &chains).await;
        assert_eq!(log[0].first_lsn, full[1].last_lsn);

        let wrong_case = job(JobKind::BackupFull, &[("CS", "SALES")], json!({}));
        let f = failure(&wrong_case, &inventory).await;
        assert_eq!((f.code, f.retryable), ("UserErrorSQLPODoesNotExist", false));
    }

    async fn restored(job: &ClaimedJob, inventory: &InventorySource) -> String {
        let chains = ChainStore::in_memory();
        match execute(job, inventory, &chains, BackupClock::Clock, |_| {}).await {
            Outcome::Complete {
                result: JobResult::Restore { restored_database, .. },
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
            // As the service sends it.
            (
                json!({"target_database": "sales_copy", "overwrite": false,
                       "restores_to": "2025-11-20T12:00:00Z", "steps": []}),
                "sales_copy",
            ),
        ] {
            let restore = job(JobKind::Restore, &[("MSSQLSERVER", "sales")], payload);
            assert_eq!(restored(&restore, &inventory).await, expected);
        }
        let unnamed = job(JobKind::Restore, &[("MSSQLSERVER", "new_db")], json!(null));
        assert_eq!(restored(&unnamed, &inventory).await, "new_db");
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
                restored(&restore, &inventory).await,
                name,
                "sysname holds 128"
            );
        }
    }
}
