//! The agent side of `/v1/agent/...`: retries while the server is away, enrolls again
//! when the server stops accepting the agent token, and refreshes the token before it
//! expires. With a token file, the token outlives the process: a restarted agent refreshes
//! it instead of enrolling again, so one single-use enrollment token serves for good.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};

use backvault_domain::agent::VmFacts;
use backvault_domain::agent::protocol::{
    AgentHeartbeat, AgentHeartbeatResponse, ClaimRequest, ClaimResponse, ClaimV2Request,
    ClaimV2Response, ClaimedJob, CompleteJob, EnrollRequest, EnrollResponse, FailJob, JobHeartbeat,
    JobHeartbeatResponse,
};
use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use uuid::Uuid;

use crate::backoff::{Backoff, MAX_DELAY};

/// A request the server answered, and will answer the same way if asked again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    Rejected {
        status: u16,
        code: String,
        detail: String,
    },
    /// The server stayed unreachable for as long as the caller cared to wait.
    GaveUp(String),
}

impl CallError {
    /// The job is no longer this agent's: stop working on it, and report nothing.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, CallError::Rejected { code, .. } if code == "lease_lost" || code == "job_not_found")
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Rejected {
                status,
                code,
                detail,
            } => write!(f, "server answered {status} {code}: {detail}"),
            CallError::GaveUp(why) => write!(f, "server unavailable: {why}"),
        }
    }
}

impl std::error::Error for CallError {}

/// What one HTTP exchange came to.
enum Exchange<T> {
    Done(T),
    Unauthorized {
        code: String,
        detail: String,
    },
    /// Worth retrying: no answer, or the server said it is overloaded or broken.
    Transient {
        why: String,
        retry_after: Option<Duration>,
    },
    Rejected(CallError),
}

struct Session {
    token: Option<String>,
    /// Bumped by every enrollment and refresh, so that callers that all got 401 at once
    /// enroll once.
    generation: u64,
    /// When the token is half-way to its expiry, and due for a refresh.
    refresh_at: Option<DateTime<Utc>>,
}

/// The file the agent token is kept in: the token alone, readable by its owner only.
pub struct TokenFile(PathBuf);

impl TokenFile {
    pub fn new(path: PathBuf) -> Self {
        Self(path)
    }

