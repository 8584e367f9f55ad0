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

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use backvault_domain::jobs::JobKind;
use backvault_domain::policy::PolicySpec;
use backvault_service::recovery::slot_jobs;
use backvault_service::{Auth, AuthConfig, Config, Service};
use backvault_store::jobs::{notify, notify_payload};
use backvault_store::schedule;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Every database of these benchmarks starts with this (not `backvault_bench_`, so the
/// other benchmark binary counts our load as foreign).
const DB_PREFIX: &str = "backvault_recbench_";
/// Fixture ids: ascending per kind of row, as UUIDv7s created one after another would be
/// (random ids would scatter every index insert, which real ids do not).
const SEQ_UUID: &str = "create function pg_temp.seq_uuid(kind int, n bigint) returns uuid language sql immutable as
    $$ select (lpad(to_hex(kind), 8, '0') || '-0000-7000-8000-' || lpad(to_hex(n + 4294967296), 12, '0'))::uuid $$";
/// The policy of the `tick` fixture: 15-minute logs.
const TICK_POLICY: &str = r#"{"time_zone":"UTC","full":{"frequency":"daily","time":"00:00"},"log":{"frequency_minutes":15,"retention_days":7},"retention":{"daily":{"days":7}}}"#;

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

#[derive(Parser, Clone)]
struct TickArgs {
    /// Protected items, one fixture (and measurement) each.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    items: Vec<u64>,
    /// VMs the items are spread over (one SQL instance each).
    #[arg(long, default_value_t = 20_000)]
    vms: u64,
    /// Only run the tick with the session settings `backvault serve` gives its pool
    /// (statement_timeout 30s, idle_in_transaction_session_timeout 60s), and say whether
    /// it succeeds.
    #[arg(long)]
    server_timeouts: bool,
}

#[derive(Parser, Clone)]
struct IngestArgs {
    /// Enrolled agents (VMs).
    #[arg(long, default_value_t = 200)]
    agents: usize,
    /// Databases per VM.
    #[arg(long, default_value_t = 50)]
    databases: usize,
    /// Log slots measured after the full.
    #[arg(long, default_value_t = 3)]
    log_rounds: usize,
    /// The server binary (default: target/release/backvault of this workspace).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// After the full, this many logs per database are inserted directly (zero-length,
    /// at the chain's end), as if the chain had run that long (672: a week of 15-minute
    /// logs on a weekly full), before the log slots are measured.
    #[arg(long, default_value_t = 0)]
    preload_logs: u32,
}

#[derive(Parser, Clone)]
struct SweepArgs {
    /// Protected items holding the expired points.
    #[arg(long, default_value_t = 10_000)]
    items: u64,
    /// Points per item: one full and the rest logs depending on it.
    #[arg(long, default_value_t = 100)]
    points_per_item: u64,
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
        Cmd::Tick(a) => summaries.extend(tick(&ctx, &a).await?),
        Cmd::Ingest(a) => summaries.push(ingest(&ctx, &a).await?),
        Cmd::Sweep(a) => summaries.push(sweep(&ctx, &a).await?),
        Cmd::All => {
            summaries.extend(tick(&ctx, &TickArgs::parse_from(["tick"])).await?);
            summaries.push(ingest(&ctx, &IngestArgs::parse_from(["ingest"])).await?);
            summaries.push(sweep(&ctx, &SweepArgs::parse_from(["sweep"])).await?);
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

// ---------------------------------------------------------------------------------------
// Machine, load and waiting for quiet

async fn machine_line(admin_url: &str) -> String {
    let postgres = async {
        let mut c = PgConnection::connect(admin_url).await.ok()?;
        let v: String = sqlx::query_scalar("select current_setting('server_version')")
            .fetch_one(&mut c)
            .await
            .ok()?;
        let sb: String = sqlx::query_scalar("select current_setting('shared_buffers')")
            .fetch_one(&mut c)
            .await
            .ok()?;
        Some(format!("Postgres {v} (shared_buffers {sb})"))
    }
    .await
    .unwrap_or_else(|| "Postgres ?".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "machine: nproc {nproc}, {postgres}, {}, load {}",
        Utc::now().format("%Y-%m-%d %H:%M UTC"),
        load()
    )
}

/// The 1/5/15-minute load averages.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

/// Busy jiffies and all jiffies of the machine (first line of /proc/stat).
fn cpu_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    (busy, (0..8).map(at).sum())
}

/// Whose CPU time it is.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Who {
    Bench,
    Server,
    /// Backends of our databases and Postgres' own background processes.
    Postgres,
    Other,
}

/// Every process's CPU ticks (user + system), by pid, with whose they are.
fn process_ticks(server: Option<u32>) -> HashMap<u32, (Who, u64)> {
    let mut out = HashMap::new();
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = fields
            .get(11)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            + fields
                .get(12)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        let who = if pid == me {
            Who::Bench
        } else if Some(pid) == server {
            Who::Server
        } else if comm == "postgres" {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let title = String::from_utf8_lossy(&cmdline);
            let backend = title.contains('(')
                || title.contains("[local]")
                || title.contains("autovacuum worker");
            if !backend || title.contains(DB_PREFIX) {
                Who::Postgres
            } else {
                Who::Other
            }
        } else {
            Who::Other
        };
        out.insert(pid, (who, ticks));
    }
    out
}

/// Measures how busy the machine was (in cores) while a measurement ran, and whose the
/// time was.
struct CpuMeter {
    start: (u64, u64),
    procs: HashMap<u32, (Who, u64)>,
    server: Option<u32>,
    at: Instant,
}

impl CpuMeter {
    fn start() -> Self {
        Self::with_server(None)
    }

    fn with_server(server: Option<u32>) -> Self {
        Self {
            start: cpu_ticks(),
            procs: process_ticks(server),
            server,
            at: Instant::now(),
        }
    }

    fn busy_cores(&self) -> f64 {
        let end = cpu_ticks();
        let total = end.1.saturating_sub(self.start.1) as f64;
        if total == 0.0 {
            return f64::NAN;
        }
        let nproc = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        end.0.saturating_sub(self.start.0) as f64 / total * nproc
    }

    /// Cores used by the benchmark, the server, Postgres and everything else.
    fn split(&self) -> String {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let mut by: HashMap<Who, u64> = HashMap::new();
        for (pid, (who, ticks)) in process_ticks(self.server) {
            let before = self.procs.get(&pid).map_or(0, |p| p.1);
            *by.entry(who).or_default() += ticks.saturating_sub(before);
        }
        let cores = |w: Who| by.get(&w).copied().unwrap_or(0) as f64 / 100.0 / wall;
        format!(
            "CPU cores: postgres {:.2}, server {:.2}, agents/bench {:.2}, other {:.2}",
            cores(Who::Postgres),
            cores(Who::Server),
            cores(Who::Bench),
            cores(Who::Other)
        )
    }
}

/// Our own process and its ancestors (the cargo and shell that started us match too).
fn ancestors() -> Vec<u32> {
    let mut pids = vec![std::process::id()];
    let mut pid = std::process::id();
    for _ in 0..32 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            break;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            break;
        };
        let Some(ppid) = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            break;
        };
        if ppid <= 1 {
            break;
        }
        pids.push(ppid);
        pid = ppid;
    }
    pids
}

