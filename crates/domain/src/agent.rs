//! What agents and backvault tell each other: a VM's facts, its SQL inventory, the results
//! of jobs. Shared by the server and the reference agent so the two cannot disagree.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::instants::{earlier, later};
use crate::jobs::JobKind;
use crate::lsn::Lsn;
use crate::text::check_instant;
use crate::violation::{Violation, Violations};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentModel {
    ResourceManager,
    Classic,
}

impl DeploymentModel {
    pub const ALL: [DeploymentModel; 2] =
        [DeploymentModel::ResourceManager, DeploymentModel::Classic];

    /// As on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentModel::ResourceManager => "resource_manager",
            DeploymentModel::Classic => "classic",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }
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
    /// At most 64 characters.
    pub agent_version: String,
    /// e.g. `4.8`; at most 64 characters.
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

impl RecoveryModel {
    pub const ALL: [RecoveryModel; 3] = [
        RecoveryModel::Full,
        RecoveryModel::BulkLogged,
        RecoveryModel::Simple,
    ];

    /// As on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryModel::Full => "full",
            RecoveryModel::BulkLogged => "bulk_logged",
            RecoveryModel::Simple => "simple",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SqlInstance {
    pub name: String,
    /// e.g. `2019`, `2012`, `2008 R2`.
    pub version: String,
}

/// Where an availability group wants its backups taken (SQL Server's
/// `automated_backup_preference`). Full and differential backups ignore it: SQL Server
/// takes them on the primary only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackupPreference {
    Primary,
    /// SQL Server's `SECONDARY_ONLY`.
    SecondaryOnly,
    /// SQL Server's `SECONDARY` (agents built before availability groups became items
    /// send `secondary`).
    #[serde(alias = "secondary")]
    PreferSecondary,
    /// SQL Server's `NONE` (older agents send `any`).
    #[serde(alias = "any")]
    AnyReplica,
}

impl BackupPreference {
    pub const ALL: [BackupPreference; 4] = [
        BackupPreference::Primary,
        BackupPreference::SecondaryOnly,
        BackupPreference::PreferSecondary,
        BackupPreference::AnyReplica,
    ];

    /// As on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupPreference::Primary => "primary",
            BackupPreference::SecondaryOnly => "secondary_only",
            BackupPreference::PreferSecondary => "prefer_secondary",
            BackupPreference::AnyReplica => "any_replica",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// A replica's role (`sys.dm_hadr_availability_replica_states.role_desc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaRole {
    Primary,
    Secondary,
    /// Between roles (during a failover) or not connected: backs up nothing.
    Resolving,
}

impl ReplicaRole {
    pub const ALL: [ReplicaRole; 3] = [
        ReplicaRole::Primary,
        ReplicaRole::Secondary,
        ReplicaRole::Resolving,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaRole::Primary => "primary",
            ReplicaRole::Secondary => "secondary",
            ReplicaRole::Resolving => "resolving",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A replica's synchronization health
/// (`sys.dm_hadr_availability_replica_states.synchronization_health_desc`), healthiest
/// last so that the order compares health.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SynchronizationHealth {
    NotHealthy,
    PartiallyHealthy,
    Healthy,
}

impl SynchronizationHealth {
    pub const ALL: [SynchronizationHealth; 3] = [
        SynchronizationHealth::NotHealthy,
        SynchronizationHealth::PartiallyHealthy,
        SynchronizationHealth::Healthy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SynchronizationHealth::NotHealthy => "not_healthy",
            SynchronizationHealth::PartiallyHealthy => "partially_healthy",
            SynchronizationHealth::Healthy => "healthy",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|h| h.as_str() == s)
    }
}

/// SQL Server's default `backup_priority`.
pub const DEFAULT_BACKUP_PRIORITY: u8 = 50;
/// `backup_priority` ranges over 0 (never chosen for backups) to 100.
pub const MAX_BACKUP_PRIORITY: u8 = 100;

/// A replica of the group, as `sys.availability_replicas` lists it on every replica: the
/// VM that hosts it lets the server check that every replica is registered with the
/// same vault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgReplica {
    pub vm_name: String,
    pub resource_group: String,
    pub instance: String,
    /// Only from agents that predate [`LocalReplica`]: whether this replica was primary.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub primary: bool,
}

/// The reporting VM's own replica of the group: SQL Server shows a secondary only its
/// own state, so each agent reports its own role, and the server joins the reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LocalReplica {
    pub instance: String,
    pub role: ReplicaRole,
    pub synchronization_health: SynchronizationHealth,
    /// 0 (never chosen for backups) to 100.
    pub backup_priority: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AvailabilityGroup {
    pub name: String,
    /// `sys.availability_groups.group_id`: the same on every replica, and what tells two
    /// groups of one name apart. Agents that predate it leave it out; the server then
    /// knows the group by its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<Uuid>,
    pub backup_preference: BackupPreference,
    pub replicas: Vec<AgReplica>,
    /// This VM's replica. Agents that predate it leave it out; the server then reads the
    /// role from the `primary` flag of this VM's entry in `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalReplica>,
}

