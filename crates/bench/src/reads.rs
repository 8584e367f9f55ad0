//! API reads against a yardstick: the real server and a bare axum + sqlx server
//! (`src/bin/bare.rs`: the same statements, the same pool settings, `Json` out, nothing
//! else) on one database and fixture, driven by one load generator with the same
//! keep-alive connections: get one vault, list 20 policies, list 50 jobs with a status
//! filter, list 50 protected items. Every answer must be a 200 and sampled bodies must hold
//! the expected count, or the run fails.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, HOST, HeaderValue};
use hyper_util::rt::TokioIo;
use uuid::Uuid;

use backvault_bench::db::with_db;
use backvault_bench::server::{Launch, Server, http_client, server_bin};
use backvault_bench::sys::{CpuSnapshot, CpuSplit, wait_until_quiet};

use crate::DB_PREFIX;
use crate::backlog::{enqueue_backlog, seed_vms};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Endpoint {
    /// `GET /v1/vaults/{id}`.
    Vault,
    /// `GET /v1/vaults/{id}/policies?limit=20`.
    Policies,
    /// `GET /v1/jobs?status=queued&limit=50`.
    Jobs,
    /// `GET /v1/vaults/{id}/protected-items?limit=50`.
    Items,
}

impl Endpoint {
    const ALL: [Endpoint; 4] = [Self::Vault, Self::Policies, Self::Jobs, Self::Items];

    fn path(self, vault: Uuid) -> String {
        match self {
            Self::Vault => format!("/v1/vaults/{vault}"),
            Self::Policies => format!("/v1/vaults/{vault}/policies?limit={POLICY_PAGE}"),
            Self::Jobs => format!("/v1/jobs?status=queued&limit={JOB_PAGE}"),
            Self::Items => format!("/v1/vaults/{vault}/protected-items?limit={ITEM_PAGE}"),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Vault => "get one vault (`GET /v1/vaults/{id}`)",
            Self::Policies => "list 20 policies (`GET /v1/vaults/{id}/policies?limit=20`)",
            Self::Jobs => "list 50 jobs by status (`GET /v1/jobs?status=queued&limit=50`)",
            Self::Items => {
                "list 50 protected items (`GET /v1/vaults/{id}/protected-items?limit=50`)"
            }
        }
    }

    /// A body of this read holds what the fixture makes it hold.
    fn check(self, body: &[u8], vault: Uuid) -> anyhow::Result<()> {
        let v: serde_json::Value = serde_json::from_slice(body).context("a JSON body")?;
        let want = match self {
            Self::Vault => {
                if v["id"].as_str() != Some(vault.to_string().as_str()) {
                    bail!("the vault's body names another id: {v}");
                }
                return Ok(());
            }
            Self::Policies => POLICY_PAGE,
            Self::Jobs => JOB_PAGE,
            Self::Items => ITEM_PAGE,
        };
        let got = v["items"].as_array().map_or(0, Vec::len);
        if got != want || v["next_cursor"].as_str().is_none() {
            bail!("{got} items (want {want}) or no next_cursor");
        }
        Ok(())
    }
}

const POLICY_PAGE: usize = 20;
const JOB_PAGE: usize = 50;
const ITEM_PAGE: usize = 50;

#[derive(Debug, Clone, Parser)]
pub struct ReadsArgs {
    /// Keep-alive connections to the server, one task each.
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// Measured seconds per read and server.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Seconds of load before each measurement, on the same connections.
    #[arg(long, default_value_t = 2)]
    pub warmup_seconds: u64,
    /// Per read: the bare server, then backvault, this many times; the median of each is
    /// reported.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Only these reads (default: all four).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub endpoints: Vec<Endpoint>,
    /// The `backvault` binary (default: target/release/backvault of this workspace).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// The bare server (default: `bare` beside this binary).
    #[arg(long)]
    pub bare_bin: Option<PathBuf>,
    /// Policies created in the vault besides its default one (a page of 20 is read).
    #[arg(long, default_value_t = 20)]
    pub policies: usize,
    /// Queued jobs of the one VM (a page of 50 is read).
    #[arg(long, default_value_t = 300)]
    pub jobs: usize,
    /// Protected items of the vault (a page of 50 is read).
    #[arg(long, default_value_t = 60)]
    pub items: usize,
    /// Every this many answers of a connection (and its first), the body is parsed and its
    /// count checked; every status is checked.
    #[arg(long, default_value_t = 50)]
    pub check_every: u64,
}

