//! Availability groups: the groups, each VM's replica of them, their databases (one row
//! per group database, however many replicas report it), and where their backups go.

use backvault_domain::agent::{BackupPreference, ReplicaRole, SynchronizationHealth};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::jobs::{notify, notify_payload};

#[derive(Debug, Clone)]
pub struct GroupReport<'a> {
    pub name: &'a str,
    /// None from agents that predate group ids: the group of that name, if any, is meant.
    pub group_id: Option<Uuid>,
    pub backup_preference: BackupPreference,
    pub replicas: serde_json::Value,
    /// The reporting VM is the group's primary: its view of the group's settings wins.
    pub from_primary: bool,
}

/// Upserts the groups one discovery reported; returns their row ids, in order. The name,
/// preference and replica list change only by the primary's report (or the first one), so
/// a secondary's stale view cannot overwrite them.
pub async fn groups_upsert(
    conn: &mut PgConnection,
    subscription_id: &str,
    groups: &[GroupReport<'_>],
) -> sqlx::Result<Vec<Uuid>> {
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        let id = Uuid::now_v7();
        let row: Uuid = sqlx::query_scalar!(
            "insert into availability_groups (id, subscription_id, group_id, name, backup_preference, replicas)
             values ($1, $2,
                     coalesce($3, (select group_id from availability_groups
                                   where subscription_id = $2 and lower(name) = lower($4)
                                   order by created_at limit 1), $1),
                     $4, $5, $6)
             on conflict (subscription_id, group_id) do update
                 set name = case when $7 then excluded.name else availability_groups.name end,
                     backup_preference = case when $7 then excluded.backup_preference
                                              else availability_groups.backup_preference end,
                     replicas = case when $7 then excluded.replicas else availability_groups.replicas end,
                     gone_at = null, updated_at = now()
             returning id",
            id,
            subscription_id,
            g.group_id,
            g.name,
            g.backup_preference as BackupPreference,
            &g.replicas,
            g.from_primary,
        )
        .fetch_one(&mut *conn)
        .await?;
        out.push(row);
    }
    Ok(out)
}

pub struct ReplicaWrite {
    pub availability_group_id: Uuid,
    pub instance_id: Uuid,
    pub role: ReplicaRole,
    pub health: SynchronizationHealth,
    pub backup_priority: i16,
}