impl AvailabilityGroup {
    /// This VM's replica: the one it reported, or, from an agent that predates that, its
    /// entry in `replicas` (healthy, default priority). None when neither names it.
    pub fn local_replica(&self, vm_name: &str, resource_group: &str) -> Option<LocalReplica> {
        if let Some(local) = &self.local {
            return Some(local.clone());
        }
        self.replicas
            .iter()
            .find(|r| {
                r.vm_name.eq_ignore_ascii_case(vm_name)
                    && r.resource_group.eq_ignore_ascii_case(resource_group)
            })
            .map(|r| LocalReplica {
                instance: r.instance.clone(),
                role: if r.primary {
                    ReplicaRole::Primary
                } else {
                    ReplicaRole::Secondary
                },
                synchronization_health: SynchronizationHealth::Healthy,
                backup_priority: DEFAULT_BACKUP_PRIORITY,
            })
    }
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

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryPointType {
    Full,
    CopyOnlyFull,
    Differential,
    Log,
}

impl RecoveryPointType {
    pub const ALL: [RecoveryPointType; 4] = [
        RecoveryPointType::Full,
        RecoveryPointType::CopyOnlyFull,
        RecoveryPointType::Differential,
        RecoveryPointType::Log,
    ];

    /// As on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryPointType::Full => "full",
            RecoveryPointType::CopyOnlyFull => "copy_only_full",
            RecoveryPointType::Differential => "differential",
            RecoveryPointType::Log => "log",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The retention a point of this type follows: a copy-only full is kept as a full.
    pub fn retention_type(self) -> crate::retention::BackupType {
        use crate::retention::BackupType;
        match self {
            RecoveryPointType::Full | RecoveryPointType::CopyOnlyFull => BackupType::Full,
            RecoveryPointType::Differential => BackupType::Differential,
            RecoveryPointType::Log => BackupType::Log,
        }
    }
}

/// One backup an agent took, as `msdb.dbo.backupset` describes it. LSNs come in SQL
/// Server's decimal form (`numeric(25,0)`) or its textual form (`0000002a:00000010:0001`).
///
/// The chain is SQL Server's: a differential's `differential_base_lsn` is the
/// `checkpoint_lsn` of its base full (the latest full that was not copy-only, whoever
/// took it); a log's `first_lsn` is the previous log's `last_lsn`; a data backup's
/// `database_backup_lsn` is the `checkpoint_lsn` of the full before it. The fields after
/// `size_bytes` came with the second version of the report: an agent that sends none of
/// them keeps working, and each point says which checks the server could not make.
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
    /// Data backups: the checkpoint the backup began with (between `first_lsn` and
    /// `last_lsn`; equal to `first_lsn` only on an idle database).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_lsn: Option<String>,
    /// Differentials: the `checkpoint_lsn` of their base full. Fulls: the base they
    /// establish (their own `checkpoint_lsn`; copy-only fulls establish none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differential_base_lsn: Option<String>,
    /// Differentials: the identifier of their base. Fulls: the identifier of the base they
    /// establish (`sys.database_files.differential_base_guid` after the backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differential_base_guid: Option<Uuid>,
    /// `msdb`'s identifier of the backup set: a report of it is recorded once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_set_uuid: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_copy_only: Option<bool>,
    /// Logs: the first of a log chain (after the database's creation, or after a switch
    /// from the simple recovery model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begins_log_chain: Option<bool>,
    /// Logs: the backup holds minimally logged changes; it restores to its end only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_bulk_logged_data: Option<bool>,
    /// The database's recovery model when the backup was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_model: Option<RecoveryModel>,
    /// The recovery fork the backup belongs to; a restore starts a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_fork_guid: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork_point_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_guid: Option<Uuid>,
}

