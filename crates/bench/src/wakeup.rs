//! Long-poll wake-up latency: many agents wait in `POST /v1/agent/claim` on one server;
//! single jobs are enqueued for random VMs at a steady rate, each in its own transaction;
//! each job's latency runs from its enqueue commit to the claim response that carries it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use backvault_domain::agent::protocol::{ClaimRequest, ClaimResponse};
use backvault_store::jobs::jobs_enqueue;
use clap::Parser;
use rand::Rng;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use backvault_bench::db::with_db;
use backvault_bench::server::{Agent, Launch, Server, enroll_agents, http_client, server_bin};
use backvault_bench::sys::{CpuSnapshot, CpuSplit, status_bytes};

use crate::DB_PREFIX;
use crate::backlog::backup_job;

#[derive(Debug, Clone, Parser)]
pub struct WakeupArgs {
    /// Agents waiting in long-polls on the one server.
    #[arg(long, default_value_t = 2_000)]
    pub agents: usize,
    /// Jobs enqueued, one per transaction, each for a random agent's VM.
    #[arg(long, default_value_t = 2_000)]
    pub jobs: usize,
    /// Enqueues per second.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// `wait_seconds` of each claim.
    #[arg(long, default_value_t = 30)]
    pub wait_seconds: u32,
    /// The `backvault` binary (default: target/release/backvault of this workspace).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 64)]
    pub enroll_concurrency: usize,
    /// How long to wait for the last jobs to be claimed after the last enqueue.
    #[arg(long, default_value_t = 30)]
    pub drain_seconds: u64,
}

impl Default for WakeupArgs {
    fn default() -> Self {
        Self::parse_from(["wakeup"])
    }
}

#[derive(Debug, Clone)]
pub struct WakeupResult {
    pub args: WakeupArgs,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub measured: usize,
    pub missing: usize,
    pub achieved_rate: f64,
    pub waiting_before: f64,
    pub claims: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub peak_rss: Option<u64>,
    pub rss_end: Option<u64>,
    /// Server RSS after start, after enrolling, with every agent waiting.
    pub rss_started: Option<u64>,
    pub rss_enrolled: Option<u64>,
    pub rss_waiting: Option<u64>,
    pub cpu: CpuSplit,
}

pub fn mb(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| {
        format!("{:.1} MB", b as f64 / 1024.0 / 1024.0)
    })
}

impl WakeupResult {
    pub fn summary(&self) -> String {
        format!(
            "wakeup: p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms (goal < 100 ms), max {:.1} ms; server peak RSS {} (goal < 150 MB; RSS {} at start, {} enrolled, {} all waiting, {} at the end) ({} agents waiting, {} jobs at {:.0}/s, {} not claimed, {} claim responses, {} errors) [{}]",
            self.p50_ms,
            self.p95_ms,
            self.p99_ms,
            self.max_ms,
            mb(self.peak_rss),
            mb(self.rss_started),
            mb(self.rss_enrolled),
            mb(self.rss_waiting),
            mb(self.rss_end),
            self.waiting_before,
            self.args.jobs,
            self.achieved_rate,
            self.missing,
            self.claims,
            self.errors,
            self.cpu
        )
    }
}