/// Replaces the VM's replicas with the ones its discovery reported. A VM that now reports
/// itself primary demotes whichever replica last did to `resolving` (a group has one
/// primary; the demoted one says what it is at its own next discovery).
pub async fn replicas_replace(
    conn: &mut PgConnection,
    vm_id: Uuid,
    replicas: &[ReplicaWrite],
) -> sqlx::Result<()> {
    let groups: Vec<Uuid> = replicas.iter().map(|r| r.availability_group_id).collect();
    let instances: Vec<Uuid> = replicas.iter().map(|r| r.instance_id).collect();
    let roles: Vec<ReplicaRole> = replicas.iter().map(|r| r.role).collect();
    let health: Vec<SynchronizationHealth> = replicas.iter().map(|r| r.health).collect();
    let priorities: Vec<i16> = replicas.iter().map(|r| r.backup_priority).collect();
    sqlx::query!(
        "delete from ag_replicas where vm_id = $1 and not (availability_group_id = any($2))",
        vm_id,
        &groups,
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "update ag_replicas set role = 'resolving'
         where role = 'primary' and vm_id <> $1
           and availability_group_id in (select g from unnest($2::uuid[], $3::text[]) as r (g, role)
                                         where role = 'primary')",
        vm_id,
        &groups,
        &roles as &[ReplicaRole],
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "insert into ag_replicas (availability_group_id, vm_id, instance_id, role, synchronization_health,
                                  backup_priority, reported_at)
         select g, $1, i, role, health, priority, now()
         from unnest($2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::int2[]) as r (g, i, role, health, priority)
         on conflict (availability_group_id, vm_id) do update
             set instance_id = excluded.instance_id, role = excluded.role,
                 synchronization_health = excluded.synchronization_health,
                 backup_priority = excluded.backup_priority, reported_at = now()",
        vm_id,
        &groups,
        &instances,
        &roles as &[ReplicaRole],
        &health as &[SynchronizationHealth],
        &priorities,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A group database's row id, by group and exact name.
#[derive(Debug, Clone)]
pub struct GroupDatabase {
    pub id: Uuid,
    pub availability_group_id: Uuid,
    pub name: String,
}

/// The group databases of (group, name) pairs, created when new.
pub async fn group_databases_upsert(
    conn: &mut PgConnection,
    groups: &[Uuid],
    names: &[&str],
) -> sqlx::Result<Vec<GroupDatabase>> {
    sqlx::query!(
        "insert into ag_databases (id, availability_group_id, name)
         select backvault_uuid_v7(), g, n from unnest($1::uuid[], $2::text[]) as r (g, n)
         on conflict (availability_group_id, name) do nothing",
        groups,
        names as &[&str],
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query_as!(
        GroupDatabase,
        "select a.id, a.availability_group_id, a.name
         from ag_databases a join unnest($1::uuid[], $2::text[]) as r (g, n)
           on a.availability_group_id = r.g and a.name = r.n",
        groups,
        names as &[&str],
    )
    .fetch_all(conn)
    .await
}

/// Items of group databases follow the primary: each one's database row becomes the
/// primary replica's copy (on a VM of the item's vault), so that primary-only work (full,
/// differential, configure) addresses the primary. The item key, and so the item, its chain and its points, stay.
pub async fn items_follow_primary(conn: &mut PgConnection, groups: &[Uuid]) -> sqlx::Result<u64> {
    let moved = sqlx::query!(
        "update protected_items p set database_id = c.id, updated_at = now()
         from sql_databases d, ag_replicas r, sql_databases c, vms cv
         where d.id = p.database_id and d.availability_group_id = any($1) and d.ag_database_id is not null
           and r.availability_group_id = d.availability_group_id and r.role = 'primary'
           and c.ag_database_id = d.ag_database_id and c.vm_id = r.vm_id and c.gone_at is null
           and c.id <> d.id
           -- Never onto a VM outside the item's vault (a replica registered elsewhere).
           and cv.id = c.vm_id and cv.vault_id = p.vault_id",
        groups,
    )
    .execute(conn)
    .await?;
    Ok(moved.rows_affected())
}

/// What routing needs of a group: its preference and, per replica, the latest report and
/// when its agent was last heard from.
#[derive(Debug, Clone)]
pub struct RoutingReplica {
    pub availability_group_id: Uuid,
    pub backup_preference: BackupPreference,
    /// None for a group no replica reports any more.
    pub vm_id: Option<Uuid>,
    pub role: Option<ReplicaRole>,
    pub health: Option<SynchronizationHealth>,
    pub backup_priority: Option<i16>,
    /// Registered with the vault that protects the group's databases (with any vault,
    /// while none is protected).
    pub registered: Option<bool>,
    pub last_seen_at: Option<DateTime<Utc>>,
}

/// Routing inputs of the given groups, or of every group with a protected database when
/// `groups` is None.
pub async fn routing_inputs(
    db: impl PgExecutor<'_>,
    groups: Option<&[Uuid]>,
) -> sqlx::Result<Vec<RoutingReplica>> {
    sqlx::query_as!(
        RoutingReplica,
        r#"select ag.id as "availability_group_id!", ag.backup_preference as "backup_preference!: BackupPreference",
                  r.vm_id as "vm_id?", r.role as "role?: ReplicaRole",
                  r.synchronization_health as "health?: SynchronizationHealth",
                  r.backup_priority as "backup_priority?",
                  (v.vault_id is not null and v.vault_id = coalesce(owner.vault_id, v.vault_id)) as "registered?",
                  v.last_seen_at
           from availability_groups ag
           left join ag_replicas r on r.availability_group_id = ag.id
           left join vms v on v.id = r.vm_id
           -- The vault protecting the group's databases: only its VMs take their backups.
           left join lateral (select p.vault_id from protected_items p
                              join sql_databases d on d.id = p.database_id
                              where d.availability_group_id = ag.id and d.ag_database_id is not null
                              limit 1) owner on true
           where case when $1::uuid[] is null
                      then exists (select 1 from protected_items p join sql_databases d on d.id = p.database_id
                                   where d.availability_group_id = ag.id)
                      else ag.id = any($1) end
           order by ag.id, r.vm_id"#,
        groups,
    )
    .fetch_all(db)
    .await
}

/// A group's computed routes.
pub struct Route {
    pub availability_group_id: Uuid,
    pub primary_vm_id: Option<Uuid>,
    pub primary_unroutable: Option<&'static str>,
    pub preferred_vm_id: Option<Uuid>,
    pub preferred_unroutable: Option<&'static str>,
}

pub async fn routes_set(conn: &mut PgConnection, routes: &[Route]) -> sqlx::Result<()> {
    let ids: Vec<Uuid> = routes.iter().map(|r| r.availability_group_id).collect();
    let primary: Vec<Option<Uuid>> = routes.iter().map(|r| r.primary_vm_id).collect();
    let primary_why: Vec<Option<&str>> = routes.iter().map(|r| r.primary_unroutable).collect();
    let preferred: Vec<Option<Uuid>> = routes.iter().map(|r| r.preferred_vm_id).collect();
    let preferred_why: Vec<Option<&str>> = routes.iter().map(|r| r.preferred_unroutable).collect();
    sqlx::query!(
        "update availability_groups ag
         set primary_vm_id = r.p, primary_unroutable = r.pw, preferred_vm_id = r.s, preferred_unroutable = r.sw,
             routed_at = now()
         from unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::text[]) as r (id, p, pw, s, sw)
         where ag.id = r.id
           and (ag.primary_vm_id, ag.primary_unroutable, ag.preferred_vm_id, ag.preferred_unroutable)
               is distinct from (r.p, r.pw, r.s, r.sw)",
        &ids,
        &primary as &[Option<Uuid>],
        &primary_why as &[Option<&str>],
        &preferred as &[Option<Uuid>],
        &preferred_why as &[Option<&str>],
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves the queued (not running) jobs of the given groups (all groups when None) to the
/// VM their group's route names now, with each item's instance renamed to that replica's
/// instance, and wakes those VMs' agents. A job whose route has no VM stays where it is:
/// the replica there refuses it as SQL Server would, and it runs again later.
pub async fn queue_reroute(
    conn: &mut PgConnection,
    groups: Option<&[Uuid]>,
) -> sqlx::Result<Vec<Uuid>> {
    let moved: Vec<Uuid> = sqlx::query_scalar!(
        r#"with target as (
               select j.id, j.vm_id as old_vm, j.availability_group_id,
                      case when backvault_backup_placement(j.kind, coalesce((j.payload ->> 'copy_only')::boolean, false))
                                = 'primary_only'
                           then ag.primary_vm_id else ag.preferred_vm_id end as vm_id
               from jobs j
               join job_queue q on q.job_id = j.id and not q.running
               join availability_groups ag on ag.id = j.availability_group_id
               where j.availability_group_id is not null and j.status = 'queued'
                 and ($1::uuid[] is null or j.availability_group_id = any($1))
           ), moved as (
               select t.id, t.vm_id, i.name as instance
               from target t
               join ag_replicas r on r.availability_group_id = t.availability_group_id and r.vm_id = t.vm_id
               join sql_instances i on i.id = r.instance_id
               where t.vm_id <> t.old_vm
           ), queue as (
               update job_queue q set vm_id = m.vm_id, run_at = least(q.run_at, now())
               from moved m where q.job_id = m.id
           ), history as (
               update jobs j
               set vm_id = m.vm_id, updated_at = now(),
                   items = (select jsonb_agg(jsonb_set(x.e, '{instance}', to_jsonb(m.instance)) order by x.n)
                            from jsonb_array_elements(j.items) with ordinality as x (e, n))
               from moved m where j.id = m.id
           )
           select distinct vm_id as "vm_id!" from moved"#,
        groups,
    )
    .fetch_all(&mut *conn)
    .await?;
    if !moved.is_empty() {
        notify(&mut *conn, &notify_payload('v', moved.clone())).await?;
    }
    Ok(moved)
}

/// A requested database id resolved: a standalone database's own row, or for a group
/// database (by its id or any replica copy's id) one present copy, the primary's where it
/// reports one.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub requested: Uuid,
    pub database: crate::inventory::DatabaseRow,
}

pub async fn databases_resolve(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
) -> sqlx::Result<Vec<Resolved>> {
    let rows = sqlx::query!(
        r#"select distinct on (k.id) k.id as "requested!",
                  d.id, d.vm_id, d.instance_id, d.availability_group_id, d.ag_database_id, d.item_key as "item_key!",
                  d.name, d.recovery_model as "recovery_model: backvault_domain::agent::RecoveryModel", d.system,
                  d.read_only, d.size_bytes, d.gone_at
           from unnest($1::uuid[]) as k (id)
           join sql_databases d
             on d.item_key = coalesce((select s.item_key from sql_databases s where s.id = k.id), k.id)
           left join ag_replicas r on r.availability_group_id = d.availability_group_id and r.vm_id = d.vm_id
           order by k.id, d.gone_at is null desc, r.role = 'primary' desc nulls last, d.id = k.id desc, d.vm_id"#,
        ids,
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Resolved {
            requested: r.requested,
            database: crate::inventory::DatabaseRow {
                id: r.id,
                vm_id: r.vm_id,
                instance_id: r.instance_id,
                availability_group_id: r.availability_group_id,
                ag_database_id: r.ag_database_id,
                item_key: r.item_key,
                name: r.name,
                recovery_model: r.recovery_model,
                system: r.system,
                read_only: r.read_only,
                size_bytes: r.size_bytes,
                gone_at: r.gone_at,
            },
        })
        .collect())
}

