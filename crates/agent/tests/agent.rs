//! The agent binary against a fake backvault that speaks the agent protocol: enrollment,
//! token refresh, long-poll claims, 503s, revoked tokens, cancellation, crashes and shutdown.
// A test's unwrap is its assertion: a panic fails the test that made it.
#![allow(clippy::unwrap_used)]

use std::collections::{HashSet, VecDeque};
use std::ffi::OsStr;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use backvault_domain::agent::protocol::{
    AgentHeartbeat, AgentHeartbeatResponse, ClaimRequest, ClaimResponse, ClaimV2Request,
    ClaimV2Response, ClaimedJob, CompleteJob, EnrollRequest, EnrollResponse, FailJob, JobHeartbeat,
    JobHeartbeatResponse, ReportOutcome, ReportRefusal,
};
use backvault_domain::agent::{JobItem, JobResult, RecoveryPointType};
use backvault_domain::jobs::{JobKind, JobStatus};
use backvault_domain::lsn::Lsn;
use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

const ENROLLMENT_TOKEN: &str = "enroll-secret";

#[derive(Default)]
struct Fake {
    enrollments: u32,
    /// Enrollments with the current agent token: refreshes.
    refreshes: u32,
    agent_token: String,
    /// Claims to answer 503 before answering properly.
    claim_outages: u32,
    queue: VecDeque<ClaimedJob>,
    cancel: HashSet<Uuid>,
    /// Jobs whose lease went to someone else.
    taken: HashSet<Uuid>,
    /// How long a completion takes to answer after it is recorded.
    completion_delay: Duration,
    heartbeats: Vec<AgentHeartbeat>,
    /// Jobs heartbeats answered `lost`.
    answered_lost: Vec<Uuid>,
    job_heartbeats: Vec<(Uuid, JobHeartbeat)>,
    completed: Vec<(Uuid, CompleteJob)>,
    failed: Vec<(Uuid, FailJob)>,
    /// Jobs whose next completion is answered `lease_lost`, as after the lease expired.
    lose_completion: HashSet<Uuid>,
    /// Completions answered `lease_lost`.
    refused: Vec<(Uuid, CompleteJob)>,
    /// Whether the fake knows version 2 of the claim (reports in the claim); an older
    /// server answers 404.
    speaks_v2: bool,
    /// Reports that came through version 1's calls, and through version 2's claim.
    v1_reports: u32,
    v2_reports: u32,
}

type Shared = Arc<Mutex<Fake>>;

fn problem(status: StatusCode, code: &str) -> Response {
    let body = json!({"type": format!("urn:backvault:problem:{code}"), "title": "error",
                      "status": status.as_u16(), "detail": code, "code": code});
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert("content-type", "application/problem+json".parse().unwrap());
    response
}

/// The 401 for a request without the current agent token.
fn unauthorized(fake: &Shared, headers: &HeaderMap) -> Option<Response> {
    let expected = format!("Bearer {}", fake.lock().unwrap().agent_token);
    let given = headers.get("authorization").and_then(|v| v.to_str().ok());
    (given != Some(expected.as_str())).then(|| problem(StatusCode::UNAUTHORIZED, "invalid_token"))
}

async fn enroll(
    State(fake): State<Shared>,
    headers: HeaderMap,
    Json(request): Json<EnrollRequest>,
) -> Response {
    let given = headers.get("authorization").and_then(|v| v.to_str().ok());
    assert_eq!(request.facts.name, "sqlvm-01");
    let mut fake = fake.lock().unwrap();
    if given == Some(&format!("Bearer {ENROLLMENT_TOKEN}")) {
        fake.enrollments += 1;
        fake.agent_token = format!("agent-token-{}", fake.enrollments);
    } else if !fake.agent_token.is_empty() && given == Some(&format!("Bearer {}", fake.agent_token))
    {
        fake.refreshes += 1;
        fake.agent_token = format!(
            "agent-token-{}-refreshed-{}",
            fake.enrollments, fake.refreshes
        );
    } else {
        return problem(StatusCode::UNAUTHORIZED, "invalid_token");
    }
    Json(EnrollResponse {
        vm_id: Uuid::nil(),
        agent_token: fake.agent_token.clone(),
        expires_at: Utc::now() + chrono::Duration::hours(1),
    })
    .into_response()
}