impl Default for ReadsArgs {
    fn default() -> Self {
        Self::parse_from(["reads"])
    }
}

/// One server under one read for one measured interval.
#[derive(Debug, Clone)]
pub struct Run {
    pub requests: u64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub cpu: CpuSplit,
}

impl Run {
    pub fn per_sec(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    /// CPU µs per request of `cores` over the run.
    fn us(&self, cores: f64) -> f64 {
        cores * self.seconds * 1e6 / self.requests.max(1) as f64
    }

    pub fn server_us(&self) -> f64 {
        self.us(self.cpu.server)
    }

    pub fn postgres_us(&self) -> f64 {
        self.us(self.cpu.postgres)
    }

    pub fn client_us(&self) -> f64 {
        self.us(self.cpu.client)
    }
}

#[derive(Debug, Clone)]
pub struct EndpointResult {
    pub endpoint: Endpoint,
    pub bare: Vec<Run>,
    pub backvault: Vec<Run>,
}

/// The run of median throughput.
fn median(runs: &[Run]) -> &Run {
    let mut sorted: Vec<&Run> = runs.iter().collect();
    sorted.sort_by(|a, b| a.per_sec().total_cmp(&b.per_sec()));
    sorted[sorted.len() / 2]
}

impl EndpointResult {
    pub fn bare(&self) -> &Run {
        median(&self.bare)
    }

    pub fn backvault(&self) -> &Run {
        median(&self.backvault)
    }

    /// backvault's req/s ÷ the bare server's (goal ≥ 0.8).
    pub fn ratio(&self) -> f64 {
        self.backvault().per_sec() / self.bare().per_sec()
    }
}

pub const GOAL_RATIO: f64 = 0.8;

#[derive(Debug, Clone)]
pub struct ReadsResult {
    pub args: ReadsArgs,
    pub endpoints: Vec<EndpointResult>,
}

impl ReadsResult {
    /// The most disturbed of the runs (for `measure`'s retry).
    pub fn cpu(&self) -> Option<CpuSplit> {
        self.endpoints
            .iter()
            .flat_map(|e| e.bare.iter().chain(&e.backvault))
            .map(|r| r.cpu)
            .max_by(|a, b| a.other.total_cmp(&b.other))
    }

    pub fn summary(&self) -> String {
        let mut lines = vec![format!(
            "reads: {} connections, {} s per run after {} s warm-up, {} round(s)",
            self.args.connections, self.args.seconds, self.args.warmup_seconds, self.args.rounds
        )];
        for e in &self.endpoints {
            let (b, v) = (e.bare(), e.backvault());
            lines.push(format!(
                "  {:?}: backvault {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms, server {:.0} µs/req, postgres {:.0} µs/req) vs bare {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms, server {:.0} µs/req, postgres {:.0} µs/req) = {:.2}x (goal {GOAL_RATIO}x: {})",
                e.endpoint,
                v.per_sec(),
                v.p50_ms,
                v.p99_ms,
                v.server_us(),
                v.postgres_us(),
                b.per_sec(),
                b.p50_ms,
                b.p99_ms,
                b.server_us(),
                b.postgres_us(),
                e.ratio(),
                if e.ratio() >= GOAL_RATIO {
                    "met"
                } else {
                    "not met"
                }
            ));
            for (name, runs) in [("bare", &e.bare), ("backvault", &e.backvault)] {
                for r in runs.iter() {
                    lines.push(format!(
                        "    {name}: {:.0} req/s; load generator {:.0} µs/req [{}]",
                        r.per_sec(),
                        r.client_us(),
                        r.cpu
                    ));
                }
            }
        }
        lines.join("\n")
    }

