//! The `reads` benchmark's yardstick: a bare axum + sqlx server answering the four reads it
//! measures with the statements backvault's store runs for them, the pool settings of
//! `backvault serve`, and `axum::Json` out; no auth, no middleware, no visibility check of
//! the vault. A process of its own, so that `/proc` gives its CPU apart from the load
//! generator's. It prints `listening <addr>` on stdout once it accepts connections.

use std::str::FromStr;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// `backvault serve`'s default.
    #[arg(long, default_value_t = 24)]
    db_max_connections: u32,
}

#[derive(Serialize, FromRow)]
struct Vault {
    id: Uuid,
    subscription_id: String,
    resource_group: String,
    name: String,
    region: String,
    description: String,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Serialize, FromRow)]
struct Policy {
    id: Uuid,
    vault_id: Uuid,
    name: String,
    spec: Json<Value>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Serialize, FromRow)]
struct Job {
    id: Uuid,
    vm_id: Uuid,
    subscription_id: String,
    vault_id: Option<Uuid>,
    kind: String,
    status: String,
    priority: i16,
    items: Json<Value>,
    warnings: Json<Value>,
    error_code: Option<String>,
    error_message: Option<String>,
    attempts: i32,
    max_attempts: i32,
    cancel_requested: bool,
    run_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
}

#[derive(Serialize, FromRow)]
struct Item {
    id: Uuid,
    vault_id: Uuid,
    database_id: Uuid,
    policy_id: Option<Uuid>,
    policy_name: Option<String>,
    state: String,
    auto_protection_id: Option<Uuid>,
    auto_protected: bool,
    protected_name: String,
    casing_changed: bool,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    vm_id: Uuid,
    vm_name: String,
    resource_group: String,
    subscription_id: String,
    instance_name: String,
    availability_group: Option<String>,
    availability_group_id: Option<Uuid>,
    last_backup_vms: Json<Value>,
    database_name: String,
    recovery_model: String,
    system: bool,
    read_only: bool,
    database_gone: bool,
    last_full_at: Option<DateTime<Utc>>,
    last_differential_at: Option<DateTime<Utc>>,
    last_log_at: Option<DateTime<Utc>>,
    needs_full: bool,
    needs_differential: bool,
    purge_after: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
struct List<T> {
    items: Vec<T>,
    next_cursor: Option<String>,
}

#[derive(Deserialize)]
struct ListParams {
    limit: Option<i64>,
    status: Option<String>,
    kind: Option<String>,
}

impl ListParams {
    fn limit(&self) -> i64 {
        self.limit.unwrap_or(50).clamp(1, 200)
    }
}

/// One row more than asked tells whether another page exists, as backvault does.
fn page<T>(mut rows: Vec<T>, limit: i64, id: impl Fn(&T) -> Uuid) -> List<T> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| rows.last().map(|r| id(r).to_string()))
        .flatten();
    List {
        items: rows,
        next_cursor,
    }
}

fn failed(e: sqlx::Error) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
}

async fn vault(State(pool): State<PgPool>, Path(id): Path<Uuid>) -> Response {
    match sqlx::query_as::<_, Vault>(
        "select id, subscription_id, resource_group, name, region, description, version, created_at, updated_at
         from vaults where id = $1",
    )
    .bind(id)
    .fetch_optional(&pool)
    .await
    {
        Ok(Some(v)) => axum::Json(v).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => failed(e),
    }
}

async fn policies(
    State(pool): State<PgPool>,
    Path(vault_id): Path<Uuid>,
    Query(p): Query<ListParams>,
) -> Response {
    let limit = p.limit();
    match sqlx::query_as::<_, Policy>(
        "select id, vault_id, name, spec, version, created_at, updated_at
         from policies where vault_id = $1 and ($2::uuid is null or id > $2)
         order by id limit $3",
    )
    .bind(vault_id)
    .bind(None::<Uuid>)
    .bind(limit + 1)
    .fetch_all(&pool)
    .await
    {
        Ok(rows) => axum::Json(page(rows, limit, |r| r.id)).into_response(),
        Err(e) => failed(e),
    }
}

