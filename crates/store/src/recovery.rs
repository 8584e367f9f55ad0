//! Recovery points and the chain state of protected items.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

use backvault_domain::chain::ChainState;
use backvault_domain::lsn::Lsn;

/// The chain state of a protected item, locked while points are recorded.
#[derive(Debug, Clone, FromRow)]
pub struct ChainRow {
    pub id: Uuid,
    pub state: String,
    pub spec: Option<Json<serde_json::Value>>,
    pub chain: Json<ChainState>,
    pub last_full_at: Option<DateTime<Utc>>,
    pub last_log_at: Option<DateTime<Utc>>,
}

pub async fn chain_lock(conn: &mut PgConnection, item_ids: &[Uuid]) -> sqlx::Result<Vec<ChainRow>> {
    sqlx::query_as(
        "select p.id, p.state, pol.spec, p.chain, p.last_full_at, p.last_log_at
         from protected_items p left join policies pol on pol.id = p.policy_id
         where p.id = any($1) order by p.id for update of p",
    )
    .bind(item_ids)
    .fetch_all(conn)
    .await
}

/// The backup sets of `item_ids` already recorded, among `backup_sets`.
pub async fn points_recorded(
    db: impl PgExecutor<'_>,
    item_ids: &[Uuid],
    backup_sets: &[Uuid],
) -> sqlx::Result<Vec<(Uuid, Uuid)>> {
    sqlx::query_as(
        "select protected_item_id, backup_set_uuid from recovery_points
         where protected_item_id = any($1) and backup_set_uuid = any($2)",
    )
    .bind(item_ids)
    .bind(backup_sets)
    .fetch_all(db)
    .await
}

pub struct NewPoint {
    pub id: Uuid,
    pub protected_item_id: Uuid,
    pub job_id: Uuid,
    pub backup_type: &'static str,
    pub started_at: DateTime<Utc>,
    pub backup_time: DateTime<Utc>,
    pub log_from: Option<DateTime<Utc>>,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    pub database_backup_lsn: Lsn,
    pub checkpoint_lsn: Option<Lsn>,
    pub differential_base_lsn: Option<Lsn>,
    pub differential_base_guid: Option<Uuid>,
    pub backup_set_uuid: Option<Uuid>,
    pub begins_log_chain: Option<bool>,
    pub has_bulk_logged_data: bool,
    pub recovery_model: Option<&'static str>,
    pub recovery_fork_guid: Option<Uuid>,
    pub fork_point_lsn: Option<Lsn>,
    pub database_guid: Option<Uuid>,
    pub size_bytes: i64,
    pub full_id: Option<Uuid>,
    pub expires_at: Option<DateTime<Utc>>,
    pub fixed_retention: bool,
    pub chain_break: Option<&'static str>,
    pub unverified: Vec<&'static str>,
}

