//! What agents and backvault tell each other: a VM's facts, its SQL inventory, the results
//! of jobs. Shared by the server and the reference agent so the two cannot disagree.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

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
