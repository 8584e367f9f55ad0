//! What discovery found on registered VMs: SQL instances, availability groups and
//! databases, plus registration of VMs with vaults.

use backvault_domain::agent::{DeploymentModel, RecoveryModel};
use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

/// Registers the VM with the vault (the caller checked the prerequisites under the row
/// lock of [`vm_lock`]).
pub async fn vm_register(
    conn: &mut PgConnection,
    vm_id: Uuid,
    vault_id: Uuid,
    next_discovery_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "update vms set vault_id = $2, registered_at = coalesce(registered_at, now()), next_discovery_at = $3,
                        updated_at = now()
         where id = $1",
        vm_id,
        vault_id,
        next_discovery_at,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Locks the VM row so that registration decisions are serialized per VM.
pub async fn vm_lock(
    conn: &mut PgConnection,
    vm_id: Uuid,
) -> sqlx::Result<Option<crate::vms::VmRow>> {
    sqlx::query_as!(
        crate::vms::VmRow,
        r#"select id, subscription_id, resource_group, name, region,
                  deployment_model as "deployment_model: DeploymentModel", agent_installed, agent_version,
                  dotnet_version, sql_iaas_extension, other_backup_product, last_seen_at, token_generation, vault_id,
                  version, created_at, updated_at
           from vms where id = $1 for update"#,
        vm_id,
    )
    .fetch_optional(conn)
    .await
}

pub async fn vm_vault(db: impl PgExecutor<'_>, vm_id: Uuid) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar!("select vault_id from vms where id = $1", vm_id)
        .fetch_optional(db)
        .await
        .map(Option::flatten)
}

pub async fn vm_unregister(conn: &mut PgConnection, vm_id: Uuid) -> sqlx::Result<()> {
    sqlx::query!(
        "delete from auto_protection_intents where instance_id in (select id from sql_instances where vm_id = $1)",
        vm_id,
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "update vms set vault_id = null, registered_at = null, next_discovery_at = null, updated_at = now() where id = $1",
        vm_id,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Unregistered VMs of a subscription: what "Start Discovery" lists.
pub async fn vms_unregistered(
    db: impl PgExecutor<'_>,
    subscription_id: &str,
) -> sqlx::Result<Vec<crate::vms::VmRow>> {
    sqlx::query_as!(
        crate::vms::VmRow,
        r#"select id, subscription_id, resource_group, name, region,
                  deployment_model as "deployment_model: DeploymentModel", agent_installed, agent_version,
                  dotnet_version, sql_iaas_extension, other_backup_product, last_seen_at, token_generation, vault_id,
                  version, created_at, updated_at
           from vms where subscription_id = $1 and vault_id is null order by lower(name), lower(resource_group)"#,
        subscription_id,
    )
    .fetch_all(db)
    .await
}

/// A registered VM whose periodic discovery is due.
#[derive(Debug, Clone, FromRow)]
pub struct DiscoveryDue {
    pub id: Uuid,
    pub subscription_id: String,
    pub vault_id: Uuid,
}

/// VMs whose periodic discovery is due, claimed for this replica: their next time moves
/// on in the same statement, so each VM is discovered once per period across replicas.
pub async fn vms_claim_discovery_due(
    conn: &mut PgConnection,
    period: chrono::Duration,
    limit: i64,
) -> sqlx::Result<Vec<DiscoveryDue>> {
    sqlx::query_as!(
        DiscoveryDue,
        // `vault_id!`: the rows claimed are registered ones (`vault_id is not null`).
        r#"with due as (
               select id from vms where vault_id is not null and next_discovery_at <= now()
               order by next_discovery_at limit $2 for update skip locked
           )
           update vms set next_discovery_at = now() + $1::interval from due where vms.id = due.id
           returning vms.id, vms.subscription_id, vms.vault_id as "vault_id!""#,
        period as chrono::Duration,
        limit,
    )
    .fetch_all(conn)
    .await
}

#[derive(Debug, Clone, FromRow)]
pub struct InstanceRow {
    pub id: Uuid,
    pub vm_id: Uuid,
    pub name: String,
    pub version: String,
    pub gone_at: Option<DateTime<Utc>>,
}

/// Records the instances a discovery reported; the others are marked gone. Returns every
/// instance of the VM (present first).
pub async fn instances_replace(
    conn: &mut PgConnection,
    vm_id: Uuid,
    reported: &[(String, String)],
) -> sqlx::Result<Vec<InstanceRow>> {
    let ids: Vec<Uuid> = reported.iter().map(|_| Uuid::now_v7()).collect();
    let names: Vec<&str> = reported.iter().map(|r| r.0.as_str()).collect();
    let versions: Vec<&str> = reported.iter().map(|r| r.1.as_str()).collect();
    sqlx::query!(
        "insert into sql_instances (id, vm_id, name, version)
         select * from unnest($1::uuid[], array_fill($2::uuid, array[cardinality($1::uuid[])]), $3::text[], $4::text[])
         on conflict (vm_id, lower(name)) do update
             set name = excluded.name, version = excluded.version, gone_at = null, updated_at = now()",
        &ids,
        vm_id,
        // Borrowed strings for `text[]` (the macros expect `&[String]`).
        &names as &[&str],
        &versions as &[&str],
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "update sql_instances set gone_at = coalesce(gone_at, now()), updated_at = now()
         where vm_id = $1 and not (lower(name) = any(select lower(n) from unnest($2::text[]) n))",
        vm_id,
        &names as &[&str],
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query_as!(
        InstanceRow,
        "select id, vm_id, name, version, gone_at from sql_instances where vm_id = $1 order by gone_at nulls first, name",
        vm_id,
    )
    .fetch_all(conn)
    .await
}

#[derive(Debug, Clone, FromRow)]
pub struct DatabaseRow {
    pub id: Uuid,
    pub vm_id: Uuid,
    pub instance_id: Uuid,
    pub availability_group_id: Option<Uuid>,
    /// The group database this copy is of, when in an availability group.
    pub ag_database_id: Option<Uuid>,
    /// What a protected item of this database protects: the group database for a copy in
    /// a group, else this database.
    pub item_key: Uuid,
    pub name: String,
    pub recovery_model: RecoveryModel,
    pub system: bool,
    pub read_only: bool,
    pub size_bytes: i64,
    pub gone_at: Option<DateTime<Utc>>,
}

// Every statement that returns a `DatabaseRow` lists its columns as `id, vm_id, instance_id,
// availability_group_id, ag_database_id, item_key as "item_key!", name, recovery_model as
// "recovery_model: RecoveryModel", system, read_only, size_bytes, gone_at` (so does
// `protection::unprotected_under`).

pub async fn databases_of_vm(
    db: impl PgExecutor<'_>,
    vm_id: Uuid,
) -> sqlx::Result<Vec<DatabaseRow>> {
    sqlx::query_as!(
        DatabaseRow,
        r#"select id, vm_id, instance_id, availability_group_id, ag_database_id, item_key as "item_key!", name,
                  recovery_model as "recovery_model: RecoveryModel",
                  system, read_only, size_bytes, gone_at
           from sql_databases where vm_id = $1 order by name"#,
        vm_id,
    )
    .fetch_all(db)
    .await
}

pub async fn databases_get(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
) -> sqlx::Result<Vec<DatabaseRow>> {
    sqlx::query_as!(
        DatabaseRow,
        r#"select id, vm_id, instance_id, availability_group_id, ag_database_id, item_key as "item_key!", name,
                  recovery_model as "recovery_model: RecoveryModel",
                  system, read_only, size_bytes, gone_at
           from sql_databases where id = any($1)"#,
        ids,
    )
    .fetch_all(db)
    .await
}

pub struct DatabaseWrite<'a> {
    pub id: Uuid,
    pub instance_id: Uuid,
    pub availability_group_id: Option<Uuid>,
    pub ag_database_id: Option<Uuid>,
    pub name: &'a str,
    pub recovery_model: RecoveryModel,
    pub system: bool,
    pub read_only: bool,
    pub size_bytes: i64,
}

/// Inserts new databases and updates known ones (by id), all present again.
pub async fn databases_write(
    conn: &mut PgConnection,
    vm_id: Uuid,
    rows: &[DatabaseWrite<'_>],
) -> sqlx::Result<()> {
    for r in rows {
        sqlx::query!(
            "insert into sql_databases (id, vm_id, instance_id, availability_group_id, name, recovery_model, system,
                                        read_only, size_bytes, ag_database_id)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             on conflict (id) do update set instance_id = excluded.instance_id,
                 availability_group_id = excluded.availability_group_id, ag_database_id = excluded.ag_database_id,
                 name = excluded.name,
                 recovery_model = excluded.recovery_model, system = excluded.system, read_only = excluded.read_only,
                 size_bytes = excluded.size_bytes, gone_at = null, updated_at = now()",
            r.id,
            vm_id,
            r.instance_id,
            r.availability_group_id,
            r.name,
            r.recovery_model as RecoveryModel,
            r.system,
            r.read_only,
            r.size_bytes,
            r.ag_database_id,
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Databases a discovery no longer reports: deleted when nothing protects them, marked
/// gone (history kept) when something does.
pub async fn databases_retire(
    conn: &mut PgConnection,
    vm_id: Uuid,
    present: &[Uuid],
) -> sqlx::Result<()> {
    sqlx::query!(
        "delete from sql_databases d where d.vm_id = $1 and not (d.id = any($2))
           and not exists (select 1 from protected_items p where p.database_id = d.id)",
        vm_id,
        present,
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "update sql_databases set gone_at = coalesce(gone_at, now()), updated_at = now()
         where vm_id = $1 and not (id = any($2))",
        vm_id,
        present,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Instance names of a VM by id.
pub async fn instance_names(
    db: impl PgExecutor<'_>,
    vm_id: Uuid,
) -> sqlx::Result<std::collections::HashMap<Uuid, String>> {
    let rows = sqlx::query!("select id, name from sql_instances where vm_id = $1", vm_id)
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.name)).collect())
}

/// A present instance on a VM registered with a vault, with its VM's name and resource
/// group.
#[derive(Debug, Clone, FromRow)]
pub struct VaultInstance {
    pub instance_id: Uuid,
    pub instance_name: String,
    pub version: String,
    pub vm_id: Uuid,
    pub vm_name: String,
    pub resource_group: String,
}

/// Present instances on the VMs registered with a vault, by VM.
pub async fn instances_of_vault(
    db: impl PgExecutor<'_>,
    vault_id: Uuid,
) -> sqlx::Result<Vec<VaultInstance>> {
    sqlx::query_as!(
        VaultInstance,
        "select i.id as instance_id, i.name as instance_name, i.version, v.id as vm_id, v.name as vm_name,
                v.resource_group
         from sql_instances i join vms v on v.id = i.vm_id
         where v.vault_id = $1 and i.gone_at is null order by lower(v.name), v.resource_group, i.name",
        vault_id,
    )
    .fetch_all(db)
    .await
}

/// Whether an instance (present) or an availability group (with a database) lives on a
/// VM registered with the vault.
pub async fn target_in_vault(
    db: impl PgExecutor<'_>,
    instance_id: Option<Uuid>,
    availability_group_id: Option<Uuid>,
    vault_id: Uuid,
) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"select (exists (select 1 from sql_instances i join vms v on v.id = i.vm_id
                           where i.id = $1 and v.vault_id = $3 and i.gone_at is null)
                or exists (select 1 from sql_databases d join vms v on v.id = d.vm_id
                           where d.availability_group_id = $2 and v.vault_id = $3)) as "in_vault!""#,
        instance_id,
        availability_group_id,
        vault_id,
    )
    .fetch_one(db)
    .await
}

/// Every database (present or gone) of the given VMs, ordered as `databases_of_vm`.
pub async fn databases_of_vms(
    db: impl PgExecutor<'_>,
    vm_ids: &[Uuid],
) -> sqlx::Result<Vec<DatabaseRow>> {
    sqlx::query_as!(
        DatabaseRow,
        r#"select id, vm_id, instance_id, availability_group_id, ag_database_id, item_key as "item_key!", name,
                  recovery_model as "recovery_model: RecoveryModel",
                  system, read_only, size_bytes, gone_at
           from sql_databases where vm_id = any($1) order by vm_id, name"#,
        vm_ids,
    )
    .fetch_all(db)
    .await
}

/// A VM and the vault it is registered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmVault {
    pub vm_id: Uuid,
    pub vault_id: Option<Uuid>,
}

/// The vault of each of the given VMs that exists.
pub async fn vm_vaults(db: impl PgExecutor<'_>, vm_ids: &[Uuid]) -> sqlx::Result<Vec<VmVault>> {
    sqlx::query_as!(
        VmVault,
        "select id as vm_id, vault_id from vms where id = any($1)",
        vm_ids,
    )
    .fetch_all(db)
    .await
}