pub async fn points_insert(conn: &mut PgConnection, points: &[NewPoint]) -> sqlx::Result<()> {
    if points.is_empty() {
        return Ok(());
    }
    let lsn = |f: fn(&NewPoint) -> Option<Lsn>| {
        points
            .iter()
            .map(|p| f(p).map(|l| l.to_string()))
            .collect::<Vec<Option<String>>>()
    };
    let uuid = |f: fn(&NewPoint) -> Option<Uuid>| points.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "insert into recovery_points (id, protected_item_id, job_id, backup_type, started_at, backup_time, log_from,
                                      first_lsn, last_lsn, database_backup_lsn, checkpoint_lsn, differential_base_lsn,
                                      differential_base_guid, backup_set_uuid, begins_log_chain, has_bulk_logged_data,
                                      recovery_model, recovery_fork_guid, fork_point_lsn, database_guid, size_bytes,
                                      full_id, expires_at, fixed_retention, chain_break, unverified)
         select id, item, job, kind, started, at, log_from, first::numeric, last::numeric, base::numeric,
                checkpoint::numeric, diff_base::numeric, diff_guid, backup_set, begins, bulk, model, fork,
                fork_point::numeric, db_guid, size, full_id, expires, fixed, chain_break,
                string_to_array(unverified, ',')
         from unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[], $6::timestamptz[],
                     $7::timestamptz[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::uuid[],
                     $14::uuid[], $15::bool[], $16::bool[], $17::text[], $18::uuid[], $19::text[], $20::uuid[],
                     $21::int8[], $22::uuid[], $23::timestamptz[], $24::bool[], $25::text[], $26::text[])
              as p(id, item, job, kind, started, at, log_from, first, last, base, checkpoint, diff_base, diff_guid,
                   backup_set, begins, bulk, model, fork, fork_point, db_guid, size, full_id, expires, fixed,
                   chain_break, unverified)
         on conflict (protected_item_id, backup_set_uuid) where backup_set_uuid is not null do nothing",
    )
    .bind(points.iter().map(|p| p.id).collect::<Vec<_>>())
    .bind(points.iter().map(|p| p.protected_item_id).collect::<Vec<_>>())
    .bind(points.iter().map(|p| p.job_id).collect::<Vec<_>>())
    .bind(points.iter().map(|p| p.backup_type).collect::<Vec<_>>())
    .bind(points.iter().map(|p| p.started_at).collect::<Vec<_>>())
    .bind(points.iter().map(|p| p.backup_time).collect::<Vec<_>>())
    .bind(points.iter().map(|p| p.log_from).collect::<Vec<_>>())
    .bind(lsn(|p| Some(p.first_lsn)))
    .bind(lsn(|p| Some(p.last_lsn)))
    .bind(lsn(|p| Some(p.database_backup_lsn)))
    .bind(lsn(|p| p.checkpoint_lsn))
    .bind(lsn(|p| p.differential_base_lsn))
    .bind(uuid(|p| p.differential_base_guid))
    .bind(uuid(|p| p.backup_set_uuid))
    .bind(points.iter().map(|p| p.begins_log_chain).collect::<Vec<_>>())
    .bind(points.iter().map(|p| p.has_bulk_logged_data).collect::<Vec<_>>())
    .bind(points.iter().map(|p| p.recovery_model).collect::<Vec<_>>())
    .bind(uuid(|p| p.recovery_fork_guid))
    .bind(lsn(|p| p.fork_point_lsn))
    .bind(uuid(|p| p.database_guid))
    .bind(points.iter().map(|p| p.size_bytes).collect::<Vec<_>>())
    .bind(uuid(|p| p.full_id))
    .bind(points.iter().map(|p| p.expires_at).collect::<Vec<_>>())
    .bind(points.iter().map(|p| p.fixed_retention).collect::<Vec<_>>())
    .bind(points.iter().map(|p| p.chain_break).collect::<Vec<_>>())
    .bind(points.iter().map(|p| p.unverified.join(",")).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// The chain state after recording points.
pub struct ChainUpdate {
    pub id: Uuid,
    pub chain: ChainState,
    pub last_full_id: Option<Uuid>,
    pub last_full_at: Option<DateTime<Utc>>,
    pub last_differential_at: Option<DateTime<Utc>>,
    pub last_log_at: Option<DateTime<Utc>>,
}

pub async fn chain_update(conn: &mut PgConnection, updates: &[ChainUpdate]) -> sqlx::Result<()> {
    if updates.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "update protected_items p set
             chain = u.chain,
             last_full_id = coalesce(u.full_id, p.last_full_id),
             last_full_at = greatest(u.full_at, p.last_full_at),
             last_differential_at = greatest(u.diff_at, p.last_differential_at),
             last_log_at = greatest(u.log_at, p.last_log_at),
             updated_at = now()
         from unnest($1::uuid[], $2::jsonb[], $3::uuid[], $4::timestamptz[], $5::timestamptz[], $6::timestamptz[])
              as u(id, chain, full_id, full_at, diff_at, log_at)
         where p.id = u.id",
    )
    .bind(updates.iter().map(|u| u.id).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| Json(u.chain)).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| u.last_full_id).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| u.last_full_at).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| u.last_differential_at).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| u.last_log_at).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// The chain states of `item_ids`, locked, with their policies' specs, for a change that
