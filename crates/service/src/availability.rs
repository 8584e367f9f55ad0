//! Availability groups as the server keeps them: each VM's discovery reports its own
//! replica; the group's routes (where primary-only and preferred backups go) follow the
//! latest reports and agent heartbeats; a failover moves items and queued jobs to the new
//! primary; and a vault protects a group only with every replica's VM registered to it.

use std::collections::{BTreeMap, HashMap};

use backvault_domain::agent::{
    BackupPreference, RecoveryPointType, ReplicaRole, SqlInventory, SynchronizationHealth,
};
use backvault_domain::availability::{GroupIssue, ReplicaState, ReplicaVm, group_issue, route};
use backvault_store::availability::{self as store, GroupReport, ReplicaWrite, Route};
use backvault_store::vms::VmRow;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::Service;
use crate::error::Result;

/// A replica of an availability group, as its own VM's latest discovery reported it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GroupReplica {
    pub vm_id: Uuid,
    pub vm_name: String,
    pub resource_group: String,
    pub instance: String,
    pub role: ReplicaRole,
    pub synchronization_health: SynchronizationHealth,
    /// 0 (never chosen for log and copy-only backups) to 100.
    pub backup_priority: u8,
    /// When its VM's discovery last reported it.
    pub reported_at: DateTime<Utc>,
    /// Its VM's agent is heard from: backups may be routed to it.
    pub agent_reachable: bool,
}

/// An availability group: its replicas and where its backups go now.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AvailabilityGroupView {
    pub id: Uuid,
    /// SQL Server's `group_id`.
    pub group_id: Uuid,
    pub name: String,
    pub backup_preference: BackupPreference,
    pub replicas: Vec<GroupReplica>,
    /// Where full and differential backups run now: the primary's VM.
    pub primary_vm_id: Option<Uuid>,
    /// Where log and copy-only full backups run now, by the preference and priorities.
    pub preferred_vm_id: Option<Uuid>,
    /// Why no replica can take log and copy-only backups now, when none can.
    pub preferred_unroutable: Option<String>,
}

impl Service {
    /// Agents heard from since this instant count as reachable: a job sent there runs.
    fn agents_heard_since(&self) -> DateTime<Utc> {
        Utc::now()
            .checked_sub_signed(self.config.agent_heard_within)
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// The views of these groups, by row id.
    pub(crate) async fn group_views(
        &self,
        conn: &mut PgConnection,
        groups: &[Uuid],
    ) -> Result<HashMap<Uuid, AvailabilityGroupView>> {
        if groups.is_empty() {
            return Ok(HashMap::new());
        }
        let heard_since = self.agents_heard_since();
        let mut out: HashMap<Uuid, AvailabilityGroupView> = HashMap::new();
        for r in store::group_replicas(conn, groups).await? {
            let view =
                out.entry(r.availability_group_id)
                    .or_insert_with(|| AvailabilityGroupView {
                        id: r.availability_group_id,
                        group_id: r.group_id,
                        name: r.name.clone(),
                        backup_preference: r.backup_preference,
                        replicas: Vec::new(),
                        primary_vm_id: r.primary_vm_id,
                        preferred_vm_id: r.preferred_vm_id,
                        preferred_unroutable: r.preferred_unroutable.clone(),
                    });
            if let (Some(vm_id), Some(role), Some(health), Some(priority), Some(reported_at)) =
                (r.vm_id, r.role, r.health, r.backup_priority, r.reported_at)
            {
                view.replicas.push(GroupReplica {
                    vm_id,
                    vm_name: r.vm_name.unwrap_or_default(),
                    resource_group: r.resource_group.unwrap_or_default(),
                    instance: r.instance.unwrap_or_default(),
                    role,
                    synchronization_health: health,
                    backup_priority: u8::try_from(priority).unwrap_or(0),
                    reported_at,
                    agent_reachable: r.last_seen_at.is_some_and(|seen| seen >= heard_since),
                });
            }
        }
        Ok(out)
    }
}

/// The advisory lock of the scheduler's routing pass.
const REROUTE_LOCK: i64 = 0x6261_636b_0002;

/// The groups one discovery reported, as rows.
#[derive(Debug, Default)]
pub(crate) struct ReportedGroups {
    /// Row id by the group's name as this VM reported it (lowercase).
    pub by_name: HashMap<String, Uuid>,
    pub ids: Vec<Uuid>,
}

impl Service {
    /// Records the groups a VM's discovery reported and the VM's replica of each.
    pub(crate) async fn apply_group_reports(
        &self,
        tx: &mut PgConnection,
        vm: &VmRow,
        reported: &SqlInventory,
        instance_id: &HashMap<String, Uuid>,
    ) -> Result<ReportedGroups> {
        let locals: Vec<_> = reported
            .availability_groups
            .iter()
            .map(|g| g.local_replica(&vm.name, &vm.resource_group))
            .collect();
        let reports: Vec<GroupReport<'_>> = reported
            .availability_groups
            .iter()
            .zip(&locals)
            .map(|(g, local)| GroupReport {
                name: &g.name,
                group_id: g.group_id,
                backup_preference: g.backup_preference,
                replicas: serde_json::to_value(&g.replicas).unwrap_or_default(),
                from_primary: local
                    .as_ref()
                    .is_some_and(|l| l.role == backvault_domain::agent::ReplicaRole::Primary),
            })
            .collect();
        // Upserting a group locks its row until the transaction ends (two replicas that
        // both claim the primary role take turns); one order for all keeps discoveries of
        // VMs sharing several groups from deadlocking.
        let mut order: Vec<usize> = (0..reports.len()).collect();
        order.sort_by_key(|&i| (reports[i].group_id, reports[i].name.to_lowercase()));
        let sorted: Vec<GroupReport<'_>> = order.iter().map(|&i| reports[i].clone()).collect();
        let sorted_ids = store::groups_upsert(tx, &vm.subscription_id, &sorted).await?;
        let mut ids = vec![Uuid::nil(); reports.len()];
        for (&i, id) in order.iter().zip(sorted_ids) {
            ids[i] = id;
        }
        let mut replicas = Vec::new();
        for ((group, local), id) in reported.availability_groups.iter().zip(&locals).zip(&ids) {
            let Some(local) = local else {
                tracing::warn!(vm = %vm.id, group = %group.name, "a discovery reported a group without this VM's replica");
                continue;
            };
            let Some(&instance) = instance_id.get(&local.instance.to_lowercase()) else {
                tracing::warn!(vm = %vm.id, group = %group.name, instance = %local.instance, "a replica on an instance the discovery did not report");
                continue;
            };
            replicas.push(ReplicaWrite {
                availability_group_id: *id,
                instance_id: instance,
                role: local.role,
                health: local.synchronization_health,
                backup_priority: i16::from(local.backup_priority),
            });
        }
        // Two entries for one group (a misbehaving agent) would make the upsert touch a
        // row twice: the first one stands.
        let mut seen = std::collections::HashSet::new();
        replicas.retain(|r| seen.insert(r.availability_group_id));
        store::replicas_replace(tx, vm.id, &replicas).await?;
        let by_name = reported
            .availability_groups
            .iter()
            .zip(&ids)
            .map(|(g, id)| (g.name.to_lowercase(), *id))
            .collect();
        let mut all = ids;
        all.sort_unstable();
        all.dedup();
        Ok(ReportedGroups { by_name, ids: all })
    }