/// A VM that hosts, or is listed as hosting, a replica of a group: by the group's replica
/// list (VM name and resource group in the group's subscription) or by its own report.
#[derive(Debug, Clone)]
pub struct GroupMemberVm {
    pub availability_group_id: Uuid,
    /// None for a listed VM backvault does not know.
    pub vm_id: Option<Uuid>,
    pub vault_id: Option<Uuid>,
}

pub async fn group_member_vms(
    db: impl PgExecutor<'_>,
    groups: &[Uuid],
) -> sqlx::Result<Vec<GroupMemberVm>> {
    sqlx::query_as!(
        GroupMemberVm,
        r#"select ag.id as "availability_group_id!", v.id as "vm_id?", v.vault_id as "vault_id?"
           from availability_groups ag
           cross join lateral jsonb_array_elements(ag.replicas) as m (replica)
           left join vms v on v.subscription_id = ag.subscription_id
                          and lower(v.resource_group) = lower(m.replica ->> 'resource_group')
                          and lower(v.name) = lower(m.replica ->> 'vm_name')
           where ag.id = any($1)
           union all
           select r.availability_group_id, v.id, v.vault_id
           from ag_replicas r join vms v on v.id = r.vm_id
           where r.availability_group_id = any($1)"#,
        groups,
    )
    .fetch_all(db)
    .await
}