/// does not come with points (a recovery model switch).
pub async fn chains_of_items(
    conn: &mut PgConnection,
    item_ids: &[Uuid],
) -> sqlx::Result<Vec<(Uuid, Json<ChainState>, Option<Json<serde_json::Value>>)>> {
    sqlx::query_as(
        "select p.id, p.chain, pol.spec
         from protected_items p left join policies pol on pol.id = p.policy_id
         where p.id = any($1) order by p.id for update of p",
    )
    .bind(item_ids)
    .fetch_all(conn)
    .await
}

pub async fn chains_set(
    db: impl PgExecutor<'_>,
    item_ids: &[Uuid],
    chains: &[ChainState],
) -> sqlx::Result<()> {
    sqlx::query(
        "update protected_items p set chain = u.chain, updated_at = now()
         from unnest($1::uuid[], $2::jsonb[]) as u(id, chain) where p.id = u.id",
    )
    .bind(item_ids)
    .bind(chains.iter().map(|c| Json(*c)).collect::<Vec<_>>())
    .execute(db)
    .await?;
    Ok(())
}

/// Keeps fulls at least as long as their dependents: raises each full's `chain_until` to
/// the expiry of new points that depend on it (only the new points are read, so the cost
/// does not grow with the chain).
pub async fn fulls_extend_chain(
    db: impl PgExecutor<'_>,
    full_ids: &[Uuid],
    expires: &[DateTime<Utc>],
) -> sqlx::Result<()> {
    sqlx::query(
        "update recovery_points f set chain_until = greatest(f.chain_until, d.until)
         from (select full_id, max(expires) as until from unnest($1::uuid[], $2::timestamptz[]) as n(full_id, expires)
               group by full_id) d
         where f.id = d.full_id and (f.chain_until is null or f.chain_until < d.until)",
    )
    .bind(full_ids)
    .bind(expires)
    .execute(db)
    .await?;
    Ok(())
}

/// The next backup of these items must be a full (an agent found their chain broken).
pub async fn needs_full_set(db: impl PgExecutor<'_>, item_ids: &[Uuid]) -> sqlx::Result<()> {
    sqlx::query(
        "update protected_items set chain = jsonb_set(chain, '{needs}', '\"full\"') where id = any($1)",
    )
    .bind(item_ids)
    .execute(db)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, FromRow)]
pub struct PointRow {
    pub id: Uuid,
    pub protected_item_id: Uuid,
    pub job_id: Option<Uuid>,
    pub backup_type: String,
    pub started_at: DateTime<Utc>,
    pub backup_time: DateTime<Utc>,
    pub log_from: Option<DateTime<Utc>>,
    pub first_lsn: String,
    pub last_lsn: String,
    pub database_backup_lsn: String,
    pub checkpoint_lsn: Option<String>,
    pub differential_base_lsn: Option<String>,
    pub differential_base_guid: Option<Uuid>,
    pub backup_set_uuid: Option<Uuid>,
    pub begins_log_chain: Option<bool>,
    pub has_bulk_logged_data: bool,
    pub recovery_model: Option<String>,
    pub recovery_fork_guid: Option<Uuid>,
    pub fork_point_lsn: Option<String>,
    pub database_guid: Option<Uuid>,
    pub chain_break: Option<String>,
    pub unverified: Vec<String>,
    pub size_bytes: i64,
    pub full_id: Option<Uuid>,
    pub expires_at: Option<DateTime<Utc>>,
    pub chain_until: Option<DateTime<Utc>>,
    pub delete_after: Option<DateTime<Utc>>,
    pub fixed_retention: bool,
    pub chain_gap: bool,
}

pub async fn points_of_item(db: impl PgExecutor<'_>, item_id: Uuid) -> sqlx::Result<Vec<PointRow>> {
    sqlx::query_as(
        "select id, protected_item_id, job_id, backup_type, started_at, backup_time, log_from, first_lsn::text,
                last_lsn::text, database_backup_lsn::text, checkpoint_lsn::text, differential_base_lsn::text,
                differential_base_guid, backup_set_uuid, begins_log_chain, has_bulk_logged_data, recovery_model,
                recovery_fork_guid, fork_point_lsn::text, database_guid, chain_break, unverified, size_bytes,
                full_id, expires_at, chain_until, delete_after, fixed_retention, chain_gap
         from recovery_points where protected_item_id = $1 order by backup_time, id",
    )
    .bind(item_id)
    .fetch_all(db)
    .await
}