/// Other benchmarks running now, as `pid command` lines.
fn other_benchmarks() -> Vec<String> {
    let mine = ancestors();
    let mut found = Vec::new();
    for pattern in ["backvault-bench", "pgbench"] {
        let Ok(out) = Command::new("pgrep").args(["-a", "-f", pattern]).output() else {
            continue;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let pid: u32 = line
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if pid != 0 && !mine.contains(&pid) {
                found.push(line.chars().take(120).collect());
            }
        }
    }
    found
}

/// Compilers running now (they compete for the two cores; noted, not waited for).
fn compilers_running() -> usize {
    ["rustc", "clippy-driver"]
        .iter()
        .filter_map(|name| Command::new("pgrep").args(["-x", name]).output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .sum()
}

/// Waits (polling every 10 s, at most an hour) until no other benchmark runs; returns the
/// conditions to note next to the result.
async fn wait_quiet(ctx: &Ctx, what: &str) -> String {
    if ctx.wait {
        let started = Instant::now();
        let mut said = false;
        loop {
            let others = other_benchmarks();
            if others.is_empty() {
                break;
            }
            if started.elapsed() > Duration::from_secs(3600) {
                eprintln!("{what}: other benchmarks still running after an hour; measuring anyway");
                break;
            }
            if !said {
                eprintln!(
                    "{what}: waiting for other benchmarks to finish: {}",
                    others.join(" | ")
                );
                said = true;
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        if said {
            eprintln!(
                "{what}: quiet after {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    format!(
        "load {} (compilers running: {})",
        load(),
        compilers_running()
    )
}

// ---------------------------------------------------------------------------------------
// Scratch databases

fn url_with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (scheme, rest) = base
        .split_once("://")
        .context("DATABASE_URL must look like postgres://user@host:port/database")?;
    let server = rest.split_once('/').map_or(rest, |(server, _)| server);
    Ok(match query {
        Some(q) => format!("{scheme}://{server}/{name}?{q}"),
        None => format!("{scheme}://{server}/{name}"),
    })
}

struct Scratch {
    admin_url: String,
    name: String,
    url: String,
}

impl Scratch {
    /// A new database (an older one of the same name is dropped), empty or a copy of
    /// `template` (which must have no connections).
    async fn create(admin_url: &str, name: &str, template: Option<&str>) -> anyhow::Result<Self> {
        let name = format!("{DB_PREFIX}{name}");
        let url = url_with_database(admin_url, &name)?;
        let mut admin = PgConnection::connect(admin_url)
            .await
            .with_context(|| format!("cannot connect to Postgres at {admin_url}"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists \"{name}\" with (force)"
        )))
        .execute(&mut admin)
        .await?;
        let create = match template {
            // FILE_COPY: a copy of a large fixture without writing it all to the WAL.
            Some(t) => format!("create database \"{name}\" template \"{t}\" strategy file_copy"),
            None => format!("create database \"{name}\""),
        };
        sqlx::query(sqlx::AssertSqlSafe(create))
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

    async fn copy(&self, name: &str) -> anyhow::Result<Self> {
        Self::create(&self.admin_url, name, Some(&self.name)).await
    }

    async fn pool(&self, max_connections: u32) -> anyhow::Result<PgPool> {
        self.pool_with(max_connections, &[]).await
    }

    /// A pool whose sessions get these settings.
    async fn pool_with(
        &self,
        max_connections: u32,
        settings: &[(&str, &str)],
    ) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(PgConnectOptions::from_str(&self.url)?.options(settings.iter().copied()))
            .await
            .with_context(|| format!("connecting to {}", self.name))
    }

    async fn drop_db(self) {
        let drop = async {
            let mut admin = PgConnection::connect(&self.admin_url).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "drop database if exists \"{}\" with (force)",
                self.name
            )))
            .execute(&mut admin)
            .await?;
            admin.close().await?;
            Ok::<_, anyhow::Error>(())
        };
        if let Err(e) = drop.await {
            eprintln!("warning: could not drop database {}: {e:#}", self.name);
        }
    }
}

async fn vacuum_analyze(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("vacuum (analyze)").execute(pool).await?;
    Ok(())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn bench_service(pool: PgPool) -> Service {
    Service::new(
        pool,
        Auth::new(AuthConfig {
            secret: b"bench-secret-0123456789-0123456789".to_vec(),
            previous_secrets: Vec::new(),
            issuer: None,
            audience: None,
        }),
        Config::default(),
    )
}

// ---------------------------------------------------------------------------------------
// tick

/// The scheduler's instant: the log slot of 10:15 is due, the next one is 10:30; the
/// daily full is due next at midnight.
fn tick_now() -> DateTime<Utc> {
    "2027-01-04T10:15:00Z".parse().expect("a valid instant")
}

struct TickFixture {
    db: Scratch,
    policy_id: Uuid,
    expected_jobs: i64,
    build: Duration,
    size: String,
}

/// One vault, one policy, `items` protected items over `vms` VMs (one instance each),
/// protected, with a full in the chain, the log slot due and the others in the future.
async fn tick_fixture(ctx: &Ctx, items: u64, vms: u64) -> anyhow::Result<TickFixture> {
    let started = Instant::now();
    let db = Scratch::create(&ctx.admin_url, &format!("tick_fx_{items}"), None).await?;
    let pool = db.pool(2).await?;
    backvault_store::MIGRATOR.run(&pool).await?;
    let (vault_id, policy_id) = (Uuid::now_v7(), Uuid::now_v7());
    let now = tick_now();
    let mut tx = pool.begin().await?;
    sqlx::query("set local synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    sqlx::query(SEQ_UUID).execute(&mut *tx).await?;
    sqlx::query(
        "insert into vaults (id, subscription_id, resource_group, name, region)
         values ($1, 'sub-1', 'rg-bench', 'bench-vault', 'westeurope')",
    )
    .bind(vault_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into policies (id, vault_id, name, spec) values ($1, $2, 'Gold', $3::jsonb)",
    )
    .bind(policy_id)
    .bind(vault_id)
    .bind(TICK_POLICY)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into vms (id, subscription_id, resource_group, name, region, deployment_model, agent_installed,
                          agent_version, dotnet_version, sql_iaas_extension, last_seen_at, vault_id, registered_at,
                          next_discovery_at)
         select pg_temp.seq_uuid(1, g), 'sub-1', 'rg-bench', 'bench-vm-' || lpad(g::text, 5, '0'), 'westeurope',
                'resource_manager', true, '1.0.0', '4.8', true, $2, $1, $2, $2 + interval '8 hours'
         from generate_series(1, $3::int8) g",
    )
    .bind(vault_id)
    .bind(now)
    .bind(vms as i64)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into sql_instances (id, vm_id, name, version)
         select pg_temp.seq_uuid(2, g), pg_temp.seq_uuid(1, g), 'MSSQLSERVER', '2019' from generate_series(1, $1::int8) g",
    )
    .bind(vms as i64)
    .execute(&mut *tx)
    .await?;
    // Item s is database s / vms + 1 of VM s % vms + 1.
    sqlx::query(
        "insert into sql_databases (id, vm_id, instance_id, name, recovery_model, size_bytes)
         select pg_temp.seq_uuid(3, s), pg_temp.seq_uuid(1, s * $2 / $1 + 1), pg_temp.seq_uuid(2, s * $2 / $1 + 1),
                'db' || lpad(s::text, 7, '0'), 'full', 1073741824
         from generate_series(0, $1::int8 - 1) s",
    )
    .bind(items as i64)
    .bind(vms as i64)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into protected_items (id, vault_id, database_id, policy_id, state, protected_name,
                                      last_full_id, chain, last_full_at, last_log_at)
         select pg_temp.seq_uuid(4, s), $3, pg_temp.seq_uuid(3, s), $4, 'protected',
                'db' || lpad(s::text, 7, '0'),
                pg_temp.seq_uuid(5, s),
                jsonb_build_object('base', jsonb_build_object('point_id', pg_temp.seq_uuid(5, s), 'checkpoint_lsn', '1000',
                                                              'first_lsn', '1000', 'last_lsn', '1000', 'guid', null),
                                   'log_end', '1100', 'log_anchored', true, 'anchor', '1000', 'fork', null,
                                   'needs', 'nothing'),
                $5 - interval '1 day', $5 - interval '15 minutes'
         from generate_series(0, $1::int8 - 1) s",
    )
    .bind(items as i64)
    .bind(vms as i64)
    .bind(vault_id)
    .bind(policy_id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    // The policy's schedule, started earlier: the log slot due now, the next full tomorrow
    // at midnight.
    sqlx::query(
        "insert into schedule_slots (policy_id, kind, slot_at, next_at)
         values ($1, 'backup_log', '-infinity', $2), ($1, 'backup_full', '-infinity', $3)",
    )
    .bind(policy_id)
    .bind(now)
    .bind(now + chrono::Duration::hours(14) - chrono::Duration::minutes(15))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    vacuum_analyze(&pool).await?;
    let expected_jobs: i64 = sqlx::query_scalar(
        "select coalesce(sum(ceil(n / 50.0)), 0)::int8 from (select vm_id, count(*) n from sql_databases group by vm_id) x",
    )
    .fetch_one(&pool)
    .await?;
    let size: String =
        sqlx::query_scalar("select pg_size_pretty(pg_database_size(current_database()))")
            .fetch_one(&pool)
            .await?;
    pool.close().await;
    Ok(TickFixture {
        db,
        policy_id,
        expected_jobs,
        build: started.elapsed(),
        size,
    })
}