/// SQL Server's `sysname`: the longest instance or database name.
pub const MAX_SQL_NAME_CHARS: usize = 128;
pub use crate::lsn::MAX_LSN_DIGITS;
/// SQL Server's documented maxima: instances on one computer, databases on one instance.
pub const MAX_INSTANCES_PER_VM: usize = 50;
pub const MAX_DATABASES_PER_INSTANCE: usize = 32_767;
/// Availability groups one VM may report.
pub const MAX_AVAILABILITY_GROUPS: usize = 1_000;
/// SQL Server's maximum: one primary and eight secondaries.
pub const MAX_AG_REPLICAS: usize = 9;
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
            if group.replicas.len() > MAX_AG_REPLICAS {
                v.push(
                    format!("{pointer}/availability_groups/{i}/replicas"),
                    "inventory_too_large",
                    format!("an availability group has at most {MAX_AG_REPLICAS} replicas"),
                );
            }
            for (j, replica) in group.replicas.iter().enumerate().take(MAX_AG_REPLICAS) {
                let at = format!("{pointer}/availability_groups/{i}/replicas/{j}");
                check_sql_name(&replica.instance, format!("{at}/instance"), &mut v);
                check_sql_name(&replica.vm_name, format!("{at}/vm_name"), &mut v);
                check_sql_name(
                    &replica.resource_group,
                    format!("{at}/resource_group"),
                    &mut v,
                );
            }
            if let Some(local) = &group.local {
                let at = format!("{pointer}/availability_groups/{i}/local");
                check_sql_name(&local.instance, format!("{at}/instance"), &mut v);
                if local.backup_priority > MAX_BACKUP_PRIORITY {
                    v.push(
                        format!("{at}/backup_priority"),
                        "backup_priority_range",
                        format!("backup_priority is 0 to {MAX_BACKUP_PRIORITY}"),
                    );
                }
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
/// Characters of one warning.
pub const MAX_WARNING_CHARS: usize = 1024;
/// Bytes of a job's `progress` (JSON, as the server stores it), in a job heartbeat or an
/// agent heartbeat.
pub const MAX_PROGRESS_BYTES: usize = 4 * 1024;
/// Bytes of a completion's `result` (JSON, as the server stores it): about 7,000
/// databases of a discovery.
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;
/// Characters of the free-form VM facts `agent_version` and `dotnet_version`.
pub const MAX_VERSION_FACT_CHARS: usize = 64;
/// Job leases one agent heartbeat may extend (a VM runs at most 35 jobs at once).
pub const MAX_HEARTBEAT_LEASES: usize = 100;
/// Finished jobs one claim may report (completions and failures together): a VM runs at
/// most 35 jobs at once, so one claim can carry every job that finished since the last.
pub const MAX_CLAIM_REPORTS: usize = 100;
/// How far a reported `backup_time` may lie outside its job's claim-to-completion window:
/// the agent's clock may differ from the server's by this much.
pub const BACKUP_TIME_SKEW_MINUTES: i64 = 5;

/// Counts the bytes of a value's JSON without building it.
#[derive(Default)]
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The size of `value` serialized as compact JSON (as stored).
pub fn json_bytes(value: &impl Serialize) -> usize {
    let mut count = ByteCount::default();
    // A value that does not serialize counts as too large.
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

fn too_large(pointer: impl Into<String>, what: String) -> Violation {
    Violation::new(pointer, "field_too_large", what)
}

/// `field_too_large` when an agent's `progress` is over [`MAX_PROGRESS_BYTES`].
pub fn check_progress(progress: Option<&JobProgress>, pointer: &str) -> Vec<Violation> {
    let Some(progress) = progress else {
        return Vec::new();
    };
    let mut v = progress.violations(pointer);
    let bytes = json_bytes(progress);
    if bytes > MAX_PROGRESS_BYTES {
        v.push(too_large(
            pointer,
            format!(
                "progress is at most {MAX_PROGRESS_BYTES} bytes of JSON (this one has {bytes})"
            ),
        ));
    }
    v
}

/// At most [`MAX_WARNINGS`] warnings of at most [`MAX_WARNING_CHARS`] characters each.
pub fn check_warnings(warnings: &[String], pointer: &str) -> Vec<Violation> {
    let mut v = Violations::default();
    if warnings.len() > MAX_WARNINGS {
        v.push(
            pointer,
            "too_many_warnings",
            format!("a completion carries at most {MAX_WARNINGS} warnings"),
        );
        return v.into_vec();
    }
    for (i, warning) in warnings.iter().enumerate() {
        if warning.chars().count() > MAX_WARNING_CHARS {
            v.push(
                format!("{pointer}/{i}"),
                "field_too_large",
                format!("a warning has at most {MAX_WARNING_CHARS} characters"),
            );
        }
    }
    v.into_vec()
}

impl VmFacts {
    /// The free-form facts' size bounds (the identity fields have rules of their own).
    pub fn size_violations(&self, pointer: &str) -> Vec<Violation> {
        let mut v = Violations::default();
        for (field, value) in [
            ("agent_version", &self.agent_version),
            ("dotnet_version", &self.dotnet_version),
        ] {
            if value.chars().count() > MAX_VERSION_FACT_CHARS {
                v.push(
                    format!("{pointer}/{field}"),
                    "field_too_large",
                    format!("{field} has at most {MAX_VERSION_FACT_CHARS} characters"),
                );
            }
        }
        v.into_vec()
    }
}

impl RecoveryPointReport {
    /// Every way this report cannot be a backup SQL Server took: names past `sysname`,
    /// instants outside the accepted range or ending before they start, LSNs in neither of
    /// SQL Server's forms or out of order (`first_lsn <= checkpoint_lsn <= last_lsn`,
    /// a differential's base before its start), a copy-only flag that contradicts the
    /// type, log-only facts on a data backup, a negative size.
    pub fn violations(&self, pointer: &str) -> Vec<Violation> {
        let mut v = Violations::default();
        for (field, name) in [("instance", &self.instance), ("database", &self.database)] {
            check_sql_name(name, format!("{pointer}/{field}"), &mut v);
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
        let mut lsn = |field: &str, raw: Option<&String>| -> Option<Lsn> {
            let raw = raw?;
            let parsed = Lsn::parse(raw);
            if parsed.is_none() {
                v.push(
                    format!("{pointer}/{field}"),
                    "lsn_invalid",
                    format!(
                        "an LSN is a decimal number of 1 to {MAX_LSN_DIGITS} digits, or SQL Server's textual form (0000002a:00000010:0001)"
                    ),
                );
            }
            parsed
        };
        let first = lsn("first_lsn", Some(&self.first_lsn));
        let last = lsn("last_lsn", Some(&self.last_lsn));
        lsn("database_backup_lsn", Some(&self.database_backup_lsn));
        let checkpoint = lsn("checkpoint_lsn", self.checkpoint_lsn.as_ref());
        let base = lsn("differential_base_lsn", self.differential_base_lsn.as_ref());
        lsn("fork_point_lsn", self.fork_point_lsn.as_ref());
        let data = self.backup_type != RecoveryPointType::Log;
        if let (Some(first), Some(last)) = (first, last)
            && first > last
        {
            v.push(
                format!("{pointer}/last_lsn"),
                "lsn_order",
                "a backup's last_lsn is not below its first_lsn",
            );
        }
        if let Some(checkpoint) = checkpoint {
            if !data {
                v.push(
                    format!("{pointer}/checkpoint_lsn"),
                    "lsn_not_applicable",
                    "a log backup has no checkpoint_lsn",
                );
            } else if first.is_some_and(|f| checkpoint < f) || last.is_some_and(|l| checkpoint > l)
            {
                v.push(
                    format!("{pointer}/checkpoint_lsn"),
                    "lsn_order",
                    "a data backup's checkpoint_lsn lies between its first_lsn and last_lsn",
                );
            }
        }
        if let (Some(base), Some(first)) = (base, first)
            && self.backup_type == RecoveryPointType::Differential
            && base > first
        {
            v.push(
                format!("{pointer}/differential_base_lsn"),
                "lsn_order",
                "a differential's base is a checkpoint before the differential began",
            );
        }
        if let Some(copy_only) = self.is_copy_only {
            let expected = self.backup_type == RecoveryPointType::CopyOnlyFull;
            if copy_only != expected {
                v.push(
                    format!("{pointer}/is_copy_only"),
                    "copy_only_mismatch",
                    "is_copy_only is true exactly for backup_type copy_only_full (backvault takes no copy-only logs or differentials)",
                );
            }
        }
        if data {
            for (field, set) in [
                ("begins_log_chain", self.begins_log_chain),
                ("has_bulk_logged_data", self.has_bulk_logged_data),
            ] {
                if set == Some(true) {
                    v.push(
                        format!("{pointer}/{field}"),
                        "log_fact_on_data_backup",
                        format!("{field} is true only for log backups"),
                    );
                }
            }
        } else if self.recovery_model == Some(RecoveryModel::Simple) {
            v.push(
                format!("{pointer}/recovery_model"),
                "log_backup_in_simple_recovery",
                "SQL Server takes no log backups of a database in the simple recovery model (Msg 4208)",
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
        let bytes = json_bytes(self);
        if bytes > MAX_RESULT_BYTES {
            // Alone: the rest of a result this large is not worth reading.
            return vec![too_large(
                pointer,
                format!(
                    "a result is at most {MAX_RESULT_BYTES} bytes of JSON (this one has {bytes})"
                ),
            )];
        }
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
            JobResult::Restore {
                restored_database,
                tail_log_backup,
            } => {
                let mut v = Violations::default();
                check_sql_name(
                    restored_database,
                    format!("{pointer}/restored_database"),
                    &mut v,
                );
                if let Some(tail) = tail_log_backup {
                    v.extend(tail.violations(&format!("{pointer}/tail_log_backup")));
                    if tail.backup_type != RecoveryPointType::Log {
                        v.push(
                            format!("{pointer}/tail_log_backup/backup_type"),
                            "point_type_mismatch",
                            "a tail-log backup is a log backup",
                        );
                    }
                }
                v.into_vec()
            }
            JobResult::Discovery { inventory } => {
                inventory.violations(&format!("{pointer}/inventory"))
            }
            JobResult::ConfigureProtection {} => Vec::new(),
        }
    }
}

/// What the server knows of a job when its agent reports the result: what the report
/// must match.
#[derive(Debug, Clone, Copy)]
pub struct ReportedJob<'a> {
    pub kind: JobKind,
    pub items: &'a [JobItem],
    pub payload: &'a serde_json::Value,
    /// When the job was first handed to an agent (its `started_at`).
    pub claimed_at: Option<DateTime<Utc>>,
    /// When the completion arrived (the server's clock).
    pub completed_at: DateTime<Utc>,
    /// A `--dev` server rehearsing schedules: a scheduled job's `payload.scheduled_at` is
    /// a chosen instant, and agents may stamp their backups with it.
    pub rehearsal: bool,
}

impl JobItem {
    /// Whether a report naming `instance` and `database` is about this item: instance
    /// names ignoring ASCII case (as SQL Server resolves them), database names exactly.
    pub fn is_named(&self, instance: &str, database: &str) -> bool {
        self.instance.eq_ignore_ascii_case(instance) && self.database == database
    }
}

impl ReportedJob<'_> {
    /// The type of every point a backup job of this kind reports; `None` for other kinds.
    pub fn point_type(&self) -> Option<RecoveryPointType> {
        match self.kind {
            JobKind::BackupFull
                if self
                    .payload
                    .get("copy_only")
                    .and_then(serde_json::Value::as_bool)
                    == Some(true) =>
            {
                Some(RecoveryPointType::CopyOnlyFull)
            }
            JobKind::BackupFull => Some(RecoveryPointType::Full),
            JobKind::BackupDifferential => Some(RecoveryPointType::Differential),
            JobKind::BackupLog => Some(RecoveryPointType::Log),
            _ => None,
        }
    }

    /// The instants a backup of this job may be stamped with: from the claim to the
    /// completion, widened by [`BACKUP_TIME_SKEW_MINUTES`] on both sides; in a rehearsal,
    /// also stretched to cover the job's `scheduled_at`.
    pub fn backup_window(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        let skew = crate::instants::minutes(BACKUP_TIME_SKEW_MINUTES);
        let mut from = self
            .claimed_at
            .unwrap_or(self.completed_at)
            .min(self.completed_at);
        let mut to = self.completed_at;
        if self.rehearsal
            && let Some(at) = self
                .payload
                .get("scheduled_at")
                .and_then(|v| serde_json::from_value::<DateTime<Utc>>(v.clone()).ok())
        {
            from = from.min(at);
            to = to.max(at);
        }
        (earlier(from, skew), later(to, skew))
    }

    /// The database a restore job writes: `payload.target_database`, else its item's.
    pub fn restore_target(&self) -> Option<&str> {
        self.payload
            .get("target_database")
            .and_then(serde_json::Value::as_str)
            .or_else(|| self.items.first().map(|i| i.database.as_str()))
    }
}

impl JobResult {
    /// Every way this result does not fit the job it completes (pointers under
    /// `pointer`): a backup's points have the job's type, name only the job's items, at
    /// most one each, stamped within the job's window; a restore reports the database the
    /// job restores. A result of another kind than the job's is not judged here (the
    /// completion answers `result_kind_mismatch`).
    pub fn job_violations(&self, job: &ReportedJob<'_>, pointer: &str) -> Vec<Violation> {
        let mut v = Violations::default();
        match self {
            JobResult::Backup { recovery_points } => {
                let Some(expected) = job.point_type() else {
                    return Vec::new();
                };
                let (from, to) = job.backup_window();
                let mut reported = vec![false; job.items.len()];
                for (i, p) in recovery_points.iter().enumerate() {
                    let at = format!("{pointer}/recovery_points/{i}");
                    if p.backup_type != expected {
                        v.push(
                            format!("{at}/backup_type"),
                            "point_type_mismatch",
                            format!(
                                "a {} job reports points of type {}",
                                job.kind.as_str(),
                                expected.as_str()
                            ),
                        );
                    }
                    let mut named = job
                        .items
                        .iter()
                        .zip(reported.iter_mut())
                        .filter(|(item, _)| item.is_named(&p.instance, &p.database))
                        .map(|(_, seen)| seen)
                        .peekable();
                    if named.peek().is_none() {
                        v.push(
                            format!("{at}/database"),
                            "point_not_in_job",
                            "a point names one of the job's databases (its instance and name)",
                        );
                    } else if let Some(seen) = named.find(|seen| !**seen) {
                        *seen = true;
                    } else {
                        v.push(
                            at.clone(),
                            "point_duplicate",
                            "a backup job reports at most one point per database",
                        );
                    }
                    if p.backup_time < from || p.backup_time > to {
                        v.push(
                            format!("{at}/backup_time"),
                            "backup_time_out_of_window",
                            format!(
                                "a point of this job is stamped between {} and {} (from its claim to its completion, give or take {BACKUP_TIME_SKEW_MINUTES} minutes)",
                                from.to_rfc3339(),
                                to.to_rfc3339()
                            ),
                        );
                    }
                }
            }
            JobResult::Restore {
                restored_database,
                tail_log_backup,
            } if job.kind == JobKind::Restore => {
                if let Some(target) = job.restore_target()
                    && restored_database != target
                {
                    v.push(
                        format!("{pointer}/restored_database"),
                        "restored_database_mismatch",
                        format!("this job restores the database {target:?}"),
                    );
                }
                if let Some(tail) = tail_log_backup {
                    let at = format!("{pointer}/tail_log_backup");
                    let asked = job
                        .payload
                        .get("tail_log_backup")
                        .and_then(serde_json::Value::as_bool)
                        == Some(true);
                    if !asked {
                        v.push(
                            at.clone(),
                            "tail_log_backup_not_requested",
                            "this restore job takes no tail-log backup",
                        );
                    } else if !job
                        .items
                        .iter()
                        .any(|i| i.is_named(&tail.instance, &tail.database))
                    {
                        v.push(
                            format!("{at}/database"),
                            "point_not_in_job",
                            "the tail-log backup is of the database the job overwrites",
                        );
                    }
                    let (from, to) = job.backup_window();
                    if tail.backup_time < from || tail.backup_time > to {
                        v.push(
                            format!("{at}/backup_time"),
                            "backup_time_out_of_window",
                            "the tail-log backup is stamped between the job's claim and its completion",
                        );
                    }
                }
            }
            _ => {}
        }
        v.into_vec()
    }
}

/// Fencing tokens count up from this: a claim hands out the first.
pub const FIRST_LEASE: i64 = 1;

/// `lease_invalid` for a lease no claim can have handed out.
pub fn check_lease(lease: i64, pointer: &str) -> Option<Violation> {
    (lease < FIRST_LEASE).then(|| {
        Violation::new(
            pointer,
            "lease_invalid",
            format!("a lease is a fencing token from a claim: {FIRST_LEASE} or more"),
        )
    })
}

/// The longest progress message.
pub const MAX_PROGRESS_MESSAGE_CHARS: usize = 1024;

/// What a running job has done so far, for users (`GET /v1/jobs/{job_id}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobProgress {
    /// 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// What the agent is doing, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl JobProgress {
    pub fn violations(&self, pointer: &str) -> Vec<Violation> {
        let mut v = Violations::default();
        if self.percent.is_some_and(|p| p > 100) {
            v.push(
                format!("{pointer}/percent"),
                "progress_invalid",
                "percent is 0 to 100",
            );
        }
        if self
            .message
            .as_ref()
            .is_some_and(|m| m.chars().count() > MAX_PROGRESS_MESSAGE_CHARS)
        {
            v.push(
                format!("{pointer}/message"),
                "field_too_large",
                format!("a progress message has at most {MAX_PROGRESS_MESSAGE_CHARS} characters"),
            );
        }
        v.into_vec()
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
        /// The tail-log backup the job took of the database it overwrote, when its
        /// payload asked for one: a log backup of the protected item like any other.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tail_log_backup: Option<Box<RecoveryPointReport>>,
    },
}

/// The messages of the agent protocol (`/v1/agent/...`).
pub mod protocol {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Serialize};
    use utoipa::ToSchema;
    use uuid::Uuid;

    use super::{JobItem, JobProgress, JobResult, VmFacts};
    use crate::jobs::{JobKind, JobStatus};

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
        pub progress: Option<JobProgress>,
    }

    /// The VM is alive; optionally new facts, and the leases of the jobs it is running
    /// (one request extends them all).
    #[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct AgentHeartbeat {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub facts: Option<VmFacts>,
        /// At most 100 leases.
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
        /// The job's [`JobPayload`](crate::jobs::JobPayload), tagged with its kind. A value
        /// here rather than the type: a job queued by an older server is forwarded as
        /// stored (with its kind), and agents read it tolerantly.
        #[schema(value_type = crate::jobs::JobPayload)]
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
        /// What the job has done so far, for users (`GET /v1/jobs/{job_id}`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub progress: Option<JobProgress>,
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
        /// What the job did; at most 1 MiB of JSON, and it must fit the job (its points, its
        /// databases, its window, its restore target).
        pub result: JobResult,
        /// Non-fatal problems; the job ends `completed_with_warnings`. At most 100, of at
        /// most 1,024 characters each.
        #[serde(default)]
        pub warnings: Vec<String>,
    }

    /// Version 2 of the claim (`POST /v2/agent/claim`): the agent reports the jobs that
    /// finished since its last claim in the claim itself, so that a busy agent makes one
    /// request per cycle instead of one per job. The reports are recorded before jobs are
    /// claimed, each on its own: one that is refused does not stop the others.
    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct ClaimV2Request {
        /// 0 to 50 (default 1). 0 only reports: nothing is claimed and nothing waited for.
        #[serde(default = "one")]
        pub max_jobs: u32,
        /// Long-poll: wait up to this many seconds (0 to 60) for a job. The reports are
        /// recorded before the wait.
        #[serde(default)]
        pub wait_seconds: u32,
        /// Jobs done, as `POST /v1/agent/jobs/{job_id}/complete` would report them.
        #[serde(default)]
        pub completions: Vec<JobCompletion>,
        /// Attempts failed, as `POST /v1/agent/jobs/{job_id}/fail` would report them.
        #[serde(default)]
        pub failures: Vec<JobFailure>,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct JobCompletion {
        pub job_id: Uuid,
        pub lease: i64,
        pub result: JobResult,
        #[serde(default)]
        pub warnings: Vec<String>,
    }

    impl JobCompletion {
        pub fn into_parts(self) -> (Uuid, CompleteJob) {
            (
                self.job_id,
                CompleteJob {
                    lease: self.lease,
                    result: self.result,
                    warnings: self.warnings,
                },
            )
        }
    }

    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct JobFailure {
        pub job_id: Uuid,
        pub lease: i64,
        pub code: String,
        pub message: String,
        pub retryable: bool,
    }

    impl JobFailure {
        pub fn into_parts(self) -> (Uuid, FailJob) {
            (
                self.job_id,
                FailJob {
                    lease: self.lease,
                    code: self.code,
                    message: self.message,
                    retryable: self.retryable,
                },
            )
        }
    }

    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    pub struct ClaimV2Response {
        pub jobs: Vec<ClaimedJob>,
        /// One per reported completion, in the order sent.
        pub completions: Vec<ReportOutcome>,
        /// One per reported failure, in the order sent.
        pub failures: Vec<ReportOutcome>,
    }

    /// What became of one reported job: its new status, or why the report was refused
    /// (what the version 1 call would have answered, as a problem).
    #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
    pub struct ReportOutcome {
        pub job_id: Uuid,
        /// The job's status after the report; absent when it was refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub status: Option<JobStatus>,
        /// When a failed attempt will be retried.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub retry_at: Option<DateTime<Utc>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub refused: Option<ReportRefusal>,
    }

    /// A refused report: the HTTP status and problem code the version 1 call would have
    /// answered (`lease_lost` 409, `job_not_found` 404, `validation_failed` 422, ...).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
    pub struct ReportRefusal {
        pub status: u16,
        pub code: String,
        pub detail: String,
        /// Every violated rule, for `validation_failed`. (Agents act on `code` alone, so
        /// they do not read these back.)
        #[serde(default, skip_serializing_if = "Vec::is_empty", skip_deserializing)]
        pub errors: Vec<crate::Violation>,
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
        }
    }

    #[test]
    fn enum_names_are_their_wire_names() {
        for t in RecoveryPointType::ALL {
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
            assert_eq!(RecoveryPointType::parse(t.as_str()), Some(t));
        }
        for m in RecoveryModel::ALL {
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
            assert_eq!(RecoveryModel::parse(m.as_str()), Some(m));
        }
    }

    #[test]
    fn second_version_facts_are_checked_against_each_other() {
        let mut p = point();
        p.checkpoint_lsn = Some("41000000030000001".into());
        p.differential_base_lsn = p.checkpoint_lsn.clone();
        p.is_copy_only = Some(false);
        p.recovery_model = Some(RecoveryModel::Simple);
        assert_eq!(codes(&p), [], "a full in simple recovery");
        p.checkpoint_lsn = Some("41000000050000001".into());
        p.is_copy_only = Some(true);
        p.has_bulk_logged_data = Some(true);
        assert_eq!(
            codes(&p),
            [
                (
                    "/result/recovery_points/0/checkpoint_lsn".to_owned(),
                    "lsn_order"
                ),
                (
                    "/result/recovery_points/0/is_copy_only".to_owned(),
                    "copy_only_mismatch"
                ),
                (
                    "/result/recovery_points/0/has_bulk_logged_data".to_owned(),
                    "log_fact_on_data_backup"
                ),
            ]
        );
        let mut log = point();
        log.backup_type = RecoveryPointType::Log;
        log.checkpoint_lsn = Some("41000000030000001".into());
        log.recovery_model = Some(RecoveryModel::Simple);
        log.fork_point_lsn = Some("x".into());
        assert_eq!(
            codes(&log),
            [
                (
                    "/result/recovery_points/0/fork_point_lsn".to_owned(),
                    "lsn_invalid"
                ),
                (
                    "/result/recovery_points/0/checkpoint_lsn".to_owned(),
                    "lsn_not_applicable"
                ),
                (
                    "/result/recovery_points/0/recovery_model".to_owned(),
                    "log_backup_in_simple_recovery"
                ),
            ]
        );
        let mut diff = point();
        diff.backup_type = RecoveryPointType::Differential;
        diff.differential_base_lsn = Some("41000000012300002".into());
        assert_eq!(
            codes(&diff),
            [(
                "/result/recovery_points/0/differential_base_lsn".to_owned(),
                "lsn_order"
            )]
        );
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
        let mut p = point();
        p.first_lsn = "00000029:0000007b:0001".into();
        assert_eq!(codes(&p), [], "the textual form names 41000000012300001");
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

    fn item(database: &str) -> JobItem {
        JobItem {
            instance: "MSSQLSERVER".into(),
            database: database.into(),
            protected_item_id: None,
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn job<'a>(
        kind: JobKind,
        items: &'a [JobItem],
        payload: &'a serde_json::Value,
    ) -> ReportedJob<'a> {
        ReportedJob {
            kind,
            items,
            payload,
            claimed_at: Some(at("2026-11-30T10:00:00Z")),
            completed_at: at("2026-11-30T10:10:00Z"),
            rehearsal: false,
        }
    }

    fn backup(points: Vec<RecoveryPointReport>) -> JobResult {
        JobResult::Backup {
            recovery_points: points,
        }
    }

    fn job_codes(result: &JobResult, job: &ReportedJob<'_>) -> Vec<(String, &'static str)> {
        result
            .job_violations(job, "/result")
            .into_iter()
            .map(|v| (v.pointer, v.code))
            .collect()
    }

    #[test]
    fn a_backup_report_has_the_jobs_type_and_names_only_its_items_once() {
        let items = [item("sales"), item("hr")];
        let plain = serde_json::json!({});
        let copy_only = serde_json::json!({"copy_only": true});
        let mut hr = point();
        hr.database = "hr".into();
        hr.instance = "mssqlserver".into();
        let both = backup(vec![point(), hr.clone()]);
        assert_eq!(
            job_codes(&both, &job(JobKind::BackupFull, &items, &plain)),
            []
        );
        assert_eq!(
            job_codes(&both, &job(JobKind::BackupFull, &items, &copy_only)),
            [
                (
                    "/result/recovery_points/0/backup_type".to_owned(),
                    "point_type_mismatch"
                ),
                (
                    "/result/recovery_points/1/backup_type".to_owned(),
                    "point_type_mismatch"
                ),
            ],
            "a copy-only job reports copy-only fulls"
        );
        let mut copy = point();
        copy.backup_type = RecoveryPointType::CopyOnlyFull;
        assert_eq!(
            job_codes(
                &backup(vec![copy]),
                &job(JobKind::BackupFull, &items, &copy_only)
            ),
            []
        );
        for kind in [JobKind::BackupDifferential, JobKind::BackupLog] {
            assert_eq!(
                job_codes(&backup(vec![point()]), &job(kind, &items, &plain)),
                [(
                    "/result/recovery_points/0/backup_type".to_owned(),
                    "point_type_mismatch"
                )]
            );
        }
        let mut log = point();
        log.backup_type = RecoveryPointType::Log;
        assert_eq!(
            job_codes(&backup(vec![log]), &job(JobKind::BackupLog, &items, &plain)),
            []
        );

        let mut stranger = point();
        stranger.database = "payroll".into();
        let mut other_instance = point();
        other_instance.instance = "SQL2".into();
        let mut recased = point();
        recased.database = "SALES".into();
        assert_eq!(
            job_codes(
                &backup(vec![point(), stranger, other_instance, recased, point()]),
                &job(JobKind::BackupFull, &items, &plain)
            ),
            [
                (
                    "/result/recovery_points/1/database".to_owned(),
                    "point_not_in_job"
                ),
                (
                    "/result/recovery_points/2/database".to_owned(),
                    "point_not_in_job"
                ),
                (
                    "/result/recovery_points/3/database".to_owned(),
                    "point_not_in_job"
                ),
                ("/result/recovery_points/4".to_owned(), "point_duplicate"),
            ]
        );
        // No point at all is not a lie (a job may report fewer points than items).
        assert_eq!(
            job_codes(&backup(vec![]), &job(JobKind::BackupLog, &items, &plain)),
            []
        );
    }

    #[test]
    fn a_backup_is_stamped_between_its_claim_and_its_completion() {
        let items = [item("sales")];
        let plain = serde_json::json!({});
        let stamped = |s: &str| {
            let mut p = point();
            p.started_at = at(s);
            p.backup_time = at(s);
            backup(vec![p])
        };
        let full = job(JobKind::BackupFull, &items, &plain);
        for ok in [
            "2026-11-30T09:55:00Z",
            "2026-11-30T10:05:00Z",
            "2026-11-30T10:15:00Z",
        ] {
            assert_eq!(job_codes(&stamped(ok), &full), [], "{ok}");
        }
        for late_or_early in [
            "2026-11-30T09:54:59Z",
            "2026-11-30T10:15:01Z",
            "2031-11-16T00:30:00Z",
        ] {
            assert_eq!(
                job_codes(&stamped(late_or_early), &full),
                [(
                    "/result/recovery_points/0/backup_time".to_owned(),
                    "backup_time_out_of_window"
                )],
                "{late_or_early}"
            );
        }
        // A rehearsal: the job's scheduled instant counts, in the future or the past, and
        // only on a server that rehearses.
        for scheduled in ["2031-11-16T00:30:00Z", "2025-11-16T00:30:00Z"] {
            let payload = serde_json::json!({"slot_at": scheduled, "scheduled_at": scheduled});
            let rehearsed = ReportedJob {
                rehearsal: true,
                ..job(JobKind::BackupFull, &items, &payload)
            };
            assert_eq!(
                job_codes(&stamped(scheduled), &rehearsed),
                [],
                "{scheduled}"
            );
            assert_eq!(job_codes(&stamped("2026-11-30T10:05:00Z"), &rehearsed), []);
            assert_eq!(
                job_codes(
                    &stamped(scheduled),
                    &job(JobKind::BackupFull, &items, &payload)
                )
                .len(),
                1,
                "not without --dev"
            );
        }
        let unscheduled = ReportedJob {
            rehearsal: true,
            ..full
        };
        assert_eq!(
            job_codes(&stamped("2031-11-16T00:30:00Z"), &unscheduled).len(),
            1
        );
    }

    #[test]
    fn a_restore_reports_the_database_its_job_restores() {
        let items = [item("sales")];
        let payload = serde_json::json!({"target_database": "sales_copy"});
        let restore = job(JobKind::Restore, &items, &payload);
        let restored = |name: &str| JobResult::Restore {
            tail_log_backup: None,
            restored_database: name.into(),
        };
        assert_eq!(job_codes(&restored("sales_copy"), &restore), []);
        for wrong in ["sales", "SALES_COPY", "master"] {
            assert_eq!(
                job_codes(&restored(wrong), &restore),
                [(
                    "/result/restored_database".to_owned(),
                    "restored_database_mismatch"
                )]
            );
        }
        let old = serde_json::json!({});
        assert_eq!(
            job_codes(&restored("sales"), &job(JobKind::Restore, &items, &old)),
            []
        );
        // Another kind's result is the kind check's business.
        assert_eq!(
            job_codes(&restored("x"), &job(JobKind::BackupLog, &items, &old)),
            []
        );
        assert_eq!(job_codes(&backup(vec![point()]), &restore), []);
    }

    #[test]
    fn free_form_fields_are_bounded() {
        let codes = |p: &JobProgress| {
            check_progress(Some(p), "/jobs/0/progress")
                .into_iter()
                .map(|v| (v.pointer, v.code))
                .collect::<Vec<_>>()
        };
        let message = |m: String| JobProgress {
            percent: Some(50),
            message: Some(m),
        };
        assert_eq!(codes(&message("copying".into())), []);
        assert!(check_progress(None, "/progress").is_empty());
        assert_eq!(
            codes(&JobProgress {
                percent: Some(101),
                message: None
            }),
            [("/jobs/0/progress/percent".to_owned(), "progress_invalid")]
        );
        assert_eq!(
            codes(&message("x".repeat(MAX_PROGRESS_MESSAGE_CHARS + 1))),
            [("/jobs/0/progress/message".to_owned(), "field_too_large")]
        );
        // Within the characters allowed, but four bytes each: over the byte cap.
        assert_eq!(
            codes(&message("🦀".repeat(MAX_PROGRESS_MESSAGE_CHARS))),
            [("/jobs/0/progress".to_owned(), "field_too_large")]
        );
        let exact = serde_json::Value::String("x".repeat(MAX_PROGRESS_BYTES - 2));
        assert_eq!(json_bytes(&exact), MAX_PROGRESS_BYTES);

        let warnings = vec![
            "w".repeat(MAX_WARNING_CHARS),
            "é".repeat(MAX_WARNING_CHARS + 1),
        ];
        assert_eq!(
            check_warnings(&warnings, "/warnings")
                .into_iter()
                .map(|v| (v.pointer, v.code))
                .collect::<Vec<_>>(),
            [("/warnings/1".to_owned(), "field_too_large")]
        );
        assert_eq!(
            check_warnings(&vec![String::new(); MAX_WARNINGS + 1], "/warnings")[0].code,
            "too_many_warnings"
        );

        let db = |i: usize| SqlDatabase {
            instance: "MSSQLSERVER".into(),
            availability_group: None,
            name: format!("{i:0>120}"),
            recovery_model: RecoveryModel::Full,
            system: false,
            read_only: false,
            size_bytes: 1,
        };
        let huge = JobResult::Discovery {
            inventory: SqlInventory {
                instances: vec![SqlInstance {
                    name: "MSSQLSERVER".into(),
                    version: "2019".into(),
                }],
                availability_groups: Vec::new(),
                databases: (0..8_000).map(db).collect(),
            },
        };
        assert_eq!(
            huge.violations("/result")
                .into_iter()
                .map(|v| (v.pointer, v.code))
                .collect::<Vec<_>>(),
            [("/result".to_owned(), "field_too_large")]
        );

        let mut facts = VmFacts {
            name: "vm".into(),
            resource_group: "rg".into(),
            subscription_id: "sub".into(),
            region: "westeurope".into(),
            deployment_model: DeploymentModel::ResourceManager,
            agent_version: "1.0.0".into(),
            dotnet_version: "4.8".into(),
            sql_iaas_extension: true,
            other_backup_product: false,
        };
        assert!(facts.size_violations("/facts").is_empty());
        facts.dotnet_version = "4".repeat(MAX_VERSION_FACT_CHARS + 1);
        assert_eq!(
            facts
                .size_violations("/facts")
                .into_iter()
                .map(|v| (v.pointer, v.code))
                .collect::<Vec<_>>(),
            [("/facts/dotnet_version".to_owned(), "field_too_large")]
        );
    }
}
