//! Protected items (a database under a policy in a vault) and auto-protection intents.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

use crate::Page;

/// A protected item with the identity of its database, so that two VMs of the same name
/// in different resource groups never look alike.
#[derive(Debug, Clone, FromRow)]
pub struct ProtectedItemRow {
    pub id: Uuid,
    pub vault_id: Uuid,
    pub database_id: Uuid,
    pub policy_id: Option<Uuid>,
    pub policy_name: Option<String>,
    pub state: String,
    pub auto_protection_id: Option<Uuid>,
    pub auto_protected: bool,
    pub protected_name: String,
    pub casing_changed: bool,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub vm_id: Uuid,
    pub vm_name: String,
    pub resource_group: String,
    pub subscription_id: String,
    pub instance_name: String,
    pub availability_group: Option<String>,
    pub database_name: String,
    pub recovery_model: String,
    pub system: bool,
    pub read_only: bool,
    pub database_gone: bool,
    pub last_full_at: Option<DateTime<Utc>>,
    pub last_differential_at: Option<DateTime<Utc>>,
    pub last_log_at: Option<DateTime<Utc>>,
    pub needs_full: bool,
    pub needs_differential: bool,
}

const ITEM_SELECT: &str = "select p.id, p.vault_id, p.database_id, p.policy_id, pol.name as policy_name, p.state,
        p.auto_protection_id, p.auto_protected, p.protected_name, p.casing_changed, p.version, p.created_at, p.updated_at,
        d.vm_id, v.name as vm_name, v.resource_group, v.subscription_id, i.name as instance_name,
        ag.name as availability_group, d.name as database_name, d.recovery_model, d.system, d.read_only,
        d.gone_at is not null as database_gone, p.last_full_at, p.last_differential_at, p.last_log_at, p.needs_full,
        p.needs_differential
    from protected_items p
    join sql_databases d on d.id = p.database_id
    join sql_instances i on i.id = d.instance_id
    join vms v on v.id = d.vm_id
    left join availability_groups ag on ag.id = d.availability_group_id
    left join policies pol on pol.id = p.policy_id";

pub struct NewItem {
    pub id: Uuid,
    pub database_id: Uuid,
    pub protected_name: String,
}

/// Inserts items in state `protecting`. A database protected meanwhile (by another
/// request or vault) fails on `protected_items_database_key`.
pub async fn items_insert(
    conn: &mut PgConnection,
    vault_id: Uuid,
    policy_id: Uuid,
    auto_protection_id: Option<Uuid>,
    items: &[NewItem],
) -> sqlx::Result<()> {
    let ids: Vec<Uuid> = items.iter().map(|i| i.id).collect();
    let dbs: Vec<Uuid> = items.iter().map(|i| i.database_id).collect();
    let names: Vec<&str> = items.iter().map(|i| i.protected_name.as_str()).collect();
    sqlx::query(
        "insert into protected_items (id, vault_id, database_id, policy_id, state, auto_protection_id, auto_protected,
                                      protected_name)
         select id, $4, database_id, $5, 'protecting', $6, $6 is not null, name
         from unnest($1::uuid[], $2::uuid[], $3::text[]) as i(id, database_id, name)",
    )
    .bind(&ids)
    .bind(&dbs)
    .bind(&names)
    .bind(vault_id)
    .bind(policy_id)
    .bind(auto_protection_id)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn item_get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<ProtectedItemRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{ITEM_SELECT} where p.id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await
}

#[derive(Debug, Default)]
pub struct ItemFilter {
    pub state: Option<String>,
    pub policy_id: Option<Uuid>,
    pub vm_id: Option<Uuid>,
    pub auto_protected: Option<bool>,
}

pub async fn items_list(
    db: impl PgExecutor<'_>,
    vault_id: Uuid,
    f: &ItemFilter,
    page: Page,
) -> sqlx::Result<Vec<ProtectedItemRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{ITEM_SELECT}
         where p.vault_id = $1 and ($2::text is null or p.state = $2) and ($3::uuid is null or p.policy_id = $3)
           and ($4::uuid is null or d.vm_id = $4)
           and ($5::bool is null or p.auto_protected = $5)
           and ($6::uuid is null or p.id > $6)
         order by p.id limit $7"
    )))
    .bind(vault_id)
    .bind(f.state.as_deref())
    .bind(f.policy_id)
    .bind(f.vm_id)
    .bind(f.auto_protected)
    .bind(page.after)
    .bind(page.limit)
    .fetch_all(db)
    .await
}

/// Of `ids`, the protected items whose database is on `vm_id`.
pub async fn items_of_vm(
    db: impl PgExecutor<'_>,
    vm_id: Uuid,
    ids: &[Uuid],
) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(
        "select p.id from protected_items p join sql_databases d on d.id = p.database_id \
         where d.vm_id = $1 and p.id = any($2)",
    )
    .bind(vm_id)
    .bind(ids)
    .fetch_all(db)
    .await
}

/// Protection state of databases: `(database_id, item_id, vault_id, state)`.
pub async fn items_for_databases(
    db: impl PgExecutor<'_>,
    database_ids: &[Uuid],
) -> sqlx::Result<Vec<(Uuid, Uuid, Uuid, String)>> {
    sqlx::query_as(
        "select database_id, id, vault_id, state from protected_items where database_id = any($1)",
    )
    .bind(database_ids)
    .fetch_all(db)
    .await
}

pub async fn items_set_state(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
    from: &str,
    to: &str,
) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "update protected_items set state = $3, version = version + 1, updated_at = now()
         where id = any($1) and state = $2",
    )
    .bind(ids)
    .bind(from)
    .bind(to)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Removes items whose protection never completed (the database stays unprotected).