    fn load(&self) -> anyhow::Result<Option<String>> {
        match std::fs::read_to_string(&self.0) {
            Ok(text) => Ok(Some(text.trim().to_owned()).filter(|t| !t.is_empty())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.0.display())),
        }
    }

    /// Replaces the file at once (a new file renamed over it), so that a crash never
    /// leaves half a token.
    fn save(&self, token: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let tmp = self.0.with_extension(format!("tmp-{}", std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let written = options.open(&tmp).and_then(|mut file| {
            file.write_all(token.as_bytes())?;
            file.sync_all()
        });
        written
            .and_then(|()| std::fs::rename(&tmp, &self.0))
            .with_context(|| format!("saving the agent token to {}", self.0.display()))
    }
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    enrollment_token: Option<String>,
    token_file: Option<TokenFile>,
    session: RwLock<Session>,
    /// What the next enrollment tells the server.
    facts: Mutex<VmFacts>,
    enrolling: tokio::sync::Mutex<()>,
    /// The server answered that it does not know version 2 of the claim (it is older than
    /// this agent): claims and reports go through version 1's calls from then on.
    v1_only: AtomicBool,
}

/// Extra time the server gets beyond a long-poll's wait before the request counts as lost.
const CLAIM_SLACK: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a refused refresh waits before the next try.
const REFRESH_RETRY: Duration = Duration::from_secs(3600);

impl Client {
    pub fn new(
        base: &str,
        enrollment_token: Option<String>,
        token_file: Option<TokenFile>,
        facts: VmFacts,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("backvault-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            enrollment_token,
            token_file,
            session: RwLock::new(Session {
                token: None,
                generation: 0,
                refresh_at: None,
            }),
            facts: Mutex::new(facts),
            enrolling: tokio::sync::Mutex::new(()),
            v1_only: AtomicBool::new(false),
        })
    }

    /// Enrolls at start, retrying while the server is unreachable: with the saved agent
    /// token if there is one (a refresh), else, or if the server refuses it, with the
    /// enrollment token. A refusal (a used or bad enrollment token, facts the server
    /// rejects) is returned: retrying will not change it.
    pub async fn enroll(&self) -> Result<EnrollResponse, CallError> {
        let _enrolling = self.enrolling.lock().await;
        let saved = match self.token_file.as_ref().map(TokenFile::load).transpose() {
            Ok(saved) => saved.flatten(),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot read the saved agent token"
                );
                None
            }
        };
        if let Some(saved) = saved {
            match self.enroll_locked(&saved).await {
                Ok(enrolled) => return Ok(enrolled),
                Err(e @ CallError::Rejected { .. }) if self.enrollment_token.is_some() => {
                    tracing::warn!(error = %e, "the saved agent token was refused; enrolling with the enrollment token");
                }
                Err(e) => return Err(e),
            }
        }
        self.enroll_with_enrollment_token().await
    }

    async fn enroll_with_enrollment_token(&self) -> Result<EnrollResponse, CallError> {
        match &self.enrollment_token {
            Some(token) => self.enroll_locked(token).await,
            None => Err(CallError::Rejected {
                status: 401,
                code: "no_enrollment_token".to_owned(),
                detail: "no enrollment token was given, and no saved agent token works".to_owned(),
            }),
        }
    }

    /// Enrolls with `credential`: an enrollment token, or the agent token to refresh.
    async fn enroll_locked(&self, credential: &str) -> Result<EnrollResponse, CallError> {
        let facts = self.facts.lock().expect("facts").clone();
        let body = EnrollRequest { facts };
        let mut backoff = Backoff::new();
        loop {
            match self
                .exchange::<_, EnrollResponse>(
                    "/v1/agent/enroll",
                    credential,
                    &body,
                    REQUEST_TIMEOUT,
                )
                .await
            {
                Exchange::Done(enrolled) => {
                    {
                        let mut session = self.session.write().expect("session");
                        session.token = Some(enrolled.agent_token.clone());
                        session.generation += 1;
                        session.refresh_at = Some(halfway_to(enrolled.expires_at));
                    }
                    if let Some(file) = &self.token_file
                        && let Err(e) = file.save(&enrolled.agent_token)
                    {
                        // The agent works on; only a restart would need a new enrollment.
                        tracing::error!(error = format!("{e:#}"), "cannot save the agent token");
                    }
                    return Ok(enrolled);
                }
                Exchange::Unauthorized { code, detail } => {
                    return Err(CallError::Rejected {
                        status: 401,
                        code,
                        detail,
                    });
                }
                Exchange::Rejected(e) => return Err(e),
                Exchange::Transient { why, retry_after } => {
                    let delay = retry_delay(&mut backoff, retry_after);
                    tracing::warn!(%why, retry_in = ?delay, "cannot enroll; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Enrolls again after a 401, unless another caller already did since `seen`.
    async fn reenroll(&self, seen: u64) {
        let _enrolling = self.enrolling.lock().await;
        if self.session.read().expect("session").generation != seen {
            return;
        }
        loop {
            match self.enroll_with_enrollment_token().await {
                Ok(enrolled) => {
                    tracing::info!(vm_id = %enrolled.vm_id, "re-enrolled");
                    return;
                }
                // Refused at runtime: keep running jobs alive and keep asking rather than
                // exit, in case an operator fixes the token on the server. Slowly: a
                // refusal does not change within milliseconds.
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?MAX_DELAY, "cannot re-enroll");
                    tokio::time::sleep(MAX_DELAY).await;
                }
            }
        }
    }

    /// How long until the token is due for a refresh (half its lifetime).
    pub fn refresh_due_in(&self) -> Duration {
        let refresh_at = self.session.read().expect("session").refresh_at;
        refresh_at.map_or(REFRESH_RETRY, |at| {
            (at - Utc::now()).to_std().unwrap_or(Duration::ZERO)
        })
    }

    /// Trades the agent token, half-way to its expiry, for a fresh one (signed with the
    /// server's current key). The old one keeps working until it expires, so a refresh
    /// whose answer is lost costs nothing; a refused one is tried again later.
    pub async fn refresh(&self) {
        let _enrolling = self.enrolling.lock().await;
        let Some(token) = self.session.read().expect("session").token.clone() else {
            return;
        };
        match self.enroll_locked(&token).await {
            Ok(refreshed) => {
                tracing::info!(token_expires_at = %refreshed.expires_at, "agent token refreshed");
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?REFRESH_RETRY, "cannot refresh the agent token");
                self.session.write().expect("session").refresh_at =
                    Some(Utc::now() + REFRESH_RETRY);
            }
        }
    }

    pub async fn heartbeat(
        &self,
        body: &AgentHeartbeat,
        give_up_after: Duration,
    ) -> Result<AgentHeartbeatResponse, CallError> {
        let response = self
            .call(
                "/v1/agent/heartbeat",
                body,
                REQUEST_TIMEOUT,
                Some(give_up_after),
            )
            .await?;
        if let Some(facts) = &body.facts {
            *self.facts.lock().expect("facts") = facts.clone();
        }
        Ok(response)
    }

    /// Long-polls for up to `max_jobs` jobs; retries until the server answers.
    pub async fn claim(
        &self,
        max_jobs: u32,
        wait_seconds: u32,
    ) -> Result<Vec<ClaimedJob>, CallError> {
        let body = ClaimRequest {
            max_jobs,
            wait_seconds,
        };
        let timeout = Duration::from_secs(wait_seconds.into()) + CLAIM_SLACK;
        let response: ClaimResponse = self.call("/v1/agent/claim", &body, timeout, None).await?;
        Ok(response.jobs)
    }

    /// Reports finished jobs and claims more in one request (version 2 of the claim);
    /// retries until the server answers. `None` when the server is older and does not
    /// know the call: use [`Self::claim`], [`Self::complete`] and [`Self::fail`].
    pub async fn claim_v2(
        &self,
        body: &ClaimV2Request,
    ) -> Result<Option<ClaimV2Response>, CallError> {
        if self.v1_only.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let timeout = Duration::from_secs(body.wait_seconds.into()) + CLAIM_SLACK;
        match self.call("/v2/agent/claim", body, timeout, None).await {
            Ok(response) => Ok(Some(response)),
            Err(CallError::Rejected {
                status: 404 | 405, ..
            }) => {
                tracing::info!("the server does not know version 2 of the claim; using version 1");
                self.v1_only.store(true, Ordering::Relaxed);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub async fn job_heartbeat(
        &self,
        job_id: Uuid,
        body: &JobHeartbeat,
        give_up_after: Duration,
    ) -> Result<JobHeartbeatResponse, CallError> {
        let path = format!("/v1/agent/jobs/{job_id}/heartbeat");
        self.call(&path, body, REQUEST_TIMEOUT, Some(give_up_after))
            .await
    }

    /// Returns the job's new status. Retries until the server answers.
    pub async fn complete(&self, job_id: Uuid, body: &CompleteJob) -> Result<String, CallError> {
        let path = format!("/v1/agent/jobs/{job_id}/complete");
        let response: serde_json::Value = self.call(&path, body, REQUEST_TIMEOUT, None).await?;
        Ok(status_of(&response))
    }

    /// Returns the job's new status. Retries until the server answers.
    pub async fn fail(&self, job_id: Uuid, body: &FailJob) -> Result<String, CallError> {
        let path = format!("/v1/agent/jobs/{job_id}/fail");
        let response: serde_json::Value = self.call(&path, body, REQUEST_TIMEOUT, None).await?;
        Ok(status_of(&response))
    }

    /// One agent call: retried with backoff while the server is unreachable or failing
    /// (until `give_up_after`, if given), re-enrolling on 401.
    async fn call<B, R>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
        give_up_after: Option<Duration>,
    ) -> Result<R, CallError>
    where
        B: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let deadline = give_up_after.map(|d| Instant::now() + d);
        let mut backoff = Backoff::new();
        let mut unauthorized_before = false;
        loop {
            let (token, generation) = {
                let session = self.session.read().expect("session");
                (session.token.clone(), session.generation)
            };
            let Some(token) = token else {
                self.reenroll(generation).await;
                continue;
            };
            let delay = match self.exchange(path, &token, body, timeout).await {
                Exchange::Done(response) => return Ok(response),
                Exchange::Rejected(e) => return Err(e),
                Exchange::Unauthorized { code, .. } => {
                    tracing::info!(path, %code, "agent token rejected; enrolling again");
                    // A server that rejects even a fresh token must not be hammered.
                    if unauthorized_before {
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    unauthorized_before = true;
                    self.reenroll(generation).await;
                    continue;
                }
                Exchange::Transient { why, retry_after } => {
                    let delay = retry_delay(&mut backoff, retry_after);
                    tracing::warn!(path, %why, retry_in = ?delay, "agent call failed; retrying");
                    if deadline.is_some_and(|d| Instant::now() + delay > d) {
                        return Err(CallError::GaveUp(why));
                    }
                    delay
                }
            };
            tokio::time::sleep(delay).await;
        }
    }

    async fn exchange<B, R>(
        &self,
        path: &str,
        token: &str,
        body: &B,
        timeout: Duration,
    ) -> Exchange<R>
    where
        B: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let sent = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(body)
            .timeout(timeout)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                return Exchange::Transient {
                    why: error_chain(&e),
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            let bytes = match response.bytes().await {
                Ok(bytes) => bytes,
                Err(e) => {
                    return Exchange::Transient {
                        why: error_chain(&e),
                        retry_after: None,
                    };
                }
            };
            return match serde_json::from_slice(&bytes) {
                Ok(body) => Exchange::Done(body),
                Err(e) => Exchange::Rejected(CallError::Rejected {
                    status: status.as_u16(),
                    code: "unexpected_response".to_owned(),
                    detail: e.to_string(),
                }),
            };
        }
        if status == StatusCode::UNAUTHORIZED {
            let (code, detail) = problem(response).await;
            return Exchange::Unauthorized { code, detail };
        }
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.trim().parse().ok())
                .map(Duration::from_secs);
            let (code, _) = problem(response).await;
            return Exchange::Transient {
                why: format!("{} {code}", status.as_u16()),
                retry_after,
            };
        }
        let (code, detail) = problem(response).await;
        Exchange::Rejected(CallError::Rejected {
            status: status.as_u16(),
            code,
            detail,
        })
    }
}

