//! Protected items (a database under a policy in a vault) and auto-protection intents.

use backvault_domain::agent::{RecoveryModel, RecoveryPointType};
use backvault_domain::protection::ProtectionState;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

use crate::Page;

/// The VM each backup type last ran on.
pub type BackupVms = std::collections::BTreeMap<RecoveryPointType, Uuid>;

/// A protected item with the identity of its database, so that two VMs of the same name
/// in different resource groups never look alike.
#[derive(Debug, Clone, FromRow)]
pub struct ProtectedItemRow {
    pub id: Uuid,
    pub vault_id: Uuid,
    pub database_id: Uuid,
    pub policy_id: Option<Uuid>,
    pub policy_name: Option<String>,
    pub state: ProtectionState,
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
    /// Set when the item protects a database of an availability group.
    pub availability_group_id: Option<Uuid>,
    /// The VM each backup type last ran on.
    pub last_backup_vms: Json<BackupVms>,
    pub database_name: String,
    pub recovery_model: RecoveryModel,
    pub system: bool,
    pub read_only: bool,
    pub database_gone: bool,
    pub last_full_at: Option<DateTime<Utc>>,
    pub last_differential_at: Option<DateTime<Utc>>,
    pub last_log_at: Option<DateTime<Utc>>,
    pub needs_full: bool,
    pub needs_differential: bool,
    /// For a soft-deleted item: when it is purged (and can no longer be undeleted).
    pub purge_after: Option<DateTime<Utc>>,
}

// `item_get` and `items_list` read the same columns (keep them alike): the database's
// identity comes with the item. The page is cut from items joined to their databases alone;
// the VM is joined to the page and the names of the instance, the group and the policy are
// looked up per row. Postgres plans each page afresh (its filters are optional), and
// planning the six tables as one join took 1.5-2.5 ms a page on the `scale` fixture, two to
// three times what running it takes; this form plans in about 0.3 ms. The looked-up names
// are nullable to sqlx: the instance's is not (`instance_id` is a non-null foreign key),
// the group's and the policy's are.

pub struct NewItem {
    pub id: Uuid,
    pub database_id: Uuid,
    pub protected_name: String,
}

/// The constraint that makes a database protected at most once: a group database counts
/// once, whichever replica's copy an item names.
pub const ONE_ITEM_PER_DATABASE: &str = "protected_items_item_key";

/// Inserts items in state `protecting`, each with its database's item key. A database
/// protected meanwhile (by another request or vault, or through another replica's copy)
/// fails on [`ONE_ITEM_PER_DATABASE`].
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
    sqlx::query!(
        "insert into protected_items (id, vault_id, database_id, item_key, policy_id, state, auto_protection_id,
                                      auto_protected, protected_name)
         select i.id, $4, i.database_id, d.item_key, $5, 'protecting', $6::uuid, $6::uuid is not null, i.name
         from unnest($1::uuid[], $2::uuid[], $3::text[]) as i(id, database_id, name)
         join sql_databases d on d.id = i.database_id",
        // `$6::uuid`: the type it is bound with; `is not null` alone leaves it undetermined.
        &ids,
        &dbs,
        // Borrowed strings for `text[]` (the macros expect `&[String]`).
        &names as &[&str],
        vault_id,
        policy_id,
        auto_protection_id,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn item_get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<ProtectedItemRow>> {
    sqlx::query_as!(
        ProtectedItemRow,
        r#"select p.id, p.vault_id, p.database_id, p.policy_id,
                  (select pol.name from policies pol where pol.id = p.policy_id) as "policy_name?",
                  p.state as "state: ProtectionState",
                  p.auto_protection_id, p.auto_protected, p.protected_name, p.casing_changed, p.version, p.created_at,
                  p.updated_at, p.vm_id, v.name as vm_name, v.resource_group, v.subscription_id,
                  (select i.name from sql_instances i where i.id = p.instance_id) as "instance_name!",
                  (select ag.name from availability_groups ag where ag.id = p.availability_group_id) as "availability_group?",
                  case when p.ag_database_id is not null then p.availability_group_id end as availability_group_id,
                  p.last_backup_vms as "last_backup_vms: Json<BackupVms>",
                  p.database_name,
                  p.recovery_model as "recovery_model: RecoveryModel", p.system, p.read_only,
                  p.gone_at is not null as "database_gone!", p.last_full_at,
                  p.last_differential_at, p.last_log_at, p.needs_full as "needs_full!",
                  p.needs_differential as "needs_differential!", p.purge_after
           from (select p.id, p.vault_id, p.database_id, p.policy_id, p.state, p.auto_protection_id, p.auto_protected,
                        p.protected_name, p.casing_changed, p.version, p.created_at, p.updated_at, p.last_backup_vms,
                        p.last_full_at, p.last_differential_at, p.last_log_at, p.needs_full, p.needs_differential,
                        p.purge_after, d.vm_id, d.instance_id, d.availability_group_id, d.ag_database_id,
                        d.name as database_name, d.recovery_model, d.system, d.read_only, d.gone_at
                 from protected_items p join sql_databases d on d.id = p.database_id
                 where p.id = $1) p
           join vms v on v.id = p.vm_id"#,
        id,
    )
    .fetch_optional(db)
    .await
}