/// A gauge or counter from `/metrics` (summed over its label sets).
async fn metric(
    client: &reqwest::Client,
    server: &Server,
    name: &str,
) -> anyhow::Result<Option<f64>> {
    let text = client
        .get(server.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let metric = line.split(['{', ' ']).next().unwrap_or("");
        if (metric == name || metric.ends_with(&format!("_{name}")))
            && let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    Ok(found)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Ctx {
    client: reqwest::Client,
    claim_url: String,
    claim: ClaimRequest,
    claimed_at: Mutex<HashMap<Uuid, Instant>>,
    claims: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Ctx {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().expect("error lock");
        if first.is_none() {
            *first = Some(what);
        }
    }
}

/// Long-polls forever (the task is aborted at the end), recording when each job arrived.
async fn agent(ctx: Arc<Ctx>, agent: Agent) {
    loop {
        let res = ctx
            .client
            .post(&ctx.claim_url)
            .bearer_auth(&agent.token)
            .json(&ctx.claim)
            .send()
            .await;
        match res {
            Ok(r) if r.status().is_success() => match r.json::<ClaimResponse>().await {
                Ok(claimed) => {
                    let now = Instant::now();
                    ctx.claims.fetch_add(1, Ordering::Relaxed);
                    if !claimed.jobs.is_empty() {
                        let mut at = ctx.claimed_at.lock().expect("claims lock");
                        for job in claimed.jobs {
                            at.insert(job.job_id, now);
                        }
                    }
                }
                Err(e) => ctx.error(format!("claim body: {e}")),
            },
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                ctx.error(format!("claim: {status} {body}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                ctx.error(format!("claim: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

pub async fn run(admin_url: &str, args: &WakeupArgs) -> anyhow::Result<WakeupResult> {
    let args = args.clone();
    let bin = server_bin(args.server_bin.as_deref())?;
    with_db(admin_url, DB_PREFIX, "wakeup", move |db| async move {
        let result = async {
            // The server applies backvault's migrations itself on start.
            let server = Server::start(&bin, &db.url, &Launch::default())?;
            let rss_started = status_bytes(server.pid, "VmRSS");
            let client = http_client(args.agents * 2)?;
            let agents =
                enroll_agents(&client, &server, args.agents, args.enroll_concurrency).await?;
            let vms: Vec<Uuid> = agents.iter().map(|a| a.vm_id).collect();
            let rss_enrolled = status_bytes(server.pid, "VmRSS");

            backvault_bench::sys::wait_until_quiet().await;
            let ctx = Arc::new(Ctx {
                client: client.clone(),
                claim_url: server.url("/v1/agent/claim"),
                claim: ClaimRequest {
                    max_jobs: 1,
                    wait_seconds: args.wait_seconds,
                },
                claimed_at: Mutex::new(HashMap::new()),
                claims: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                first_error: Mutex::new(None),
            });
            let mut set = tokio::task::JoinSet::new();
            for a in agents {
                set.spawn(agent(ctx.clone(), a));
            }
            // All waiting: every VM has a long-poll registered and every first (empty)
            // claim has been answered by the database.
            let wait_started = Instant::now();
            let waiting = loop {
                let waiting = metric(&client, &server, "long_polls_waiting")
                    .await?
                    .unwrap_or(0.0);
                if waiting >= args.agents as f64 {
                    break waiting;
                }
                if wait_started.elapsed() > Duration::from_secs(60) {
                    bail!(
                        "only {waiting} of {} agents waiting after 60 s",
                        args.agents
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rss_waiting = status_bytes(server.pid, "VmRSS");

            let mut conn = PgConnection::connect(&db.url)
                .await
                .context("enqueue connection")?;
            let mut committed: Vec<(Uuid, Instant)> = Vec::with_capacity(args.jobs);
            let cpu_before = CpuSnapshot::take(DB_PREFIX, Some(server.pid));
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
            let enqueue_started = Instant::now();
            for _ in 0..args.jobs {
                tick.tick().await;
                let vm = vms[rand::rng().random_range(0..vms.len())];
                let job = backup_job(vm);
                let id = job.id;
                let mut tx = conn.begin().await?;
                jobs_enqueue(&mut tx, &[job]).await?;
                tx.commit().await?;
                committed.push((id, Instant::now()));
            }
            let achieved_rate = args.jobs as f64 / enqueue_started.elapsed().as_secs_f64();
            let drain_until = Instant::now() + Duration::from_secs(args.drain_seconds);
            while Instant::now() < drain_until
                && ctx.claimed_at.lock().expect("claims lock").len() < args.jobs
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let cpu = CpuSnapshot::take(DB_PREFIX, Some(server.pid)).since(&cpu_before);
            let peak_rss = status_bytes(server.pid, "VmHWM");
            let rss_end = status_bytes(server.pid, "VmRSS");
            set.abort_all();
            while set.join_next().await.is_some() {}
            drop(server);
            conn.close().await?;

            let claimed_at = ctx.claimed_at.lock().expect("claims lock").clone();
            let mut latencies: Vec<f64> = committed
                .iter()
                .filter_map(|(id, at)| {
                    claimed_at.get(id).map(|c| {
                        // A claim can be answered before the enqueue's commit acknowledgment
                        // reaches this task; count that as zero.
                        c.saturating_duration_since(*at).as_secs_f64() * 1000.0
                    })
                })
                .collect();
            latencies.sort_by(f64::total_cmp);
            let measured = latencies.len();
            Ok(WakeupResult {
                p50_ms: percentile(&latencies, 50.0),
                p95_ms: percentile(&latencies, 95.0),
                p99_ms: percentile(&latencies, 99.0),
                max_ms: latencies.last().copied().unwrap_or(f64::NAN),
                mean_ms: latencies.iter().sum::<f64>() / measured.max(1) as f64,
                measured,
                missing: args.jobs - measured,
                achieved_rate,
                waiting_before: waiting,
                claims: ctx.claims.load(Ordering::Relaxed),
                errors: ctx.errors.load(Ordering::Relaxed),
                first_error: ctx.first_error.lock().expect("error lock").clone(),
                peak_rss,
                rss_end,
                rss_started,
                rss_enrolled,
                rss_waiting,
                cpu,
                args,
            })
        }
        .await;
        (db, result)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }
}
