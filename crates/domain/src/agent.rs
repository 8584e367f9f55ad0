//! What agents and backvault tell each other: a VM's facts, its SQL inventory, the results
//! of jobs. Shared by the server and the reference agent so the two cannot disagree.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::text::check_instant;
use crate::violation::{Violation, Violations};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentModel {
    ResourceManager,
    Classic,
}

/// What an agent knows about its VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmFacts {
    pub name: String,
    pub resource_group: String,
    pub subscription_id: String,
    pub region: String,
    pub deployment_model: DeploymentModel,
    pub agent_version: String,
    /// e.g. `4.8`.
    pub dotnet_version: String,
    pub sql_iaas_extension: bool,
    /// Another backup product backs up this VM's SQL databases.
    pub other_backup_product: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryModel {
    Full,
    BulkLogged,
    Simple,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SqlInstance {
    pub name: String,
    /// e.g. `2019`, `2012`, `2008 R2`.
    pub version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackupPreference {
    Primary,
    Secondary,
    Any,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgReplica {
    pub vm_name: String,
    pub resource_group: String,
    pub instance: String,
    pub primary: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AvailabilityGroup {
    pub name: String,
    pub backup_preference: BackupPreference,
    pub replicas: Vec<AgReplica>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SqlDatabase {
    pub instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_group: Option<String>,
    pub name: String,
    pub recovery_model: RecoveryModel,
    #[serde(default)]
    pub system: bool,
    #[serde(default)]
    pub read_only: bool,
    pub size_bytes: i64,
}

/// The result of a discovery job.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct SqlInventory {
    pub instances: Vec<SqlInstance>,
    #[serde(default)]
    pub availability_groups: Vec<AvailabilityGroup>,
    pub databases: Vec<SqlDatabase>,
}

/// A database a job works on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobItem {
    pub instance: String,
    pub database: String,
    /// The protected item, once protection exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected_item_id: Option<Uuid>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryPointType {
    Full,
    CopyOnlyFull,
    Differential,
    Log,
}

/// One backup an agent took. Log-sequence numbers chain the points: a differential's
/// `database_backup_lsn` is its full's `first_lsn`; a log's `first_lsn` is the previous
/// log's `last_lsn`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RecoveryPointReport {
    pub instance: String,
    pub database: String,
    pub backup_type: RecoveryPointType,
    pub started_at: DateTime<Utc>,
    /// The point in time the backup restores to (its end).
    pub backup_time: DateTime<Utc>,
    pub first_lsn: String,
    pub last_lsn: String,
    pub database_backup_lsn: String,
    pub size_bytes: i64,
}

/// SQL Server's `sysname`: the longest instance or database name.
pub const MAX_SQL_NAME_CHARS: usize = 128;
/// A log-sequence number in decimal, as `msdb.dbo.backupset` holds it (`numeric(25,0)`).
pub const MAX_LSN_DIGITS: usize = 25;
/// SQL Server's documented maxima: instances on one computer, databases on one instance.
pub const MAX_INSTANCES_PER_VM: usize = 50;
pub const MAX_DATABASES_PER_INSTANCE: usize = 32_767;
/// Availability groups one VM may report.
pub const MAX_AVAILABILITY_GROUPS: usize = 1_000;
/// A version string such as `2019` or `2008 R2`.
pub const MAX_VERSION_CHARS: usize = 64;

fn check_sql_name(name: &str, pointer: String, v: &mut Violations) {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_SQL_NAME_CHARS {
        v.push(
            pointer,
            "sql_name_length",
            format!("a SQL Server name has 1 to {MAX_SQL_NAME_CHARS} characters"),
        );
    }
}

impl SqlInventory {
    /// Every way this inventory cannot be what one VM's SQL Server reports: names past
    /// `sysname`, more instances or databases than SQL Server allows, negative sizes.
    pub fn violations(&self, pointer: &str) -> Vec<Violation> {
        let mut v = Violations::default();
        if self.instances.len() > MAX_INSTANCES_PER_VM {
            v.push(
                format!("{pointer}/instances"),
                "inventory_too_large",
                format!("a VM runs at most {MAX_INSTANCES_PER_VM} SQL Server instances"),
            );
        }
        let per_instance_cap = self
            .instances
            .len()
            .max(1)
            .saturating_mul(MAX_DATABASES_PER_INSTANCE);
        if self.databases.len() > per_instance_cap {
            v.push(
                format!("{pointer}/databases"),
                "inventory_too_large",
                format!("an instance holds at most {MAX_DATABASES_PER_INSTANCE} databases"),
            );
        }
        if self.availability_groups.len() > MAX_AVAILABILITY_GROUPS {
            v.push(
                format!("{pointer}/availability_groups"),
                "inventory_too_large",
                format!("a VM reports at most {MAX_AVAILABILITY_GROUPS} availability groups"),
            );
        }
        if !v.is_empty() {
            return v.into_vec();
        }
        for (i, instance) in self.instances.iter().enumerate() {
            check_sql_name(
                &instance.name,
                format!("{pointer}/instances/{i}/name"),
                &mut v,
            );
            if instance.version.chars().count() > MAX_VERSION_CHARS {
                v.push(
                    format!("{pointer}/instances/{i}/version"),
                    "version_too_long",
                    format!("a version has at most {MAX_VERSION_CHARS} characters"),
                );
            }
        }
        for (i, group) in self.availability_groups.iter().enumerate() {
            check_sql_name(
                &group.name,
                format!("{pointer}/availability_groups/{i}/name"),
                &mut v,
            );
            for (j, replica) in group.replicas.iter().enumerate() {
                let at = format!("{pointer}/availability_groups/{i}/replicas/{j}");
                check_sql_name(&replica.instance, format!("{at}/instance"), &mut v);
                check_sql_name(&replica.vm_name, format!("{at}/vm_name"), &mut v);
                check_sql_name(
                    &replica.resource_group,
                    format!("{at}/resource_group"),
                    &mut v,
                );
            }
        }
        for (i, db) in self.databases.iter().enumerate() {
            let at = format!("{pointer}/databases/{i}");
            check_sql_name(&db.instance, format!("{at}/instance"), &mut v);
            check_sql_name(&db.name, format!("{at}/name"), &mut v);
            if let Some(group) = &db.availability_group {
                check_sql_name(group, format!("{at}/availability_group"), &mut v);
            }
            if db.size_bytes < 0 {
                v.push(
                    format!("{at}/size_bytes"),
                    "size_negative",
                    "size_bytes is zero or more",
                );
            }
        }
        v.into_vec()
    }
}

/// A backup job covers at most this many databases, so it reports at most as many points.
pub const MAX_POINTS_PER_REPORT: usize = crate::jobs::MAX_ITEMS_PER_JOB;
/// Warnings one completion may carry.
pub const MAX_WARNINGS: usize = 100;

/// An LSN in decimal form, or `None` when it is not one.
pub fn parse_lsn(raw: &str) -> Option<u128> {
    let digits =
        (1..=MAX_LSN_DIGITS).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| raw.parse().ok()).flatten()
}

impl RecoveryPointReport {
    /// Every way this report cannot be a backup SQL Server took: names past `sysname`,
    /// instants outside the accepted range or ending before they start, LSNs that are not
    /// decimal numbers or run backwards, a negative size.
    pub fn violations(&self, pointer: &str) -> Vec<Violation> {
        let mut v = Violations::default();
        for (field, name) in [("instance", &self.instance), ("database", &self.database)] {
            let chars = name.chars().count();
            if chars == 0 || chars > MAX_SQL_NAME_CHARS {
                v.push(
                    format!("{pointer}/{field}"),
                    "sql_name_length",
                    format!("a SQL Server name has 1 to {MAX_SQL_NAME_CHARS} characters"),
                );
            }
        }
        v.extend(check_instant(
            self.started_at,
            &format!("{pointer}/started_at"),
        ));
        v.extend(check_instant(
            self.backup_time,
            &format!("{pointer}/backup_time"),
        ));
        if self.started_at > self.backup_time {
            v.push(
                format!("{pointer}/started_at"),
                "backup_times_reversed",
                "a backup starts before it ends (started_at <= backup_time)",
            );
        }
        let mut lsns = [None; 3];
        for (slot, (field, raw)) in lsns.iter_mut().zip([
            ("first_lsn", &self.first_lsn),
            ("last_lsn", &self.last_lsn),
            ("database_backup_lsn", &self.database_backup_lsn),
        ]) {
            *slot = parse_lsn(raw);
            if slot.is_none() {
                v.push(
                    format!("{pointer}/{field}"),
                    "lsn_invalid",
                    format!("an LSN is a decimal number of 1 to {MAX_LSN_DIGITS} digits"),
                );
            }
        }
        if let [Some(first), Some(last), _] = lsns
            && first > last
        {
            v.push(
                format!("{pointer}/last_lsn"),
                "lsn_order",
                "a backup's last_lsn is not below its first_lsn",
            );
        }
        if self.size_bytes < 0 {
            v.push(
                format!("{pointer}/size_bytes"),
                "size_negative",
                "size_bytes is zero or more",
            );
        }
        v.into_vec()
    }
}

impl JobResult {
    /// Every reason this result cannot be recorded as it is, with pointers under
    /// `pointer` (the result's place in the request).
    pub fn violations(&self, pointer: &str) -> Vec<Violation> {
        match self {
            JobResult::Backup { recovery_points } => {
                let mut v = Violations::default();
                if recovery_points.len() > MAX_POINTS_PER_REPORT {
                    v.push(
                        format!("{pointer}/recovery_points"),
                        "too_many_points",
                        format!(
                            "a backup job reports at most {MAX_POINTS_PER_REPORT} recovery points"
                        ),
                    );
                }
                for (i, p) in recovery_points.iter().enumerate() {
                    v.extend(p.violations(&format!("{pointer}/recovery_points/{i}")));
                }
                v.into_vec()
            }
            JobResult::Restore { restored_database } => {
                let chars = restored_database.chars().count();
                if chars == 0 || chars > MAX_SQL_NAME_CHARS {
                    vec![Violation::new(
                        format!("{pointer}/restored_database"),
                        "sql_name_length",
                        format!("a SQL Server name has 1 to {MAX_SQL_NAME_CHARS} characters"),
                    )]
                } else {
                    Vec::new()
                }
            }
            JobResult::Discovery { inventory } => {
                inventory.violations(&format!("{pointer}/inventory"))
            }
            JobResult::ConfigureProtection {} => Vec::new(),
        }
    }
}

/// What a completed job reports, by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobResult {
    Discovery {
        inventory: SqlInventory,
    },
    ConfigureProtection {},
    Backup {
        recovery_points: Vec<RecoveryPointReport>,
    },
    Restore {
        restored_database: String,
    },
}