/// Jobs, items in them and queue rows of kind `backup_log`.
async fn tick_verify(pool: &PgPool, fx: &TickFixture, items: u64) -> anyhow::Result<()> {
    let (jobs, total, queued, other_kinds): (i64, i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from jobs), (select coalesce(sum(jsonb_array_length(items)), 0)::int8 from jobs),
                (select count(*) from job_queue), (select count(*) from jobs where kind <> 'backup_log')",
    )
    .fetch_one(pool)
    .await?;
    ensure!(
        jobs == fx.expected_jobs,
        "{jobs} jobs, expected {} (sum over VMs of ceil(dbs/50))",
        fx.expected_jobs
    );
    ensure!(
        total == items as i64,
        "{total} items in the jobs, expected {items}"
    );
    ensure!(queued == jobs, "{queued} queue rows for {jobs} jobs");
    ensure!(other_kinds == 0, "{other_kinds} jobs are not backup_log");
    Ok(())
}

/// What `Service::schedule_tick` does, step by step with the same store functions, to
/// see where the time goes (the service does not expose its steps).
async fn tick_steps(pool: &PgPool, now: DateTime<Utc>) -> anyhow::Result<Vec<(String, Duration)>> {
    let mut steps: Vec<(String, Duration)> = Vec::new();
    let t = Instant::now();
    let policies = schedule::schedules_in_use(pool).await?;
    steps.push(("schedules_in_use".to_owned(), t.elapsed()));
    for schedules in policies {
        let policy_id = schedules.id;
        let spec: PolicySpec = serde_json::from_value(schedules.spec.0.clone())?;
        let policy = spec
            .validate("")
            .map_err(|v| anyhow::anyhow!("invalid policy: {v:?}"))?;
        let next_at = |kind: JobKind| schedules.next_at(kind.as_str());
        for (kind, next) in policy.slots_to_claim(now, next_at) {
            let short = kind.as_str().trim_start_matches("backup_");
            let mut tx = pool.begin().await?;
            let t = Instant::now();
            let slot = schedule::schedule_claim_slot(
                &mut tx,
                policy_id,
                schedules.version,
                kind.as_str(),
                now,
                next,
            )
            .await?;
            steps.push((format!("{short}: schedule_claim_slot"), t.elapsed()));
            if let Some(slot) = slot {
                let t = Instant::now();
                let jobs = slot_jobs(kind, None);
                let done =
                    schedule::schedule_enqueue(&mut tx, policy_id, kind.as_str(), slot, now, jobs)
                        .await?;
                steps.push((
                    format!(
                        "{short}: schedule_enqueue ({} jobs, {} items)",
                        done.jobs, done.items
                    ),
                    t.elapsed(),
                ));
                let t = Instant::now();
                notify(&mut *tx, &notify_payload('v', done.vm_ids)).await?;
                steps.push((format!("{short}: notify"), t.elapsed()));
            }
            let t = Instant::now();
            tx.commit().await?;
            steps.push((format!("{short}: commit"), t.elapsed()));
        }
    }
    Ok(steps)
}

/// The lower bound: one statement producing the same job rows (per VM, chunks of at most
/// 50 items as even as `batch` makes them) and their queue rows, with nothing else.
async fn tick_lower_bound(pool: &PgPool, policy_id: Uuid) -> anyhow::Result<(u64, Duration)> {
    let sql = "with due as materialized (
             select p.id, p.vault_id, d.vm_id, v.subscription_id, i.name as instance, d.name as database,
                    row_number() over w as rn, count(*) over (partition by d.vm_id) as n
             from protected_items p
             join sql_databases d on d.id = p.database_id
             join sql_instances i on i.id = d.instance_id
             join vms v on v.id = d.vm_id
             where p.policy_id = $1 and p.state = 'protected'
               and not p.needs_full and d.gone_at is null and d.recovery_model <> 'simple'
             window w as (partition by d.vm_id order by p.id)
         ), grouped as materialized (
             select gen_random_uuid() as id, vm_id, min(subscription_id) as subscription_id,
                    (array_agg(vault_id))[1] as vault_id,
                    jsonb_agg(jsonb_build_object('instance', instance, 'database', database, 'protected_item_id', id)
                              order by rn) as items
             from due
             group by vm_id, (rn - 1) * ceil(n / 50.0)::int8 / n
         ), history as (
             insert into jobs (id, vm_id, subscription_id, vault_id, kind, status, priority, items, payload, max_attempts)
             select id, vm_id, subscription_id, vault_id, 'backup_log', 'queued', 1, items, '{}', $2 from grouped
         )
         insert into job_queue (job_id, vm_id, kind, priority, run_at, max_attempts)
         select id, vm_id, 'backup_log', 1, now(), $2 from grouped";
    let t = Instant::now();
    let mut tx = pool.begin().await?;
    let done = sqlx::query(sql)
        .bind(policy_id)
        .bind(JobKind::BackupLog.max_attempts())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((done.rows_affected(), t.elapsed()))
}

struct TickResult {
    items: u64,
    tick: Duration,
    idle_tick: Duration,
    lower: Duration,
}

