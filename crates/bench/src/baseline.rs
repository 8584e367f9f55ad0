//! The reference point: a naive Postgres queue driven by pgbench. One pgbench
//! "transaction" is one run of the script: a claim statement and a complete statement,
//! each autocommitted (so two Postgres transactions, two fsyncs), i.e. one job.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use backvault_bench::db::with_db;
use backvault_bench::sys::{CpuSnapshot, CpuSplit};

use crate::DB_PREFIX;

#[derive(Debug, Clone, Copy, ValueEnum, Serialize, Deserialize)]
pub enum CompleteMode {
    /// `DELETE FROM bench_jobs WHERE id = :id`
    Delete,
    /// `UPDATE bench_jobs SET state = 'done' WHERE id = :id`
    Update,
}

#[derive(Debug, Clone, Parser)]
pub struct BaselineArgs {
    /// Pending rows loaded before the run (must outlast it: claims fail on an empty queue).
    #[arg(long, default_value_t = 500_000)]
    pub rows: i64,
    /// pgbench clients (connections).
    #[arg(long, default_value_t = 8)]
    pub clients: u32,
    /// pgbench worker threads.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// Length of the run.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// How the naive queue completes a job.
    #[arg(long, value_enum, default_value = "delete")]
    pub complete: CompleteMode,
    /// The pgbench executable.
    #[arg(long, default_value = "pgbench")]
    pub pgbench: PathBuf,
}

impl Default for BaselineArgs {
    fn default() -> Self {
        Self::parse_from(["baseline"])
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineResult {
    /// pgbench's tps (without connection time) = jobs/s.
    pub jobs_per_sec: f64,
    /// Script runs (jobs) pgbench counted.
    pub transactions: u64,
    pub failed: u64,
    pub latency_ms: f64,
    pub rows_left: i64,
    pub clients: u32,
    pub seconds: u64,
    pub rows: i64,
    pub complete: CompleteMode,
    #[serde(skip)]
    pub cpu: Option<CpuSplit>,
}

impl BaselineResult {
    pub fn summary(&self) -> String {
        let cpu = self.cpu.map(|c| format!(" [{c}]")).unwrap_or_default();
        format!(
            "baseline: {:.0} jobs/s (pgbench naive queue, {} clients, {} s, {} jobs, {} failed, {:.2} ms per claim+complete){cpu}",
            self.jobs_per_sec,
            self.clients,
            self.seconds,
            self.transactions,
            self.failed,
            self.latency_ms
        )
    }
}

// The naive queue's table is the benchmark's own, not backvault's schema, so its statements
// cannot be checked by the `sqlx::query!` macros (which check against backvault's
// migrated schema): they stay runtime strings, all of them static.

const SCHEMA: &str = "create table bench_jobs (
    id      bigserial primary key,
    vm      int not null,
    state   text not null,
    lease   bigint not null default 0,
    payload jsonb not null
)";

const CLAIM: &str = "UPDATE bench_jobs SET state = 'running', lease = lease + 1 WHERE id = (SELECT id FROM bench_jobs WHERE state = 'pending' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id \\gset";

fn script(mode: CompleteMode) -> String {
    let complete = match mode {
        CompleteMode::Delete => "DELETE FROM bench_jobs WHERE id = :id;",
        CompleteMode::Update => "UPDATE bench_jobs SET state = 'done' WHERE id = :id;",
    };
    format!("{CLAIM}\n{complete}\n")
}

fn field<'a>(output: &'a str, prefix: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .map(str::trim)
}

fn first_number(s: &str) -> Option<f64> {
    s.split_whitespace().next()?.parse().ok()
}