#[derive(Debug, Default)]
pub struct ItemFilter {
    pub state: Option<ProtectionState>,
    pub policy_id: Option<Uuid>,
    pub vm_id: Option<Uuid>,
    pub auto_protected: Option<bool>,
    pub availability_group_id: Option<Uuid>,
}

pub async fn items_list(
    db: impl PgExecutor<'_>,
    vault_id: Uuid,
    f: &ItemFilter,
    page: Page,
) -> sqlx::Result<Vec<ProtectedItemRow>> {
    sqlx::query_as!(
        ProtectedItemRow,
        r#"select p.id, p.vault_id, p.database_id, p.policy_id,
                  (select pol.name from policies pol where pol.id = p.policy_id) as "policy_name?",
                  p.state as "state: ProtectionState",
                  p.auto_protection_id, p.auto_protected, p.protected_name, p.casing_changed, p.version, p.created_at,
                  p.updated_at, p.vm_id, v.name as vm_name, v.resource_group, v.subscription_id,
                  (select i.name from sql_instances i where i.id = p.instance_id) as "instance_name!",
                  (select ag.name from availability_groups ag where ag.id = p.availability_group_id) as "availability_group?",
                  case when p.ag_database_id is not null then p.availability_group_id end as availability_group_id,
                  p.last_backup_vms as "last_backup_vms: Json<BackupVms>",
                  p.database_name,
                  p.recovery_model as "recovery_model: RecoveryModel", p.system, p.read_only,
                  p.gone_at is not null as "database_gone!", p.last_full_at,
                  p.last_differential_at, p.last_log_at, p.needs_full as "needs_full!",
                  p.needs_differential as "needs_differential!", p.purge_after
           from (select p.id, p.vault_id, p.database_id, p.policy_id, p.state, p.auto_protection_id, p.auto_protected,
                        p.protected_name, p.casing_changed, p.version, p.created_at, p.updated_at, p.last_backup_vms,
                        p.last_full_at, p.last_differential_at, p.last_log_at, p.needs_full, p.needs_differential,
                        p.purge_after, d.vm_id, d.instance_id, d.availability_group_id, d.ag_database_id,
                        d.name as database_name, d.recovery_model, d.system, d.read_only, d.gone_at
                 from protected_items p join sql_databases d on d.id = p.database_id
                 where p.vault_id = $1 and ($2::text is null or p.state = $2) and ($3::uuid is null or p.policy_id = $3)
                   and ($4::uuid is null or d.vm_id = $4)
                   and ($5::bool is null or p.auto_protected = $5)
                   and ($6::uuid is null or p.id > $6)
                   and ($8::uuid is null or d.ag_database_id is not null and d.availability_group_id = $8)
                 order by p.id limit $7) p
           join vms v on v.id = p.vm_id
           order by p.id"#,
        vault_id,
        f.state as Option<ProtectionState>,
        f.policy_id,
        f.vm_id,
        f.auto_protected,
        page.after,
        page.limit,
        f.availability_group_id,
    )
    .fetch_all(db)
    .await
}