pub async fn items_delete_protecting(db: impl PgExecutor<'_>, ids: &[Uuid]) -> sqlx::Result<u64> {
    let done =
        sqlx::query("delete from protected_items where id = any($1) and state = 'protecting'")
            .bind(ids)
            .execute(db)
            .await?;
    Ok(done.rows_affected())
}

/// Changes policy and/or state when the version matches; `None` when it does not.
pub async fn item_update(
    conn: &mut PgConnection,
    id: Uuid,
    expected_version: Option<i64>,
    policy_id: Option<Uuid>,
    state: &str,
) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "update protected_items set policy_id = $3, state = $4, version = version + 1, updated_at = now()
         where id = $1 and ($2::bigint is null or version = $2) returning version",
    )
    .bind(id)
    .bind(expected_version)
    .bind(policy_id)
    .bind(state)
    .fetch_optional(conn)
    .await
}

pub async fn item_delete(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("delete from protected_items where id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn items_on_vm(db: impl PgExecutor<'_>, vm_id: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "select count(*) from protected_items p join sql_databases d on d.id = p.database_id where d.vm_id = $1",
    )
    .bind(vm_id)
    .fetch_one(db)
    .await
}

/// Flags items whose database came back with another casing.
pub async fn items_flag_casing(db: impl PgExecutor<'_>, database_ids: &[Uuid]) -> sqlx::Result<()> {
    sqlx::query("update protected_items set casing_changed = true, updated_at = now() where database_id = any($1)")
        .bind(database_ids)
        .execute(db)
        .await?;
    Ok(())
}

/// On-demand fulls of an item since `since` (jobs keep the item in their `items`).
pub async fn on_demand_fulls_since(
    db: impl PgExecutor<'_>,
    item_id: Uuid,
    since: DateTime<Utc>,
) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "select count(*) from jobs where kind = 'backup_full' and priority = 0 and created_at >= $2
           and status <> 'cancelled' and coalesce(payload ->> 'copy_only', 'false') = 'false'
           and items @> jsonb_build_array(jsonb_build_object('protected_item_id', $1::text))",
    )
    .bind(item_id)
    .bind(since)
    .fetch_one(db)
    .await
}

#[derive(Debug, Clone, FromRow)]
pub struct IntentRow {
    pub id: Uuid,
    pub vault_id: Uuid,
    pub policy_id: Uuid,
    pub policy_name: String,
    pub instance_id: Option<Uuid>,
    pub availability_group_id: Option<Uuid>,
    pub target_name: String,
    pub created_at: DateTime<Utc>,
}

const INTENT_SELECT: &str =
    "select a.id, a.vault_id, a.policy_id, pol.name as policy_name, a.instance_id,
        a.availability_group_id, coalesce(i.name, ag.name) as target_name, a.created_at
    from auto_protection_intents a
    join policies pol on pol.id = a.policy_id
    left join sql_instances i on i.id = a.instance_id
    left join availability_groups ag on ag.id = a.availability_group_id";

pub async fn intent_insert(
    conn: &mut PgConnection,
    id: Uuid,
    vault_id: Uuid,
    policy_id: Uuid,
    instance_id: Option<Uuid>,
    availability_group_id: Option<Uuid>,
) -> sqlx::Result<()> {
    sqlx::query(
        "insert into auto_protection_intents (id, vault_id, policy_id, instance_id, availability_group_id)
         values ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(vault_id)
    .bind(policy_id)
    .bind(instance_id)
    .bind(availability_group_id)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn intent_get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<IntentRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{INTENT_SELECT} where a.id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await
}

pub async fn intents_of_vault(
    db: impl PgExecutor<'_>,
    vault_id: Uuid,
) -> sqlx::Result<Vec<IntentRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{INTENT_SELECT} where a.vault_id = $1 order by a.id"
    )))
    .bind(vault_id)
    .fetch_all(db)
    .await
}

pub async fn intent_delete(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<bool> {
    let done = sqlx::query("delete from auto_protection_intents where id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Intents that cover databases on this VM: on its instances, or on groups with a
/// database here.
pub async fn intents_for_vm(db: impl PgExecutor<'_>, vm_id: Uuid) -> sqlx::Result<Vec<IntentRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{INTENT_SELECT}
         where a.instance_id in (select id from sql_instances where vm_id = $1)
            or a.availability_group_id in (select availability_group_id from sql_databases where vm_id = $1)"
    )))
    .bind(vm_id)
    .fetch_all(db)
    .await
}

/// Present, unprotected databases under an intent's target.
pub async fn unprotected_under(
    db: impl PgExecutor<'_>,
    instance_id: Option<Uuid>,
    availability_group_id: Option<Uuid>,
) -> sqlx::Result<Vec<crate::inventory::DatabaseRow>> {
    sqlx::query_as(
        "select d.id, d.vm_id, d.instance_id, d.availability_group_id, d.name, d.recovery_model, d.system,
                d.read_only, d.size_bytes, d.gone_at
         from sql_databases d
         where d.gone_at is null
           and (d.instance_id = $1 or d.availability_group_id = $2)
           and not exists (select 1 from protected_items p where p.database_id = d.id)
         order by d.vm_id, d.name",
    )
    .bind(instance_id)
    .bind(availability_group_id)
    .fetch_all(db)
    .await
}

/// The policies of these protected items.
pub async fn items_policies(db: impl PgExecutor<'_>, item_ids: &[Uuid]) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(
        "select distinct policy_id from protected_items where id = any($1) and policy_id is not null",
    )
    .bind(item_ids)
    .fetch_all(db)
    .await
}