    /// The report's table rows (one per read and server) and the details under it.
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| Read | Server | req/s | p50 | p99 | server CPU/req | Postgres CPU/req | load generator CPU/req | backvault ÷ bare (goal ≥ 0.8×) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for e in &self.endpoints {
            for (name, r) in [("bare axum + sqlx", e.bare()), ("backvault", e.backvault())] {
                let verdict = if name == "backvault" {
                    format!(
                        "**{:.2}×** {}{}",
                        e.ratio(),
                        if e.ratio() >= GOAL_RATIO {
                            "**met**"
                        } else {
                            "**not met**"
                        },
                        if r.cpu.contaminated() {
                            format!(
                                " (disturbed: other processes took {:.2} cores; not reliable)",
                                r.cpu.other
                            )
                        } else {
                            String::new()
                        }
                    )
                } else {
                    "—".to_owned()
                };
                s.push_str(&format!(
                    "| {} | {name} | {:.0} | {:.2} ms | {:.2} ms | {:.0} µs | {:.0} µs | {:.0} µs | {verdict} |\n",
                    e.endpoint.label(),
                    r.per_sec(),
                    r.p50_ms,
                    r.p99_ms,
                    r.server_us(),
                    r.postgres_us(),
                    r.client_us(),
                ));
            }
        }
        s.push_str(&format!(
            "\nEach read: {} keep-alive HTTP/1.1 connections (one task each, a hyper client), {} s measured after {} s of warm-up, the bare server then backvault, {} round(s) (median shown). Fixture: one vault with {} policies, one VM with {} queued jobs, {} protected items. CPU per request is the process's CPU time over the interval ÷ requests answered in it.\n",
            self.args.connections,
            self.args.seconds,
            self.args.warmup_seconds,
            self.args.rounds,
            self.args.policies + 1,
            self.args.jobs,
            self.args.items
        ));
        for e in &self.endpoints {
            for (name, runs) in [("bare", &e.bare), ("backvault", &e.backvault)] {
                for r in runs {
                    s.push_str(&format!(
                        "- {:?}, {name}: {} requests in {:.1} s. CPU: {}.\n",
                        e.endpoint, r.requests, r.seconds, r.cpu
                    ));
                }
            }
        }
        s
    }
}

/// The bare server, killed when dropped.
struct Bare {
    child: Child,
    addr: SocketAddr,
}