/// Of `ids`, the protected items whose database has a copy on `vm_id` (for a group
/// database: any replica's).
pub async fn items_of_vm(
    db: impl PgExecutor<'_>,
    vm_id: Uuid,
    ids: &[Uuid],
) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar!(
        "select distinct p.id from protected_items p join sql_databases d on d.item_key = p.item_key \
         where d.vm_id = $1 and p.id = any($2)",
        vm_id,
        ids,
    )
    .fetch_all(db)
    .await
}

/// A database's protection: the item, its vault and state.
#[derive(Debug, Clone, FromRow)]
pub struct DatabaseProtection {
    pub database_id: Uuid,
    pub item_id: Uuid,
    pub vault_id: Uuid,
    pub state: ProtectionState,
}

/// The protection of each of these databases that has one.
pub async fn items_for_databases(
    db: impl PgExecutor<'_>,
    database_ids: &[Uuid],
) -> sqlx::Result<Vec<DatabaseProtection>> {
    sqlx::query_as!(
        DatabaseProtection,
        r#"select database_id, id as item_id, vault_id, state as "state: ProtectionState"
           from protected_items where database_id = any($1)"#,
        database_ids,
    )
    .fetch_all(db)
    .await
}

/// A protected item by what it protects (`sql_databases.item_key`).
#[derive(Debug, Clone)]
pub struct KeyProtection {
    pub item_key: Uuid,
    pub item_id: Uuid,
    pub vault_id: Uuid,
    pub state: ProtectionState,
}

/// The items protecting these item keys (a standalone database's id or a group
/// database's id).
pub async fn items_for_keys(
    db: impl PgExecutor<'_>,
    keys: &[Uuid],
) -> sqlx::Result<Vec<KeyProtection>> {
    sqlx::query_as!(
        KeyProtection,
        r#"select item_key, id as item_id, vault_id, state as "state: ProtectionState"
           from protected_items where item_key = any($1)"#,
        keys,
    )
    .fetch_all(db)
    .await
}

pub async fn items_set_state(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
    from: ProtectionState,
    to: ProtectionState,
) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        "update protected_items set state = $3, version = version + 1, updated_at = now()
         where id = any($1) and state = $2",
        ids,
        from as ProtectionState,
        to as ProtectionState,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Removes items whose protection never completed (the database stays unprotected).
pub async fn items_delete_protecting(db: impl PgExecutor<'_>, ids: &[Uuid]) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        "delete from protected_items where id = any($1) and state = 'protecting'",
        ids,
    )
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
    state: ProtectionState,
) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar!(
        "update protected_items set policy_id = $3, state = $4, version = version + 1, updated_at = now()
         where id = $1 and ($2::bigint is null or version = $2) returning version",
        id,
        expected_version,
        policy_id,
        state as ProtectionState,
    )
    .fetch_optional(conn)
    .await
}

