//! Throughput through the agent protocol over HTTP: the real server binary, one task per
//! enrolled agent, until the backlog is drained. With `--protocol v2` (the default, what
//! the reference agent does) each claim (`POST /v2/agent/claim`) carries the completions
//! of the jobs the previous claim returned; with `--protocol v1` the agent claims
//! (`POST /v1/agent/claim`) and completes every claimed job at once
//! (`POST /v1/agent/jobs/{id}/complete`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use backvault_domain::agent::JobResult;
use backvault_domain::agent::protocol::{
    ClaimRequest, ClaimResponse, ClaimV2Request, ClaimV2Response, CompleteJob, JobCompletion,
};
use clap::{Parser, ValueEnum};

use backvault_bench::db::{jobs_queued, quote_ident, with_db};
use backvault_bench::server::{Agent, enroll_agents, http_client, server_bin};
use backvault_bench::sys::{CpuSnapshot, CpuSplit, status_bytes};
use sqlx::{Postgres, QueryBuilder};

use crate::DB_PREFIX;
use crate::backlog::{done_at_once, drain_server, enqueue_backlog};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// A claim, then one completion request per job.
    V1,
    /// Completions ride on the next claim: one request per cycle.
    V2,
}

#[derive(Debug, Clone, Parser)]
pub struct HttpArgs {
    /// Which version of the agent protocol the agents speak.
    #[arg(long, value_enum, default_value_t = Protocol::V2)]
    pub protocol: Protocol,
    /// Agents (VMs) enrolled, one task each.
    #[arg(long, default_value_t = 200)]
    pub agents: usize,
    /// Jobs in the backlog, spread round-robin over the agents' VMs.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: usize,
    /// `max_jobs` of each claim.
    #[arg(long, default_value_t = 20)]
    pub max_jobs: u32,
    /// `wait_seconds` of each claim.
    #[arg(long, default_value_t = 1)]
    pub wait_seconds: u32,
    /// `--max-running-backups-per-vm` of the server.
    #[arg(long, default_value_t = 1_000)]
    pub max_running_backups_per_vm: u32,
    /// The `backvault` binary (default: target/release/backvault of this workspace).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 32)]
    pub enroll_concurrency: usize,
    /// Jobs per enqueue transaction while loading the backlog.
    #[arg(long, default_value_t = 5_000)]
    pub enqueue_batch: usize,
    /// Give up after this many seconds of draining.
    #[arg(long, default_value_t = 600)]
    pub timeout_seconds: u64,
    /// Diagnostic: `ALTER DATABASE … SET plan_cache_mode = force_custom_plan` before the
    /// server starts, so its prepared statements are planned for their actual parameters.
    #[arg(long)]
    pub force_custom_plans: bool,
    /// Compare with this baseline instead of the cached or a fresh one.
    #[arg(long)]
    pub baseline_jobs_per_sec: Option<f64>,
}

impl Default for HttpArgs {
    fn default() -> Self {
        Self::parse_from(["http"])
    }
}

#[derive(Debug, Clone)]
pub struct HttpResult {
    pub args: HttpArgs,
    pub jobs_per_sec: f64,
    pub completed: u64,
    pub seconds: f64,
    pub claims: u64,
    pub empty_claims: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub server_peak_rss: Option<u64>,
    pub cpu: CpuSplit,
}

impl HttpResult {
    pub fn requests_per_sec(&self) -> f64 {
        let completion_requests = match self.args.protocol {
            Protocol::V1 => self.completed,
            Protocol::V2 => 0,
        };
        (self.claims + completion_requests + self.errors) as f64 / self.seconds
    }

    pub fn summary(&self, baseline: Option<f64>) -> String {
        let ratio = baseline
            .map(|b| format!(" = {:.2}x baseline (goal 3x)", self.jobs_per_sec / b))
            .unwrap_or_default();
        format!(
            "http: {:.0} jobs/s{ratio} (protocol {:?}, {} jobs, {} agents{}, {:.1} s; {:.0} requests/s: {} claims ({} empty), {} completes, {} errors) [{}]",
            self.jobs_per_sec,
            self.args.protocol,
            self.completed,
            self.args.agents,
            if self.args.force_custom_plans {
                ", custom plans forced"
            } else {
                ""
            },
            self.seconds,
            self.requests_per_sec(),
            self.claims,
            self.empty_claims,
            self.completed,
            self.errors,
            self.cpu
        )
    }
}

