//! Registration, discovery, protectable items, configure protection, protected items and
//! auto-protection: the seed's flow from "Start Discovery" to "AUTOPROTECT ON".

use std::collections::{BTreeMap, HashMap};

use backvault_domain::agent::{JobItem, SqlInventory};
use backvault_domain::jobs::{BackupPayload, JobKind, Priority, batch};
use backvault_domain::protection::{
    NameIssue, OnDemandTarget, OnDemandType, VaultTarget, VmPrerequisites, check_on_demand,
    check_registration, name_issue, name_issues, time_zone_warning,
};
use backvault_domain::violation::Violations;
use backvault_store::inventory::{self, AgUpsert, DatabaseRow, DatabaseWrite};
use backvault_store::jobs as queue;
use backvault_store::protection::{
    self as store, IntentRow, ItemFilter, NewItem, ProtectedItemRow,
};
use backvault_store::schedule;
use backvault_store::{policies, vms};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use backvault_domain::agent::RecoveryModel;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::jobs::{Job, new_job};
use crate::pagination::{Page, page, page_request};
use crate::vms::{Vm, vm_not_found};
use crate::{ExpectedVersion, Principal, Service};

/// Configure-protection jobs of auto-protection are retried 3 times after the first try.
const AUTO_PROTECTION_ATTEMPTS: i32 = 4;