async fn heartbeat(
    State(fake): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<AgentHeartbeat>,
) -> Response {
    if let Some(rejection) = unauthorized(&fake, &headers) {
        return rejection;
    }
    let mut fake = fake.lock().unwrap();
    // Like backvault: a finished job's lease cannot be extended either.
    let (lost, extended): (Vec<Uuid>, Vec<Uuid>) =
        body.jobs.iter().map(|j| j.job_id).partition(|id| {
            fake.taken.contains(id)
                || fake.completed.iter().any(|(done, _)| done == id)
                || fake.failed.iter().any(|(done, _)| done == id)
        });
    let cancel_requested = extended
        .iter()
        .copied()
        .filter(|id| fake.cancel.contains(id))
        .collect();
    fake.heartbeats.push(body);
    fake.answered_lost.extend(&lost);
    Json(AgentHeartbeatResponse {
        extended,
        lost,
        cancel_requested,
        lease_expires_at: Utc::now() + chrono::Duration::seconds(30),
    })
    .into_response()
}

async fn claim(
    State(fake): State<Shared>,
    headers: HeaderMap,
    Json(request): Json<ClaimRequest>,
) -> Response {
    if let Some(rejection) = unauthorized(&fake, &headers) {
        return rejection;
    }
    {
        let mut fake = fake.lock().unwrap();
        if fake.claim_outages > 0 {
            fake.claim_outages -= 1;
            return problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
        }
    }
    let jobs = take_jobs(&fake, request.max_jobs, request.wait_seconds).await;
    Json(ClaimResponse { jobs }).into_response()
}

