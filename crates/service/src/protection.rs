//! Configure protection and the life of a protected item: list, read, change policy,
//! stop (deleting or retaining data) and resume; and what finished configure-protection
//! jobs do to their items.

use std::collections::{BTreeMap, HashMap};

use backvault_domain::agent::{JobItem, RecoveryModel, RecoveryPointType};
use backvault_domain::configure::{
    ConfigureFacts, ConfigureRequest, DatabaseFacts, check_configure,
};
use backvault_domain::jobs::{JobKind, Priority, batch};
use backvault_domain::protection::ProtectionState;
use backvault_domain::safety::{GuardedOperation, UserDeletion, user_deletion};
use backvault_domain::violation::Violations;
use backvault_store::inventory::{self, DatabaseRow};
use backvault_store::jobs as queue;
use backvault_store::protection::{self as store, ItemFilter, NewItem, ProtectedItemRow};
use backvault_store::schedule;
use backvault_store::{policies, vms};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::jobs::new_job;
use crate::pagination::{Page, page, page_request};
use crate::protectable_items::vm_name_issues;
use crate::vms::vm_not_found;
use crate::{ExpectedVersion, Principal, Service};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "policy": "HourlyLogBackup",
    "databases": ["0192f3a0-7b1c-7d2e-9f00-1a2b3c4d5e6f", "0192f3a0-7b1c-7d2e-9f00-1a2b3c4d5e70"]
}))]
pub struct ConfigureProtection {
    /// A policy of this vault, by name.
    pub policy: String,
    /// Databases (ids from protectable items).
    pub databases: Vec<Uuid>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConfigureProtectionResult {
    pub items: Vec<ProtectedItem>,
    /// One configure-protection job per VM and 50 databases.
    pub jobs: Vec<Uuid>,
}

/// A database protected in a vault, with its full identity.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProtectedItem {
    pub id: Uuid,
    pub vault_id: Uuid,
    pub database_id: Uuid,
    pub state: ProtectionState,
    pub policy: Option<String>,
    pub auto_protected: bool,
    pub subscription_id: String,
    pub resource_group: String,
    pub vm_id: Uuid,
    pub vm_name: String,
    pub instance: String,
    /// The availability group's name, for a database of one.
    pub availability_group: Option<String>,
    /// The availability group, for a database of one: the item is the group database,
    /// backed up on whichever replica its group's routes name.
    pub availability_group_id: Option<Uuid>,
    /// For a database of an availability group: its replicas and where backups go now.
    pub availability_group_detail: Option<crate::availability::AvailabilityGroupView>,
    /// The VM each backup type last ran on (for a group database: which replica).
    pub last_backup_vm_ids: BTreeMap<RecoveryPointType, Uuid>,
    pub database: String,
    /// The name when protection began; differs in case when `casing_changed`.
    pub protected_name: String,
    /// The database reappeared with another casing (unsupported; history is kept).
    pub casing_changed: bool,
    /// The database is no longer reported by discovery.
    pub database_gone: bool,
    pub recovery_model: RecoveryModel,
    pub last_full_at: Option<DateTime<Utc>>,
    pub last_differential_at: Option<DateTime<Utc>>,
    pub last_log_at: Option<DateTime<Utc>>,
    /// For a soft-deleted item: when it will be purged; undelete it before then.
    pub purge_after: Option<DateTime<Utc>>,
    pub health: ItemHealth,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What needs attention on a protected item, the most pressing first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ItemHealth {
    /// Discovery no longer finds the database.
    DatabaseGone,
    /// The log chain broke; the next backup runs as a full.
    ChainBroken,
    /// The database came back with another casing (unsupported by Azure Backup too).
    CasingChanged,
    /// Protected, no full backup yet.
    AwaitingFirstBackup,
    Healthy,
}

impl From<ProtectedItemRow> for ProtectedItem {
    fn from(r: ProtectedItemRow) -> Self {
        Self {
            id: r.id,
            vault_id: r.vault_id,
            database_id: r.database_id,
            state: r.state,
            policy: r.policy_name,
            auto_protected: r.auto_protected,
            subscription_id: r.subscription_id,
            resource_group: r.resource_group,
            vm_id: r.vm_id,
            vm_name: r.vm_name,
            instance: r.instance_name,
            availability_group: r.availability_group,
            availability_group_id: r.availability_group_id,
            availability_group_detail: None,
            last_backup_vm_ids: r.last_backup_vms.0,
            database: r.database_name,
            protected_name: r.protected_name,
            casing_changed: r.casing_changed,
            database_gone: r.database_gone,
            recovery_model: r.recovery_model,
            health: if r.database_gone {
                ItemHealth::DatabaseGone
            } else if (r.needs_full || r.needs_differential) && r.last_full_at.is_some() {
                ItemHealth::ChainBroken
            } else if r.casing_changed {
                ItemHealth::CasingChanged
            } else if r.last_full_at.is_none() {
                ItemHealth::AwaitingFirstBackup
            } else {
                ItemHealth::Healthy
            },
            last_full_at: r.last_full_at,
            last_differential_at: r.last_differential_at,
            last_log_at: r.last_log_at,
            purge_after: r.purge_after,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ItemQuery {
    pub state: Option<ProtectionState>,
    pub policy: Option<String>,
    pub vm_id: Option<Uuid>,
    pub auto_protected: Option<bool>,
    pub availability_group_id: Option<Uuid>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePolicy {
    pub policy: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopMode {
    /// Stop and delete the recovery points.
    DeleteData,
    /// Stop; keep the recovery points until deleted explicitly.
    RetainData,
    /// Stop; the recovery points expire as the last policy says.
    RetainPerPolicy,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopProtection {
    pub mode: StopMode,
}

/// A soft-deleted item takes no action but undelete (and reads).
pub(crate) fn item_soft_deleted() -> Error {
    Error::new(
        ErrorKind::Conflict,
        "item_soft_deleted",
        "the item is soft-deleted: undelete it first (POST .../undelete)",
    )
}

pub(crate) fn item_not_found(id: Uuid) -> Error {
    Error::not_found(
        "protected_item_not_found",
        format_args!("protected item {id}"),
    )
}

pub(crate) fn database_item(d: &DatabaseRow, instance: &str, item_id: Uuid) -> JobItem {
    JobItem {
        instance: instance.to_owned(),
        database: d.name.clone(),
        protected_item_id: Some(item_id),
    }
}

impl Service {
    pub(crate) async fn policy_id(
        &self,
        conn: &mut PgConnection,
        vault_id: Uuid,
        name: &str,
        pointer: &str,
    ) -> Result<Uuid> {
        match policies::policy_get(&mut *conn, vault_id, name).await? {
            Some(p) => Ok(p.id),
            None => {
                let mut v = Violations::default();
                v.push(
                    pointer,
                    "policy_not_found",
                    format!("the vault has no policy '{name}'"),
                );
                Err(Error::validation(v.into_vec()))
            }
        }
    }

    /// Inserts protected items and enqueues their configure-protection jobs.
    pub(crate) async fn protect(
        &self,
        tx: &mut PgConnection,
        vault_id: Uuid,
        policy_id: Uuid,
        intent: Option<Uuid>,
        databases: Vec<DatabaseRow>,
        max_attempts: i32,
    ) -> Result<Vec<Uuid>> {
        if databases.is_empty() {
            return Ok(Vec::new());
        }
        let items: Vec<NewItem> = databases
            .iter()
            .map(|d| NewItem {
                id: Uuid::now_v7(),
                database_id: d.id,
                protected_name: d.name.clone(),
            })
            .collect();
        store::items_insert(tx, vault_id, policy_id, intent, &items)
            .await
            .on_constraint(store::ONE_ITEM_PER_DATABASE, || {
                Error::new(
                    ErrorKind::Conflict,
                    "database_already_protected",
                    "a database was protected meanwhile; retry",
                )
            })?;
        let item_of: HashMap<Uuid, Uuid> = items.iter().map(|i| (i.database_id, i.id)).collect();
        let mut jobs = Vec::new();
        for ((vm_id, group), dbs) in group_by_vm_and_group(databases) {
            let vm = vms::vm_get(&mut *tx, vm_id)
                .await?
                .ok_or_else(|| vm_not_found(vm_id))?;
            let instances = inventory::instance_names(&mut *tx, vm_id).await?;
            let job_items: Vec<JobItem> = dbs
                .iter()
                .map(|d| {
                    database_item(
                        d,
                        instances.get(&d.instance_id).map_or("", String::as_str),
                        item_of[&d.id],
                    )
                })
                .collect();
            for chunk in batch(job_items) {
                let mut job = new_job(
                    vm_id,
                    &vm.subscription_id,
                    Some(vault_id),
                    JobKind::ConfigureProtection,
                    Priority::OnDemand,
                    &chunk,
                    serde_json::json!({}),
                )?;
                job.max_attempts = max_attempts;
                job.availability_group_id = group;
                jobs.push(job);
            }
        }
        let ids = jobs.iter().map(|j| j.id).collect();
        queue::jobs_enqueue(tx, &jobs).await?;
        Ok(ids)
    }

    pub(crate) async fn after_jobs_finished(
        &self,
        tx: &mut PgConnection,
        job_ids: &[Uuid],
        succeeded: bool,
    ) -> Result<()> {
        jobs_finished(tx, job_ids, succeeded).await
    }

    /// Configure Protection: every database is checked and all violations come back
    /// together; accepted databases become protected items with jobs of ≤ 50 per VM.
    pub async fn protection_configure(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        req: ConfigureProtection,
    ) -> Result<ConfigureProtectionResult> {
        principal.require(Operation::ConfigureProtection)?;
        let mut tx = self.pool.begin().await?;
        self.visible_vault(&mut *tx, principal, vault_id).await?;
        let (facts, found) = configure_facts(&mut tx, vault_id, &req).await?;
        let plan = check_configure(
            ConfigureRequest {
                vault_id,
                policy: &req.policy,
                databases: &req.databases,
            },
            &facts,
        )
        .map_err(Error::validation)?;
        let policy_id = plan.policy_id;
        let accepted: Vec<DatabaseRow> = plan
            .databases
            .iter()
            .filter_map(|id| found.get(id).cloned())
            .collect();
        let ids: Vec<Uuid> = accepted.iter().map(|d| d.id).collect();
        let jobs = self
            .protect(
                &mut tx,
                vault_id,
                policy_id,
                None,
                accepted,
                backvault_domain::jobs::DEFAULT_MAX_ATTEMPTS,
            )
            .await?;
        tx.commit().await?;
        let mut items = Vec::new();
        for protection in store::items_for_databases(&self.pool, &ids).await? {
            if let Some(row) = store::item_get(&self.pool, protection.item_id).await? {
                items.push(row.into());
            }
        }
        Ok(ConfigureProtectionResult { items, jobs })
    }

    pub(crate) async fn visible_item(
        &self,
        conn: &mut PgConnection,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
    ) -> Result<ProtectedItemRow> {
        self.visible_vault(&mut *conn, principal, vault_id).await?;
        store::item_get(&mut *conn, id)
            .await?
            .filter(|i| i.vault_id == vault_id)
            .ok_or_else(|| item_not_found(id))
    }

    pub(crate) async fn protected_item_row(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
    ) -> Result<ProtectedItemRow> {
        let mut conn = self.pool.acquire().await?;
        self.visible_item(&mut conn, principal, vault_id, id).await
    }

    pub async fn protected_item_list(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        query: &ItemQuery,
        cursor: Option<&str>,
        limit: Option<i64>,
    ) -> Result<Page<ProtectedItem>> {
        principal.require(Operation::Read)?;
        let (request, limit) = page_request(cursor, limit)?;
        let mut conn = self.pool.acquire().await?;
        self.visible_vault(&mut *conn, principal, vault_id).await?;
        let policy_id = match &query.policy {
            Some(name) => Some(self.policy_id(&mut conn, vault_id, name, "/policy").await?),
            None => None,
        };
        let filter = ItemFilter {
            state: query.state,
            policy_id,
            vm_id: query.vm_id,
            auto_protected: query.auto_protected,
            availability_group_id: query.availability_group_id,
        };
        let rows = store::items_list(&mut *conn, vault_id, &filter, request).await?;
        let mut listed = page(rows, limit, |r| r.id, ProtectedItem::from);
        listed.items = self.with_group_details(&mut conn, listed.items).await?;
        Ok(listed)
    }

    /// Items of group databases get their group's replicas and routes, loaded once per page.
    pub(crate) async fn with_group_details(
        &self,
        conn: &mut PgConnection,
        mut items: Vec<ProtectedItem>,
    ) -> Result<Vec<ProtectedItem>> {
        let mut groups: Vec<Uuid> = items
            .iter()
            .filter_map(|i| i.availability_group_id)
            .collect();
        groups.sort_unstable();
        groups.dedup();
        let views = self.group_views(conn, &groups).await?;
        for item in &mut items {
            item.availability_group_detail = item
                .availability_group_id
                .and_then(|g| views.get(&g).cloned());
        }
        Ok(items)
    }

    pub async fn protected_item_get(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
    ) -> Result<ProtectedItem> {
        principal.require(Operation::Read)?;
        let mut conn = self.pool.acquire().await?;
        let item = self
            .visible_item(&mut conn, principal, vault_id, id)
            .await?;
        let mut items = self
            .with_group_details(&mut conn, vec![item.into()])
            .await?;
        items.pop().ok_or_else(|| item_not_found(id))
    }

    pub async fn protected_item_change_policy(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
        expected: ExpectedVersion,
        req: ChangePolicy,
    ) -> Result<ProtectedItem> {
        principal.require(Operation::ConfigureProtection)?;
        let mut tx = self.pool.begin().await?;
        let item = self.visible_item(&mut tx, principal, vault_id, id).await?;
        let policy_id = self
            .policy_id(&mut tx, vault_id, &req.policy, "/policy")
            .await?;
        if item.state == ProtectionState::SoftDeleted {
            return Err(item_soft_deleted());
        }
        if item.state.is_stopped() {
            return Err(Error::new(
                ErrorKind::Conflict,
                "protection_stopped",
                "protection is stopped; resume it with a policy",
            ));
        }
        joining_policy(&mut tx, item.policy_id, policy_id).await?;
        store::item_update(&mut tx, id, expected, Some(policy_id), item.state)
            .await?
            .ok_or_else(Error::precondition_failed)?;
        // The next tick schedules the item from its new policy's slots.
        tx.commit().await?;
        self.protected_item_get(principal, vault_id, id).await
    }

    /// Stops protection. Deleting the data removes the item; retaining keeps it stopped.
    pub async fn protected_item_stop(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
        req: StopProtection,
    ) -> Result<Option<ProtectedItem>> {
        principal.require(match req.mode {
            StopMode::DeleteData => Operation::StopProtectionDeleteData,
            StopMode::RetainData | StopMode::RetainPerPolicy => Operation::StopProtectionRetainData,
        })?;
        let mut tx = self.pool.begin().await?;
        let item = self.visible_item(&mut tx, principal, vault_id, id).await?;
        if item.state == ProtectionState::SoftDeleted {
            return Err(item_soft_deleted());
        }
        let mut mode = req.mode;
        if matches!(mode, StopMode::DeleteData) {
            let safety = self.vault_safety_locked(&mut tx, vault_id).await?;
            self.require_approval(
                &mut tx,
                principal,
                vault_id,
                &safety,
                GuardedOperation::StopProtectionDeleteData,
                id,
            )
            .await?;
            let now = backvault_store::safety::db_now(&mut *tx).await?;
            match user_deletion(&crate::data_safety::safety_of(&safety), now) {
                UserDeletion::Delete => {}
                UserDeletion::SoftDelete { purge_at } => {
                    backvault_store::safety::item_soft_delete(&mut tx, id, purge_at).await?;
                    tx.commit().await?;
                    return self
                        .protected_item_get(principal, vault_id, id)
                        .await
                        .map(Some);
                }
                // Immutable: nothing goes before its time; protection stops and each
                // point expires as the last policy says.
                UserDeletion::RetainUntilExpiry => mode = StopMode::RetainPerPolicy,
            }
        }
        match mode {
            StopMode::DeleteData => store::item_delete(&mut tx, id).await?,
            StopMode::RetainData | StopMode::RetainPerPolicy => {
                if matches!(mode, StopMode::RetainData) {
                    backvault_store::recovery::points_retain_forever(&mut *tx, id).await?;
                }
                let state = if matches!(mode, StopMode::RetainData) {
                    ProtectionState::StoppedRetain
                } else {
                    ProtectionState::StoppedRetainPerPolicy
                };
                let policy = if matches!(mode, StopMode::RetainPerPolicy) {
                    item.policy_id
                } else {
                    None
                };
                store::item_update(&mut tx, id, None, policy, state).await?;
            }
        }
        tx.commit().await?;
        match mode {
            StopMode::DeleteData => Ok(None),
            _ => self
                .protected_item_get(principal, vault_id, id)
                .await
                .map(Some),
        }
    }

    pub async fn protected_item_resume(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
        req: ChangePolicy,
    ) -> Result<ProtectedItem> {
        principal.require(Operation::ConfigureProtection)?;
        let mut tx = self.pool.begin().await?;
        let item = self.visible_item(&mut tx, principal, vault_id, id).await?;
        if item.state == ProtectionState::SoftDeleted {
            return Err(item_soft_deleted());
        }
        if !item.state.is_stopped() {
            return Err(Error::new(
                ErrorKind::Conflict,
                "protection_not_stopped",
                "protection is not stopped",
            ));
        }
        let policy_id = self
            .policy_id(&mut tx, vault_id, &req.policy, "/policy")
            .await?;
        joining_policy(&mut tx, item.policy_id, policy_id).await?;
        store::item_update(
            &mut tx,
            id,
            None,
            Some(policy_id),
            ProtectionState::Protected,
        )
        .await?;
        tx.commit().await?;
        self.protected_item_get(principal, vault_id, id).await
    }
}

/// What Configure Protection decides on, in four queries whatever the request's size:
/// the policy, the requested databases, their protection, and their VMs' vaults and
/// databases (for the sibling-name rule).
async fn configure_facts(
    tx: &mut PgConnection,
    vault_id: Uuid,
    req: &ConfigureProtection,
) -> Result<(ConfigureFacts, HashMap<Uuid, DatabaseRow>)> {
    let policy_id = policies::policy_get(&mut *tx, vault_id, &req.policy)
        .await?
        .map(|p| p.id);
    let found: HashMap<Uuid, DatabaseRow> =
        backvault_store::availability::databases_resolve(&mut *tx, &req.databases)
            .await?
            .into_iter()
            .map(|r| (r.requested, r.database))
            .collect();
    let keys: Vec<Uuid> = found.values().map(|d| d.item_key).collect();
    let protected_in: HashMap<Uuid, Uuid> = store::items_for_keys(&mut *tx, &keys)
        .await?
        .into_iter()
        .map(|p| (p.item_key, p.vault_id))
        .collect();
    let mut vm_ids: Vec<Uuid> = found.values().map(|d| d.vm_id).collect();
    vm_ids.sort_unstable();
    vm_ids.dedup();
    let vm_vaults: HashMap<Uuid, Option<Uuid>> = inventory::vm_vaults(&mut *tx, &vm_ids)
        .await?
        .into_iter()
        .map(|v| (v.vm_id, v.vault_id))
        .collect();
    let mut groups: Vec<Uuid> = found
        .values()
        .filter(|d| d.ag_database_id.is_some())
        .filter_map(|d| d.availability_group_id)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    let group_issues = crate::availability::group_issues(&mut *tx, vault_id, &groups).await?;
    let siblings = inventory::databases_of_vms(&mut *tx, &vm_ids).await?;
    let issues = vm_name_issues(&siblings);
    let databases = found
        .iter()
        .map(|(requested, d)| {
            let facts = DatabaseFacts {
                vm_vault: vm_vaults.get(&d.vm_id).copied().flatten(),
                gone: d.gone_at.is_some(),
                protected_in: protected_in.get(&d.item_key).copied(),
                name_issue: issues.get(&d.id).copied().flatten(),
                group_database: d.ag_database_id,
                group_issue: d
                    .ag_database_id
                    .and(d.availability_group_id)
                    .and_then(|g| group_issues.get(&g).copied().flatten()),
            };
            (*requested, facts)
        })
        .collect();
    Ok((
        ConfigureFacts {
            policy_id,
            databases,
        },
        found,
    ))
}

/// Before a protected item moves from policy `from` to `to`: no tick makes jobs from
/// either meanwhile, and `to`'s schedule starts afresh if it protects nothing yet.
async fn joining_policy(tx: &mut PgConnection, from: Option<Uuid>, to: Uuid) -> Result<()> {
    let policies: Vec<Uuid> = std::iter::once(to).chain(from).collect();
    schedule::policies_lock_members(&mut *tx, &policies).await?;
    schedule::schedule_restart_idle(&mut *tx, &[to]).await?;
    Ok(())
}

/// Effects of finished jobs, in the transaction that finishes them: configure protection
/// done → protected, failed for good → the database stays unprotected. (A finished backup
/// job leaves the queue in the same transaction, which is what lets its databases' next
/// slot of that type run.)
pub(crate) async fn jobs_finished(
    tx: &mut PgConnection,
    job_ids: &[Uuid],
    succeeded: bool,
) -> Result<()> {
    for job in queue::jobs_content(&mut *tx, job_ids).await? {
        let items = crate::jobs::protected_items_of(&job.items.0)?;
        if job.kind != JobKind::ConfigureProtection || items.is_empty() {
            continue;
        }
        if succeeded {
            let policies = store::items_policies(&mut *tx, &items).await?;
            schedule::schedule_restart_idle(&mut *tx, &policies).await?;
            store::items_set_state(
                &mut *tx,
                &items,
                ProtectionState::Protecting,
                ProtectionState::Protected,
            )
            .await?;
        } else {
            store::items_delete_protecting(&mut *tx, &items).await?;
        }
    }
    Ok(())
}

/// Databases by VM and, for copies of group databases, by group: a group's jobs are its
/// own, so that a failover moves them whole.
fn group_by_vm_and_group(
    dbs: Vec<DatabaseRow>,
) -> BTreeMap<(Uuid, Option<Uuid>), Vec<DatabaseRow>> {
    let mut out: BTreeMap<(Uuid, Option<Uuid>), Vec<DatabaseRow>> = BTreeMap::new();
    for d in dbs {
        let group = d.ag_database_id.and(d.availability_group_id);
        out.entry((d.vm_id, group)).or_default().push(d);
    }
    out
}