/// Points of items under a policy whose expiry follows it (for a retention change).
pub async fn points_following_policy(
    db: impl PgExecutor<'_>,
    policy_id: Uuid,
) -> sqlx::Result<Vec<(Uuid, String, DateTime<Utc>)>> {
    sqlx::query_as(
        "select r.id, r.backup_type, r.backup_time from recovery_points r
         join protected_items p on p.id = r.protected_item_id
         where p.policy_id = $1 and not r.fixed_retention and r.expires_at is not null",
    )
    .bind(policy_id)
    .fetch_all(db)
    .await
}

pub async fn points_set_expiry(
    conn: &mut PgConnection,
    ids: &[Uuid],
    expires: &[DateTime<Utc>],
) -> sqlx::Result<()> {
    sqlx::query(
        "update recovery_points r set expires_at = u.expires
         from unnest($1::uuid[], $2::timestamptz[]) as u(id, expires) where r.id = u.id",
    )
    .bind(ids)
    .bind(expires)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "update recovery_points f set chain_until = (select max(d.expires_at) from recovery_points d where d.full_id = f.id)
         where f.id in (select distinct full_id from recovery_points where id = any($1) and full_id is not null)
            or (f.id = any($1) and f.backup_type = 'full')",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// Retain the data of a stopped item: its points no longer expire.
pub async fn points_retain_forever(db: impl PgExecutor<'_>, item_id: Uuid) -> sqlx::Result<()> {
    sqlx::query("update recovery_points set expires_at = null, chain_until = null where protected_item_id = $1")
        .bind(item_id)
        .execute(db)
        .await?;
    Ok(())
}

/// Deletes up to `limit` expired points on which no point depends, oldest first: a full
/// goes only once its expired dependents went in an earlier batch, so a batch never cuts a
/// full from its chain. One statement, so the `delete_after` index serves every kind;
/// the ids go in as an array (`id in (subquery)` makes a hash join over the whole table).
pub async fn points_sweep(conn: &mut PgConnection, limit: i64) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "delete from recovery_points where id = any(array(
             select r.id from recovery_points r
             where r.delete_after < now()
               and not exists (select 1 from recovery_points d where d.full_id = r.id)
             order by r.delete_after limit $1))",
    )
    .bind(limit)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

#[derive(Debug, Clone, FromRow)]
pub struct RpoRow {
    pub id: Uuid,
    pub policy_id: Option<Uuid>,
    pub database: String,
    pub vm_name: String,
    pub created_at: DateTime<Utc>,
    pub last_full_at: Option<DateTime<Utc>>,
    pub last_differential_at: Option<DateTime<Utc>>,
    pub last_log_at: Option<DateTime<Utc>>,
}

pub async fn rpo_rows(
    db: impl PgExecutor<'_>,
    vault_id: Option<Uuid>,
) -> sqlx::Result<Vec<RpoRow>> {
    sqlx::query_as(
        "select p.id, p.policy_id, d.name as database, v.name as vm_name, p.created_at, p.last_full_at,
                p.last_differential_at, p.last_log_at
         from protected_items p join sql_databases d on d.id = p.database_id join vms v on v.id = d.vm_id
         where p.state = 'protected' and ($1::uuid is null or p.vault_id = $1)
         order by p.id",
    )
    .bind(vault_id)
    .fetch_all(db)
    .await
}

/// Protected items whose latest backup (or start of protection) is older than the instant
/// given for their policy (`before[i]` for `policies[i]`), counted in one statement
/// however many policies there are.
pub async fn items_stale(
    db: impl PgExecutor<'_>,
    policies: &[Uuid],
    before: &[DateTime<Utc>],
) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "select count(*) from protected_items p
           join unnest($1::uuid[], $2::timestamptz[]) as s(policy_id, before) on s.policy_id = p.policy_id
         where p.state = 'protected'
           and coalesce(greatest(p.last_full_at, p.last_differential_at, p.last_log_at), p.created_at) < s.before",
    )
    .bind(policies)
    .bind(before)
    .fetch_one(db)
    .await
}
