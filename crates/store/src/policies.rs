//! The `policies` table. The spec is stored as the JSON the administrator wrote.

use backvault_domain::policy::PolicySpec;
use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, PgExecutor, types::Json};
use uuid::Uuid;

use crate::Page;

#[derive(Debug, Clone, FromRow)]
pub struct PolicyRow {
    pub id: Uuid,
    pub vault_id: Uuid,
    pub name: String,
    pub spec: Json<serde_json::Value>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

// Every statement below that returns a `PolicyRow` lists its columns as
// `id, vault_id, name, spec as "spec: Json<serde_json::Value>", version, created_at, updated_at`.

pub async fn policy_insert(
    conn: &mut PgConnection,
    id: Uuid,
    vault_id: Uuid,
    name: &str,
    spec: &serde_json::Value,
) -> sqlx::Result<PolicyRow> {
    sqlx::query_as!(
        PolicyRow,
        r#"insert into policies (id, vault_id, name, spec) values ($1, $2, $3, $4)
           returning id, vault_id, name, spec as "spec: Json<serde_json::Value>", version, created_at, updated_at"#,
        id,
        vault_id,
        name,
        spec,
    )
    .fetch_one(conn)
    .await
}

/// Looks a policy up by name within its vault, ignoring case.
pub async fn policy_get(
    db: impl PgExecutor<'_>,
    vault_id: Uuid,
    name: &str,
) -> sqlx::Result<Option<PolicyRow>> {
    sqlx::query_as!(
        PolicyRow,
        r#"select id, vault_id, name, spec as "spec: Json<serde_json::Value>", version, created_at, updated_at
           from policies where vault_id = $1 and lower(name) = lower($2)"#,
        vault_id,
        name,
    )
    .fetch_optional(db)
    .await
}

/// A policy of a page read with its vault's subscription, and its spec decoded straight
/// into its type (no `serde_json::Value` in between).
#[derive(Debug, Clone, FromRow)]
pub struct PolicyPageRow {
    pub vault_subscription_id: String,
    pub id: Uuid,
    pub vault_id: Uuid,
    pub name: String,
    pub spec: Json<PolicySpec>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A page of the vault's policies, each with the vault's subscription, so that a caller can
/// check the vault's visibility without a statement of its own. No rows: the page is empty
/// or the vault does not exist; [`crate::vaults::vault_get`] tells which.
pub async fn policy_list(
    db: impl PgExecutor<'_>,
    vault_id: Uuid,
    page: Page,
) -> sqlx::Result<Vec<PolicyPageRow>> {
    sqlx::query_as!(
        PolicyPageRow,
        r#"select v.subscription_id as vault_subscription_id, p.id, p.vault_id, p.name,
                  p.spec as "spec: Json<PolicySpec>", p.version, p.created_at, p.updated_at
           from policies p join vaults v on v.id = p.vault_id
           where p.vault_id = $1 and ($2::uuid is null or p.id > $2)
           order by p.id limit $3"#,
        vault_id,
        page.after,
        page.limit,
    )
    .fetch_all(db)
    .await
}

pub async fn policy_replace(
    conn: &mut PgConnection,
    id: Uuid,
    expected_version: Option<i64>,
    spec: &serde_json::Value,
) -> sqlx::Result<Option<PolicyRow>> {
    sqlx::query_as!(
        PolicyRow,
        r#"update policies set spec = $3, version = version + 1, updated_at = now()
           where id = $1 and ($2::bigint is null or version = $2)
           returning id, vault_id, name, spec as "spec: Json<serde_json::Value>", version, created_at, updated_at"#,
        id,
        expected_version,
        spec,
    )
    .fetch_optional(conn)
    .await
}

/// Deletes when the version matches. Protected items and auto-protection intents that
/// use the policy make this fail with a foreign-key error.
pub async fn policy_delete(
    conn: &mut PgConnection,
    id: Uuid,
    expected_version: Option<i64>,
) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "delete from policies where id = $1 and ($2::bigint is null or version = $2)",
        id,
        expected_version,
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
