//! Protectable items: a vault's registered instances and availability groups, each with
//! its databases and why any cannot be protected.

use std::collections::{BTreeMap, HashMap};

use backvault_domain::agent::RecoveryModel;
use backvault_domain::configure::{Sibling, sibling_name_issues};
use backvault_domain::protection::{NameIssue, ProtectionState, time_zone_warning};
use backvault_store::inventory::{self, DatabaseRow};
use backvault_store::protection::{self as store, DatabaseProtection};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::{Error, Result};
use crate::{Principal, Service};

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProtectableDatabase {
    pub id: Uuid,
    pub name: String,
    pub recovery_model: RecoveryModel,
    pub system: bool,
    pub read_only: bool,
    pub size_bytes: i64,
    /// The protection it has, in this vault.
    pub protected_item_id: Option<Uuid>,
    pub protection_state: Option<ProtectionState>,
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

fn issue_of(issue: NameIssue) -> DatabaseIssue {
    DatabaseIssue {
        code: issue.code(),
        message: issue.message(),
    }
}

impl Service {
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
        let mut vm_ids: Vec<Uuid> = rows.iter().map(|r| r.vm_id).collect();
        vm_ids.sort_unstable();
        vm_ids.dedup();
        let all = inventory::databases_of_vms(&self.pool, &vm_ids).await?;
        let issues = vm_name_issues(&all);
        let present: Vec<&DatabaseRow> = all.iter().filter(|d| d.gone_at.is_none()).collect();
        let mut by_instance: HashMap<Uuid, Vec<&DatabaseRow>> = HashMap::new();
        for d in &present {
            by_instance.entry(d.instance_id).or_default().push(d);
        }
        let protection: HashMap<Uuid, DatabaseProtection> = store::items_for_databases(
            &self.pool,
            &present.iter().map(|d| d.id).collect::<Vec<_>>(),
        )
        .await?
        .into_iter()
        .map(|p| (p.database_id, p))
        .collect();
        for instance in rows {
            let instance_id = instance.instance_id;
            let mut standalone = Vec::new();
            for d in by_instance.remove(&instance_id).unwrap_or_default() {
                let issue = issues.get(&d.id).copied().flatten();
                let item = protection.get(&d.id);
                if unprotected_only && item.is_some() {
                    continue;
                }
                let db = ProtectableDatabase {
                    id: d.id,
                    name: d.name.clone(),
                    recovery_model: d.recovery_model,
                    system: d.system,
                    read_only: d.read_only,
                    size_bytes: d.size_bytes,
                    protected_item_id: item.map(|p| p.item_id),
                    protection_state: item.map(|p| p.state),
                    protectable: item.is_none() && issue.is_none(),
                    issue: issue.map(issue_of),
                };
                match d.availability_group_id {
                    Some(ag) => {
                        let entry = groups.entry(ag).or_insert_with(|| ProtectableContainer {
                            kind: ContainerKind::AvailabilityGroup,
                            id: ag,
                            name: String::new(),
                            vm_id: instance.vm_id,
                            vm_name: instance.vm_name.clone(),
                            resource_group: instance.resource_group.clone(),
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
                warning: time_zone_warning(&instance.version),
                name: instance.instance_name,
                vm_id: instance.vm_id,
                vm_name: instance.vm_name,
                resource_group: instance.resource_group,
                version: Some(instance.version),
                auto_protection_id: intents
                    .iter()
                    .find(|i| i.instance_id == Some(instance_id))
                    .map(|i| i.id),
                databases: standalone,
            });
        }
        let ids: Vec<Uuid> = groups.keys().copied().collect();
        let mut names: HashMap<Uuid, String> =
            inventory::availability_group_names(&self.pool, &ids)
                .await?
                .into_iter()
                .map(|g| (g.id, g.name))
                .collect();
        for (id, mut group) in groups {
            group.name = names.remove(&id).ok_or_else(|| {
                Error::internal(format!(
                    "stored data out of its domain: availability group {id} without its row"
                ))
            })?;
            containers.push(group);
        }
        Ok(containers)
    }
}

/// Each database's name issue, by database id.
pub(crate) type NameIssues = HashMap<Uuid, Option<NameIssue>>;

/// The name issue of each of the given databases (every database of one or more VMs),
/// by the domain's sibling-name rule. The one place protectable items, configure
/// protection and auto-protection take name issues from.
pub(crate) fn vm_name_issues(databases: &[DatabaseRow]) -> NameIssues {
    let siblings: Vec<Sibling<'_, Uuid>> = databases
        .iter()
        .map(|d| Sibling {
            id: d.id,
            instance: d.instance_id,
            name: &d.name,
            present: d.gone_at.is_none(),
        })
        .collect();
    sibling_name_issues(&siblings)
}