async fn tick(ctx: &Ctx, args: &TickArgs) -> anyhow::Result<Vec<String>> {
    let mut results: Vec<TickResult> = Vec::new();
    let mut lines = Vec::new();
    let now = tick_now();
    for &items in &args.items {
        eprintln!("tick N={items}: building the fixture ({} VMs)", args.vms);
        let fx = tick_fixture(ctx, items, args.vms).await?;
        eprintln!(
            "tick N={items}: fixture built in {:.1} s ({}); {} jobs expected",
            secs(fx.build),
            fx.size,
            fx.expected_jobs
        );
        if args.server_timeouts {
            let settings = [
                ("statement_timeout", "30s"),
                ("idle_in_transaction_session_timeout", "60s"),
            ];
            let outcome = measure_tick(ctx, &fx, items, now, &settings).await;
            fx.db.drop_db().await;
            let line = match outcome {
                Ok((tick, _, conditions, _)) => format!(
                    "tick N={items} with the server's statement_timeout 30s: succeeded in {:.2} s; {conditions}",
                    secs(tick)
                ),
                Err(e) => {
                    format!("tick N={items} with the server's statement_timeout 30s: FAILED: {e:#}")
                }
            };
            println!("{line}");
            lines.push(line);
            continue;
        }
        let outcome = tick_one(ctx, &fx, items, now).await;
        fx.db.drop_db().await;
        let (r, line) = outcome?;
        println!("{line}");
        lines.push(line);
        results.push(r);
    }
    if let (Some(a), Some(b)) = (results.first(), results.last())
        && results.len() > 1
    {
        let line = format!(
            "tick growth N={}→{} (x{:.0} items): schedule_tick x{:.1}, lower bound x{:.1}, idle tick x{:.1}",
            a.items,
            b.items,
            b.items as f64 / a.items as f64,
            secs(b.tick) / secs(a.tick),
            secs(b.lower) / secs(a.lower),
            secs(b.idle_tick) / secs(a.idle_tick),
        );
        println!("{line}");
        lines.push(line);
    }
    Ok(lines)
}

/// `Service::schedule_tick` on a fresh copy of the fixture, then an idle tick (nothing
/// due).
async fn measure_tick(
    ctx: &Ctx,
    fx: &TickFixture,
    items: u64,
    now: DateTime<Utc>,
    settings: &[(&str, &str)],
) -> anyhow::Result<(Duration, Duration, String, f64)> {
    let copy = fx.db.copy("tick_run").await?;
    let measured = async {
        let pool = copy.pool_with(4, settings).await?;
        let service = bench_service(pool.clone());
        let conditions = wait_quiet(ctx, "tick").await;
        let cpu = CpuMeter::start();
        let t = Instant::now();
        let enqueued = service.schedule_tick(now).await?;
        let tick = t.elapsed();
        let cores = cpu.busy_cores();
        let conditions = format!("{conditions}; {}", cpu.split());
        ensure!(
            enqueued as i64 == fx.expected_jobs,
            "schedule_tick enqueued {enqueued} jobs, expected {}",
            fx.expected_jobs
        );
        tick_verify(&pool, fx, items).await?;
        let t = Instant::now();
        let idle = service
            .schedule_tick(now + chrono::Duration::minutes(1))
            .await?;
        let idle_tick = t.elapsed();
        ensure!(idle == 0, "the idle tick enqueued {idle} jobs");
        eprintln!(
            "tick N={items}: schedule_tick {:.2} s ({enqueued} jobs, {cores:.1} cores busy; {conditions}); idle tick {:.3} s",
            secs(tick),
            secs(idle_tick)
        );
        pool.close().await;
        Ok::<_, anyhow::Error>((tick, idle_tick, conditions, cores))
    }
    .await;
    copy.drop_db().await;
    measured
}

async fn tick_one(
    ctx: &Ctx,
    fx: &TickFixture,
    items: u64,
    now: DateTime<Utc>,
) -> anyhow::Result<(TickResult, String)> {
    // 1. The real tick, then an idle one (nothing due).
    let (tick, idle_tick, conditions, cores) = measure_tick(ctx, fx, items, now, &[]).await?;

    // 2. The same tick step by step (where the time goes).
    let copy = fx.db.copy("tick_steps").await?;
    let steps = async {
        let pool = copy.pool(2).await?;
        wait_quiet(ctx, "tick steps").await;
        let steps = tick_steps(&pool, now).await?;
        tick_verify(&pool, fx, items).await?;
        pool.close().await;
        Ok::<_, anyhow::Error>(steps)
    }
    .await;
    copy.drop_db().await;
    for (name, d) in &steps? {
        eprintln!("tick N={items}:   step {name}: {:.3} s", secs(*d));
    }

    // 3. The lower bound: the same jobs from one INSERT ... SELECT.
    let copy = fx.db.copy("tick_lower").await?;
    let lower = async {
        let pool = copy.pool(2).await?;
        let conditions = wait_quiet(ctx, "tick lower bound").await;
        let (rows, took) = tick_lower_bound(&pool, fx.policy_id).await?;
        ensure!(rows as i64 == fx.expected_jobs, "lower bound: {rows} rows");
        tick_verify(&pool, fx, items).await?;
        eprintln!(
            "tick N={items}: lower bound {:.2} s ({conditions})",
            secs(took)
        );
        pool.close().await;
        Ok::<_, anyhow::Error>(took)
    }
    .await;
    copy.drop_db().await;
    let lower = lower?;
    let ratio = secs(tick) / secs(lower);
    let line = format!(
        "tick N={items}: schedule_tick {:.2} s, {} jobs verified; lower bound (INSERT ... SELECT of the jobs) {:.2} s → {ratio:.2}x ({}; goal ≤ 2x); idle tick {:.3} s; {conditions}, {cores:.1} cores busy",
        secs(tick),
        fx.expected_jobs,
        secs(lower),
        if ratio <= 2.0 { "met" } else { "not met" },
        secs(idle_tick),
    );
    Ok((
        TickResult {
            items,
            tick,
            idle_tick,
            lower,
        },
        line,
    ))
}

// ---------------------------------------------------------------------------------------
// ingest

/// The real server, started with `--dev` on a free port.
struct Server {
    child: Child,
    pid: u32,
    base: String,
    admin: String,
}

impl Server {
    fn start(bin: &Path, database_url: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .env("DATABASE_URL", database_url)
            // The periodic scheduler ticks at the real time; the benchmark ticks at chosen
            // instants (`POST /v1/scheduler/run`), so the periodic one stays out of the way.
            .env("BACKVAULT_SCHEDULER_INTERVAL", "1h")
            .env("BACKVAULT_LOG", "warn,backvault=info")
            .env_remove("BACKVAULT_LISTEN")
            .env_remove("BACKVAULT_JWT_SECRET")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let stderr = child.stderr.take().context("server stderr")?;
        let (tx, rx) = std::sync::mpsc::channel::<(Option<String>, Option<String>)>();
        // The --dev admin token comes on stderr, the logs on stdout; both pipes are read
        // to their end so the server never blocks on a full one.
        let token_tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                match line.strip_prefix("export BACKVAULT_TOKEN=") {
                    Some(token) => drop(token_tx.send((Some(token.trim().to_owned()), None))),
                    None => eprintln!("{line}"),
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(log) = serde_json::from_str::<Value>(&line)
                    && log["message"] == "listening"
                    && let Some(addr) = log["addr"].as_str()
                {
                    let _ = tx.send((None, Some(addr.to_owned())));
                }
            }
        });
        let (mut admin, mut addr) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while admin.is_none() || addr.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((t, a)) => {
                    admin = admin.or(t);
                    addr = addr.or(a);
                }
                Err(_) => {
                    let _ = child.kill();
                    bail!("the server printed no token and \"listening\" line within 60 s");
                }
            }
        }
        Ok(Self {
            pid: child.id(),
            child,
            base: format!("http://{}", addr.unwrap_or_default()),
            admin: admin.unwrap_or_default(),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone)]
struct Http {
    client: reqwest::Client,
    base: Arc<String>,
}