#[derive(Default)]
struct Counters {
    completed: AtomicU64,
    claims: AtomicU64,
    empty_claims: AtomicU64,
    errors: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().expect("error lock");
        if first.is_none() {
            *first = Some(what);
        }
    }
}

struct Ctx {
    client: reqwest::Client,
    claim_url: String,
    claim_v2_url: String,
    base: String,
    claim: ClaimRequest,
    counters: Counters,
    deadline: Instant,
}

/// Claims and completes until this agent's share of the backlog is done; returns when
/// its last completion landed.
async fn agent(ctx: Arc<Ctx>, agent: Agent, expected: u64) -> Instant {
    let token = Arc::new(agent.token);
    let mut done = 0u64;
    let mut last = Instant::now();
    while done < expected && Instant::now() < ctx.deadline {
        let res = ctx
            .client
            .post(&ctx.claim_url)
            .bearer_auth(token.as_str())
            .json(&ctx.claim)
            .send()
            .await;
        let claimed: ClaimResponse = match res {
            Ok(r) if r.status().is_success() => match r.json().await {
                Ok(c) => c,
                Err(e) => {
                    ctx.counters.error(format!("claim body: {e}"));
                    continue;
                }
            },
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                ctx.counters.error(format!("claim: {status} {body}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                ctx.counters.error(format!("claim: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        ctx.counters.claims.fetch_add(1, Ordering::Relaxed);
        if claimed.jobs.is_empty() {
            ctx.counters.empty_claims.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut set = tokio::task::JoinSet::new();
        for job in claimed.jobs {
            let ctx = ctx.clone();
            let token = token.clone();
            set.spawn(async move {
                let body = CompleteJob {
                    lease: job.lease,
                    result: JobResult::Backup {
                        recovery_points: vec![],
                    },
                    warnings: vec![],
                };
                let res = ctx
                    .client
                    .post(format!(
                        "{}/v1/agent/jobs/{}/complete",
                        ctx.base, job.job_id
                    ))
                    .bearer_auth(token.as_str())
                    .json(&body)
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status().is_success() => {
                        // Read the body so the connection goes back to the pool.
                        let _ = r.bytes().await;
                        true
                    }
                    Ok(r) => {
                        let status = r.status();
                        let body = r.text().await.unwrap_or_default();
                        ctx.counters.error(format!("complete: {status} {body}"));
                        false
                    }
                    Err(e) => {
                        ctx.counters.error(format!("complete: {e}"));
                        false
                    }
                }
            });
        }
        while let Some(ok) = set.join_next().await {
            if matches!(ok, Ok(true)) {
                done += 1;
                ctx.counters.completed.fetch_add(1, Ordering::Relaxed);
            }
        }
        last = Instant::now();
    }
    last
}

/// Version 2: each claim reports the jobs the previous one returned (done at once, as
/// no-op backups); the last claim only reports. Returns when its last report landed.
async fn agent_v2(ctx: Arc<Ctx>, agent: Agent, expected: u64) -> Instant {
    let token = agent.token;
    let (mut done, mut claimed) = (0u64, 0u64);
    let mut finished: Vec<JobCompletion> = Vec::new();
    let mut last = Instant::now();
    while done < expected && Instant::now() < ctx.deadline {
        let max_jobs = if claimed < expected {
            ctx.claim.max_jobs
        } else {
            0
        };
        let body = ClaimV2Request {
            max_jobs,
            // As the reference agent: a claim that reports does not wait.
            wait_seconds: if finished.is_empty() {
                ctx.claim.wait_seconds
            } else {
                0
            },
            completions: std::mem::take(&mut finished),
            failures: Vec::new(),
        };
        let res = ctx
            .client
            .post(&ctx.claim_v2_url)
            .bearer_auth(token.as_str())
            .json(&body)
            .send()
            .await;
        let response: ClaimV2Response = match res {
            Ok(r) if r.status().is_success() => match r.json().await {
                Ok(c) => c,
                Err(e) => {
                    ctx.counters.error(format!("claim body: {e}"));
                    finished = body.completions;
                    continue;
                }
            },
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                ctx.counters.error(format!("claim: {status} {text}"));
                finished = body.completions;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                ctx.counters.error(format!("claim: {e}"));
                finished = body.completions;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        ctx.counters.claims.fetch_add(1, Ordering::Relaxed);
        for outcome in &response.completions {
            match &outcome.refused {
                None => {
                    done += 1;
                    ctx.counters.completed.fetch_add(1, Ordering::Relaxed);
                }
                Some(refused) => ctx.counters.error(format!(
                    "completion of {}: {} {}",
                    outcome.job_id, refused.status, refused.code
                )),
            }
        }
        if !response.completions.is_empty() {
            last = Instant::now();
        }
        if response.jobs.is_empty() && max_jobs > 0 {
            ctx.counters.empty_claims.fetch_add(1, Ordering::Relaxed);
        }
        claimed += response.jobs.len() as u64;
        finished = done_at_once(response.jobs);
    }
    last
}

pub async fn run(admin_url: &str, args: &HttpArgs) -> anyhow::Result<HttpResult> {
    let args = args.clone();
    let bin = server_bin(args.server_bin.as_deref())?;
    with_db(admin_url, DB_PREFIX, "http", move |db| async move {
        let result = async {
            if args.force_custom_plans {
                let admin = db.pool(1).await?;
                // Built, not static: the database's name is an identifier, which cannot be
                // a bind parameter.
                QueryBuilder::<Postgres>::new("alter database ")
                    .push(quote_ident(&db.name))
                    .push(" set plan_cache_mode = force_custom_plan")
                    .build()
                    .execute(&admin)
                    .await?;
                admin.close().await;
            }
            // The server applies its own (same) migrations on start; connecting after it
            // keeps the bench and server binaries from disagreeing about applied ones.
            let server = drain_server(&bin, &db.url, args.max_running_backups_per_vm)?;
            let pool = db.pool(2).await?;
            let client = http_client(4_000)?;
            let agents =
                enroll_agents(&client, &server, args.agents, args.enroll_concurrency).await?;
            let vms: Vec<_> = agents.iter().map(|a| a.vm_id).collect();
            let (per_vm, _) = enqueue_backlog(&pool, &vms, args.jobs, args.enqueue_batch).await?;

            let ctx = Arc::new(Ctx {
                client: client.clone(),
                claim_url: server.url("/v1/agent/claim"),
                claim_v2_url: server.url("/v2/agent/claim"),
                base: server.base.clone(),
                claim: ClaimRequest {
                    max_jobs: args.max_jobs,
                    wait_seconds: args.wait_seconds,
                },
                counters: Counters::default(),
                deadline: Instant::now() + Duration::from_secs(args.timeout_seconds),
            });
            backvault_bench::sys::wait_until_quiet().await;
            let cpu_before = CpuSnapshot::take(DB_PREFIX, Some(server.pid));
            let started = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for (a, expected) in agents.into_iter().zip(per_vm) {
                match args.protocol {
                    Protocol::V1 => set.spawn(agent(ctx.clone(), a, expected as u64)),
                    Protocol::V2 => set.spawn(agent_v2(ctx.clone(), a, expected as u64)),
                };
            }
            let mut finished = started;
            while let Some(r) = set.join_next().await {
                finished = finished.max(r?);
            }
            let cpu = CpuSnapshot::take(DB_PREFIX, Some(server.pid)).since(&cpu_before);
            let seconds = finished.duration_since(started).as_secs_f64();
            let server_peak_rss = status_bytes(server.pid, "VmHWM");
            drop(server);

            let c = &ctx.counters;
            let completed = c.completed.load(Ordering::Relaxed);
            let left = jobs_queued(&pool).await?;
            pool.close().await;
            if completed != args.jobs as u64 || left != 0 {
                bail!(
                    "{completed} of {} jobs completed, {left} still queued; first error: {}",
                    args.jobs,
                    c.first_error
                        .lock()
                        .expect("error lock")
                        .clone()
                        .unwrap_or_default()
                );
            }
            Ok(HttpResult {
                jobs_per_sec: completed as f64 / seconds,
                completed,
                seconds,
                claims: c.claims.load(Ordering::Relaxed),
                empty_claims: c.empty_claims.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                first_error: c.first_error.lock().expect("error lock").clone(),
                server_peak_rss,
                cpu,
                args,
            })
        }
        .await;
        (db, result)
    })
    .await
}