pub async fn item_delete(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query!("delete from protected_items where id = $1", id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Protected items with a copy of their database on the VM (a group database counts on
/// every replica).
pub async fn items_on_vm(db: impl PgExecutor<'_>, vm_id: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"select count(distinct p.id) as "count!" from protected_items p join sql_databases d on d.item_key = p.item_key
           where d.vm_id = $1"#,
        vm_id,
    )
    .fetch_one(db)
    .await
}

/// Flags items whose database came back with another casing.
pub async fn items_flag_casing(db: impl PgExecutor<'_>, database_ids: &[Uuid]) -> sqlx::Result<()> {
    sqlx::query!(
        "update protected_items set casing_changed = true, updated_at = now() where database_id = any($1)",
        database_ids,
    )
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
    sqlx::query_scalar!(
        // `$1::uuid::text`: the id goes in as a uuid, as it always did, and is compared as
        // the text the job's items hold.
        r#"select count(*) as "count!" from jobs where kind = 'backup_full' and priority = 0 and created_at >= $2
             and status <> 'cancelled' and coalesce(payload ->> 'copy_only', 'false') = 'false'
             and items @> jsonb_build_array(jsonb_build_object('protected_item_id', $1::uuid::text))"#,
        item_id,
        since,
    )
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

// The intent reads below share their columns and joins (keep them alike). `target_name!`:
// an intent names exactly one target (`auto_protection_one_target`), deleted with it.

pub async fn intent_insert(
    conn: &mut PgConnection,
    id: Uuid,
    vault_id: Uuid,
    policy_id: Uuid,
    instance_id: Option<Uuid>,
    availability_group_id: Option<Uuid>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "insert into auto_protection_intents (id, vault_id, policy_id, instance_id, availability_group_id)
         values ($1, $2, $3, $4, $5)",
        id,
        vault_id,
        policy_id,
        instance_id,
        availability_group_id,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn intent_get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<IntentRow>> {
    sqlx::query_as!(
        IntentRow,
        r#"select a.id, a.vault_id, a.policy_id, pol.name as policy_name, a.instance_id,
                  a.availability_group_id, coalesce(i.name, ag.name) as "target_name!", a.created_at
           from auto_protection_intents a
           join policies pol on pol.id = a.policy_id
           left join sql_instances i on i.id = a.instance_id
           left join availability_groups ag on ag.id = a.availability_group_id
           where a.id = $1"#,
        id,
    )
    .fetch_optional(db)
    .await
}

pub async fn intents_of_vault(
    db: impl PgExecutor<'_>,
    vault_id: Uuid,
) -> sqlx::Result<Vec<IntentRow>> {
    sqlx::query_as!(
        IntentRow,
        r#"select a.id, a.vault_id, a.policy_id, pol.name as policy_name, a.instance_id,
                  a.availability_group_id, coalesce(i.name, ag.name) as "target_name!", a.created_at
           from auto_protection_intents a
           join policies pol on pol.id = a.policy_id
           left join sql_instances i on i.id = a.instance_id
           left join availability_groups ag on ag.id = a.availability_group_id
           where a.vault_id = $1 order by a.id"#,
        vault_id,
    )
    .fetch_all(db)
    .await
}

pub async fn intent_delete(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<bool> {
    let done = sqlx::query!("delete from auto_protection_intents where id = $1", id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Intents that cover databases on this VM: on its instances, or on groups with a
/// database here.
pub async fn intents_for_vm(db: impl PgExecutor<'_>, vm_id: Uuid) -> sqlx::Result<Vec<IntentRow>> {
    sqlx::query_as!(
        IntentRow,
        r#"select a.id, a.vault_id, a.policy_id, pol.name as policy_name, a.instance_id,
                  a.availability_group_id, coalesce(i.name, ag.name) as "target_name!", a.created_at
           from auto_protection_intents a
           join policies pol on pol.id = a.policy_id
           left join sql_instances i on i.id = a.instance_id
           left join availability_groups ag on ag.id = a.availability_group_id
           where a.instance_id in (select id from sql_instances where vm_id = $1)
              or a.availability_group_id in (select availability_group_id from sql_databases where vm_id = $1)"#,
        vm_id,
    )
    .fetch_all(db)
    .await
}

/// Present, unprotected databases under an intent's target: an instance's standalone
/// databases, or a group's databases, one copy each (the primary's where it reports one).
/// Ordered by item key; the caller orders them as it needs.
pub async fn unprotected_under(
    db: impl PgExecutor<'_>,
    instance_id: Option<Uuid>,
    availability_group_id: Option<Uuid>,
) -> sqlx::Result<Vec<crate::inventory::DatabaseRow>> {
    sqlx::query_as!(
        crate::inventory::DatabaseRow,
        r#"select distinct on (d.item_key)
                      d.id, d.vm_id, d.instance_id, d.availability_group_id, d.ag_database_id,
                      d.item_key as "item_key!", d.name, d.recovery_model as "recovery_model: RecoveryModel",
                      d.system, d.read_only, d.size_bytes, d.gone_at
               from sql_databases d
               left join ag_replicas r on r.availability_group_id = d.availability_group_id and r.vm_id = d.vm_id
               where d.gone_at is null
                 and (d.instance_id = $1 and d.ag_database_id is null or d.availability_group_id = $2)
                 and not exists (select 1 from protected_items p where p.item_key = d.item_key)
               order by d.item_key, r.role = 'primary' desc nulls last, d.vm_id"#,
        instance_id,
        availability_group_id,
    )
    .fetch_all(db)
    .await
}

/// The policies of these protected items.
pub async fn items_policies(db: impl PgExecutor<'_>, item_ids: &[Uuid]) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar!(
        r#"select distinct policy_id as "policy_id!" from protected_items
           where id = any($1) and policy_id is not null"#,
        item_ids,
    )
    .fetch_all(db)
    .await
}