impl Http {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = res.status().as_u16();
        let bytes = res.bytes().await?;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Ok((status, value))
    }

    /// POST that must answer `expect`.
    async fn post(
        &self,
        path: &str,
        token: &str,
        body: &Value,
        expect: u16,
    ) -> anyhow::Result<Value> {
        let (status, value) = self
            .call(reqwest::Method::POST, path, token, Some(body))
            .await?;
        ensure!(status == expect, "POST {path}: {status} {value}");
        Ok(value)
    }

    async fn get(&self, path: &str, token: &str) -> anyhow::Result<Value> {
        let (status, value) = self.call(reqwest::Method::GET, path, token, None).await?;
        ensure!(status == 200, "GET {path}: {status} {value}");
        Ok(value)
    }
}

/// A fake SQL Server's log-sequence state per database, so that reported points chain.
#[derive(Default)]
struct Lsns {
    next: u128,
    full_first: HashMap<String, u128>,
    last_log: HashMap<String, u128>,
}

impl Lsns {
    fn point(&mut self, instance: &str, db: &str, kind: &str, at: DateTime<Utc>) -> Value {
        self.next += 10;
        let (first, last, base, backup_type) = match kind {
            "backup_full" => {
                let first = self.next;
                self.full_first.insert(db.to_owned(), first);
                // A full does not break the log chain; before the first log, the chain
                // starts within the first full.
                self.last_log.entry(db.to_owned()).or_insert(first + 5);
                (first, first + 5, first, "full")
            }
            "backup_differential" => (
                self.next,
                self.next + 5,
                self.full_first.get(db).copied().unwrap_or(0),
                "differential",
            ),
            _ => {
                let first = self.last_log.get(db).copied().unwrap_or(0);
                self.last_log.insert(db.to_owned(), self.next + 5);
                (
                    first,
                    self.next + 5,
                    self.full_first.get(db).copied().unwrap_or(0),
                    "log",
                )
            }
        };
        json!({"instance": instance, "database": db, "backup_type": backup_type,
               "started_at": at - chrono::Duration::seconds(30), "backup_time": at,
               "first_lsn": first.to_string(), "last_lsn": last.to_string(),
               "database_backup_lsn": base.to_string(), "size_bytes": 1_073_741_824i64})
    }
}

struct AgentSim {
    vm_id: Uuid,
    token: String,
    databases: usize,
    lsns: Lsns,
}

#[derive(Default, Clone)]
struct DrainStats {
    kinds: std::collections::BTreeMap<String, usize>,
    jobs: usize,
    points: usize,
    claims: usize,
    claim_time: Duration,
    complete_time: Duration,
    complete_max: Duration,
}

impl AgentSim {
    fn inventory(&self) -> Value {
        let databases: Vec<Value> = (1..=self.databases)
            .map(|d| json!({"instance": "MSSQLSERVER", "name": format!("db{d:03}"), "recovery_model": "full", "size_bytes": 1_073_741_824i64}))
            .collect();
        json!({"instances": [{"name": "MSSQLSERVER", "version": "2019"}], "databases": databases})
    }

    /// Claims and completes jobs until none is left, as an agent would; backups report
    /// one point per database taken at `at`.
    async fn drain(&mut self, http: &Http, at: DateTime<Utc>) -> anyhow::Result<DrainStats> {
        let mut stats = DrainStats::default();
        loop {
            let t = Instant::now();
            let claimed = http
                .post(
                    "/v1/agent/claim",
                    &self.token,
                    &json!({"max_jobs": 50, "wait_seconds": 0}),
                    200,
                )
                .await?;
            stats.claim_time += t.elapsed();
            stats.claims += 1;
            let jobs = claimed["jobs"].as_array().cloned().unwrap_or_default();
            if jobs.is_empty() {
                return Ok(stats);
            }
            for job in jobs {
                let kind = job["kind"].as_str().unwrap_or("").to_owned();
                let result = match kind.as_str() {
                    "discovery" => json!({"kind": "discovery", "inventory": self.inventory()}),
                    "configure_protection" => json!({"kind": "configure_protection"}),
                    k if k.starts_with("backup_") => {
                        let points: Vec<Value> = job["items"]
                            .as_array()
                            .map(Vec::as_slice)
                            .unwrap_or_default()
                            .iter()
                            .map(|i| {
                                self.lsns.point(
                                    i["instance"].as_str().unwrap_or(""),
                                    i["database"].as_str().unwrap_or(""),
                                    k,
                                    at,
                                )
                            })
                            .collect();
                        stats.points += points.len();
                        json!({"kind": "backup", "recovery_points": points})
                    }
                    other => bail!("unexpected job kind {other}"),
                };
                let t = Instant::now();
                http.post(
                    &format!(
                        "/v1/agent/jobs/{}/complete",
                        job["job_id"].as_str().unwrap_or("")
                    ),
                    &self.token,
                    &json!({"lease": job["lease"], "result": result}),
                    200,
                )
                .await?;
                let took = t.elapsed();
                stats.complete_time += took;
                stats.complete_max = stats.complete_max.max(took);
                stats.jobs += 1;
                *stats.kinds.entry(kind).or_default() += 1;
            }
        }
    }
}