pub async fn run(admin_url: &str, args: &BaselineArgs) -> anyhow::Result<BaselineResult> {
    let args = args.clone();
    with_db(admin_url, DB_PREFIX, "baseline", move |db| async move {
        let result = async {
            let pool = db.pool(2).await?;
            sqlx::query(SCHEMA).execute(&pool).await?;
            sqlx::query(
                "insert into bench_jobs (vm, state, payload)
                 select g % 1000, 'pending',
                        jsonb_build_object('kind', 'backup_full',
                                           'items', jsonb_build_array(jsonb_build_object('instance', 'MSSQLSERVER', 'database', 'sales')))
                 from generate_series(1, $1) g",
            )
            .bind(args.rows)
            .execute(&pool)
            .await
            .context("loading bench_jobs")?;
            sqlx::query("create index bench_jobs_pending on bench_jobs (id) where state = 'pending'")
                .execute(&pool)
                .await?;
            sqlx::query("vacuum analyze bench_jobs").execute(&pool).await?;

            backvault_bench::sys::wait_until_quiet().await;
            let script_path = std::env::temp_dir().join(format!("backvault-bench-{}.sql", std::process::id()));
            std::fs::write(&script_path, script(args.complete))?;
            let mut child = Command::new(&args.pgbench)
                .args(["-n", "-M", "prepared", "-c", &args.clients.to_string()])
                .args(["-j", &args.threads.to_string(), "-T", &args.seconds.to_string()])
                .arg("-f")
                .arg(&script_path)
                .arg(&db.url)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {}", args.pgbench.display()))?;
            // CPU split over the middle of the run, while pgbench and its backends live.
            let cpu = if args.seconds >= 4 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let before = CpuSnapshot::take(DB_PREFIX, None);
                tokio::time::sleep(Duration::from_secs(args.seconds - 2)).await;
                Some(CpuSnapshot::take(DB_PREFIX, None).since(&before))
            } else {
                None
            };
            let output = tokio::task::spawn_blocking(move || {
                let mut stdout = String::new();
                let mut stderr = String::new();
                use std::io::Read;
                if let Some(mut s) = child.stdout.take() {
                    let _ = s.read_to_string(&mut stdout);
                }
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut stderr);
                }
                child.wait().map(|status| (status, stdout, stderr))
            })
            .await??;
            let _ = std::fs::remove_file(&script_path);
            let (status, stdout, stderr) = output;
            if !status.success() {
                bail!("pgbench failed ({status}):\n{stdout}\n{stderr}");
            }
            let tps = field(&stdout, "tps =")
                .and_then(first_number)
                .with_context(|| format!("no tps in pgbench output:\n{stdout}"))?;
            let transactions = field(&stdout, "number of transactions actually processed:")
                .and_then(first_number)
                .unwrap_or(0.0) as u64;
            let failed = field(&stdout, "number of failed transactions:")
                .and_then(first_number)
                .unwrap_or(0.0) as u64;
            let latency_ms = field(&stdout, "latency average =")
                .and_then(first_number)
                .unwrap_or(f64::NAN);
            let rows_left: i64 =
                sqlx::query_scalar("select count(*) from bench_jobs where state = 'pending'")
                    .fetch_one(&pool)
                    .await?;
            pool.close().await;
            if rows_left == 0 {
                bail!("the queue ran dry during the run; raise --rows");
            }
            Ok(BaselineResult {
                jobs_per_sec: tps,
                transactions,
                failed,
                latency_ms,
                rows_left,
                clients: args.clients,
                seconds: args.seconds,
                rows: args.rows,
                complete: args.complete,
                cpu,
            })
        }
        .await;
        (db, result)
    })
    .await
}

/// Where the last baseline is kept for `queue` and `http` run on their own.
pub fn cache_path() -> PathBuf {
    backvault_bench::workspace_root().join("target/backvault-bench/baseline.json")
}

pub fn save(result: &BaselineResult) {
    let path = cache_path();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(json) = serde_json::to_string_pretty(result) {
        let _ = std::fs::write(path, json);
    }
}

/// The baseline to compare against: given, cached from the last `baseline` run, or
/// measured now.
pub async fn resolve(admin_url: &str, given: Option<f64>) -> anyhow::Result<(f64, String)> {
    if let Some(jps) = given {
        return Ok((jps, "given with --baseline-jobs-per-sec".into()));
    }
    let path = cache_path();
    if let Ok(json) = std::fs::read_to_string(&path)
        && let Ok(cached) = serde_json::from_str::<BaselineResult>(&json)
    {
        return Ok((
            cached.jobs_per_sec,
            format!("cached in {} (run `baseline` to refresh)", path.display()),
        ));
    }
    eprintln!("no baseline cached; measuring one first");
    let result = run(admin_url, &BaselineArgs::default()).await?;
    println!("{}", result.summary());
    save(&result);
    Ok((result.jobs_per_sec, "measured just now".into()))
}
