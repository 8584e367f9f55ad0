//! Protectable items: a vault's registered instances and availability groups, each with
//! its databases and why any cannot be protected.

use std::collections::{BTreeMap, HashMap};

use backvault_domain::agent::RecoveryModel;
use backvault_domain::availability::GroupIssue;
use backvault_domain::configure::{Sibling, sibling_name_issues};
use backvault_domain::protection::{NameIssue, ProtectionState, time_zone_warning};
use backvault_store::inventory::{self, DatabaseRow};
use backvault_store::protection::{self as store, KeyProtection};
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

/// A standalone instance or an availability group with its databases. A group database
/// appears once, under its group, with the group database's id (what Configure
/// Protection takes), however many replicas report it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProtectableContainer {
    pub kind: ContainerKind,
    pub id: Uuid,
    pub name: String,
    /// The instance's VM; for a group, its primary's (none while no replica is primary).
    pub vm_id: Option<Uuid>,
    pub vm_name: Option<String>,
    pub resource_group: Option<String>,
    pub version: Option<String>,
    /// SQL Server 2008 R2 and 2012: backups may record a wrong time zone.
    pub warning: Option<&'static str>,
    pub auto_protection_id: Option<Uuid>,
    /// Whether this vault can protect the container's databases (a group: every replica's
    /// VM is registered with it).
    pub protectable: bool,
    /// Why it cannot.
    pub issue: Option<DatabaseIssue>,
    /// For a group: its replicas, backup preference and where backups go now.
    pub availability_group: Option<crate::availability::AvailabilityGroupView>,
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
        let protection: HashMap<Uuid, KeyProtection> = store::items_for_keys(
            &self.pool,
            &present.iter().map(|d| d.item_key).collect::<Vec<_>>(),
        )
        .await?
        .into_iter()
        .map(|p| (p.item_key, p))
        .collect();
        let mut group_ids: Vec<Uuid> = present
            .iter()
            .filter(|d| d.ag_database_id.is_some())
            .filter_map(|d| d.availability_group_id)
            .collect();
        group_ids.sort_unstable();
        group_ids.dedup();
        let mut conn = self.pool.acquire().await?;
        let views = self.group_views(&mut conn, &group_ids).await?;
        let group_issues =
            crate::availability::group_issues(&mut conn, vault_id, &group_ids).await?;
        let database = |d: &DatabaseRow, id: Uuid, group_issue: Option<GroupIssue>| {
            let item = protection.get(&d.item_key);
            let issue = issues.get(&d.id).copied().flatten();
            let db = ProtectableDatabase {
                id,
                name: d.name.clone(),
                recovery_model: d.recovery_model,
                system: d.system,
                read_only: d.read_only,
                size_bytes: d.size_bytes,
                protected_item_id: item.map(|p| p.item_id),
                protection_state: item.map(|p| p.state),
                protectable: item.is_none() && issue.is_none() && group_issue.is_none(),
                issue: match group_issue {
                    Some(g) => Some(DatabaseIssue {
                        code: g.code(),
                        message: g.message(),
                    }),
                    None => issue.map(issue_of),
                },
            };
            (!(unprotected_only && item.is_some())).then_some(db)
        };
        // A group database appears once, under its group: the primary's copy speaks for it.
        let mut group_copies: BTreeMap<Uuid, BTreeMap<Uuid, &DatabaseRow>> = BTreeMap::new();
        for instance in rows {
            let instance_id = instance.instance_id;
            let mut standalone = Vec::new();
            for d in by_instance.remove(&instance_id).unwrap_or_default() {
                match (d.ag_database_id, d.availability_group_id) {
                    (Some(group_db), Some(group)) => {
                        let primary = views.get(&group).and_then(|v| v.primary_vm_id);
                        let copies = group_copies.entry(group).or_default();
                        let keep = copies
                            .get(&group_db)
                            .is_none_or(|kept| primary == Some(d.vm_id) && kept.vm_id != d.vm_id);
                        if keep {
                            copies.insert(group_db, d);
                        }
                    }
                    _ => standalone.extend(database(d, d.id, None)),
                }
            }
            containers.push(ProtectableContainer {
                kind: ContainerKind::Instance,
                id: instance_id,
                warning: time_zone_warning(&instance.version),
                name: instance.instance_name,
                vm_id: Some(instance.vm_id),
                vm_name: Some(instance.vm_name),
                resource_group: Some(instance.resource_group),
                version: Some(instance.version),
                auto_protection_id: intents
                    .iter()
                    .find(|i| i.instance_id == Some(instance_id))
                    .map(|i| i.id),
                availability_group: None,
                protectable: true,
                issue: None,
                databases: standalone,
            });
        }
        for (group, copies) in group_copies {
            let view = views.get(&group).cloned().ok_or_else(|| {
                Error::internal(format!(
                    "stored data out of its domain: availability group {group} without its row"
                ))
            })?;
            let group_issue = group_issues.get(&group).copied().flatten();
            let primary = view
                .primary_vm_id
                .and_then(|vm| view.replicas.iter().find(|r| r.vm_id == vm));
            containers.push(ProtectableContainer {
                kind: ContainerKind::AvailabilityGroup,
                id: group,
                name: view.name.clone(),
                vm_id: primary.map(|r| r.vm_id),
                vm_name: primary.map(|r| r.vm_name.clone()),
                resource_group: primary.map(|r| r.resource_group.clone()),
                version: None,
                warning: None,
                auto_protection_id: intents
                    .iter()
                    .find(|i| i.availability_group_id == Some(group))
                    .map(|i| i.id),
                protectable: group_issue.is_none(),
                issue: group_issue.map(|g| DatabaseIssue {
                    code: g.code(),
                    message: g.message(),
                }),
                databases: copies
                    .into_iter()
                    .filter_map(|(group_db, d)| database(d, group_db, group_issue))
                    .collect(),
                availability_group: Some(view),
            });
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
