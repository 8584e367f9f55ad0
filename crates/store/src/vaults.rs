//! The `vaults` table.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

use crate::Page;

#[derive(Debug, Clone, FromRow)]
pub struct VaultRow {
    pub id: Uuid,
    pub subscription_id: String,
    pub resource_group: String,
    pub name: String,
    pub region: String,
    pub description: String,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub struct NewVault<'a> {
    pub id: Uuid,
    pub subscription_id: &'a str,
    pub resource_group: &'a str,
    pub name: &'a str,
    pub region: &'a str,
    pub description: &'a str,
}

// Every statement below that returns a `VaultRow` lists its columns as
// `id, subscription_id, resource_group, name, region, description, version, created_at, updated_at`.

pub async fn vault_insert(conn: &mut PgConnection, v: NewVault<'_>) -> sqlx::Result<VaultRow> {
    sqlx::query_as!(
        VaultRow,
        "insert into vaults (id, subscription_id, resource_group, name, region, description)
         values ($1, $2, $3, $4, $5, $6)
         returning id, subscription_id, resource_group, name, region, description, version, created_at, updated_at",
        v.id,
        v.subscription_id,
        v.resource_group,
        v.name,
        v.region,
        v.description,
    )
    .fetch_one(conn)
    .await
}

pub async fn vault_get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<VaultRow>> {
    sqlx::query_as!(
        VaultRow,
        "select id, subscription_id, resource_group, name, region, description, version, created_at, updated_at
         from vaults where id = $1",
        id,
    )
    .fetch_optional(db)
    .await
}

/// Vaults in the given subscriptions (`None`: all), in creation order.
pub async fn vault_list(
    db: impl PgExecutor<'_>,
    subscriptions: Option<&[String]>,
    page: Page,
) -> sqlx::Result<Vec<VaultRow>> {
    sqlx::query_as!(
        VaultRow,
        "select id, subscription_id, resource_group, name, region, description, version, created_at, updated_at
         from vaults
         where ($1::text[] is null or subscription_id = any($1))
           and ($2::uuid is null or id > $2)
         order by id limit $3",
        subscriptions,
        page.after,
        page.limit,
    )
    .fetch_all(db)
    .await
}

/// Updates the description when the version matches (`None`: any). `None` back means no
/// row matched: the vault is gone or the version moved on.
pub async fn vault_update(
    conn: &mut PgConnection,
    id: Uuid,
    expected_version: Option<i64>,
    description: &str,
) -> sqlx::Result<Option<VaultRow>> {
    sqlx::query_as!(
        VaultRow,
        "update vaults set description = $3, version = version + 1, updated_at = now()
         where id = $1 and ($2::bigint is null or version = $2)
         returning id, subscription_id, resource_group, name, region, description, version, created_at, updated_at",
        id,
        expected_version,
        description,
    )
    .fetch_optional(conn)
    .await
}

/// Deletes when the version matches. Rows that reference the vault with `on delete
/// restrict` (registered VMs, protected items) make this fail with a foreign-key error.
pub async fn vault_delete(
    conn: &mut PgConnection,
    id: Uuid,
    expected_version: Option<i64>,
) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "delete from vaults where id = $1 and ($2::bigint is null or version = $2)",
        id,
        expected_version,
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