async fn jobs(State(pool): State<PgPool>, Query(p): Query<ListParams>) -> Response {
    let limit = p.limit();
    match sqlx::query_as::<_, Job>(
        "select j.id, j.vm_id, j.subscription_id, j.vault_id, j.kind, backvault_job_status(j.status, q.running) as status,
                j.priority, j.items, j.warnings, j.error_code, j.error_message,
                coalesce(q.attempt, j.attempts) as attempts, j.max_attempts, j.cancel_requested, q.run_at,
                j.created_at, coalesce(j.started_at, q.started_at) as started_at, j.finished_at,
                greatest(j.updated_at, q.attempt_started_at) as updated_at
         from jobs j left join job_queue q on q.job_id = j.id
         where ($1::text[] is null or j.subscription_id = any($1))
           -- As `job_list` for every status but `in_progress` (not among the reads measured).
           and ($2::text is null or j.status >= $2 and j.status <= $2 and q.running is not true)
           and ($3::text is null or j.kind = $3)
           and ($4::uuid is null or j.vm_id = $4)
           and ($5::timestamptz is null or j.created_at >= $5)
           and ($6::timestamptz is null or j.created_at < $6)
           and ($7::uuid is null
                or (j.created_at, j.id) < (coalesce((select c.created_at from jobs c where c.id = $7),
                                                    to_timestamp(('x' || left(replace($7::text, '-', ''), 12))::bit(48)::int8 / 1000.0)),
                                           $7))
         order by case when $2::text is null then null else j.status end desc, j.created_at desc, j.id desc
         limit $8",
    )
    .bind(None::<Vec<String>>)
    .bind(p.status.as_deref())
    .bind(p.kind.as_deref())
    .bind(None::<Uuid>)
    .bind(None::<DateTime<Utc>>)
    .bind(None::<DateTime<Utc>>)
    .bind(None::<Uuid>)
    .bind(limit + 1)
    .fetch_all(&pool)
    .await
    {
        Ok(rows) => axum::Json(page(rows, limit, |r| r.id)).into_response(),
        Err(e) => failed(e),
    }
}

async fn items(
    State(pool): State<PgPool>,
    Path(vault_id): Path<Uuid>,
    Query(p): Query<ListParams>,
) -> Response {
    let limit = p.limit();
    match sqlx::query_as::<_, Item>(
        "select p.id, p.vault_id, p.database_id, p.policy_id,
                (select pol.name from policies pol where pol.id = p.policy_id) as policy_name, p.state,
                p.auto_protection_id, p.auto_protected, p.protected_name, p.casing_changed, p.version, p.created_at,
                p.updated_at, p.vm_id, v.name as vm_name, v.resource_group, v.subscription_id,
                (select i.name from sql_instances i where i.id = p.instance_id) as instance_name,
                (select ag.name from availability_groups ag where ag.id = p.availability_group_id) as availability_group,
                case when p.ag_database_id is not null then p.availability_group_id end as availability_group_id,
                p.last_backup_vms, p.database_name, p.recovery_model, p.system, p.read_only,
                p.gone_at is not null as database_gone, p.last_full_at,
                p.last_differential_at, p.last_log_at, p.needs_full, p.needs_differential, p.purge_after
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
         order by p.id",
    )
    .bind(vault_id)
    .bind(None::<String>)
    .bind(None::<Uuid>)
    .bind(None::<Uuid>)
    .bind(None::<bool>)
    .bind(None::<Uuid>)
    .bind(limit + 1)
    .bind(None::<Uuid>)
    .fetch_all(&pool)
    .await
    {
        Ok(rows) => axum::Json(page(rows, limit, |r| r.id)).into_response(),
        Err(e) => failed(e),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // As `backvault serve` connects (`DbArgs::connect`).
    let options = PgConnectOptions::from_str(&args.database_url)?.options([
        ("statement_timeout", "30s"),
        ("idle_in_transaction_session_timeout", "60s"),
    ]);
    let pool = PgPoolOptions::new()
        .max_connections(args.db_max_connections)
        .acquire_timeout(Duration::from_secs(1))
        .connect_with(options)
        .await?;
    let app = Router::new()
        .route("/v1/vaults/{vault_id}", get(vault))
        .route("/v1/vaults/{vault_id}/policies", get(policies))
        .route("/v1/jobs", get(jobs))
        .route("/v1/vaults/{vault_id}/protected-items", get(items))
        .with_state(pool);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("listening {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
