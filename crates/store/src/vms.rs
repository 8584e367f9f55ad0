//! The `vms` table: the inventory of VMs that agents enrolled or automation upserted.

use backvault_domain::agent::DeploymentModel;
use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

use crate::Page;

#[derive(Debug, Clone, FromRow)]
pub struct VmRow {
    pub id: Uuid,
    pub subscription_id: String,
    pub resource_group: String,
    pub name: String,
    pub region: String,
    pub deployment_model: DeploymentModel,
    pub agent_installed: bool,
    pub agent_version: Option<String>,
    pub dotnet_version: Option<String>,
    pub sql_iaas_extension: bool,
    pub other_backup_product: bool,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub token_generation: i64,
    /// The vault the VM is registered with.
    pub vault_id: Option<Uuid>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Facts as the store keeps them.
pub struct VmFactsRow<'a> {
    pub subscription_id: &'a str,
    pub resource_group: &'a str,
    pub name: &'a str,
    pub region: &'a str,
    pub deployment_model: DeploymentModel,
    pub agent_version: &'a str,
    pub dotnet_version: &'a str,
    pub sql_iaas_extension: bool,
    pub other_backup_product: bool,
}

// Every statement below that returns a `VmRow` lists its columns as
// `id, subscription_id, resource_group, name, region, deployment_model as "deployment_model: DeploymentModel",
// agent_installed, agent_version, dotnet_version, sql_iaas_extension, other_backup_product, last_seen_at,
// token_generation, vault_id, version, created_at, updated_at` (so do `inventory::vm_lock` and
// `inventory::vms_unregistered`).

/// Inserts or updates the VM an agent enrolls for, marks it heard from, and bumps its
/// token generation so that tokens issued before this enrollment stop working. A VM that
/// already has an agent (a token generation above 0) is left alone unless `replace_agent`:
/// then `None` comes back, decided under the row's lock, so two racing enrollments of one
/// VM cannot both win.
pub async fn vm_enroll(
    conn: &mut PgConnection,
    new_id: Uuid,
    f: &VmFactsRow<'_>,
    replace_agent: bool,
) -> sqlx::Result<Option<VmRow>> {
    sqlx::query_as!(
        VmRow,
        r#"insert into vms (id, subscription_id, resource_group, name, region, deployment_model, agent_installed,
                          agent_version, dotnet_version, sql_iaas_extension, other_backup_product, last_seen_at,
                          token_generation)
         values ($1, $2, $3, $4, $5, $6, true, $7, $8, $9, $10, now(), 1)
         on conflict (subscription_id, lower(resource_group), lower(name)) do update set
             region = excluded.region, deployment_model = excluded.deployment_model, agent_installed = true,
             agent_version = excluded.agent_version, dotnet_version = excluded.dotnet_version,
             sql_iaas_extension = excluded.sql_iaas_extension,
             other_backup_product = excluded.other_backup_product, last_seen_at = now(),
             token_generation = vms.token_generation + 1, version = vms.version + 1, updated_at = now()
         where vms.token_generation = 0 or $11
         returning id, subscription_id, resource_group, name, region,
                   deployment_model as "deployment_model: DeploymentModel", agent_installed, agent_version,
                   dotnet_version, sql_iaas_extension, other_backup_product, last_seen_at, token_generation, vault_id,
                   version, created_at, updated_at"#,
        new_id,
        f.subscription_id,
        f.resource_group,
        f.name,
        f.region,
        f.deployment_model as DeploymentModel,
        f.agent_version,
        f.dotnet_version,
        f.sql_iaas_extension,
        f.other_backup_product,
        replace_agent,
    )
    .fetch_optional(conn)
    .await
}

/// An agent refreshing its token: the VM's facts are updated and it is marked heard from,
/// if `generation` is still its token generation (else `None`). The generation stays, so
/// the token the agent refreshed keeps working until it expires.
pub async fn vm_refresh(
    conn: &mut PgConnection,
    id: Uuid,
    generation: i64,
    f: &VmFactsRow<'_>,
) -> sqlx::Result<Option<VmRow>> {
    sqlx::query_as!(
        VmRow,
        r#"update vms set
             region = $3, deployment_model = $4, agent_installed = true, agent_version = $5,
             dotnet_version = $6, sql_iaas_extension = $7, other_backup_product = $8,
             last_seen_at = now(), version = version + 1, updated_at = now()
         where id = $1 and token_generation = $2
         returning id, subscription_id, resource_group, name, region,
                   deployment_model as "deployment_model: DeploymentModel", agent_installed, agent_version,
                   dotnet_version, sql_iaas_extension, other_backup_product, last_seen_at, token_generation, vault_id,
                   version, created_at, updated_at"#,
        id,
        generation,
        f.region,
        f.deployment_model as DeploymentModel,
        f.agent_version,
        f.dotnet_version,
        f.sql_iaas_extension,
        f.other_backup_product,
    )
    .fetch_optional(conn)
    .await
}