    /// After the groups' replicas changed: items follow the primary, routes are computed
    /// afresh, and queued jobs go where the routes now say.
    pub(crate) async fn groups_changed(
        &self,
        tx: &mut PgConnection,
        groups: &[Uuid],
    ) -> Result<()> {
        if groups.is_empty() {
            return Ok(());
        }
        store::items_follow_primary(tx, groups).await?;
        self.refresh_routes(tx, Some(groups)).await?;
        store::queue_reroute(tx, Some(groups)).await?;
        Ok(())
    }

    /// Computes the routes of the given groups (every group with a protected database when
    /// None) from the replicas' latest reports and their agents' heartbeats.
    pub(crate) async fn refresh_routes(
        &self,
        tx: &mut PgConnection,
        groups: Option<&[Uuid]>,
    ) -> Result<()> {
        let rows = store::routing_inputs(&mut *tx, groups).await?;
        let heard_since = self.agents_heard_since();
        let mut by_group: BTreeMap<
            Uuid,
            (backvault_domain::agent::BackupPreference, Vec<ReplicaState>),
        > = BTreeMap::new();
        for r in rows {
            let entry = by_group
                .entry(r.availability_group_id)
                .or_insert_with(|| (r.backup_preference, Vec::new()));
            let (Some(vm_id), Some(role), Some(health), Some(priority)) =
                (r.vm_id, r.role, r.health, r.backup_priority)
            else {
                continue;
            };
            entry.1.push(ReplicaState {
                vm_id,
                role,
                health,
                backup_priority: u8::try_from(priority).unwrap_or(0),
                reachable: r.registered == Some(true)
                    && r.last_seen_at.is_some_and(|seen| seen >= heard_since),
            });
        }
        let routes: Vec<Route> = by_group
            .into_iter()
            .map(|(id, (preference, replicas))| {
                let primary = route(RecoveryPointType::Full, preference, &replicas);
                let preferred = route(RecoveryPointType::Log, preference, &replicas);
                Route {
                    availability_group_id: id,
                    primary_vm_id: primary.ok(),
                    primary_unroutable: primary.err().map(|e| e.message()),
                    preferred_vm_id: preferred.ok(),
                    preferred_unroutable: preferred.err().map(|e| e.message()),
                }
            })
            .collect();
        store::routes_set(tx, &routes).await?;
        Ok(())
    }

    /// Routes of every group with a protected database, and queued jobs moved to them: run
    /// by the scheduler before it enqueues, so that heartbeats that stopped (or resumed)
    /// since the last discovery count.
    pub(crate) async fn reroute_groups(&self) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        // One replica of the server does it per tick; the others' ticks find it done.
        if !backvault_store::try_lead(&mut tx, REROUTE_LOCK).await? {
            return Ok(());
        }
        self.refresh_routes(&mut tx, None).await?;
        store::queue_reroute(&mut tx, None).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Why `vault_id` cannot protect each group, if it cannot (`domain::availability::group_issue`).
pub(crate) async fn group_issues(
    conn: &mut PgConnection,
    vault_id: Uuid,
    groups: &[Uuid],
) -> Result<HashMap<Uuid, Option<GroupIssue>>> {
    let mut members: HashMap<Uuid, Vec<ReplicaVm>> =
        groups.iter().map(|g| (*g, Vec::new())).collect();
    for m in store::group_member_vms(conn, groups).await? {
        let vm = match (m.vm_id, m.vault_id) {
            (Some(_), Some(v)) if v == vault_id => ReplicaVm::InVault,
            (Some(_), Some(_)) => ReplicaVm::OtherVault,
            _ => ReplicaVm::NotRegistered,
        };
        members.entry(m.availability_group_id).or_default().push(vm);
    }
    Ok(members
        .into_iter()
        .map(|(g, vms)| (g, group_issue(&vms)))
        .collect())
}