/// A VM that "Start Discovery" lists, with what would stop its registration.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DiscoveryCandidate {
    pub vm: Vm,
    /// Prerequisites it fails now (empty: ready to register).
    pub issues: Vec<backvault_domain::Violation>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProtectableDatabase {
    pub id: Uuid,
    pub name: String,
    #[schema(value_type = backvault_domain::agent::RecoveryModel)]
    pub recovery_model: String,
    pub system: bool,
    pub read_only: bool,
    pub size_bytes: i64,
    /// The protection it has, in this vault.
    pub protected_item_id: Option<Uuid>,
    #[schema(value_type = Option<backvault_domain::protection::ProtectionState>)]
    pub protection_state: Option<String>,
    /// Whether Configure Protection accepts it now.
    pub protectable: bool,
    /// Why it cannot be protected (or only by auto-protection).
    pub issue: Option<DatabaseIssue>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DatabaseIssue {
    pub code: &'static str,
    pub message: &'static str,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ContainerKind {
    Instance,
    AvailabilityGroup,
}

/// A standalone instance or an availability group with its databases.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProtectableContainer {
    pub kind: ContainerKind,
    pub id: Uuid,
    pub name: String,
    pub vm_id: Uuid,
    pub vm_name: String,
    pub resource_group: String,
    pub version: Option<String>,
    /// SQL Server 2008 R2 and 2012: backups may record a wrong time zone.
    pub warning: Option<&'static str>,
    pub auto_protection_id: Option<Uuid>,
    pub databases: Vec<ProtectableDatabase>,
}

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
    #[schema(value_type = backvault_domain::protection::ProtectionState)]
    pub state: String,
    pub policy: Option<String>,
    pub auto_protected: bool,
    pub subscription_id: String,
    pub resource_group: String,
    pub vm_id: Uuid,
    pub vm_name: String,
    pub instance: String,
    pub availability_group: Option<String>,
    pub database: String,
    /// The name when protection began; differs in case when `casing_changed`.
    pub protected_name: String,
    /// The database reappeared with another casing (unsupported; history is kept).
    pub casing_changed: bool,
    /// The database is no longer reported by discovery.
    pub database_gone: bool,
    #[schema(value_type = backvault_domain::agent::RecoveryModel)]
    pub recovery_model: String,
    pub last_full_at: Option<DateTime<Utc>>,
    pub last_differential_at: Option<DateTime<Utc>>,
    pub last_log_at: Option<DateTime<Utc>>,
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
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ItemQuery {
    pub state: Option<String>,
    pub policy: Option<String>,
    pub vm_id: Option<Uuid>,
    pub auto_protected: Option<bool>,
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

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OnDemandBackup {
    #[serde(rename = "type")]
    pub backup_type: OnDemandType,
    /// Full: 45 to 36159 days; copy-only full: 1 to 36159 days; differential and log:
    /// none (they follow the policy).
    #[serde(default)]
    pub retention_days: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAutoProtection {
    /// A standalone instance (from protectable items); or give `availability_group_id`.
    #[serde(default)]
    pub instance_id: Option<Uuid>,
    #[serde(default)]
    pub availability_group_id: Option<Uuid>,
    pub policy: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AutoProtection {
    pub id: Uuid,
    pub vault_id: Uuid,
    pub policy: String,
    pub instance_id: Option<Uuid>,
    pub availability_group_id: Option<Uuid>,
    pub target_name: String,
    pub created_at: DateTime<Utc>,
    /// Jobs that protect the databases found when the intent was created.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<Uuid>,
}

impl From<IntentRow> for AutoProtection {
    fn from(r: IntentRow) -> Self {
        Self {
            id: r.id,
            vault_id: r.vault_id,
            policy: r.policy_name,
            instance_id: r.instance_id,
            availability_group_id: r.availability_group_id,
            target_name: r.target_name,
            created_at: r.created_at,
            jobs: Vec::new(),
        }
    }
}

fn item_not_found(id: Uuid) -> Error {
    Error::not_found(
        "protected_item_not_found",
        format_args!("protected item {id}"),
    )
}

fn issue_of(issue: NameIssue) -> DatabaseIssue {
    DatabaseIssue {
        code: issue.code(),
        message: issue.message(),
    }
}

fn database_item(d: &DatabaseRow, instance: &str, item_id: Uuid) -> JobItem {
    JobItem {
        instance: instance.to_owned(),
        database: d.name.clone(),
        protected_item_id: Some(item_id),
    }
}

impl Service {
    async fn policy_id(
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

    /// "Start Discovery": the VMs of the vault's subscription registered with no vault,
    /// each with the prerequisites it fails now.
    pub async fn discovery_candidates(
        &self,
        principal: &Principal,
        vault_id: Uuid,
    ) -> Result<Vec<DiscoveryCandidate>> {
        principal.require(Operation::Read)?;
        let vault = self.visible_vault(&self.pool, principal, vault_id).await?;
        let rows = inventory::vms_unregistered(&self.pool, &vault.subscription_id).await?;
        let now = Utc::now();
        let vault_id_text = vault.id.to_string();
        let target = VaultTarget {
            id: &vault_id_text,
            subscription_id: &vault.subscription_id,
            region: &vault.region,
        };
        Ok(rows
            .into_iter()
            .map(|row| {
                let vm = Vm::from(row);
                let issues = check_registration(
                    &prerequisites(&vm, None),
                    &target,
                    now,
                    self.config.agent_heard_within,
                );
                DiscoveryCandidate { vm, issues }
            })
            .collect())
    }

    /// "Discover DBs": checks every prerequisite, registers the VM with the vault and
    /// dispatches a discovery job to its agent.
    pub async fn vm_discover(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        vm_id: Uuid,
    ) -> Result<Job> {
        principal.require(Operation::RegisterVm)?;
        let mut tx = self.pool.begin().await?;
        let vault = self.visible_vault(&mut *tx, principal, vault_id).await?;
        let row = inventory::vm_lock(&mut tx, vm_id)
            .await?
            .filter(|vm| principal.sees_subscription(&vm.subscription_id))
            .ok_or_else(|| vm_not_found(vm_id))?;
        let registered = inventory::vm_vault(&mut *tx, vm_id)
            .await?
            .map(|v| v.to_string());
        let vm = Vm::from(row);
        let vault_id_text = vault.id.to_string();
        let target = VaultTarget {
            id: &vault_id_text,
            subscription_id: &vault.subscription_id,
            region: &vault.region,
        };
        let issues = check_registration(
            &prerequisites(&vm, registered.as_deref()),
            &target,
            Utc::now(),
            self.config.agent_heard_within,
        );
        if !issues.is_empty() {
            let mut e = Error::validation(issues);
            e.code = "prerequisites_failed";
            e.message = format!("the VM cannot be registered with this vault: {}", e.message);
            return Err(e);
        }
        inventory::vm_register(
            &mut tx,
            vm_id,
            vault_id,
            backvault_domain::instants::later(Utc::now(), self.config.discovery_period),
        )
        .await?;
        let job = discovery_job(vm_id, &vm.subscription_id, vault_id, Priority::OnDemand)?;
        tracing::info!(vm.id = %vm_id, vault.id = %vault_id, "VM registered; discovery dispatched");
        self.commit_with_job(principal, tx, job).await
    }

    /// "Rediscover DBs" for a VM registered with this vault.
    pub async fn vm_rediscover(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        vm_id: Uuid,
    ) -> Result<Job> {
        principal.require(Operation::RegisterVm)?;
        let mut tx = self.pool.begin().await?;
        self.visible_vault(&mut *tx, principal, vault_id).await?;
        let vm = self
            .registered_vm(&mut tx, principal, vault_id, vm_id)
            .await?;
        let job = discovery_job(vm_id, &vm.subscription_id, vault_id, Priority::OnDemand)?;
        self.commit_with_job(principal, tx, job).await
    }

    async fn registered_vm(
        &self,
        conn: &mut PgConnection,
        principal: &Principal,
        vault_id: Uuid,
        vm_id: Uuid,
    ) -> Result<vms::VmRow> {
        let vm = self.visible_vm(&mut *conn, principal, vm_id).await?;
        if inventory::vm_vault(&mut *conn, vm_id).await? != Some(vault_id) {
            return Err(Error::new(
                ErrorKind::Conflict,
                "vm_not_registered",
                "the VM is not registered with this vault",
            ));
        }
        Ok(vm)
    }

    /// Unregisters a VM; refused while any of its databases is protected.
    pub async fn vm_unregister(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        vm_id: Uuid,
    ) -> Result<()> {
        principal.require(Operation::UnregisterVm)?;
        let mut tx = self.pool.begin().await?;
        self.visible_vault(&mut *tx, principal, vault_id).await?;
        inventory::vm_lock(&mut tx, vm_id).await?;
        self.registered_vm(&mut tx, principal, vault_id, vm_id)
            .await?;
        if store::items_on_vm(&mut *tx, vm_id).await? > 0 {
            return Err(Error::new(
                ErrorKind::Conflict,
                "vm_has_protected_items",
                "databases on this VM are protected; stop protection (and delete their data) first",
            ));
        }
        inventory::vm_unregister(&mut tx, vm_id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces the VM's SQL inventory with what its discovery job reported, and
    /// auto-protects new databases under an intent, in the completion's transaction.
    pub(crate) async fn apply_discovery(
        &self,
        tx: &mut PgConnection,
        vm_id: Uuid,
        reported: &SqlInventory,
    ) -> Result<()> {
        let Some(vm) = vms::vm_get(&mut *tx, vm_id).await? else {
            return Ok(());
        };
        let instance_rows = inventory::instances_replace(
            tx,
            vm_id,
            &reported
                .instances
                .iter()
                .map(|i| (i.name.clone(), i.version.clone()))
                .collect::<Vec<_>>(),
        )
        .await?;
        let instance_id: HashMap<String, Uuid> = instance_rows
            .iter()
            .filter(|i| i.gone_at.is_none())
            .map(|i| (i.name.to_lowercase(), i.id))
            .collect();
        let groups: Vec<AgUpsert<'_>> = reported
            .availability_groups
            .iter()
            .map(|g| AgUpsert {
                name: &g.name,
                backup_preference: match g.backup_preference {
                    backvault_domain::agent::BackupPreference::Primary => "primary",
                    backvault_domain::agent::BackupPreference::Secondary => "secondary",
                    backvault_domain::agent::BackupPreference::Any => "any",
                },
                replicas: serde_json::to_value(&g.replicas).unwrap_or_default(),
            })
            .collect();
        let group_id: HashMap<String, Uuid> =
            inventory::availability_groups_upsert(tx, &vm.subscription_id, &groups)
                .await?
                .into_iter()
                .collect();

        let existing = inventory::databases_of_vm(&mut *tx, vm_id).await?;
        // Lookups by name, built once: a discovery of thousands of databases stays linear.
        let mut by_name: HashMap<(Uuid, &str), &DatabaseRow> = HashMap::new();
        let mut by_folded_name: HashMap<(Uuid, String), Vec<&DatabaseRow>> = HashMap::new();
        for e in &existing {
            by_name.entry((e.instance_id, e.name.as_str())).or_insert(e);
            by_folded_name
                .entry((e.instance_id, e.name.to_ascii_lowercase()))
                .or_default()
                .push(e);
        }
        let reported_names: std::collections::HashSet<(String, &str)> = reported
            .databases
            .iter()
            .map(|r| (r.instance.to_ascii_lowercase(), r.name.as_str()))
            .collect();
        let mut writes = Vec::new();
        let mut present = Vec::new();
        let mut recased = Vec::new();
        let mut switched = HashMap::new();
        for db in &reported.databases {
            let Some(&instance) = instance_id.get(&db.instance.to_lowercase()) else {
                continue;
            };
            let exact = by_name.get(&(instance, db.name.as_str())).copied();
            // The same database under another casing: keep its row (and history), flag it.
            let recase = exact.is_none().then(|| {
                let reported_instance = db.instance.to_ascii_lowercase();
                by_folded_name
                    .get(&(instance, db.name.to_ascii_lowercase()))
                    .into_iter()
                    .flatten()
                    .find(|e| {
                        !reported_names.contains(&(reported_instance.clone(), e.name.as_str()))
                    })
                    .copied()
            });
            let recase = recase.flatten();
            if let Some(e) = recase {
                recased.push(e.id);
            }
            let before = exact.or(recase);
            let id = before.map_or_else(Uuid::now_v7, |e| e.id);
            present.push(id);
            let model = db.recovery_model.as_str();
            if let Some(before) = before
                && before.recovery_model != model
            {
                switched.insert(
                    id,
                    (
                        crate::recovery::model_of(&before.recovery_model)?,
                        db.recovery_model,
                    ),
                );
            }
            writes.push(DatabaseWrite {
                id,
                instance_id: instance,
                availability_group_id: db
                    .availability_group
                    .as_ref()
                    .and_then(|g| group_id.get(&g.to_lowercase()).copied()),
                name: &db.name,
                recovery_model: model,
                system: db.system,
                read_only: db.read_only,
                size_bytes: db.size_bytes,
            });
        }
        inventory::databases_retire(tx, vm_id, &present).await?;
        inventory::databases_write(tx, vm_id, &writes).await?;
        if !switched.is_empty() {
            self.recovery_models_switched(tx, &switched).await?;
        }
        if !recased.is_empty() {
            store::items_flag_casing(&mut *tx, &recased).await?;
        }
        for intent in store::intents_for_vm(&mut *tx, vm_id).await? {
            self.auto_protect(tx, &intent).await?;
        }
        Ok(())
    }

    /// Databases whose recovery model changed since the last discovery: their items'
    /// chains follow (`domain::chain::model_changed`).
    async fn recovery_models_switched(
        &self,
        tx: &mut PgConnection,
        switched: &HashMap<Uuid, (RecoveryModel, RecoveryModel)>,
    ) -> Result<()> {
        let databases: Vec<Uuid> = switched.keys().copied().collect();
        let items: HashMap<Uuid, Uuid> = store::items_for_databases(&mut *tx, &databases)
            .await?
            .into_iter()
            .map(|(database, item, _, _)| (item, database))
            .collect();
        let ids: Vec<Uuid> = items.keys().copied().collect();
        let mut changed_ids = Vec::new();
        let mut chains = Vec::new();
        for (item, state, spec) in
            backvault_store::recovery::chains_of_items(&mut *tx, &ids).await?
        {
            let Some((from, to)) = items.get(&item).and_then(|d| switched.get(d)) else {
                continue;
            };
            let has_differential =
                crate::recovery::policy_of(spec.as_ref()).is_some_and(|p| p.differential.is_some());
            changed_ids.push(item);
            chains.push(backvault_domain::chain::model_changed(
                state.0,
                *from,
                *to,
                has_differential,
            ));
        }
        backvault_store::recovery::chains_set(&mut *tx, &changed_ids, &chains).await?;
        Ok(())
    }

    /// Protects every present, unprotected database under the intent whose name allows
    /// auto-protection, with configure-protection jobs of at most 50 databases per VM.
    async fn auto_protect(&self, tx: &mut PgConnection, intent: &IntentRow) -> Result<Vec<Uuid>> {
        let candidates =
            store::unprotected_under(&mut *tx, intent.instance_id, intent.availability_group_id)
                .await?;
        let mut eligible = Vec::new();
        for (vm_id, dbs) in group_by_vm(candidates) {
            let issues = vm_name_issues(&inventory::databases_of_vm(&mut *tx, vm_id).await?);
            for d in dbs {
                let issue = issues
                    .get(&d.id)
                    .copied()
                    .unwrap_or_else(|| name_issue(&d.name));
                if issue.is_none_or(NameIssue::auto_protection_allowed) {
                    eligible.push(d);
                }
            }
        }
        self.protect(
            tx,
            intent.vault_id,
            intent.policy_id,
            Some(intent.id),
            eligible,
            AUTO_PROTECTION_ATTEMPTS,
        )
        .await
    }

    /// Inserts protected items and enqueues their configure-protection jobs.
    async fn protect(
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
            .on_constraint("protected_items_database_key", || {
                Error::new(
                    ErrorKind::Conflict,
                    "database_already_protected",
                    "a database was protected meanwhile; retry",
                )
            })?;
        let item_of: HashMap<Uuid, Uuid> = items.iter().map(|i| (i.database_id, i.id)).collect();
        let mut jobs = Vec::new();
        for (vm_id, dbs) in group_by_vm(databases) {
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

    /// Protectable items of the vault: registered instances and availability groups, each
    /// with its databases and why any cannot be protected.
    pub async fn protectable_items(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        unprotected_only: bool,
    ) -> Result<Vec<ProtectableContainer>> {
        principal.require(Operation::Read)?;
        self.visible_vault(&self.pool, principal, vault_id).await?;
        let rows = inventory::instances_of_vault(&self.pool, vault_id).await?;
        let intents = store::intents_of_vault(&self.pool, vault_id).await?;
        let mut containers: Vec<ProtectableContainer> = Vec::new();
        let mut groups: BTreeMap<Uuid, ProtectableContainer> = BTreeMap::new();
        let mut dbs_by_vm: HashMap<Uuid, (Vec<DatabaseRow>, NameIssues)> = HashMap::new();
        for (instance_id, name, version, vm_id, vm_name, rg) in rows {
            if let std::collections::hash_map::Entry::Vacant(slot) = dbs_by_vm.entry(vm_id) {
                let databases = inventory::databases_of_vm(&self.pool, vm_id).await?;
                let issues = vm_name_issues(&databases);
                slot.insert((databases, issues));
            }
            let (all, vm_issues) = &dbs_by_vm[&vm_id];
            let on_instance: Vec<&DatabaseRow> = all
                .iter()
                .filter(|d| d.instance_id == instance_id && d.gone_at.is_none())
                .collect();
            let issues = on_instance
                .iter()
                .map(|d| vm_issues.get(&d.id).copied().flatten());
            let protection = store::items_for_databases(
                &self.pool,
                &on_instance.iter().map(|d| d.id).collect::<Vec<_>>(),
            )
            .await?;
            let mut standalone = Vec::new();
            for (d, issue) in on_instance.iter().zip(issues) {
                let item = protection.iter().find(|p| p.0 == d.id);
                if unprotected_only && item.is_some() {
                    continue;
                }
                let db = ProtectableDatabase {
                    id: d.id,
                    name: d.name.clone(),
                    recovery_model: d.recovery_model.clone(),
                    system: d.system,
                    read_only: d.read_only,
                    size_bytes: d.size_bytes,
                    protected_item_id: item.map(|p| p.1),
                    protection_state: item.map(|p| p.3.clone()),
                    protectable: item.is_none() && issue.is_none(),
                    issue: issue.map(issue_of),
                };
                match d.availability_group_id {
                    Some(ag) => {
                        let entry = groups.entry(ag).or_insert_with(|| ProtectableContainer {
                            kind: ContainerKind::AvailabilityGroup,
                            id: ag,
                            name: String::new(),
                            vm_id,
                            vm_name: vm_name.clone(),
                            resource_group: rg.clone(),
                            version: None,
                            warning: None,
                            auto_protection_id: intents
                                .iter()
                                .find(|i| i.availability_group_id == Some(ag))
                                .map(|i| i.id),
                            databases: Vec::new(),
                        });
                        entry.databases.push(db);
                    }
                    None => standalone.push(db),
                }
            }
            containers.push(ProtectableContainer {
                kind: ContainerKind::Instance,
                id: instance_id,
                warning: time_zone_warning(&version),
                name,
                vm_id,
                vm_name,
                resource_group: rg,
                version: Some(version),
                auto_protection_id: intents
                    .iter()
                    .find(|i| i.instance_id == Some(instance_id))
                    .map(|i| i.id),
                databases: standalone,
            });
        }
        for (id, mut group) in groups {
            group.name = inventory::availability_group_name(&self.pool, id).await?;
            containers.push(group);
        }
        Ok(containers)
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
        let mut v = Violations::default();
        let policy = match policies::policy_get(&mut *tx, vault_id, &req.policy).await? {
            Some(p) => Some(p.id),
            None => {
                v.push(
                    "/policy",
                    "policy_not_found",
                    format!("the vault has no policy '{}'", req.policy),
                );
                None
            }
        };
        if req.databases.is_empty() {
            v.push(
                "/databases",
                "databases_empty",
                "list at least one database",
            );
        }
        let found = inventory::databases_get(&mut *tx, &req.databases).await?;
        let protection = store::items_for_databases(&mut *tx, &req.databases).await?;
        // Per VM, read once: its vault and the name issues of its databases.
        let mut vm_vaults: HashMap<Uuid, Option<Uuid>> = HashMap::new();
        let mut vm_issues: HashMap<Uuid, HashMap<Uuid, Option<NameIssue>>> = HashMap::new();
        let mut accepted = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, id) in req.databases.iter().enumerate() {
            let pointer = format!("/databases/{i}");
            let Some(d) = found.iter().find(|d| d.id == *id) else {
                v.push(
                    pointer,
                    "database_not_found",
                    "no such database; list protectable items",
                );
                continue;
            };
            if !seen.insert(*id) {
                v.push(
                    pointer,
                    "database_duplicate",
                    "the database is listed twice",
                );
                continue;
            }
            let vm_vault = match vm_vaults.get(&d.vm_id) {
                Some(vault) => *vault,
                None => {
                    let vault = inventory::vm_vault(&mut *tx, d.vm_id).await?;
                    vm_vaults.insert(d.vm_id, vault);
                    vault
                }
            };
            if vm_vault != Some(vault_id) {
                v.push(
                    pointer,
                    "database_not_in_vault",
                    "the database's VM is not registered with this vault",
                );
                continue;
            }
            if d.gone_at.is_some() {
                v.push(
                    pointer,
                    "database_gone",
                    "the last discovery did not find this database; rediscover",
                );
                continue;
            }
            if let Some(p) = protection.iter().find(|p| p.0 == *id) {
                let message = if p.2 == vault_id {
                    "the database is already protected in this vault"
                } else {
                    "the database is protected in another vault; a database is protected in one vault only"
                };
                v.push(pointer, "database_already_protected", message);
                continue;
            }
            let issues = match vm_issues.entry(d.vm_id) {
                std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => slot.insert(vm_name_issues(
                    &inventory::databases_of_vm(&mut *tx, d.vm_id).await?,
                )),
            };
            if let Some(issue) = issues
                .get(&d.id)
                .copied()
                .unwrap_or_else(|| name_issue(&d.name))
            {
                v.push(pointer, issue.code(), issue.message());
                continue;
            }
            accepted.push(d.clone());
        }
        let Some(policy_id) = policy.filter(|_| v.is_empty()) else {
            return Err(Error::validation(v.into_vec()));
        };
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
        for (db, item, _, _) in store::items_for_databases(&self.pool, &ids).await? {
            let _ = db;
            if let Some(row) = store::item_get(&self.pool, item).await? {
                items.push(row.into());
            }
        }
        Ok(ConfigureProtectionResult { items, jobs })
    }

    async fn visible_item(
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
            state: query.state.clone(),
            policy_id,
            vm_id: query.vm_id,
            auto_protected: query.auto_protected,
        };
        let rows = store::items_list(&mut *conn, vault_id, &filter, request).await?;
        Ok(page(rows, limit, |r| r.id, ProtectedItem::from))
    }

    pub async fn protected_item_get(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
    ) -> Result<ProtectedItem> {
        principal.require(Operation::Read)?;
        let mut conn = self.pool.acquire().await?;
        Ok(self
            .visible_item(&mut conn, principal, vault_id, id)
            .await?
            .into())
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
        if item.state.starts_with("stopped") {
            return Err(Error::new(
                ErrorKind::Conflict,
                "protection_stopped",
                "protection is stopped; resume it with a policy",
            ));
        }
        joining_policy(&mut tx, item.policy_id, policy_id).await?;
        store::item_update(&mut tx, id, expected, Some(policy_id), &item.state)
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
        match req.mode {
            StopMode::DeleteData => store::item_delete(&mut tx, id).await?,
            StopMode::RetainData | StopMode::RetainPerPolicy => {
                if matches!(req.mode, StopMode::RetainData) {
                    backvault_store::recovery::points_retain_forever(&mut *tx, id).await?;
                }
                let state = if matches!(req.mode, StopMode::RetainData) {
                    "stopped_retain"
                } else {
                    "stopped_retain_per_policy"
                };
                let policy = if matches!(req.mode, StopMode::RetainPerPolicy) {
                    item.policy_id
                } else {
                    None
                };
                store::item_update(&mut tx, id, None, policy, state).await?;
            }
        }
        tx.commit().await?;
        match req.mode {
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
        if !item.state.starts_with("stopped") {
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
        store::item_update(&mut tx, id, None, Some(policy_id), "protected").await?;
        tx.commit().await?;
        self.protected_item_get(principal, vault_id, id).await
    }

    /// An on-demand backup of one protected database, as a job for its VM's agent.
    pub async fn protected_item_backup(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
        req: OnDemandBackup,
    ) -> Result<Job> {
        principal.require(Operation::BackupNow)?;
        let mut tx = self.pool.begin().await?;
        let item = self.visible_item(&mut tx, principal, vault_id, id).await?;
        if item.state != "protected" {
            return Err(Error::new(
                ErrorKind::Conflict,
                "item_not_protected",
                format!("the item is {}; backups need it protected", item.state),
            ));
        }
        let midnight = Utc::now()
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc();
        let fulls_today = store::on_demand_fulls_since(&mut *tx, id, midnight).await?;
        let issues = check_on_demand(
            req.backup_type,
            req.retention_days,
            OnDemandTarget {
                database_name: &item.database_name,
                read_only: item.read_only,
                simple_recovery: item.recovery_model == "simple",
                on_demand_fulls_today: fulls_today,
            },
        );
        if !issues.is_empty() {
            return Err(Error::validation(issues));
        }
        let (kind, copy_only) = match req.backup_type {
            OnDemandType::Full => (JobKind::BackupFull, false),
            OnDemandType::CopyOnlyFull => (JobKind::BackupFull, true),
            OnDemandType::Differential => (JobKind::BackupDifferential, false),
            OnDemandType::Log => (JobKind::BackupLog, false),
        };
        let items = [JobItem {
            instance: item.instance_name.clone(),
            database: item.database_name.clone(),
            protected_item_id: Some(id),
        }];
        let payload = serde_json::to_value(BackupPayload {
            copy_only: Some(copy_only),
            retention_days: req.retention_days,
            on_demand: Some(true),
            ..BackupPayload::default()
        })
        .map_err(Error::internal)?;
        let job = new_job(
            item.vm_id,
            &item.subscription_id,
            Some(vault_id),
            kind,
            Priority::OnDemand,
            &items,
            payload,
        )?;
        self.commit_with_job(principal, tx, job).await
    }

    /// Enables auto-protection on an instance or availability group, and protects what is
    /// there now.
    pub async fn auto_protection_create(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        req: CreateAutoProtection,
    ) -> Result<AutoProtection> {
        principal.require(Operation::ManageAutoProtection)?;
        let mut tx = self.pool.begin().await?;
        self.visible_vault(&mut *tx, principal, vault_id).await?;
        let mut v = Violations::default();
        let policy = policies::policy_get(&mut *tx, vault_id, &req.policy).await?;
        if policy.is_none() {
            v.push(
                "/policy",
                "policy_not_found",
                format!("the vault has no policy '{}'", req.policy),
            );
        }
        let in_vault = match (req.instance_id, req.availability_group_id) {
            (Some(_), None) | (None, Some(_)) => {
                inventory::target_in_vault(
                    &mut *tx,
                    req.instance_id,
                    req.availability_group_id,
                    vault_id,
                )
                .await?
            }
            _ => {
                v.push(
                    "",
                    "auto_protection_target_invalid",
                    "give exactly one of instance_id and availability_group_id",
                );
                false
            }
        };
        let Some(policy_id) = policy.map(|p| p.id).filter(|_| v.is_empty()) else {
            return Err(Error::validation(v.into_vec()));
        };
        if !in_vault {
            return Err(Error::not_found(
                "auto_protection_target_not_found",
                "the instance or availability group on a VM of this vault",
            ));
        }
        let id = Uuid::now_v7();
        store::intent_insert(
            &mut tx,
            id,
            vault_id,
            policy_id,
            req.instance_id,
            req.availability_group_id,
        )
        .await
        .map_err(Error::from)
        .map_err(|e| {
            match e
                .source
                .as_deref()
                .and_then(|s| s.downcast_ref::<sqlx::Error>())
            {
                Some(sqlx::Error::Database(db)) if db.is_unique_violation() => Error::new(
                    ErrorKind::Conflict,
                    "auto_protection_exists",
                    "auto-protection is already on for this target",
                ),
                _ => e,
            }
        })?;
        let intent = store::intent_get(&mut *tx, id)
            .await?
            .ok_or_else(|| Error::internal("intent vanished"))?;
        let jobs = self.auto_protect(&mut tx, &intent).await?;
        tx.commit().await?;
        let mut out = AutoProtection::from(intent);
        out.jobs = jobs;
        Ok(out)
    }

    pub async fn auto_protection_list(
        &self,
        principal: &Principal,
        vault_id: Uuid,
    ) -> Result<Vec<AutoProtection>> {
        principal.require(Operation::Read)?;
        self.visible_vault(&self.pool, principal, vault_id).await?;
        Ok(store::intents_of_vault(&self.pool, vault_id)
            .await?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    pub async fn auto_protection_get(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
    ) -> Result<AutoProtection> {
        principal.require(Operation::Read)?;
        self.visible_vault(&self.pool, principal, vault_id).await?;
        store::intent_get(&self.pool, id)
            .await?
            .filter(|i| i.vault_id == vault_id)
            .map(Into::into)
            .ok_or_else(|| {
                Error::not_found(
                    "auto_protection_not_found",
                    format_args!("auto-protection {id}"),
                )
            })
    }

    /// Disables auto-protection; what it protected stays protected.
    pub async fn auto_protection_delete(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
    ) -> Result<()> {
        principal.require(Operation::ManageAutoProtection)?;
        self.auto_protection_get(principal, vault_id, id).await?;
        let mut tx = self.pool.begin().await?;
        store::intent_delete(&mut tx, id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Dispatches the periodic discovery of registered VMs that are due. Safe across
    /// replicas: each due VM is claimed by one of them and moved to its next period.
    pub async fn discover_due_vms(&self) -> Result<usize> {
        let mut tx = self.pool.begin().await?;
        let due =
            inventory::vms_claim_discovery_due(&mut tx, self.config.discovery_period, 500).await?;
        let jobs = due
            .iter()
            .map(|(vm, sub, vault)| discovery_job(*vm, sub, *vault, Priority::Scheduled))
            .collect::<Result<Vec<_>>>()?;
        queue::jobs_enqueue(&mut tx, &jobs).await?;
        tx.commit().await?;
        Ok(jobs.len())
    }
}

fn discovery_job(
    vm_id: Uuid,
    subscription: &str,
    vault_id: Uuid,
    priority: Priority,
) -> Result<queue::NewJob> {
    new_job(
        vm_id,
        subscription,
        Some(vault_id),
        JobKind::Discovery,
        priority,
        &[],
        serde_json::json!({}),
    )
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
    for (_, kind, items, _) in queue::jobs_content(&mut *tx, job_ids).await? {
        let items = crate::jobs::protected_items_of(&items.0);
        if kind != JobKind::ConfigureProtection.as_str() || items.is_empty() {
            continue;
        }
        if succeeded {
            let policies = store::items_policies(&mut *tx, &items).await?;
            schedule::schedule_restart_idle(&mut *tx, &policies).await?;
            store::items_set_state(&mut *tx, &items, "protecting", "protected").await?;
        } else {
            store::items_delete_protecting(&mut *tx, &items).await?;
        }
    }
    Ok(())
}

fn prerequisites<'a>(vm: &'a Vm, registered_vault: Option<&'a str>) -> VmPrerequisites<'a> {
    VmPrerequisites {
        name: &vm.name,
        resource_group: &vm.resource_group,
        subscription_id: &vm.subscription_id,
        region: &vm.region,
        deployment_model: vm.deployment_model,
        agent_installed: vm.agent_installed,
        last_seen_at: vm.last_seen_at,
        dotnet_version: vm.dotnet_version.as_deref(),
        other_backup_product: vm.other_backup_product,
        registered_vault,
    }
}

/// Each present database's name issue, by database id.
type NameIssues = HashMap<Uuid, Option<NameIssue>>;

/// The name issue of each present database of a VM, judged among its instance's names
/// in one pass over the VM's databases. The one place protectable items, configure
/// protection and auto-protection take name issues from: a database discovery no longer
/// finds is no sibling (its name collides with nothing).
fn vm_name_issues(databases: &[DatabaseRow]) -> NameIssues {
    let present: Vec<&DatabaseRow> = databases.iter().filter(|d| d.gone_at.is_none()).collect();
    let named: Vec<(Uuid, &str)> = present
        .iter()
        .map(|d| (d.instance_id, d.name.as_str()))
        .collect();
    present
        .iter()
        .map(|d| d.id)
        .zip(name_issues(&named))
        .collect()
}

fn group_by_vm(dbs: Vec<DatabaseRow>) -> BTreeMap<Uuid, Vec<DatabaseRow>> {
    let mut out: BTreeMap<Uuid, Vec<DatabaseRow>> = BTreeMap::new();
    for d in dbs {
        out.entry(d.vm_id).or_default().push(d);
    }
    out
}