/// Every agent drains its jobs at once; returns the agents and their summed statistics
/// and the wall time.
async fn drain_all(
    http: &Http,
    agents: Vec<AgentSim>,
    at: DateTime<Utc>,
) -> anyhow::Result<(Vec<AgentSim>, DrainStats, Duration)> {
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, mut agent) in agents.into_iter().enumerate() {
        let http = http.clone();
        set.spawn(async move {
            let stats = agent.drain(&http, at).await;
            (i, agent, stats)
        });
    }
    let mut back: Vec<Option<AgentSim>> = Vec::new();
    let mut total = DrainStats::default();
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        let (i, agent, stats) = joined?;
        if back.len() <= i {
            back.resize_with(i + 1, || None);
        }
        back[i] = Some(agent);
        match stats {
            Ok(s) => {
                total.jobs += s.jobs;
                for (k, n) in s.kinds {
                    *total.kinds.entry(k).or_default() += n;
                }
                total.points += s.points;
                total.claims += s.claims;
                total.claim_time += s.claim_time;
                total.complete_time += s.complete_time;
                total.complete_max = total.complete_max.max(s.complete_max);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let wall = started.elapsed();
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok((back.into_iter().flatten().collect(), total, wall))
}

/// Runs `count` tasks of `f`, `concurrency` at a time.
async fn for_each_concurrent<F, Fut>(count: usize, concurrency: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..count {
        let permit = gate.clone().acquire_owned().await?;
        let fut = f(i);
        set.spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// The next instant on a whole hour strictly after `t`.
fn next_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    let s = t.timestamp();
    DateTime::from_timestamp((s / 3600 + 1) * 3600, 0).expect("a valid instant")
}

async fn ingest(ctx: &Ctx, args: &IngestArgs) -> anyhow::Result<String> {
    let bin = args
        .server_bin
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/release/backvault"));
    ensure!(
        bin.is_file(),
        "no server binary at {}; run `cargo build --release -p backvault`",
        bin.display()
    );
    let db = Scratch::create(&ctx.admin_url, "ingest", None).await?;
    let outcome = ingest_on(ctx, args, &bin, &db).await;
    db.drop_db().await;
    outcome
}

async fn ingest_on(
    ctx: &Ctx,
    args: &IngestArgs,
    bin: &Path,
    db: &Scratch,
) -> anyhow::Result<String> {
    let server = Server::start(bin, &db.url)?;
    let pool = db.pool(2).await?;
    let http = Http {
        client: reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(120))
            .build()?,
        base: Arc::new(server.base.clone()),
    };
    let admin = server.admin.clone();
    let setup = Instant::now();

    // A vault (with its default policy HourlyLogBackup) and the enrolled agents.
    let vault = http
        .post(
            "/v1/vaults",
            &admin,
            &json!({"name": "ingest-vault", "subscription_id": "sub-1", "resource_group": "rg-bench", "region": "westeurope"}),
            201,
        )
        .await?["id"]
        .as_str()
        .context("vault id")?
        .to_owned();
    // An enrollment token enrolls at most 100 VMs.
    let mut enrollment = Vec::new();
    for _ in 0..args.agents.div_ceil(100) {
        enrollment.push(
            http.post(
                "/v1/enrollment-tokens",
                &admin,
                &json!({"subscription_id": "sub-1", "ttl_seconds": 7200, "max_uses": 100}),
                201,
            )
            .await?["token"]
                .as_str()
                .context("enrollment token")?
                .to_owned(),
        );
    }
    let enrollment = Arc::new(enrollment);
    let enrolled = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    {
        let (http, enrollment, enrolled) = (http.clone(), enrollment.clone(), enrolled.clone());
        for_each_concurrent(args.agents, 16, move |i| {
            let (http, enrollment, enrolled) = (http.clone(), enrollment.clone(), enrolled.clone());
            async move {
                let enrollment = &enrollment[i / 100];
                let facts = json!({"name": format!("bench-vm-{i:05}"), "resource_group": "rg-bench", "subscription_id": "sub-1",
                    "region": "westeurope", "deployment_model": "resource_manager", "agent_version": "1.0.0",
                    "dotnet_version": "4.8", "sql_iaas_extension": true, "other_backup_product": false});
                let res = http
                    .post("/v1/agent/enroll", enrollment, &json!({"facts": facts}), 200)
                    .await?;
                let vm_id: Uuid = res["vm_id"].as_str().context("vm_id")?.parse()?;
                let token = res["agent_token"].as_str().context("agent_token")?.to_owned();
                enrolled.lock().await.push((i, vm_id, token));
                Ok(())
            }
        })
        .await?;
    }
    let mut enrolled = std::mem::take(&mut *enrolled.lock().await);
    enrolled.sort_by_key(|e| e.0);
    let mut agents: Vec<AgentSim> = enrolled
        .into_iter()
        .map(|(i, vm_id, token)| AgentSim {
            vm_id,
            token,
            databases: args.databases,
            lsns: Lsns {
                next: (i as u128 + 1) * 1_000_000_000_000,
                ..Lsns::default()
            },
        })
        .collect();

    // Registration: a discovery job per VM, completed with an inventory of N databases.
    {
        let vms: Arc<Vec<Uuid>> = Arc::new(agents.iter().map(|a| a.vm_id).collect());
        let (http, admin, vault) = (http.clone(), admin.clone(), vault.clone());
        for_each_concurrent(vms.len(), 16, move |i| {
            let (http, admin, vault, vms) =
                (http.clone(), admin.clone(), vault.clone(), vms.clone());
            async move {
                http.post(
                    &format!("/v1/vaults/{vault}/vms/{}/discover", vms[i]),
                    &admin,
                    &json!({}),
                    202,
                )
                .await?;
                Ok(())
            }
        })
        .await?;
    }
    let (back, stats, _) = drain_all(&http, agents, Utc::now()).await?;
    agents = back;
    ensure!(
        stats.jobs == agents.len(),
        "{} discovery jobs completed, expected {}",
        stats.jobs,
        agents.len()
    );

    // Protection of every database with HourlyLogBackup, then the configure jobs.
    let containers = http
        .get(&format!("/v1/vaults/{vault}/protectable-items"), &admin)
        .await?;
    let ids: Vec<Value> = containers
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .flat_map(|c| c["databases"].as_array().cloned().unwrap_or_default())
        .filter(|d| d["protectable"] == true)
        .map(|d| d["id"].clone())
        .collect();
    let total_dbs = args.agents * args.databases;
    ensure!(
        ids.len() == total_dbs,
        "{} protectable databases, expected {total_dbs}",
        ids.len()
    );
    for chunk in ids.chunks(1000) {
        http.post(
            &format!("/v1/vaults/{vault}/protected-items"),
            &admin,
            &json!({"policy": "HourlyLogBackup", "databases": chunk}),
            202,
        )
        .await?;
    }
    let (back, _, _) = drain_all(&http, agents, Utc::now()).await?;
    agents = back;
    let protected: i64 =
        sqlx::query_scalar("select count(*) from protected_items where state = 'protected'")
            .fetch_one(&pool)
            .await?;
    ensure!(
        protected as usize == total_dbs,
        "{protected} items protected, expected {total_dbs}"
    );
    eprintln!(
        "ingest: {} agents, {total_dbs} databases protected in {:.1} s",
        agents.len(),
        secs(setup.elapsed())
    );

    // The scheduler: the first tick only sets the cursors; the next slot is promoted to
    // a full (no full in the chain yet); later slots are logs.
    // Tomorrow 00:01 UTC: the slots measured below (01:00, 02:00, ...) stay clear of the
    // policy's daily full at 22:00, so each round is one kind of backup.
    let t0 = DateTime::from_timestamp((Utc::now().timestamp() / 86_400 + 1) * 86_400 + 60, 0)
        .context("tomorrow")?;
    let first = http
        .post("/v1/scheduler/run", &admin, &json!({"now": t0}), 200)
        .await?;
    ensure!(
        first["jobs_enqueued"] == 0,
        "the first tick enqueued jobs: {first}"
    );
    let mut slot = next_hour(t0);
    let mut rounds = Vec::new();
    for round in 0..=args.log_rounds {
        let label = if round == 0 {
            "full slot".to_owned()
        } else {
            format!("log slot {round}")
        };
        let t = Instant::now();
        let run = http
            .post("/v1/scheduler/run", &admin, &json!({"now": slot}), 200)
            .await?;
        let tick = t.elapsed();
        if round == 1 && args.preload_logs > 0 {
            preload_logs(&pool, args.preload_logs).await?;
        }
        let enqueued = run["jobs_enqueued"].as_u64().unwrap_or(0);
        ensure!(enqueued > 0, "the {label} slot enqueued no jobs: {run}");
        let before: i64 = sqlx::query_scalar("select count(*) from recovery_points")
            .fetch_one(&pool)
            .await?;
        let conditions = wait_quiet(ctx, "ingest").await;
        let cpu = CpuMeter::with_server(Some(server.pid));
        let (back, stats, wall) =
            drain_all(&http, agents, slot + chrono::Duration::minutes(5)).await?;
        let cores = cpu.busy_cores();
        let split = cpu.split();
        agents = back;
        let (after, gaps, left): (i64, i64, i64) = sqlx::query_as(
            "select (select count(*) from recovery_points), (select count(*) from recovery_points where chain_gap),
                    (select count(*) from job_queue)",
        )
        .fetch_one(&pool)
        .await?;
        let recorded = (after - before) as usize;
        ensure!(
            recorded == stats.points,
            "{recorded} points recorded, {} reported",
            stats.points
        );
        ensure!(gaps == 0, "{gaps} points with a chain gap");
        let want = if round == 0 {
            "backup_full"
        } else {
            "backup_log"
        };
        ensure!(
            stats.kinds.keys().all(|k| k == want),
            "the {label} ran {:?}, expected only {want}",
            stats.kinds
        );
        ensure!(left == 0, "{left} jobs left in the queue");
        let rate = recorded as f64 / secs(wall);
        let line = format!(
            "ingest {label} ({slot}): {recorded} points in {} jobs {:?} in {:.2} s = {rate:.0} points/s (goal ≥ 5000: {}); mean claim {:.1} ms, mean complete {:.1} ms, max complete {:.0} ms; scheduler run {:.2} s; {conditions}, {cores:.1} cores busy ({split})",
            stats.jobs,
            stats.kinds,
            secs(wall),
            if rate >= 5000.0 { "met" } else { "not met" },
            secs(stats.claim_time) * 1000.0 / stats.claims.max(1) as f64,
            secs(stats.complete_time) * 1000.0 / stats.jobs.max(1) as f64,
            secs(stats.complete_max) * 1000.0,
            secs(tick),
        );
        eprintln!("{line}");
        rounds.push((label, recorded, wall, rate));
        slot += chrono::Duration::hours(1);
    }
    let logs: Vec<&(String, usize, Duration, f64)> = rounds.iter().skip(1).collect();
    let log_points: usize = logs.iter().map(|r| r.1).sum();
    let log_wall: f64 = logs.iter().map(|r| secs(r.2)).sum();
    let full = &rounds[0];
    let log_rate = log_points as f64 / log_wall.max(f64::MIN_POSITIVE);
    pool.close().await;
    drop(server);
    Ok(format!(
        "ingest ({} agents × {} databases): full slot {} points in {:.2} s = {:.0} points/s; log slots {} points in {:.2} s = {log_rate:.0} points/s; goal ≥ 5000 points/s: {}",
        args.agents,
        args.databases,
        full.1,
        secs(full.2),
        full.3,
        log_points,
        log_wall,
        if full.3 >= 5000.0 && log_rate >= 5000.0 {
            "met"
        } else {
            "not met"
        }
    ))
}

/// `per_item` logs on every item's full, as if its chain had run that long: zero-length
/// (first = last = the chain's end), so the agents' next logs still chain; the fulls'
/// chain_until raised as `fulls_extend_chain` would have.
async fn preload_logs(pool: &PgPool, per_item: u32) -> anyhow::Result<()> {
    let t = Instant::now();
    let mut tx = pool.begin().await?;
    sqlx::query("set local synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    let n = sqlx::query(
        "insert into recovery_points (id, protected_item_id, backup_type, started_at, backup_time, log_from, first_lsn,
                                      last_lsn, database_backup_lsn, size_bytes, full_id, expires_at)
         select gen_random_uuid(), p.id, 'log', f.backup_time + k * interval '1 second',
                f.backup_time + k * interval '1 second', f.backup_time + (k - 1) * interval '1 second',
                (p.chain ->> 'log_end')::numeric, (p.chain ->> 'log_end')::numeric,
                (p.chain -> 'base' ->> 'first_lsn')::numeric, 1048576, f.id,
                f.backup_time + k * interval '1 second' + interval '30 days'
         from generate_series(1, $1::int8) k, protected_items p join recovery_points f on f.id = p.last_full_id
         order by k, p.id",
    )
    .bind(i64::from(per_item))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(
        "update recovery_points f set chain_until = f.backup_time + $1 * interval '1 second' + interval '30 days'
         where f.backup_type = 'full'",
    )
    .bind(f64::from(per_item))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    vacuum_analyze(pool).await?;
    eprintln!(
        "ingest: preloaded {n} logs ({per_item} per database) in {:.1} s",
        secs(t.elapsed())
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// sweep

async fn sweep(ctx: &Ctx, args: &SweepArgs) -> anyhow::Result<String> {
    let fx = Scratch::create(&ctx.admin_url, "sweep_fx", None).await?;
    let outcome = async {
        let expected = sweep_fixture(args, &fx).await?;
        let mut lines = Vec::new();
        for variant in [SweepVariant::AsRecorded, SweepVariant::FullsLast] {
            let copy = fx.copy("sweep_run").await?;
            let line = sweep_run(ctx, &copy, variant, expected).await;
            copy.drop_db().await;
            let line = line.unwrap_or_else(|e| format!("sweep {}: FAILED: {e:#}", variant.label()));
            println!("{line}");
            lines.push(line);
        }
        Ok::<_, anyhow::Error>(lines.join("\n"))
    }
    .await;
    fx.drop_db().await;
    outcome
}

/// Guard items: their full expired long ago, but a log depending on it is live.
const GUARD_ITEMS: i64 = 20;

#[derive(Clone, Copy)]
enum SweepVariant {
    /// Fulls' chain_until is their last log's expiry, as `fulls_extend_chain` keeps it:
    /// a full and its last log have the same delete_after.
    AsRecorded,
    /// Fulls' chain_until one second later, so each full sorts after all its logs.
    FullsLast,
}

impl SweepVariant {
    fn label(self) -> &'static str {
        match self {
            SweepVariant::AsRecorded => "as recorded (full ties its last log)",
            SweepVariant::FullsLast => "fulls 1 s after their last log",
        }
    }
}

/// Builds the fixture; returns how many points a sweep must remove.
async fn sweep_fixture(args: &SweepArgs, db: &Scratch) -> anyhow::Result<i64> {
    let started = Instant::now();
    let pool = db.pool(4).await?;
    backvault_store::MIGRATOR.run(&pool).await?;
    let vms = (args.items / 10).max(1) as i64;
    let items = args.items as i64;
    let logs = args.points_per_item.saturating_sub(1) as i64;
    let (vault_id, policy_id) = (Uuid::now_v7(), Uuid::now_v7());
    // A month ago: every point below expired days ago (7-day retention).
    let base = Utc::now() - chrono::Duration::days(30);
    let mut tx = pool.begin().await?;
    sqlx::query("set local synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    sqlx::query(SEQ_UUID).execute(&mut *tx).await?;
    for sql in [
        "insert into vaults (id, subscription_id, resource_group, name, region)
         values ($1, 'sub-1', 'rg-bench', 'bench-vault', 'westeurope')",
        "insert into policies (id, vault_id, name, spec) values ($2, $1, 'Gold', $4::jsonb)",
        // One more VM for the guard items.
        "insert into vms (id, subscription_id, resource_group, name, region, deployment_model, vault_id)
         select pg_temp.seq_uuid(1, g), 'sub-1', 'rg-bench', 'bench-vm-' || lpad(g::text, 5, '0'), 'westeurope',
                'resource_manager', $1
         from generate_series(0, $3::int8) g",
        "insert into sql_instances (id, vm_id, name, version)
         select pg_temp.seq_uuid(2, g), pg_temp.seq_uuid(1, g), 'MSSQLSERVER', '2019' from generate_series(0, $3::int8) g",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(vault_id)
            .bind(policy_id)
            .bind(vms)
            .bind(TICK_POLICY)
            .execute(&mut *tx)
            .await?;
    }
    // Items 0..items on VMs 1..=vms; guard items -1..=-GUARD_ITEMS on VM 0.
    sqlx::query(
        "insert into sql_databases (id, vm_id, instance_id, name, recovery_model)
         select pg_temp.seq_uuid(3, s), pg_temp.seq_uuid(1, case when s < 0 then 0 else s % $2 + 1 end),
                pg_temp.seq_uuid(2, case when s < 0 then 0 else s % $2 + 1 end), 'db' || s, 'full'
         from generate_series(-$3::int8, $1::int8 - 1) s",
    )
    .bind(items)
    .bind(vms)
    .bind(GUARD_ITEMS)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into protected_items (id, vault_id, database_id, policy_id, state, protected_name, chain)
         select pg_temp.seq_uuid(4, s), $2, pg_temp.seq_uuid(3, s), $3, 'protected', 'db' || s, '{\"needs\": \"nothing\"}'
         from generate_series(-$4::int8, $1::int8 - 1) s",
    )
    .bind(items)
    .bind(vault_id)
    .bind(policy_id)
    .bind(GUARD_ITEMS)
    .execute(&mut *tx)
    .await?;
    // Per item a full at `base` and `logs` 15-minute logs on it, each kept 7 days; the
    // full's chain_until is its last log's expiry (as fulls_extend_chain keeps it).
    // Inserted in time order, as they would have been recorded.
    sqlx::query(
        "insert into recovery_points (id, protected_item_id, backup_type, started_at, backup_time, first_lsn, last_lsn,
                                      database_backup_lsn, size_bytes, expires_at, chain_until)
         select pg_temp.seq_uuid(5, s), pg_temp.seq_uuid(4, s), 'full', $2, $2, 1000, 1005, 1000, 1073741824,
                $2 + interval '7 days', $2 + interval '7 days' + $3 * interval '15 minutes'
         from generate_series(0, $1::int8 - 1) s",
    )
    .bind(items)
    .bind(base)
    .bind(logs as f64)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into recovery_points (id, protected_item_id, backup_type, started_at, backup_time, log_from, first_lsn,
                                      last_lsn, database_backup_lsn, size_bytes, full_id, expires_at)
         select pg_temp.seq_uuid(6, k * 1000000000 + s), pg_temp.seq_uuid(4, s), 'log', $2 + k * interval '15 minutes',
                $2 + k * interval '15 minutes', $2 + (k - 1) * interval '15 minutes', 995 + k * 10, 1005 + k * 10, 1000,
                1048576, pg_temp.seq_uuid(5, s), $2 + k * interval '15 minutes' + interval '7 days'
         from generate_series(1, $3::int8) k, generate_series(0, $1::int8 - 1) s
         order by k, s",
    )
    .bind(items)
    .bind(base)
    .bind(logs)
    .execute(&mut *tx)
    .await?;
    // Guard items: an expired full with an expired and a live log. Half keep chain_until
    // as fulls_extend_chain would (the live log's expiry); half have it stale (in the
    // past), so only the sweep's own check keeps the full.
    sqlx::query(
        "insert into recovery_points (id, protected_item_id, backup_type, started_at, backup_time, first_lsn, last_lsn,
                                      database_backup_lsn, size_bytes, expires_at, chain_until)
         select pg_temp.seq_uuid(5, s), pg_temp.seq_uuid(4, s), 'full', $1, $1, 1000, 1005, 1000, 1073741824,
                $1 + interval '7 days',
                case when s % 2 = 0 then now() + interval '1 day' else $1 + interval '8 days' end
         from generate_series(-$2::int8, -1) s",
    )
    .bind(base)
    .bind(GUARD_ITEMS)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into recovery_points (id, protected_item_id, backup_type, started_at, backup_time, first_lsn, last_lsn,
                                      database_backup_lsn, size_bytes, full_id, expires_at)
         select pg_temp.seq_uuid(7, s * 10 + k), pg_temp.seq_uuid(4, s), 'log', $1 + k * interval '1 day', $1 + k * interval '1 day',
                995 + k * 10, 1005 + k * 10, 1000, 1048576, pg_temp.seq_uuid(5, s),
                case when k = 1 then $1 + interval '8 days' else now() + interval '1 day' end
         from generate_series(-$2::int8, -1) s, generate_series(1, 2) k",
    )
    .bind(base)
    .bind(GUARD_ITEMS)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    vacuum_analyze(&pool).await?;
    let (total, expired): (i64, i64) = sqlx::query_as(
        "select count(*), count(*) filter (where delete_after < now()) from recovery_points",
    )
    .fetch_one(&pool)
    .await?;
    let size: String =
        sqlx::query_scalar("select pg_size_pretty(pg_total_relation_size('recovery_points'))")
            .fetch_one(&pool)
            .await?;
    eprintln!(
        "sweep: fixture of {total} points ({expired} with delete_after in the past, recovery_points {size}) built in {:.1} s",
        secs(started.elapsed())
    );
    pool.close().await;
    Ok(items * (logs + 1) + GUARD_ITEMS)
}