/// A group with one of its reporting replicas, for the views (protectable and protected
/// items).
#[derive(Debug, Clone)]
pub struct GroupReplicaRow {
    pub availability_group_id: Uuid,
    pub name: String,
    pub group_id: Uuid,
    pub backup_preference: BackupPreference,
    pub primary_vm_id: Option<Uuid>,
    pub preferred_vm_id: Option<Uuid>,
    pub preferred_unroutable: Option<String>,
    pub vm_id: Option<Uuid>,
    pub vm_name: Option<String>,
    pub resource_group: Option<String>,
    pub instance: Option<String>,
    pub role: Option<ReplicaRole>,
    pub health: Option<SynchronizationHealth>,
    pub backup_priority: Option<i16>,
    pub reported_at: Option<DateTime<Utc>>,
    pub last_seen_at: Option<DateTime<Utc>>,
}

pub async fn group_replicas(
    db: impl PgExecutor<'_>,
    groups: &[Uuid],
) -> sqlx::Result<Vec<GroupReplicaRow>> {
    sqlx::query_as!(
        GroupReplicaRow,
        r#"select ag.id as "availability_group_id!", ag.name as "name!", ag.group_id as "group_id!",
                  ag.backup_preference as "backup_preference!: BackupPreference",
                  ag.primary_vm_id, ag.preferred_vm_id, ag.preferred_unroutable,
                  r.vm_id as "vm_id?", v.name as "vm_name?", v.resource_group as "resource_group?",
                  i.name as "instance?", r.role as "role?: ReplicaRole",
                  r.synchronization_health as "health?: SynchronizationHealth",
                  r.backup_priority as "backup_priority?", r.reported_at as "reported_at?", v.last_seen_at
           from availability_groups ag
           left join ag_replicas r on r.availability_group_id = ag.id
           left join vms v on v.id = r.vm_id
           left join sql_instances i on i.id = r.instance_id
           where ag.id = any($1)
           order by ag.id, lower(v.name), v.resource_group"#,
        groups,
    )
    .fetch_all(db)
    .await
}

