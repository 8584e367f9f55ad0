//! Faults under load, with the real server binary and real `backvault-agent` processes:
//! the server killed with SIGKILL while jobs flow, and the database cutting every
//! connection while clients read and write. Each test is bounded by request counts and
//! deadlines, and waits by polling the API or the database, never by sleeping on a guess.
// A test's unwrap is its assertion: a panic fails the test that made it.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Agents, Api, Deadline, Inventories, Server, ServerLog, TestDb, free_local_addr, inventory_toml,
};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

/// Short leases and a quick rescuer, as in `agents_e2e`: a job whose server or agent
/// vanished is handed out again within seconds. The periodic scheduler stays out of the
/// way, so the only backups are the ones the tests ask for.
const LEASE_SECONDS: u64 = 3;
const SERVER_ENV: [(&str, &str); 3] = [
    ("BACKVAULT_LEASE_SECONDS", "3"),
    ("BACKVAULT_RESCUE_INTERVAL", "300ms"),
    ("BACKVAULT_SCHEDULER_INTERVAL", "1h"),
];
const VMS: usize = 3;
const DATABASES_PER_VM: usize = 4;
/// How long each job takes on an agent: long enough that jobs are mid-run when a fault
/// hits, short enough that the backlog drains in seconds.
const BACKUP_MILLIS: u64 = 300;

// ---------------------------------------------------------------------------------------
// The fleet: agents playing VMs, registered with a vault, every database protected.
// ---------------------------------------------------------------------------------------

struct Fleet {
    vault: String,
    /// Every protected item: (item id, VM id).
    items: Vec<(String, String)>,
    agents: Agents,
}

impl Fleet {
    fn item_ids(&self) -> Vec<String> {
        self.items.iter().map(|(item, _)| item.clone()).collect()
    }

    /// One item of each VM.
    fn one_item_per_vm(&self) -> Vec<(String, String)> {
        let mut seen = std::collections::BTreeMap::new();
        for (item, vm) in &self.items {
            seen.entry(vm.clone()).or_insert_with(|| item.clone());
        }
        seen.into_iter().map(|(vm, item)| (item, vm)).collect()
    }
}