/// The messages of the agent protocol (`/v1/agent/...`).
pub mod protocol {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Serialize};
    use utoipa::ToSchema;
    use uuid::Uuid;

    use super::{JobItem, JobResult, VmFacts};
    use crate::jobs::JobKind;

    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct EnrollRequest {
        pub facts: VmFacts,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    pub struct EnrollResponse {
        pub vm_id: Uuid,
        /// Bearer token for every later agent call; earlier tokens of this VM stop working.
        pub agent_token: String,
        pub expires_at: DateTime<Utc>,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct JobLease {
        pub job_id: Uuid,
        pub lease: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub progress: Option<serde_json::Value>,
    }

    /// The VM is alive; optionally new facts, and the leases of the jobs it is running
    /// (one request extends them all).
    #[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct AgentHeartbeat {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub facts: Option<VmFacts>,
        #[serde(default)]
        pub jobs: Vec<JobLease>,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    pub struct AgentHeartbeatResponse {
        /// Leases extended, until `lease_expires_at`.
        pub extended: Vec<Uuid>,
        /// Jobs whose lease this agent no longer holds: stop working on them.
        pub lost: Vec<Uuid>,
        /// Jobs a user cancelled: stop, then report them failed with code `JobCancelled`.
        pub cancel_requested: Vec<Uuid>,
        pub lease_expires_at: DateTime<Utc>,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct ClaimRequest {
        /// 1 to 50 (default 1).
        #[serde(default = "one")]
        pub max_jobs: u32,
        /// Long-poll: wait up to this many seconds (0 to 60) for a job.
        #[serde(default)]
        pub wait_seconds: u32,
    }

    fn one() -> u32 {
        1
    }

    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    pub struct ClaimedJob {
        pub job_id: Uuid,
        pub kind: JobKind,
        /// Fencing token: send it back with every heartbeat, completion and failure.
        pub lease: i64,
        pub lease_expires_at: DateTime<Utc>,
        /// 1 on the first try.
        pub attempt: i32,
        pub items: Vec<JobItem>,
        pub payload: serde_json::Value,
    }

    /// The payload of a scheduled backup job.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
    pub struct ScheduledBackup {
        /// The policy slot the job serves; after downtime, the first slot missed (the
        /// missed ones run once).
        pub slot_at: DateTime<Utc>,
        /// The scheduler's clock when it enqueued the job: a chosen instant when a `--dev`
        /// server rehearses a schedule.
        pub scheduled_at: DateTime<Utc>,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    pub struct ClaimResponse {
        pub jobs: Vec<ClaimedJob>,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct JobHeartbeat {
        pub lease: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub progress: Option<serde_json::Value>,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    pub struct JobHeartbeatResponse {
        pub lease_expires_at: DateTime<Utc>,
        pub cancel_requested: bool,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct CompleteJob {
        pub lease: i64,
        pub result: JobResult,
        /// Non-fatal problems; the job ends `completed_with_warnings`.
        #[serde(default)]
        pub warnings: Vec<String>,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct FailJob {
        pub lease: i64,
        /// e.g. `UserErrorSQLNoSysAdminMembership`.
        pub code: String,
        pub message: String,
        /// Worth trying again (a transient error); non-retryable failures end the job.
        pub retryable: bool,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point() -> RecoveryPointReport {
        RecoveryPointReport {
            instance: "MSSQLSERVER".into(),
            database: "sales".into(),
            backup_type: RecoveryPointType::Full,
            started_at: "2026-11-30T10:00:00Z".parse().unwrap(),
            backup_time: "2026-11-30T10:05:00Z".parse().unwrap(),
            first_lsn: "41000000012300001".into(),
            last_lsn: "41000000045600001".into(),
            database_backup_lsn: "0".into(),
            size_bytes: 1 << 30,
        }
    }

    fn codes(p: &RecoveryPointReport) -> Vec<(String, &'static str)> {
        p.violations("/result/recovery_points/0")
            .into_iter()
            .map(|v| (v.pointer, v.code))
            .collect()
    }

    #[test]
    fn a_plausible_point_passes() {
        assert_eq!(codes(&point()), []);
    }

    #[test]
    fn lsns_are_decimal_numbers_that_do_not_run_backwards() {
        assert_eq!(parse_lsn("0"), Some(0));
        assert_eq!(parse_lsn(&"9".repeat(25)), Some(10u128.pow(25) - 1));
        for bad in ["", "not-a-number", "-1", "+1", "1e5", " 1", &"1".repeat(26)] {
            assert_eq!(parse_lsn(bad), None, "{bad:?}");
        }
        let mut p = point();
        p.first_lsn = "not-a-number".into();
        assert_eq!(
            codes(&p),
            [(
                "/result/recovery_points/0/first_lsn".to_owned(),
                "lsn_invalid"
            )]
        );
        let mut p = point();
        (p.first_lsn, p.last_lsn) = ("900".into(), "100".into());
        assert_eq!(
            codes(&p),
            [("/result/recovery_points/0/last_lsn".to_owned(), "lsn_order")]
        );
    }

    #[test]
    fn times_names_and_sizes_are_bounded() {
        let mut p = point();
        p.backup_time = "+10017-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(codes(&p)[0].1, "instant_out_of_range");
        let mut p = point();
        p.started_at = p.backup_time + chrono::Duration::hours(1);
        assert_eq!(codes(&p)[0].1, "backup_times_reversed");
        let mut p = point();
        p.database = "d".repeat(MAX_SQL_NAME_CHARS + 1);
        p.size_bytes = -1;
        assert_eq!(
            codes(&p).into_iter().map(|c| c.1).collect::<Vec<_>>(),
            ["sql_name_length", "size_negative"]
        );
    }

    #[test]
    fn inventories_stay_within_sql_servers_limits() {
        let inventory = |databases: Vec<SqlDatabase>| SqlInventory {
            instances: vec![SqlInstance {
                name: "MSSQLSERVER".into(),
                version: "2019".into(),
            }],
            availability_groups: Vec::new(),
            databases,
        };
        let db = |name: &str, size_bytes| SqlDatabase {
            instance: "MSSQLSERVER".into(),
            availability_group: None,
            name: name.into(),
            recovery_model: RecoveryModel::Full,
            system: false,
            read_only: false,
            size_bytes,
        };
        assert!(inventory(vec![db("sales", 1)]).violations("/i").is_empty());
        let codes: Vec<_> = inventory(vec![db("", 1), db(&"x".repeat(129), -5)])
            .violations("/i")
            .into_iter()
            .map(|v| (v.pointer, v.code))
            .collect();
        assert_eq!(
            codes,
            [
                ("/i/databases/0/name".to_owned(), "sql_name_length"),
                ("/i/databases/1/name".to_owned(), "sql_name_length"),
                ("/i/databases/1/size_bytes".to_owned(), "size_negative"),
            ]
        );
        let crowded = inventory(vec![db("d", 0); MAX_DATABASES_PER_INSTANCE + 1]);
        assert_eq!(crowded.violations("/i")[0].code, "inventory_too_large");
    }

    #[test]
    fn a_backup_result_checks_each_point_and_their_number() {
        let mut bad = point();
        bad.last_lsn = "1".into();
        let result = JobResult::Backup {
            recovery_points: vec![point(), bad],
        };
        let v = result.violations("/result");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].pointer, "/result/recovery_points/1/last_lsn");
        let many = JobResult::Backup {
            recovery_points: vec![point(); MAX_POINTS_PER_REPORT + 1],
        };
        assert_eq!(many.violations("/result")[0].code, "too_many_points");
    }
}