impl Bare {
    fn start(bin: &Path, database_url: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
            .args(["--database-url", database_url, "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("bare server stdout")?;
        let mut line = String::new();
        let addr = BufReader::new(stdout)
            .read_line(&mut line)
            .ok()
            .and_then(|_| line.trim().strip_prefix("listening ")?.parse().ok());
        match addr {
            Some(addr) => Ok(Self { child, addr }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the bare server did not start (printed {line:?})")
            }
        }
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bare_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()?.with_file_name("bare"),
    };
    if !path.is_file() {
        bail!(
            "no bare server at {}; run `cargo build --release -p backvault-bench` or pass --bare-bin",
            path.display()
        );
    }
    Ok(path)
}

/// A server as the load generator sees it.
struct Target {
    addr: SocketAddr,
    pid: u32,
    token: Option<HeaderValue>,
}

/// What one connection saw: answers in the measured interval and their latencies (µs).
struct Seen {
    answered: u64,
    latencies: Vec<u32>,
}

/// One keep-alive connection sending `path` back to back until `end`. Fails on any answer
/// but a 200 and on any checked body that is not the fixture's.
#[allow(clippy::too_many_arguments)]
async fn connection(
    addr: SocketAddr,
    path: Arc<str>,
    token: Option<HeaderValue>,
    endpoint: Endpoint,
    vault: Uuid,
    check_every: u64,
    window: (Instant, Instant),
) -> anyhow::Result<Seen> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let host = HeaderValue::from_str(&addr.to_string())?;
    let (start, end) = window;
    let mut seen = Seen {
        answered: 0,
        latencies: Vec::new(),
    };
    let mut sent = 0u64;
    loop {
        let mut req = hyper::Request::get(&*path).header(HOST, host.clone());
        if let Some(t) = &token {
            req = req.header(AUTHORIZATION, t.clone());
        }
        let req = req.body(Empty::<Bytes>::new())?;
        sender.ready().await?;
        let began = Instant::now();
        let res = sender.send_request(req).await?;
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        let done = Instant::now();
        if status != hyper::StatusCode::OK {
            bail!(
                "GET {path}: {status} {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            );
        }
        if sent.is_multiple_of(check_every.max(1)) {
            endpoint
                .check(&body, vault)
                .with_context(|| format!("GET {path}"))?;
        }
        sent += 1;
        if done >= start && done < end {
            seen.answered += 1;
            seen.latencies
                .push(u32::try_from(done.duration_since(began).as_micros()).unwrap_or(u32::MAX));
        }
        if done >= end {
            return Ok(seen);
        }
    }
}

fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

async fn drive(
    target: &Target,
    endpoint: Endpoint,
    vault: Uuid,
    args: &ReadsArgs,
) -> anyhow::Result<Run> {
    wait_until_quiet().await;
    let path: Arc<str> = endpoint.path(vault).into();
    let start = Instant::now() + Duration::from_secs(args.warmup_seconds);
    let end = start + Duration::from_secs(args.seconds);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..args.connections.max(1) {
        set.spawn(connection(
            target.addr,
            path.clone(),
            target.token.clone(),
            endpoint,
            vault,
            args.check_every,
            (start, end),
        ));
    }
    tokio::time::sleep_until(start.into()).await;
    let before = CpuSnapshot::take(DB_PREFIX, Some(target.pid));
    tokio::time::sleep_until(end.into()).await;
    let cpu = CpuSnapshot::take(DB_PREFIX, Some(target.pid)).since(&before);
    let mut answered = 0;
    let mut latencies = Vec::new();
    while let Some(seen) = set.join_next().await {
        let seen = seen??;
        answered += seen.answered;
        latencies.extend(seen.latencies);
    }
    latencies.sort_unstable();
    Ok(Run {
        requests: answered,
        seconds: end.duration_since(start).as_secs_f64(),
        p50_ms: percentile_ms(&latencies, 0.50),
        p99_ms: percentile_ms(&latencies, 0.99),
        cpu,
    })
}

/// The spec of the policies the fixture creates: weekly fulls, differentials, 30-minute
/// logs and long-term retention, so that a listed policy is a full one.
fn gold_spec() -> serde_json::Value {
    serde_json::json!({
        "time_zone": "Europe/Amsterdam",
        "full": {"frequency": "weekly", "days": ["sunday"], "time": "22:00"},
        "differential": {"days": ["wednesday"], "time": "22:00", "retention_days": 30},
        "log": {"frequency_minutes": 30, "retention_days": 14},
        "retention": {
            "weekly": {"weeks": 8},
            "monthly": {"weeks_of_month": ["first"], "days_of_week": ["sunday"], "months": 12}
        },
        "compression": true
    })
}

/// The vault and its policies through the API; the VM, its jobs and the protected items
/// set-based (no endpoint makes them without an agent). Returns the vault's id.
async fn fixture(server: &Server, pool: &sqlx::PgPool, args: &ReadsArgs) -> anyhow::Result<Uuid> {
    let client = http_client(4)?;
    let post = async |path: String, body: serde_json::Value| {
        let res = client
            .post(server.url(&path))
            .bearer_auth(&server.admin)
            .json(&body)
            .send()
            .await?;
        let status = res.status();
        let body: serde_json::Value = res.json().await?;
        if !status.is_success() {
            bail!("POST {path}: {status} {body}");
        }
        Ok::<_, anyhow::Error>(body)
    };
    let vault = post(
        "/v1/vaults".into(),
        serde_json::json!({"name": "bench-reads", "subscription_id": "sub-1",
                           "resource_group": "rg-bench", "region": "westeurope"}),
    )
    .await?;
    let vault: Uuid = vault["id"].as_str().context("the vault's id")?.parse()?;
    for i in 1..=args.policies {
        post(
            format!("/v1/vaults/{vault}/policies"),
            serde_json::json!({"name": format!("Gold-{i:02}"), "spec": gold_spec()}),
        )
        .await?;
    }
    let vms = seed_vms(pool, 1).await?;
    let vm = vms[0];
    sqlx::query("update vms set vault_id = $1, registered_at = now() where id = $2")
        .bind(vault)
        .bind(vm)
        .execute(pool)
        .await?;
    enqueue_backlog(pool, &vms, args.jobs, args.jobs.max(1)).await?;
    let instance = Uuid::now_v7();
    sqlx::query(
        "insert into sql_instances (id, vm_id, name, version) values ($1, $2, 'MSSQLSERVER', '2019')",
    )
    .bind(instance)
    .bind(vm)
    .execute(pool)
    .await?;
    let databases: Vec<Uuid> = (0..args.items).map(|_| Uuid::now_v7()).collect();
    let items: Vec<Uuid> = (0..args.items).map(|_| Uuid::now_v7()).collect();
    let names: Vec<String> = (0..args.items).map(|i| format!("sales{i:04}")).collect();
    sqlx::query(
        "insert into sql_databases (id, vm_id, instance_id, name, recovery_model, size_bytes)
         select id, $2, $3, name, 'full', 1073741824 from unnest($1::uuid[], $4::text[]) as d(id, name)",
    )
    .bind(&databases)
    .bind(vm)
    .bind(instance)
    .bind(&names)
    .execute(pool)
    .await?;
    sqlx::query(
        r#"insert into protected_items (id, vault_id, database_id, item_key, policy_id, state, protected_name, chain,
                                        last_full_at, last_log_at)
           select i.id, $3, i.db, i.db, (select id from policies where vault_id = $3 order by id desc limit 1),
                  'protected', i.name, '{"needs": "nothing"}', now() - interval '1 day', now() - interval '15 minutes'
           from unnest($1::uuid[], $2::uuid[], $4::text[]) as i(id, db, name)"#,
    )
    .bind(&items)
    .bind(&databases)
    .bind(vault)
    .bind(&names)
    .execute(pool)
    .await?;
    sqlx::query("analyze").execute(pool).await?;
    Ok(vault)
}

pub async fn run(admin_url: &str, args: &ReadsArgs) -> anyhow::Result<ReadsResult> {
    let args = args.clone();
    let bin = server_bin(args.server_bin.as_deref())?;
    let bare_bin = bare_bin(args.bare_bin.as_deref())?;
    let endpoints = if args.endpoints.is_empty() {
        Endpoint::ALL.to_vec()
    } else {
        args.endpoints.clone()
    };
    with_db(admin_url, DB_PREFIX, "reads", move |db| async move {
        let result = async {
            // The server migrates the database before anything else connects.
            let server = Server::start(&bin, &db.url, &Launch::default())?;
            let pool = db.pool(2).await?;
            let vault = fixture(&server, &pool, &args).await?;
            pool.close().await;
            let bare_server = Bare::start(&bare_bin, &db.url)?;
            let bare = Target {
                addr: bare_server.addr,
                pid: bare_server.child.id(),
                token: None,
            };
            let backvault = Target {
                addr: server.base.trim_start_matches("http://").parse()?,
                pid: server.pid,
                token: Some(HeaderValue::from_str(&format!("Bearer {}", server.admin))?),
            };
            let mut results = Vec::new();
            for endpoint in endpoints {
                let mut result = EndpointResult {
                    endpoint,
                    bare: Vec::new(),
                    backvault: Vec::new(),
                };
                for _ in 0..args.rounds.max(1) {
                    result
                        .bare
                        .push(drive(&bare, endpoint, vault, &args).await?);
                    result
                        .backvault
                        .push(drive(&backvault, endpoint, vault, &args).await?);
                }
                results.push(result);
            }
            drop(bare_server);
            drop(server);
            Ok(ReadsResult {
                args,
                endpoints: results,
            })
        }
        .await;
        (db, result)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_must_hold_the_fixtures_count() {
        let vault = Uuid::now_v7();
        let page = |n: usize, cursor: bool| {
            serde_json::to_vec(&serde_json::json!({
                "items": vec![serde_json::json!({}); n],
                "next_cursor": cursor.then_some("x"),
            }))
            .unwrap()
        };
        assert!(Endpoint::Policies.check(&page(20, true), vault).is_ok());
        assert!(Endpoint::Policies.check(&page(19, true), vault).is_err());
        assert!(Endpoint::Jobs.check(&page(50, false), vault).is_err());
        assert!(
            Endpoint::Items
                .check(b"{\"type\":\"about:blank\"}", vault)
                .is_err()
        );
        let v = serde_json::to_vec(&serde_json::json!({"id": vault})).unwrap();
        assert!(Endpoint::Vault.check(&v, vault).is_ok());
        assert!(Endpoint::Vault.check(&v, Uuid::now_v7()).is_err());
    }

    #[test]
    fn percentiles_are_of_the_sorted_latencies() {
        let us: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&us, 0.50), 50.0);
        assert_eq!(percentile_ms(&us, 0.99), 99.0);
        assert!(percentile_ms(&[], 0.5).is_nan());
    }
}