pub async fn vm_get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<VmRow>> {
    sqlx::query_as!(
        VmRow,
        r#"select id, subscription_id, resource_group, name, region,
                  deployment_model as "deployment_model: DeploymentModel", agent_installed, agent_version,
                  dotnet_version, sql_iaas_extension, other_backup_product, last_seen_at, token_generation, vault_id,
                  version, created_at, updated_at
         from vms where id = $1"#,
        id,
    )
    .fetch_optional(db)
    .await
}

/// The current token generation, or `None` when the VM was removed.
pub async fn vm_token_generation(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar!("select token_generation from vms where id = $1", id)
        .fetch_optional(db)
        .await
}

#[derive(Debug, Default)]
pub struct VmFilter<'a> {
    pub subscriptions: Option<&'a [String]>,
    pub subscription_id: Option<&'a str>,
    pub resource_group: Option<&'a str>,
    pub region: Option<&'a str>,
    pub registered: Option<bool>,
}

pub async fn vm_list(
    db: impl PgExecutor<'_>,
    f: &VmFilter<'_>,
    page: Page,
) -> sqlx::Result<Vec<VmRow>> {
    sqlx::query_as!(
        VmRow,
        r#"select id, subscription_id, resource_group, name, region,
                  deployment_model as "deployment_model: DeploymentModel", agent_installed, agent_version,
                  dotnet_version, sql_iaas_extension, other_backup_product, last_seen_at, token_generation, vault_id,
                  version, created_at, updated_at
         from vms
         where ($1::text[] is null or subscription_id = any($1))
           and ($2::text is null or subscription_id = $2)
           and ($3::text is null or lower(resource_group) = lower($3))
           and ($4::text is null or lower(region) = lower($4))
           and ($5::bool is null or (vault_id is not null) = $5)
           and ($6::uuid is null or id > $6)
         order by id limit $7"#,
        f.subscriptions,
        f.subscription_id,
        f.resource_group,
        f.region,
        f.registered,
        page.after,
        page.limit,
    )
    .fetch_all(db)
    .await
}

/// A VM upserted, and whether the upsert created it.
#[derive(Debug, Clone)]
pub struct VmUpserted {
    pub vm: VmRow,
    pub created: bool,
}

/// Inserts or updates a VM from inventory automation. Only placement facts change; what
/// the agent reports (and its tokens) is left alone.
pub async fn vm_upsert(
    conn: &mut PgConnection,
    new_id: Uuid,
    f: &VmFactsRow<'_>,
) -> sqlx::Result<VmUpserted> {
    let row: VmRow = sqlx::query_as!(
        VmRow,
        r#"insert into vms (id, subscription_id, resource_group, name, region, deployment_model)
         values ($1, $2, $3, $4, $5, $6)
         on conflict (subscription_id, lower(resource_group), lower(name)) do update set
             region = excluded.region, deployment_model = excluded.deployment_model,
             version = vms.version + 1, updated_at = now()
         returning id, subscription_id, resource_group, name, region,
                   deployment_model as "deployment_model: DeploymentModel", agent_installed, agent_version,
                   dotnet_version, sql_iaas_extension, other_backup_product, last_seen_at, token_generation, vault_id,
                   version, created_at, updated_at"#,
        new_id,
        f.subscription_id,
        f.resource_group,
        f.name,
        f.region,
        f.deployment_model as DeploymentModel,
    )
    .fetch_one(conn)
    .await?;
    Ok(VmUpserted {
        created: row.id == new_id,
        vm: row,
    })
}

/// Records that the agent was heard from, with new facts when it sent them. Only the
/// mutable facts change; identity (name, resource group, subscription) is fixed at
/// enrollment.
pub async fn vm_heartbeat(
    db: impl PgExecutor<'_>,
    id: Uuid,
    facts: Option<&VmFactsRow<'_>>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "update vms set last_seen_at = now(),
             agent_version = coalesce($2, agent_version), dotnet_version = coalesce($3, dotnet_version),
             sql_iaas_extension = coalesce($4, sql_iaas_extension),
             other_backup_product = coalesce($5, other_backup_product)
         where id = $1",
        id,
        facts.map(|f| f.agent_version),
        facts.map(|f| f.dotnet_version),
        facts.map(|f| f.sql_iaas_extension),
        facts.map(|f| f.other_backup_product),
    )
    .execute(db)
    .await?;
    Ok(())
}

pub async fn vm_delete(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<bool> {
    let done = sqlx::query!("delete from vms where id = $1", id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}