async fn take_jobs(fake: &Shared, max_jobs: u32, wait_seconds: u32) -> Vec<ClaimedJob> {
    let deadline = Instant::now() + Duration::from_secs(wait_seconds.into());
    loop {
        {
            let mut fake = fake.lock().unwrap();
            if !fake.queue.is_empty() {
                let n = fake.queue.len().min(max_jobs as usize);
                return fake.queue.drain(..n).collect();
            }
        }
        if Instant::now() >= deadline {
            return Vec::new();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn claim_v2(
    State(fake): State<Shared>,
    headers: HeaderMap,
    Json(request): Json<ClaimV2Request>,
) -> Response {
    if !fake.lock().unwrap().speaks_v2 {
        return StatusCode::NOT_FOUND.into_response();
    }
    if let Some(rejection) = unauthorized(&fake, &headers) {
        return rejection;
    }
    let (completions, failures) = {
        let mut fake = fake.lock().unwrap();
        fake.v2_reports += (request.completions.len() + request.failures.len()) as u32;
        let completions = request
            .completions
            .into_iter()
            .map(|c| {
                let (job_id, body) = c.into_parts();
                if fake.lose_completion.remove(&job_id) {
                    fake.refused.push((job_id, body));
                    return ReportOutcome {
                        job_id,
                        status: None,
                        retry_at: None,
                        refused: Some(ReportRefusal {
                            status: 409,
                            code: "lease_lost".into(),
                            detail: "lease lost".into(),
                            errors: Vec::new(),
                        }),
                    };
                }
                fake.completed.push((job_id, body));
                ReportOutcome {
                    job_id,
                    status: Some(JobStatus::Completed),
                    retry_at: None,
                    refused: None,
                }
            })
            .collect();
        let failures = request
            .failures
            .into_iter()
            .map(|f| {
                let (job_id, body) = f.into_parts();
                let status = if body.retryable {
                    JobStatus::Queued
                } else {
                    JobStatus::Failed
                };
                fake.failed.push((job_id, body));
                ReportOutcome {
                    job_id,
                    status: Some(status),
                    retry_at: None,
                    refused: None,
                }
            })
            .collect();
        (completions, failures)
    };
    let jobs = if request.max_jobs == 0 {
        Vec::new()
    } else {
        take_jobs(&fake, request.max_jobs, request.wait_seconds).await
    };
    Json(ClaimV2Response {
        jobs,
        completions,
        failures,
    })
    .into_response()
}

async fn job_heartbeat(
    State(fake): State<Shared>,
    Path(job_id): Path<Uuid>,
    headers: HeaderMap,
    Json(body): Json<JobHeartbeat>,
) -> Response {
    if let Some(rejection) = unauthorized(&fake, &headers) {
        return rejection;
    }
    let mut fake = fake.lock().unwrap();
    fake.job_heartbeats.push((job_id, body));
    Json(JobHeartbeatResponse {
        lease_expires_at: Utc::now() + chrono::Duration::seconds(3),
        cancel_requested: fake.cancel.contains(&job_id),
    })
    .into_response()
}

async fn complete(
    State(fake): State<Shared>,
    Path(job_id): Path<Uuid>,
    headers: HeaderMap,
    Json(body): Json<CompleteJob>,
) -> Response {
    if let Some(rejection) = unauthorized(&fake, &headers) {
        return rejection;
    }
    let delay = {
        let mut fake = fake.lock().unwrap();
        fake.v1_reports += 1;
        if fake.lose_completion.remove(&job_id) {
            fake.refused.push((job_id, body));
            return problem(StatusCode::CONFLICT, "lease_lost");
        }
        fake.completed.push((job_id, body));
        fake.completion_delay
    };
    tokio::time::sleep(delay).await;
    Json(json!({"job_id": job_id, "status": "completed"})).into_response()
}

async fn fail(
    State(fake): State<Shared>,
    Path(job_id): Path<Uuid>,
    headers: HeaderMap,
    Json(body): Json<FailJob>,
) -> Response {
    if let Some(rejection) = unauthorized(&fake, &headers) {
        return rejection;
    }
    let status = if body.retryable { "queued" } else { "failed" };
    let mut fake = fake.lock().unwrap();
    fake.v1_reports += 1;
    fake.failed.push((job_id, body));
    Json(json!({"job_id": job_id, "status": status})).into_response()
}

struct Harness {
    fake: Shared,
    url: String,
    inventory: PathBuf,
    state_file: PathBuf,
    _runtime: tokio::runtime::Runtime,
}

impl Harness {
    fn new(edit_inventory: impl FnOnce(String) -> String) -> Self {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let fake: Shared = Arc::default();
        let app = Router::new()
            .route("/v1/agent/enroll", post(enroll))
            .route("/v1/agent/heartbeat", post(heartbeat))
            .route("/v1/agent/claim", post(claim))
            .route("/v2/agent/claim", post(claim_v2))
            .route("/v1/agent/jobs/{job_id}/heartbeat", post(job_heartbeat))
            .route("/v1/agent/jobs/{job_id}/complete", post(complete))
            .route("/v1/agent/jobs/{job_id}/fail", post(fail))
            .with_state(Arc::clone(&fake));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });

        let sample = include_str!("../sample-inventory.toml");
        let dir = std::env::temp_dir();
        let inventory = dir.join(format!("backvault-agent-test-{}.toml", Uuid::new_v4()));
        std::fs::write(&inventory, edit_inventory(sample.to_owned())).unwrap();
        let state_file = dir.join(format!("backvault-agent-test-{}.json", Uuid::new_v4()));
        Self {
            fake,
            url,
            inventory,
            state_file,
            _runtime: runtime,
        }
    }

    fn start_agent(&self) -> Agent {
        self.start_agent_with(Some(ENROLLMENT_TOKEN), &[])
    }

    fn start_agent_with(&self, enrollment_token: Option<&str>, extra: &[&OsStr]) -> Agent {
        let mut command = Command::new(env!("CARGO_BIN_EXE_backvault-agent"));
        command
            .args(["--inventory".as_ref(), self.inventory.as_os_str()])
            .args(["--server", &self.url])
            .args(["--heartbeat-seconds", "1", "--claim-wait-seconds", "25"])
            .args(["--state-file".as_ref(), self.state_file.as_os_str()])
            .args(extra)
            .env_remove("BACKVAULT_ENROLLMENT_TOKEN")
            .env("BACKVAULT_LOG", "debug,hyper=info,reqwest=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(token) = enrollment_token {
            command.env("BACKVAULT_ENROLLMENT_TOKEN", token);
        }
        let mut child = command.spawn().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]);
                eprint!("{text}");
                sink.lock().unwrap().push_str(&text);
            }
        });
        Agent { child, log }
    }

    fn push(&self, job: ClaimedJob) -> Uuid {
        let id = job.job_id;
        self.fake.lock().unwrap().queue.push_back(job);
        id
    }

    fn wait_until<T>(&self, what: &str, mut check: impl FnMut(&mut Fake) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(found) = check(&mut self.fake.lock().unwrap()) {
                return found;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn completion(&self, job_id: Uuid) -> CompleteJob {
        self.wait_until("the job's completion", |f| {
            f.completed
                .iter()
                .find(|(id, _)| *id == job_id)
                .map(|(_, c)| c.clone())
        })
    }

    fn failure(&self, job_id: Uuid) -> FailJob {
        self.wait_until("the job's failure", |f| {
            f.failed
                .iter()
                .find(|(id, _)| *id == job_id)
                .map(|(_, c)| c.clone())
        })
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.inventory);
        let _ = std::fs::remove_file(&self.state_file);
    }
}

