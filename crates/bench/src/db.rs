//! A database of its own per benchmark, and the store-layer setup the benchmarks share:
//! VMs and a backlog of jobs enqueued through `backvault_store::jobs::jobs_enqueue`.

use std::time::{Duration, Instant};

use anyhow::Context;
use backvault_store::jobs::{NewJob, jobs_enqueue};
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// The default admin connection; the benchmarks' databases live on the same server.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// `url` with its database name replaced by `name` (query parameters kept).
pub fn url_with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (scheme, rest) = base
        .split_once("://")
        .context("DATABASE_URL must look like postgres://user@host:port/database")?;
    let server = rest.split_once('/').map_or(rest, |(server, _)| server);
    let server = format!("{scheme}://{server}");
    Ok(match query {
        Some(q) => format!("{server}/{name}?{q}"),
        None => format!("{server}/{name}"),
    })
}

/// A scratch database `backvault_bench_<name>`, created empty (an older one of the same
/// name is dropped first) and dropped by [`BenchDb::drop_db`].
pub struct BenchDb {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl BenchDb {
    pub async fn create(admin_url: &str, bench: &str) -> anyhow::Result<Self> {
        let name = format!("backvault_bench_{bench}");
        let url = url_with_database(admin_url, &name)?;
        let mut admin = PgConnection::connect(admin_url)
            .await
            .with_context(|| format!("cannot connect to Postgres at {admin_url}"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists \"{name}\" with (force)"
        )))
        .execute(&mut admin)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("create database \"{name}\"")))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        admin.close().await?;
        Ok(Self {
            admin_url: admin_url.to_owned(),
            name,
            url,
        })
    }

    pub async fn pool(&self, max_connections: u32) -> anyhow::Result<PgPool> {
        self.pool_with(max_connections, &[]).await
    }

    /// A pool whose sessions get these settings (`SET name = value`).
    pub async fn pool_with(
        &self,
        max_connections: u32,
        settings: &[(&str, &str)],
    ) -> anyhow::Result<PgPool> {
        let options = PgConnectOptions::from_str(&self.url)?.options(settings.iter().copied());
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .with_context(|| format!("connecting to {}", self.name))
    }

    /// A pool on a database with backvault's schema applied.
    pub async fn migrated_pool(
        &self,
        max_connections: u32,
        settings: &[(&str, &str)],
    ) -> anyhow::Result<PgPool> {
        let pool = self.pool_with(max_connections, settings).await?;
        backvault_store::MIGRATOR
            .run(&pool)
            .await
            .context("applying backvault's migrations")?;
        Ok(pool)
    }

    pub async fn drop_db(self) -> anyhow::Result<()> {
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists \"{}\" with (force)",
            self.name
        )))
        .execute(&mut admin)
        .await
        .with_context(|| format!("dropping database {}", self.name))?;
        admin.close().await?;
        Ok(())
    }
}

/// Runs `body` on a fresh database and drops the database afterwards, whatever happened.
pub async fn with_db<T, F, Fut>(admin_url: &str, bench: &str, body: F) -> anyhow::Result<T>
where
    F: FnOnce(BenchDb) -> Fut,
    Fut: Future<Output = (BenchDb, anyhow::Result<T>)>,
{
    let db = BenchDb::create(admin_url, bench).await?;
    let (db, result) = body(db).await;
    let name = db.name.clone();
    if let Err(e) = db.drop_db().await {
        eprintln!("warning: could not drop database {name}: {e:#}");
    }
    result
}

/// Inserts `n` VMs of subscription `sub-1` directly (setup, not measured); returns their ids.
pub async fn seed_vms(pool: &PgPool, n: usize) -> anyhow::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let names: Vec<String> = (0..n).map(|i| format!("bench-vm-{i:05}")).collect();
    sqlx::query(
        "insert into vms (id, subscription_id, resource_group, name, region, deployment_model,
                          agent_installed, agent_version, dotnet_version, sql_iaas_extension)
         select id, 'sub-1', 'rg-bench', name, 'westeurope', 'resource_manager', true, '1.0.0', '4.8', true
         from unnest($1::uuid[], $2::text[]) as v(id, name)",
    )
    .bind(&ids)
    .bind(&names)
    .execute(pool)
    .await
    .context("seeding VMs")?;
    Ok(ids)
}

/// One scheduled full backup of one database, as the scheduler would enqueue it.
pub fn backup_job(vm_id: Uuid) -> NewJob {
    NewJob {
        id: Uuid::now_v7(),
        vm_id,
        subscription_id: "sub-1".to_owned(),
        vault_id: None,
        kind: "backup_full",
        priority: 1,
        items: serde_json::json!([{"instance": "MSSQLSERVER", "database": "sales"}]),
        payload: serde_json::json!({}),
        max_attempts: 3,
        // A second in the past so that `run_at <= now()` holds on the first claim.
        run_at: chrono::Utc::now() - chrono::Duration::seconds(1),
    }
}

/// Enqueues `jobs` jobs spread round-robin over `vms`, `batch` per transaction, through
/// `jobs_enqueue`. Returns how many each VM got and how long it took.
pub async fn enqueue_backlog(
    pool: &PgPool,
    vms: &[Uuid],
    jobs: usize,
    batch: usize,
) -> anyhow::Result<(Vec<usize>, Duration)> {
    let started = Instant::now();
    let mut per_vm = vec![0usize; vms.len()];
    let mut next = 0usize;
    while next < jobs {
        let end = (next + batch.max(1)).min(jobs);
        let batch: Vec<NewJob> = (next..end)
            .map(|i| {
                per_vm[i % vms.len()] += 1;
                backup_job(vms[i % vms.len()])
            })
            .collect();
        let mut tx = pool.begin().await?;
        jobs_enqueue(&mut tx, &batch).await?;
        tx.commit().await?;
        next = end;
    }
    let took = started.elapsed();
    // Autovacuum would analyze the freshly loaded tables within a minute; do it now so
    // the measurement does not depend on when it happens to run.
    sqlx::query("analyze vms, jobs, job_queue, job_attempts")
        .execute(pool)
        .await?;
    Ok((per_vm, took))
}
