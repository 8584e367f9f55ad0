//! Recovery benchmarks: the scheduler tick at scale (`tick`), recovery-point ingestion
//! through the agent protocol of the real server (`ingest`) and the retention sweep
//! (`sweep`).
//!
//! Each benchmark works on databases of its own, named `backvault_recbench_*`, created
//! next to `DATABASE_URL` and dropped afterwards. Fixtures are filled with set-based SQL
//! (`INSERT ... SELECT generate_series(...)`); only the operation under test goes through
//! backvault's code. Before each measurement the benchmark waits until no other benchmark
//! runs (`pgrep -f backvault-bench`, `pgrep -f pgbench`, polled every 10 s) and reports
//! the load average next to the result.
//!
//! ```text
//! cargo run --release -p backvault-bench --bin recovery -- tick
//! cargo build --release -p backvault && cargo run --release -p backvault-bench --bin recovery -- ingest
//! cargo run --release -p backvault-bench --bin recovery -- sweep
//! ```

mod agents;
mod ingest;
mod quiet;
mod sweep;
mod tick;

use std::time::Duration;

use backvault_bench::db::DEFAULT_DATABASE_URL;
use backvault_bench::server::auth;
use backvault_bench::sys::{CpuSnapshot, CpuSplit, load_average, nproc};
use backvault_service::{Config, Service};
use backvault_store::policies::policy_insert;
use backvault_store::vaults::{NewVault, vault_insert};
use chrono::Utc;
use clap::{Parser, Subcommand};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::ingest::IngestArgs;
use crate::sweep::SweepArgs;
use crate::tick::TickArgs;

/// Every database of these benchmarks starts with this (not `backvault_bench_`, so the
/// other benchmark binary counts our load as foreign).
const DB_PREFIX: &str = "backvault_recbench_";
/// The policy of the `tick` and `sweep` fixtures: 15-minute logs.
const TICK_POLICY: &str = r#"{"time_zone":"UTC","full":{"frequency":"daily","time":"00:00"},"log":{"frequency_minutes":15,"retention_days":7},"retention":{"daily":{"days":7}}}"#;

// Fixture ids are ascending per kind of row, as UUIDv7s created one after another would be
// (random ids would scatter every index insert, which real ids do not): id `n` of kind `k`
// is `0000000k-0000-7000-8000-<n + 2^32 in 12 hex digits>`, written out in each statement
// as `('0000000k-0000-7000-8000-' || lpad(to_hex(n + 4294967296), 12, '0'))::uuid`.

#[derive(Parser)]
#[command(
    name = "recovery",
    about = "Scheduler, ingestion and retention benchmarks"
)]
struct Cli {
    /// Admin connection; the benchmark databases are created on the same server.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    database_url: String,
    /// Measure at once, without waiting for other benchmarks to finish.
    #[arg(long)]
    no_wait: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One scheduler tick enqueueing the log slot of N protected items, against a single
    /// INSERT ... SELECT producing the same jobs.
    Tick(TickArgs),
    /// Recovery points recorded per second through claim + complete of the real server.
    Ingest(IngestArgs),
    /// The retention sweep over a million expired recovery points.
    Sweep(SweepArgs),
    /// All three with their defaults.
    All,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let ctx = Ctx {
        admin_url: cli.database_url.clone(),
        wait: !cli.no_wait,
    };
    println!("{}", machine_line(&ctx.admin_url).await);
    let mut summaries = Vec::new();
    match cli.command {
        Cmd::Tick(a) => summaries.extend(tick::run(&ctx, &a).await?),
        Cmd::Ingest(a) => summaries.push(ingest::run(&ctx, &a).await?),
        Cmd::Sweep(a) => summaries.push(sweep::run(&ctx, &a).await?),
        Cmd::All => {
            summaries.extend(tick::run(&ctx, &TickArgs::parse_from(["tick"])).await?);
            summaries.push(ingest::run(&ctx, &IngestArgs::parse_from(["ingest"])).await?);
            summaries.push(sweep::run(&ctx, &SweepArgs::parse_from(["sweep"])).await?);
        }
    }
    println!();
    for s in summaries {
        println!("{s}");
    }
    Ok(())
}

struct Ctx {
    admin_url: String,
    wait: bool,
}

async fn machine_line(admin_url: &str) -> String {
    let postgres = async {
        let mut c = PgConnection::connect(admin_url).await.ok()?;
        let v = sqlx::query_scalar!(r#"select current_setting('server_version') as "v!""#)
            .fetch_one(&mut c)
            .await
            .ok()?;
        let sb = sqlx::query_scalar!(r#"select current_setting('shared_buffers') as "sb!""#)
            .fetch_one(&mut c)
            .await
            .ok()?;
        Some(format!("Postgres {v} (shared_buffers {sb})"))
    }
    .await
    .unwrap_or_else(|| "Postgres ?".into());
    format!(
        "machine: nproc {}, {postgres}, {}, load {}",
        nproc(),
        Utc::now().format("%Y-%m-%d %H:%M UTC"),
        load_average()
    )
}

/// CPU use from `start` to now: the split for the result line and the cores busy.
struct CpuMeter {
    start: CpuSnapshot,
    server: Option<u32>,
}

impl CpuMeter {
    fn start(server: Option<u32>) -> Self {
        Self {
            start: CpuSnapshot::take(DB_PREFIX, server),
            server,
        }
    }

    fn stop(&self) -> CpuSplit {
        CpuSnapshot::take(DB_PREFIX, self.server).since(&self.start)
    }
}

/// Cores used by Postgres, the server, this process and all other processes.
fn cpu_line(split: &CpuSplit) -> String {
    format!(
        "CPU cores: postgres {:.2}, server {:.2}, agents/bench {:.2}, other {:.2}",
        split.postgres, split.server, split.client, split.other_processes
    )
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

async fn vacuum_analyze(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query!("vacuum (analyze)").execute(pool).await?;
    Ok(())
}

/// The fixtures' vault (`bench-vault` in `sub-1`) and its policy `Gold` ([`TICK_POLICY`]),
/// through the store.
async fn vault_and_policy(conn: &mut PgConnection) -> anyhow::Result<(Uuid, Uuid)> {
    let (vault_id, policy_id) = (Uuid::now_v7(), Uuid::now_v7());
    vault_insert(
        &mut *conn,
        NewVault {
            id: vault_id,
            subscription_id: "sub-1",
            resource_group: "rg-bench",
            name: "bench-vault",
            region: "westeurope",
            description: "",
        },
    )
    .await?;
    let spec: serde_json::Value = serde_json::from_str(TICK_POLICY)?;
    policy_insert(&mut *conn, policy_id, vault_id, "Gold", &spec).await?;
    Ok((vault_id, policy_id))
}

/// Points in `recovery_points`.
async fn points_count(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"select count(*) as "n!" from recovery_points"#)
        .fetch_one(pool)
        .await
}

fn bench_service(pool: PgPool) -> Service {
    Service::new(pool, auth(), Config::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let _ = (
            TickArgs::parse_from(["tick"]),
            IngestArgs::parse_from(["ingest"]),
            SweepArgs::parse_from(["sweep"]),
        );
    }
}