/// The `code` and `detail` of a problem+json body, or stand-ins for other bodies.
async fn problem(response: reqwest::Response) -> (String, String) {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let parsed: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    let field = |name: &str| {
        parsed
            .as_ref()
            .and_then(|p| p.get(name)?.as_str())
            .map(str::to_owned)
    };
    let code = field("code").unwrap_or_else(|| format!("http_{}", status.as_u16()));
    let detail = field("detail").unwrap_or_else(|| text.chars().take(200).collect());
    (code, detail)
}

fn status_of(response: &serde_json::Value) -> String {
    response
        .get("status")
        .and_then(|s| s.as_str())
        .unwrap_or("unknown")
        .to_owned()
}

/// Half-way from now to `expires_at`: when a token is refreshed.
fn halfway_to(expires_at: DateTime<Utc>) -> DateTime<Utc> {
    let now = Utc::now();
    now + (expires_at - now) / 2
}

/// Our backoff, unless the server asked for longer (within reason).
fn retry_delay(backoff: &mut Backoff, retry_after: Option<Duration>) -> Duration {
    let delay = backoff.next_delay();
    retry_after.map_or(delay, |asked| delay.max(asked.min(MAX_DELAY)))
}

/// reqwest's top-level messages ("error sending request") hide the cause.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