async fn sweep_run(
    ctx: &Ctx,
    db: &Scratch,
    variant: SweepVariant,
    expected_removed: i64,
) -> anyhow::Result<String> {
    let pool = db.pool(4).await?;
    if let SweepVariant::FullsLast = variant {
        sqlx::query(
            "update recovery_points set chain_until = chain_until + interval '1 second'
             where backup_type = 'full' and delete_after < now()",
        )
        .execute(&pool)
        .await?;
        vacuum_analyze(&pool).await?;
    }
    let total: i64 = sqlx::query_scalar("select count(*) from recovery_points")
        .fetch_one(&pool)
        .await?;
    let service = bench_service(pool.clone());
    let conditions = wait_quiet(ctx, "sweep").await;
    let cpu = CpuMeter::start();
    let t = Instant::now();
    let swept: anyhow::Result<u64> = service.sweep_recovery_points().await.map_err(Into::into);
    let took = t.elapsed();
    let cores = cpu.busy_cores();
    let conditions = format!("{conditions}; {}", cpu.split());
    let removed = match swept {
        Ok(n) => n,
        Err(e) => {
            let left: i64 = sqlx::query_scalar("select count(*) from recovery_points")
                .fetch_one(&pool)
                .await?;
            pool.close().await;
            let removed = total - left;
            return Ok(format!(
                "sweep {}: FAILED after {:.1} s, {removed} of {expected_removed} expired points removed ({:.0} points/s until then): {e}; {conditions}, {cores:.1} cores busy",
                variant.label(),
                secs(took),
                removed as f64 / secs(took),
            ));
        }
    };
    let (left, guard_fulls, guard_live): (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from recovery_points),
                (select count(*) from recovery_points r join protected_items p on p.id = r.protected_item_id
                 where p.protected_name like 'db-%' and r.backup_type = 'full'),
                (select count(*) from recovery_points r join protected_items p on p.id = r.protected_item_id
                 where p.protected_name like 'db-%' and r.backup_type = 'log' and r.expires_at > now())",
    )
    .fetch_one(&pool)
    .await?;
    ensure!(
        removed as i64 == expected_removed,
        "the sweep removed {removed} points, expected {expected_removed}"
    );
    ensure!(
        guard_fulls == GUARD_ITEMS && guard_live == GUARD_ITEMS && left == 2 * GUARD_ITEMS,
        "after the sweep: {left} points left, {guard_fulls} guarded fulls, {guard_live} live logs (expected {}, {GUARD_ITEMS}, {GUARD_ITEMS})",
        2 * GUARD_ITEMS
    );
    pool.close().await;
    let rate = removed as f64 / secs(took);
    let line = format!(
        "sweep {}: {removed} expired points removed in {:.1} s = {rate:.0} points/s (batches of up to 10,000); {GUARD_ITEMS} fulls with a live dependent kept (half with a stale chain_until); {conditions}, {cores:.1} cores busy",
        variant.label(),
        secs(took),
    );
    Ok(line)
}