/// `VMS` agents with `DATABASES_PER_VM` databases each, registered with a new vault, every
/// database protected by the vault's default policy and given a first full backup (so the
/// log backups of the load have a chain to extend).
async fn protected_fleet(api: &Api, tag: &str) -> Fleet {
    let enrollment = api.enrollment_token("sub-1").await;
    let inventories: Vec<(String, String)> = (0..VMS)
        .map(|v| {
            let name = format!("{tag}-vm-{v}");
            let databases: Vec<String> = (0..DATABASES_PER_VM)
                .map(|d| format!("db{v}_{d}"))
                .collect();
            let databases: Vec<&str> = databases.iter().map(String::as_str).collect();
            let toml = inventory_toml(&name, "4.8", true, &databases, BACKUP_MILLIS);
            (name, toml)
        })
        .collect();
    let inventories: Vec<(&str, String)> = inventories
        .iter()
        .map(|(name, toml)| (name.as_str(), toml.clone()))
        .collect();
    let agents = api
        .start_agents(
            &enrollment,
            Inventories::new(&format!("faults-{tag}")),
            &inventories,
            &[],
        )
        .await;

    let vault = api.create_vault(&format!("{tag}-vault")).await;
    let vms: Vec<&str> = agents.vms.values().map(String::as_str).collect();
    api.register(&vault, &vms).await;
    let items: Vec<(String, String)> = api
        .protect_all(&vault, "HourlyLogBackup")
        .await
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_owned(),
                i["vm_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(items.len(), VMS * DATABASES_PER_VM, "{items:?}");

    let mut fulls = Vec::new();
    for (item, _) in &items {
        let job = api
            .post_expecting(
                &format!("/v1/vaults/{vault}/protected-items/{item}/backup"),
                json!({"type": "full", "retention_days": 45}),
                202,
            )
            .await;
        fulls.push(job["id"].as_str().unwrap().to_owned());
    }
    for id in &fulls {
        api.completed_job(id).await;
    }
    Fleet {
        vault,
        items,
        agents,
    }
}

// ---------------------------------------------------------------------------------------
// Traffic: client loops that keep every exchange, including the ones with no answer.
// ---------------------------------------------------------------------------------------

/// One request and what came of it.
#[derive(Debug, Clone)]
struct Exchange {
    request: String,
    /// `None`: no HTTP answer at all (connection refused or reset, timeout).
    status: Option<u16>,
    code: Option<String>,
    retry_after: Option<String>,
    request_id: Option<String>,
    /// The job a 202 acknowledged.
    job_id: Option<String>,
    transport_error: Option<String>,
}

impl Exchange {
    fn is_success(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// What a client may be told while the database is away: 503 `database_unavailable`
    /// with a `Retry-After`.
    fn is_proper_unavailable(&self) -> bool {
        self.status == Some(503)
            && self.code.as_deref() == Some("database_unavailable")
            && self.retry_after.is_some()
    }
}

#[derive(Clone)]
struct Http {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Http {
    fn new(base: &str, token: &str) -> Self {
        Self {
            client: reqwest::Client::new(),
            base: base.to_owned(),
            token: token.to_owned(),
        }
    }

    async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Exchange {
        let request = match body {
            Some(body) => format!("{method} {path} {body}"),
            None => format!("{method} {path}"),
        };
        let mut builder = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(10));
        if let Some(body) = body {
            builder = builder.json(body);
        }
        let response = match builder.send().await {
            Ok(response) => response,
            Err(e) => {
                return Exchange {
                    request,
                    status: None,
                    code: None,
                    retry_after: None,
                    request_id: None,
                    job_id: None,
                    transport_error: Some(transport_failure(&e)),
                };
            }
        };
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let retry_after = header("retry-after");
        let request_id = header("x-request-id");
        let body: Value = response.json().await.unwrap_or(Value::Null);
        Exchange {
            request,
            status: Some(status),
            code: body["code"].as_str().map(str::to_owned),
            retry_after,
            request_id,
            job_id: (status == 202)
                .then(|| body["id"].as_str().map(str::to_owned))
                .flatten(),
            transport_error: None,
        }
    }
}

/// Why a request got no answer, briefly: refused, timed out, or cut off mid-request
/// (with the innermost cause, e.g. a reset connection).
fn transport_failure(e: &reqwest::Error) -> String {
    if e.is_connect() {
        return "cannot connect".to_owned();
    }
    if e.is_timeout() {
        return "timed out".to_owned();
    }
    let mut cause: &dyn std::error::Error = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    format!("cut off mid-request: {cause}")
}

type Request = (Method, String, Option<Value>);

#[derive(Default)]
struct Shared {
    sent: AtomicUsize,
    acknowledged: AtomicUsize,
    stop: AtomicBool,
    exchanges: Mutex<Vec<Exchange>>,
}

/// `clients` concurrent client loops, each sending the next request (`request(n)` for the
/// n-th of all), pausing `pace` between requests, until stopped or `max_requests` were sent.
struct Traffic {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(
        http: &Http,
        clients: usize,
        pace: Duration,
        max_requests: usize,
        request: impl Fn(usize) -> Request + Send + Sync + 'static,
    ) -> Self {
        let shared = Arc::new(Shared::default());
        let request = Arc::new(request);
        let tasks = (0..clients)
            .map(|_| {
                let (http, shared, request) =
                    (http.clone(), Arc::clone(&shared), Arc::clone(&request));
                tokio::spawn(async move {
                    while !shared.stop.load(Ordering::SeqCst) {
                        let n = shared.sent.fetch_add(1, Ordering::SeqCst);
                        if n >= max_requests {
                            break;
                        }
                        let (method, path, body) = request(n);
                        let exchange = http.send(method, &path, body.as_ref()).await;
                        if exchange.job_id.is_some() {
                            shared.acknowledged.fetch_add(1, Ordering::SeqCst);
                        }
                        // A server that is down refuses at once: do not spin on it.
                        let pause = if exchange.status.is_none() {
                            pace.max(Duration::from_millis(50))
                        } else {
                            pace
                        };
                        shared.exchanges.lock().unwrap().push(exchange);
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Self { shared, tasks }
    }

    /// Writes acknowledged so far (202 with a job id).
    fn acknowledged(&self) -> usize {
        self.shared.acknowledged.load(Ordering::SeqCst)
    }

    async fn finish(self) -> Vec<Exchange> {
        self.shared.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
        std::mem::take(&mut *self.shared.exchanges.lock().unwrap())
    }
}

/// On-demand backups round robin over `items`: each item gets a copy-only full, then a
/// log, and so on. Both are allowed on a protected full-recovery database any number of
/// times a day (docs/rules.md, "On-demand backups"); the log extends the chain of the full
/// `protected_fleet` took.
fn on_demand_backups(vault: String, items: Vec<String>) -> impl Fn(usize) -> Request {
    move |n| {
        let item = &items[n % items.len()];
        let body = if (n / items.len()).is_multiple_of(2) {
            json!({"type": "copy_only_full", "retention_days": 30})
        } else {
            json!({"type": "log"})
        };
        (
            Method::POST,
            format!("/v1/vaults/{vault}/protected-items/{item}/backup"),
            Some(body),
        )
    }
}

// ---------------------------------------------------------------------------------------
// Waiting and checking.
// ---------------------------------------------------------------------------------------

async fn count(conn: &mut PgConnection, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(conn).await.unwrap()
}

const UNFINISHED_JOBS: &str = "select count(*) from jobs where status in ('queued', 'in_progress')";

/// Polls the database until every job has finished.
async fn all_jobs_finished(conn: &mut PgConnection, within: Duration) {
    let deadline = Deadline::within(within, "every job to finish");
    loop {
        let unfinished = count(conn, UNFINISHED_JOBS).await;
        if unfinished == 0 {
            return;
        }
        deadline.check(|| format!("{unfinished} jobs still queued or running"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the database says is wrong with the jobs and their recovery points, once every job
/// has finished: each finding is a line.
async fn job_and_point_findings(conn: &mut PgConnection) -> Vec<String> {
    let mut findings = Vec::new();
    // Every job ended, and a failure says why.
    let unexplained: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "select id::text, kind, status, error_code from jobs
          where not (status in ('completed', 'completed_with_warnings')
                     or (status = 'failed' and coalesce(error_code, '') <> ''))",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    findings.extend(unexplained.into_iter().map(|(id, kind, status, code)| {
        format!("job {id} ({kind}) ended {status} with error code {code:?}")
    }));
    // No job recorded two points for one item (a completion applied twice).
    let duplicates: Vec<(String, String, i64)> = sqlx::query_as(
        "select job_id::text, protected_item_id::text, count(*) from recovery_points
          group by 1, 2 having count(*) > 1",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    findings.extend(
        duplicates.into_iter().map(|(job, item, n)| {
            format!("job {job} recorded {n} recovery points for item {item}")
        }),
    );
    // A completed backup recorded a point per item; a failed one recorded none (a result
    // accepted by a server that then died, and also by its replacement, would show here).
    let mismatched: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "select j.id::text, j.status, jsonb_array_length(j.items)::int8, count(rp.id)
           from jobs j left join recovery_points rp on rp.job_id = j.id
          where j.kind like 'backup\\_%'
          group by j.id
         having count(rp.id) <> case j.status
                                  when 'completed' then jsonb_array_length(j.items)
                                  when 'completed_with_warnings' then count(rp.id)
                                  else 0
                                end",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    findings.extend(mismatched.into_iter().map(|(job, status, items, points)| {
        format!("backup job {job} is {status} with {items} items but {points} recovery points")
    }));
    findings
}

/// Server errors other than 503 the server counted on any route, agents' ones included
/// (its `/metrics` counts every request by route and status).
async fn server_errors_counted(http: &Http) -> Vec<String> {
    let metrics = http
        .client
        .get(format!("{}/metrics", http.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .filter(|l| l.starts_with("backvault_http_request_seconds_count"))
        .filter(|l| l.contains("status=\"5") && !l.contains("status=\"503\""))
        .map(str::to_owned)
        .collect()
}

/// Each exchange that broke `allowed`, with the servers' log lines for its request.
fn violations(
    exchanges: &[Exchange],
    allowed: impl Fn(&Exchange) -> bool,
    logs: &[&ServerLog],
) -> Vec<String> {
    exchanges
        .iter()
        .filter(|e| !allowed(e))
        .map(|e| {
            let logged: Vec<String> = e
                .request_id
                .as_deref()
                .map(|id| logs.iter().flat_map(|log| log.containing(id)).collect())
                .unwrap_or_default();
            format!("{e:?}\n    server log: {logged:?}")
        })
        .collect()
}

/// The server's ERROR lines other than those about a 503 (which a database outage is
/// expected to cause, and which the exchange checks judge).
fn errors_besides_unavailable(log: &ServerLog) -> Vec<String> {
    log.at_level("ERROR")
        .into_iter()
        .filter(|l| !l.contains("database_unavailable") && !l.contains("503 Service Unavailable"))
        .collect()
}

/// How many exchanges got each status and code (or no answer, and why).
fn tally(exchanges: &[Exchange]) -> std::collections::BTreeMap<String, usize> {
    let mut tally = std::collections::BTreeMap::new();
    for e in exchanges {
        let key = match (e.status, &e.code) {
            (Some(s), Some(code)) => format!("{s} {code}"),
            (Some(s), None) => s.to_string(),
            (None, _) => format!(
                "no answer: {}",
                e.transport_error.as_deref().unwrap_or_default()
            ),
        };
        *tally.entry(key).or_insert(0) += 1;
    }
    tally
}

/// An admin token signed with `secret`, minted as an operator would.
fn mint_admin_token(secret: &str) -> String {
    common::mint_token("admin", "*", "1h", &[("BACKVAULT_JWT_SECRET", secret)])
}

// ---------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------

/// SIGKILL the server while on-demand backups are being accepted and run, keep it down for
/// longer than a lease, start a new server on the same database and address. Every
/// acknowledged job exists and ends completed or failed with a code, nothing stays queued
/// or running, no completion is recorded twice (no item has two points from one job, a
/// completed backup has exactly a point per item and a failed one none), and every agent
/// works on with the new server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_killed_mid_load_loses_no_job_and_duplicates_no_point() {
    let started = Instant::now();
    let db = TestDb::new();
    // A configured key rather than `--dev`'s random one: the agents' tokens and the test's
    // admin token must stay valid on the server that replaces the killed one.
    let secret = "faults-test-secret-that-is-long-enough-0123456789";
    let env: Vec<(&str, &str)> = SERVER_ENV
        .into_iter()
        .chain([("BACKVAULT_JWT_SECRET", secret)])
        .collect();
    // Agents are given the server's URL once, at start: the replacement must listen where
    // the first server did.
    let addr = free_local_addr();
    let (mut first, first_log) = Server::start_logged(&db, &addr, &[], &env);
    let token = mint_admin_token(secret);
    let api = Api::new(&first.base, &token);
    let mut fleet = protected_fleet(&api, "kill").await;
    let setup = started.elapsed();

    let http = Http::new(&first.base, &token);
    let traffic = Traffic::start(
        &http,
        3,
        Duration::from_millis(20),
        800,
        on_demand_backups(fleet.vault.clone(), fleet.item_ids()),
    );
    let mut conn = PgConnection::connect(&db.url).await.unwrap();

    // Kill once jobs are flowing: a share of the load acknowledged, some of it running.
    let deadline = Deadline::within(Duration::from_secs(15), "on-demand jobs to be running");
    let running_at_kill = loop {
        let running = count(&mut conn, "select count(*) from job_queue where running").await;
        if traffic.acknowledged() >= 30 && running > 0 {
            break running;
        }
        deadline.check(|| format!("{} acknowledged, {running} running", traffic.acknowledged()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let acknowledged_at_kill = traffic.acknowledged();
    // Down until the leases of the jobs that were running have lapsed, so the new server's
    // rescuer hands them out again while their agents still hold results the old server
    // never recorded, or recorded without answering.
    let deadline = Deadline::within(
        Duration::from_secs(LEASE_SECONDS + 10),
        "the leases of the running jobs to lapse",
    );
    loop {
        let live = count(
            &mut conn,
            "select count(*) from job_queue where running and lease_expires_at > now()",
        )
        .await;
        if live == 0 {
            break;
        }
        deadline.check(|| format!("{live} leases still live"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (second, second_log) = Server::start_logged(&db, &addr, &[], &env);
    assert_eq!(second.base, first.base);

    // Keep the load on until the new server has acknowledged a share of it too.
    let deadline = Deadline::within(
        Duration::from_secs(15),
        "the new server to acknowledge backups",
    );
    while traffic.acknowledged() < acknowledged_at_kill + 30 {
        deadline.check(|| format!("{} acknowledged", traffic.acknowledged()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exchanges = traffic.finish().await;
    all_jobs_finished(&mut conn, Duration::from_secs(30)).await;

    let mut findings = Vec::new();
    // The client saw acknowledgements or no answer at all (the server was gone); a
    // database_unavailable 503 would be acceptable, anything else is not.
    findings.extend(violations(
        &exchanges,
        |e| e.status == Some(202) || e.status.is_none() || e.is_proper_unavailable(),
        &[&first_log, &second_log],
    ));
    // Every acknowledged write exists: its job is in the database (and finished, as every
    // job is by now).
    let acknowledged: Vec<&str> = exchanges
        .iter()
        .filter_map(|e| e.job_id.as_deref())
        .collect();
    let known: i64 = sqlx::query_scalar("select count(*) from jobs where id::text = any($1)")
        .bind(&acknowledged)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    if known != acknowledged.len() as i64 {
        findings.push(format!(
            "{} writes were acknowledged but only {known} of their jobs exist",
            acknowledged.len()
        ));
    }
    findings.extend(job_and_point_findings(&mut conn).await);

    // The agents survived the server's death and work with the new one: a backup on each
    // VM completes.
    for (i, agent) in fleet.agents.processes.iter_mut().enumerate() {
        if let Some(status) = agent.child.try_wait().unwrap() {
            findings.push(format!("agent {i} exited: {status}"));
        }
    }
    for (item, vm) in fleet.one_item_per_vm() {
        let (status, job) = api
            .post(
                &format!("/v1/vaults/{}/protected-items/{item}/backup", fleet.vault),
                json!({"type": "copy_only_full", "retention_days": 30}),
            )
            .await;
        assert_eq!(status, 202, "{job}");
        let job = api.finished_job(job["id"].as_str().unwrap()).await;
        if job["status"] != "completed" {
            findings.push(format!("VM {vm}: a backup after the restart ended {job}"));
        }
    }
    findings.extend(server_errors_counted(&http).await);

    let jobs = count(&mut conn, "select count(*) from jobs").await;
    let requeued = count(
        &mut conn,
        "select count(distinct job_id) from job_attempts where outcome = 'lease_expired'",
    )
    .await;
    let failed = count(
        &mut conn,
        "select count(*) from jobs where status = 'failed'",
    )
    .await;
    println!(
        "server kill: setup {setup:?}, total {:?}; {} requests {:?}; {running_at_kill} jobs running at the kill, \
         {acknowledged_at_kill} acknowledged before it; {jobs} jobs, {requeued} handed out again after a lapsed lease, {failed} failed",
        started.elapsed(),
        exchanges.len(),
        tally(&exchanges),
    );
    assert!(
        findings.is_empty(),
        "{} findings:\n{}\nfirst server's errors: {:?}\nsecond server's errors: {:?}",
        findings.len(),
        findings.join("\n"),
        errors_besides_unavailable(&first_log),
        errors_besides_unavailable(&second_log),
    );
}

/// Cut every database connection of the server a few times over ~2 s while clients list
/// jobs and vaults and ask for backups, and agents claim and complete. Nobody gets a 500:
/// what fails is a 503 `database_unavailable` with `Retry-After`. Within 2 s of the last cut
/// the API answers again, and every acknowledged write is there afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_connection_cut_mid_load_answers_503_then_recovers() {
    const CUTS: usize = 4;
    const BETWEEN_CUTS: Duration = Duration::from_millis(600);
    const RECOVERY_LIMIT: Duration = Duration::from_secs(2);

    let started = Instant::now();
    let db = TestDb::new();
    let (server, log) = Server::start_logged(&db, "127.0.0.1:0", &["--dev"], &SERVER_ENV);
    let token = server.token.clone().unwrap();
    let api = Api::new(&server.base, &token);
    let fleet = protected_fleet(&api, "cut").await;
    let setup = started.elapsed();

    let http = Http::new(&server.base, &token);
    let writes = Traffic::start(
        &http,
        2,
        Duration::from_millis(40),
        400,
        on_demand_backups(fleet.vault.clone(), fleet.item_ids()),
    );
    let reads = Traffic::start(&http, 2, Duration::from_millis(10), 2000, |n| {
        let path = if n.is_multiple_of(2) {
            "/v1/jobs?limit=50"
        } else {
            "/v1/vaults"
        };
        (Method::GET, path.to_owned(), None)
    });
    let deadline = Deadline::within(Duration::from_secs(10), "backups to be acknowledged");
    while writes.acknowledged() < 10 {
        deadline.check(|| format!("{} acknowledged", writes.acknowledged()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The cuts come from a session on another database, which they leave alone.
    let mut admin = PgConnection::connect(db.admin_url()).await.unwrap();
    let mut terminated = Vec::new();
    for cut in 0..CUTS {
        if cut > 0 {
            tokio::time::sleep(BETWEEN_CUTS).await;
        }
        let n: i64 = sqlx::query_scalar(
            "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity
              where datname = $1 and pid <> pg_backend_pid()",
        )
        .bind(db.name())
        .fetch_one(&mut admin)
        .await
        .unwrap();
        terminated.push(n);
    }
    let last_cut = Instant::now();
    // How long until the API answers again; probed well past the limit, to report it.
    let mut probes = Vec::new();
    let recovered_after = loop {
        let probe = http.send(Method::GET, "/v1/vaults", None).await;
        let ok = probe.is_success();
        probes.push(probe);
        if ok {
            break Some(last_cut.elapsed());
        }
        if last_cut.elapsed() > Duration::from_secs(10) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Some load after the recovery too, then stop.
    let acknowledged_at_recovery = writes.acknowledged();
    let deadline = Deadline::within(
        Duration::from_secs(10),
        "backups to be acknowledged after the cuts",
    );
    while writes.acknowledged() < acknowledged_at_recovery + 10 {
        deadline.check(|| format!("{} acknowledged", writes.acknowledged()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let writes = writes.finish().await;
    let reads = reads.finish().await;

    let mut findings = Vec::new();
    if terminated[0] == 0 {
        findings.push("the first cut found no session of the server to terminate".to_owned());
    }
    match recovered_after {
        Some(after) if after <= RECOVERY_LIMIT => {}
        Some(after) => findings.push(format!(
            "the API answered 2xx again only {after:?} after the last cut"
        )),
        None => findings.push("the API did not answer 2xx within 10 s of the last cut".into()),
    }
    // Nothing in this traffic may be refused (the items stay protected, the bodies follow
    // the rules), so no 4xx is expected either: what is not a 2xx must be a proper 503.
    let all: Vec<Exchange> = [&writes[..], &reads[..], &probes[..]].concat();
    findings.extend(violations(
        &all,
        |e| e.is_success() || e.is_proper_unavailable(),
        &[&log],
    ));
    // No acknowledged write was lost.
    for exchange in &writes {
        if let Some(id) = &exchange.job_id {
            let (status, job) = api.get(&format!("/v1/jobs/{id}")).await;
            if status != 200 {
                findings.push(format!(
                    "acknowledged {} (job {id}) but GET answers {status} {job}",
                    exchange.request
                ));
            }
        }
    }
    // Agents' requests too: no 500 on any route.
    findings.extend(server_errors_counted(&http).await);
    // The jobs all end, none because the server could not record a result the agent had
    // (a connection cut is the database being away, not a bad result).
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    all_jobs_finished(&mut conn, Duration::from_secs(30)).await;
    findings.extend(job_and_point_findings(&mut conn).await);
    let not_recorded: Vec<(String,)> =
        sqlx::query_as("select id::text from jobs where error_code = 'JobResultNotRecorded'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    findings.extend(
        not_recorded
            .into_iter()
            .map(|(id,)| format!("job {id} failed JobResultNotRecorded")),
    );

    println!(
        "database cut: setup {setup:?}, total {:?}; sessions terminated per cut {terminated:?}; \
         2xx again {recovered_after:?} after the last cut; writes {:?}; reads {:?}; probes {:?}",
        started.elapsed(),
        tally(&writes),
        tally(&reads),
        tally(&probes),
    );
    assert!(
        findings.is_empty(),
        "{} findings:\n{}\nserver errors besides 503s: {:?}",
        findings.len(),
        findings.join("\n"),
        errors_besides_unavailable(&log),
    );
}