struct Agent {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Agent {
    fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn wait_for_log_line(&self, what: &str, matches: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.log().lines().any(&matches) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn job(kind: JobKind, items: &[(&str, &str)], payload: serde_json::Value) -> ClaimedJob {
    ClaimedJob {
        job_id: Uuid::new_v4(),
        kind,
        lease: 1,
        lease_expires_at: Utc::now() + chrono::Duration::seconds(30),
        attempt: 1,
        items: items
            .iter()
            .map(|(instance, database)| JobItem {
                instance: (*instance).to_owned(),
                database: (*database).to_owned(),
                protected_item_id: Some(Uuid::new_v4()),
            })
            .collect(),
        payload,
    }
}

fn no_delay(sample: String) -> String {
    sample.replace("backup_millis = 200", "backup_millis = 0")
}

#[test]
fn discovers_backs_up_survives_outages_and_revocation_then_stops_on_sigterm() {
    let harness = Harness::new(no_delay);
    harness.fake.lock().unwrap().claim_outages = 2;
    let mut agent = harness.start_agent();

    let discovery = harness.push(job(JobKind::Discovery, &[], json!({})));
    let JobResult::Discovery { inventory } = harness.completion(discovery).result else {
        panic!("not a discovery result");
    };
    assert_eq!(inventory.instances.len(), 2);
    assert_eq!(inventory.databases.len(), 6);
    assert!(agent.log().contains("enrolled"));

    let dbs = [("MSSQLSERVER", "sales"), ("SQL2012", "erp+archive")];
    let full = harness.push(job(JobKind::BackupFull, &dbs, json!({})));
    let JobResult::Backup {
        recovery_points: full,
    } = harness.completion(full).result
    else {
        panic!("not a backup result");
    };
    assert_eq!(full.len(), 2);
    assert!(
        full.iter()
            .all(|p| p.backup_type == RecoveryPointType::Full)
    );

    // The token stops working while the agent holds a job: it must enroll again and still
    // deliver the result.
    let log = harness.push(job(JobKind::BackupLog, &dbs[..1], json!({})));
    harness.fake.lock().unwrap().agent_token = "revoked".to_owned();
    let JobResult::Backup {
        recovery_points: log,
    } = harness.completion(log).result
    else {
        panic!("not a backup result");
    };
    assert!(harness.fake.lock().unwrap().enrollments >= 2);
    let lsn = |text: &str| Lsn::parse(text).unwrap();
    assert!(
        lsn(&log[0].first_lsn) <= lsn(&full[0].last_lsn),
        "the first log holds the full's end"
    );
    assert_eq!(
        Some(&log[0].database_backup_lsn),
        full[0].checkpoint_lsn.as_ref(),
        "the full's checkpoint"
    );
    assert_ne!(
        full[0].checkpoint_lsn.as_ref(),
        Some(&full[0].first_lsn),
        "sales is busy"
    );

    let simple = harness.push(job(
        JobKind::BackupLog,
        &[("MSSQLSERVER", "staging")],
        json!({}),
    ));
    let failure = harness.failure(simple);
    assert_eq!(failure.code, "UserErrorSQLPODoesNotSupportBackupType");
    assert!(!failure.retryable);

    harness.wait_until("a heartbeat", |f| (!f.heartbeats.is_empty()).then_some(()));
    // Now idle in a 25-second long-poll: SIGTERM must not wait for it.
    std::thread::sleep(Duration::from_millis(200));
    let asked = Instant::now();
    agent.terminate();
    assert_eq!(agent.wait(Duration::from_secs(5)).code(), Some(0));
    assert!(asked.elapsed() < Duration::from_secs(3));
}

/// SQL Server cannot undo a backup: when the server refuses a completion because the lease
/// expired, the job's next attempt, even by a restarted agent, reports the same backup.
#[test]
fn a_retry_reports_the_backup_whose_completion_was_refused() {
    let harness = Harness::new(no_delay);
    let mut agent = harness.start_agent();
    let hr = [("MSSQLSERVER", "hr")];
    let full = harness.push(job(JobKind::BackupFull, &hr, json!({})));
    harness.completion(full);

    let log = job(JobKind::BackupLog, &hr, json!({}));
    let mut retry = log.clone();
    (retry.attempt, retry.lease) = (2, 2);
    harness
        .fake
        .lock()
        .unwrap()
        .lose_completion
        .insert(log.job_id);
    harness.push(log);
    let refused = harness.wait_until("the refused completion", |f| {
        f.refused.first().map(|(_, c)| c.clone())
    });
    agent.wait_for_log_line("the lease loss", |line| {
        line.contains("lease lost before the result was accepted")
    });
    agent.terminate();
    assert!(agent.wait(Duration::from_secs(10)).success());

    let _restarted = harness.start_agent();
    let id = harness.push(retry);
    let reported = harness.completion(id);
    assert_eq!(reported.lease, 2);
    assert_eq!(
        reported.result, refused.result,
        "the same backup set, LSNs and times"
    );
    let JobResult::Backup { recovery_points } = reported.result else {
        panic!("not a backup result");
    };
    assert!(recovery_points[0].backup_set_uuid.is_some());

    let next = harness.push(job(JobKind::BackupLog, &hr, json!({})));
    let JobResult::Backup {
        recovery_points: next,
    } = harness.completion(next).result
    else {
        panic!("not a backup result");
    };
    assert_eq!(
        next[0].first_lsn, recovery_points[0].last_lsn,
        "the chain goes on from it"
    );
}

#[test]
fn cancelled_jobs_stop_and_report_job_cancelled() {
    let harness = Harness::new(|s| s.replace("backup_millis = 200", "backup_millis = 10000"));
    let mut agent = harness.start_agent();
    let mut slow = job(JobKind::BackupFull, &[("MSSQLSERVER", "sales")], json!({}));
    // A 3-second lease: a job heartbeat each second.
    slow.lease_expires_at = Utc::now() + chrono::Duration::seconds(3);
    let id = harness.push(slow);
    harness.wait_until("a job heartbeat with progress", |f| {
        f.job_heartbeats
            .iter()
            .any(|(job, beat)| *job == id && beat.progress.is_some() && beat.lease == 1)
            .then_some(())
    });
    harness.fake.lock().unwrap().cancel.insert(id);
    let failure = harness.failure(id);
    assert_eq!(failure.code, "JobCancelled");
    assert!(!failure.retryable);
    assert!(harness.fake.lock().unwrap().completed.is_empty());
    agent.terminate();
    assert_eq!(agent.wait(Duration::from_secs(5)).code(), Some(0));
}

#[test]
fn a_completed_job_is_not_reported_lost() {
    let harness = Harness::new(|s| s.replace("backup_millis = 200", "backup_millis = 2000"));
    // The server records the completion at once but answers late, so that heartbeats
    // carry the job's lease while its completion is in flight, and after.
    harness.fake.lock().unwrap().completion_delay = Duration::from_millis(2500);
    let mut agent = harness.start_agent();
    let done = harness.push(job(JobKind::ConfigureProtection, &[], json!({})));
    let taken = job(JobKind::ConfigureProtection, &[], json!({}));
    harness.fake.lock().unwrap().taken.insert(taken.job_id);
    let taken = harness.push(taken);

    harness.completion(done);
    let (done, taken) = (done.to_string(), taken.to_string());
    agent.wait_for_log_line("the completion's answer", |line| {
        line.contains(&done) && line.contains("job completed")
    });
    agent.wait_for_log_line("the other job's loss", |line| {
        line.contains(&taken) && line.contains("lease lost")
    });
    let fake = harness.fake.lock().unwrap();
    assert!(
        fake.answered_lost.iter().any(|id| id.to_string() == done),
        "a heartbeat crossed the completion"
    );
    assert!(fake.completed.iter().all(|(id, _)| id.to_string() != taken));
    drop(fake);
    let log = agent.log();
    let false_alarms: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(&done) && line.contains("lost"))
        .collect();
    assert!(false_alarms.is_empty(), "{false_alarms:#?}");
    agent.terminate();
    assert_eq!(agent.wait(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn sigterm_lets_running_jobs_finish() {
    let harness = Harness::new(|s| s.replace("backup_millis = 200", "backup_millis = 1500"));
    let mut agent = harness.start_agent();
    let id = harness.push(job(JobKind::ConfigureProtection, &[], json!({})));
    harness.wait_until("the claim", |f| f.queue.is_empty().then_some(()));
    std::thread::sleep(Duration::from_millis(200));
    agent.terminate();
    assert_eq!(agent.wait(Duration::from_secs(10)).code(), Some(0));
    let completion = harness.completion(id);
    assert_eq!(completion.result, JobResult::ConfigureProtection {});
}

#[test]
fn crash_after_claim_exits_without_reporting() {
    let harness =
        Harness::new(|s| s.replace("crash_after_claim = false", "crash_after_claim = true"));
    let mut agent = harness.start_agent();
    harness.push(job(JobKind::Discovery, &[], json!({})));
    assert_eq!(agent.wait(Duration::from_secs(10)).code(), Some(101));
    let fake = harness.fake.lock().unwrap();
    assert!(fake.completed.is_empty() && fake.failed.is_empty());
}

/// An enrollment token is single-use: a restarted agent must not need another. It keeps its
/// agent token in the token file and refreshes it at start.
#[test]
fn a_restarted_agent_refreshes_its_saved_token_instead_of_enrolling_again() {
    let harness = Harness::new(no_delay);
    let token_file = harness.state_file.with_extension("token");
    let extra = ["--token-file".as_ref(), token_file.as_os_str()];
    let mut first = harness.start_agent_with(Some(ENROLLMENT_TOKEN), &extra);
    harness.wait_until("the enrollment", |f| (f.enrollments == 1).then_some(()));
    first.wait_for_log_line("enrolled", |l| l.contains("enrolled"));
    assert_eq!(
        std::fs::read_to_string(&token_file).unwrap(),
        "agent-token-1"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only the agent's user reads its token");
    }
    first.terminate();
    assert!(first.wait(Duration::from_secs(10)).success());

    // No enrollment token this time: the saved agent token is all it has.
    let second = harness.start_agent_with(None, &extra);
    harness.wait_until("the refresh", |f| (f.refreshes == 1).then_some(()));
    second.wait_for_log_line("enrolled", |l| l.contains("enrolled"));
    assert_eq!(harness.fake.lock().unwrap().enrollments, 1);
    assert_eq!(
        std::fs::read_to_string(&token_file).unwrap(),
        "agent-token-1-refreshed-1"
    );
    let discovery = harness.push(job(JobKind::Discovery, &[], json!({})));
    harness.completion(discovery);
    let _ = std::fs::remove_file(&token_file);
}

#[test]
fn refused_enrollment_is_fatal() {
    let harness = Harness::new(no_delay);
    let mut agent = Command::new(env!("CARGO_BIN_EXE_backvault-agent"))
        .args(["--inventory".as_ref(), harness.inventory.as_os_str()])
        .args(["--server", &harness.url, "--enrollment-token", "wrong"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1));
}

/// Against a server that knows version 2 of the claim, finished jobs are reported in the
/// claims (none through version 1's calls), a refused completion is acted on as before,
/// and the last reports still go out at shutdown.
#[test]
fn reports_ride_on_claims_when_the_server_knows_version_2() {
    let harness = Harness::new(no_delay);
    harness.fake.lock().unwrap().speaks_v2 = true;
    let mut agent = harness.start_agent();
    let hr = [("MSSQLSERVER", "hr")];
    let full = harness.push(job(JobKind::BackupFull, &hr, json!({})));
    harness.completion(full);
    let lost = job(JobKind::BackupLog, &hr, json!({}));
    harness
        .fake
        .lock()
        .unwrap()
        .lose_completion
        .insert(lost.job_id);
    let lost = harness.push(lost);
    agent.wait_for_log_line("the lease loss", |line| {
        line.contains(&lost.to_string())
            && line.contains("lease lost before the result was accepted")
    });
    let simple = harness.push(job(
        JobKind::BackupLog,
        &[("MSSQLSERVER", "staging")],
        json!({}),
    ));
    assert_eq!(
        harness.failure(simple).code,
        "UserErrorSQLPODoesNotSupportBackupType"
    );
    let many: Vec<Uuid> = (0..5)
        .map(|_| harness.push(job(JobKind::ConfigureProtection, &[], json!({}))))
        .collect();
    for id in many {
        harness.completion(id);
    }
    agent.terminate();
    assert_eq!(agent.wait(Duration::from_secs(10)).code(), Some(0));
    let fake = harness.fake.lock().unwrap();
    assert_eq!(fake.v1_reports, 0, "no report went through version 1");
    assert_eq!(
        fake.v2_reports, 8,
        "a full, a lost log, a refused log, 5 configurations"
    );
}
