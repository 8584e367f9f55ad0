//! The agent side of `/v1/agent/...`: retries while the server is away, and enrolls again
//! when the server stops accepting the agent token.

use std::fmt;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use backvault_domain::agent::VmFacts;
use backvault_domain::agent::protocol::{
    AgentHeartbeat, AgentHeartbeatResponse, ClaimRequest, ClaimResponse, ClaimedJob, CompleteJob,
    EnrollRequest, EnrollResponse, FailJob, JobHeartbeat, JobHeartbeatResponse,
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
    Unauthorized,
    /// Worth retrying: no answer, or the server said it is overloaded or broken.
    Transient {
        why: String,
        retry_after: Option<Duration>,
    },
    Rejected(CallError),
}

struct Session {
    token: Option<String>,
    /// Bumped by every enrollment, so that callers that all got 401 at once enroll once.
    generation: u64,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    enrollment_token: String,
    session: RwLock<Session>,
    /// What the next enrollment tells the server.
    facts: Mutex<VmFacts>,
    enrolling: tokio::sync::Mutex<()>,
}

/// Extra time the server gets beyond a long-poll's wait before the request counts as lost.
const CLAIM_SLACK: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    pub fn new(base: &str, enrollment_token: String, facts: VmFacts) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("backvault-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            enrollment_token,
            session: RwLock::new(Session {
                token: None,
                generation: 0,
            }),
            facts: Mutex::new(facts),
            enrolling: tokio::sync::Mutex::new(()),
        })
    }

    /// Enrolls, retrying while the server is unreachable. A refusal (a bad enrollment
    /// token, facts the server rejects) is returned: retrying will not change it.
    pub async fn enroll(&self) -> Result<EnrollResponse, CallError> {
        let _enrolling = self.enrolling.lock().await;
        self.enroll_locked().await
    }

    async fn enroll_locked(&self) -> Result<EnrollResponse, CallError> {
        let facts = self.facts.lock().expect("facts").clone();
        let body = EnrollRequest { facts };
        let mut backoff = Backoff::new();
        loop {
            match self
                .exchange::<_, EnrollResponse>(
                    "/v1/agent/enroll",
                    &self.enrollment_token,
                    &body,
                    REQUEST_TIMEOUT,
                )
                .await
            {
                Exchange::Done(enrolled) => {
                    let mut session = self.session.write().expect("session");
                    session.token = Some(enrolled.agent_token.clone());
                    session.generation += 1;
                    return Ok(enrolled);
                }
                Exchange::Unauthorized => {
                    return Err(CallError::Rejected {
                        status: 401,
                        code: "enrollment_token_rejected".to_owned(),
                        detail: "the server does not accept the enrollment token".to_owned(),
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
            match self.enroll_locked().await {
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
                Exchange::Unauthorized => {
                    tracing::info!(path, "agent token rejected; enrolling again");
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
            return Exchange::Unauthorized;
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