/// Where a group's backup of one placement goes now: the VM and that replica's instance,
/// or why none can take it.
#[derive(Debug, Clone)]
pub struct RoutedTo {
    pub vm_id: Option<Uuid>,
    pub instance: Option<String>,
    pub unroutable: Option<String>,
}

pub async fn route_of(
    db: impl PgExecutor<'_>,
    group: Uuid,
    primary_only: bool,
) -> sqlx::Result<RoutedTo> {
    sqlx::query_as!(
        RoutedTo,
        r#"select case when $2 then ag.primary_vm_id else ag.preferred_vm_id end as vm_id,
                  i.name as "instance?",
                  case when $2 then ag.primary_unroutable else ag.preferred_unroutable end as unroutable
           from availability_groups ag
           left join ag_replicas r
             on r.availability_group_id = ag.id
            and r.vm_id = case when $2 then ag.primary_vm_id else ag.preferred_vm_id end
           left join sql_instances i on i.id = r.instance_id
           where ag.id = $1"#,
        group,
        primary_only,
    )
    .fetch_one(db)
    .await
}

/// The instance hosting the group's replica on a VM, if the VM hosts one.
pub async fn replica_instance(
    db: impl PgExecutor<'_>,
    group: Uuid,
    vm_id: Uuid,
) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar!(
        "select i.name from ag_replicas r join sql_instances i on i.id = r.instance_id
         where r.availability_group_id = $1 and r.vm_id = $2",
        group,
        vm_id,
    )
    .fetch_optional(db)
    .await
}

/// The availability group a job's databases belong to, if any.
pub async fn group_of_job(db: impl PgExecutor<'_>, job_id: Uuid) -> sqlx::Result<Option<Uuid>> {
    let group = sqlx::query_scalar!(
        "select availability_group_id from jobs where id = $1",
        job_id
    )
    .fetch_optional(db)
    .await?;
    Ok(group.flatten())
}
