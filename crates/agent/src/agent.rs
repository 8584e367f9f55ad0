//! The agent's life: enroll, then heartbeat and claim until told to stop, running each
//! claimed job in its own task with its own lease heartbeats.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backvault_domain::agent::JobProgress;
use backvault_domain::agent::protocol::{
    AgentHeartbeat, ClaimV2Request, ClaimV2Response, ClaimedJob, JobCompletion, JobFailure,
    JobHeartbeat, ReportOutcome,
};
use chrono::Utc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::client::{CallError, Client};
use crate::config::InventorySource;
use crate::reports::{Outbox, Report};
use crate::running::{Registration, Running, Stop};
use crate::store::Store;
use crate::worker::{self, BackupClock, Failure, Outcome};

pub struct Settings {
    /// Jobs run at once.
    pub concurrency: u32,
    pub heartbeat: Duration,
    pub claim_wait_seconds: u32,
    /// How long running jobs get to finish once a shutdown is requested.
    pub shutdown_grace: Duration,
    pub backup_clock: BackupClock,
}

/// The server accepts at most this many jobs per claim.
const MAX_JOBS_PER_CLAIM: usize = 50;
/// A server that answers a long-poll at once must not be polled in a tight loop.
const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Time for jobs that outlived the grace period to hand themselves back.
const HAND_BACK_TIMEOUT: Duration = Duration::from_secs(5);
const MIN_JOB_HEARTBEAT: Duration = Duration::from_millis(250);
const MAX_JOB_HEARTBEAT: Duration = Duration::from_secs(60);
/// A server that hands out very short-lived tokens must not be asked in a tight loop.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// Reports that no claim took within this long are sent on their own: a job's lease is
/// no longer extended once it finished.
const REPORT_LINGER: Duration = Duration::from_millis(50);
/// How long the agent waits at exit for its last reports to reach the server.
const FINAL_REPORTS_TIMEOUT: Duration = Duration::from_secs(10);

/// Set once, when the agent should stop claiming and wind down.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> (watch::Sender<bool>, Self) {
        let (trigger, receiver) = watch::channel(false);
        (trigger, Self(receiver))
    }

    pub async fn requested(&mut self) {
        // A dropped trigger means nobody can ask any more: treat it as asked.
        let _ = self.0.wait_for(|&asked| asked).await;
    }
}

pub struct Agent {
    client: Client,
    inventory: InventorySource,
    store: Store,
    running: Arc<Running>,
    outbox: Outbox,
    settings: Settings,
}

/// Stops a background task when its owner is done, panicking or not.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Agent {
    pub fn new(
        client: Client,
        inventory: InventorySource,
        store: Store,
        settings: Settings,
    ) -> Self {
        Self {
            client,
            inventory,
            store,
            running: Arc::default(),
            outbox: Outbox::default(),
            settings,
        }
    }

    /// Runs until `shutdown`, then lets running jobs finish. Fails only if the server
    /// refuses to enroll the agent at start.
    pub async fn run(self: Arc<Self>, mut shutdown: Shutdown) -> anyhow::Result<()> {
        let enrolled = tokio::select! {
            enrolled = self.client.enroll() => enrolled.context("enrollment refused")?,
            () = shutdown.requested() => return Ok(()),
        };
        tracing::info!(
            vm_id = %enrolled.vm_id,
            token_expires_at = %enrolled.expires_at,
            "enrolled"
        );

        let _heartbeats = AbortOnDrop(tokio::spawn(Arc::clone(&self).heartbeat_loop()));
        let _refreshes = AbortOnDrop(tokio::spawn(Arc::clone(&self).refresh_loop()));
        let (close_reports, reports_closing) = Shutdown::new();
        let reporter = tokio::spawn(Arc::clone(&self).report_loop(reports_closing));
        let mut jobs = JoinSet::new();
        self.claim_loop(&mut jobs, shutdown).await;
        self.drain(jobs).await;
        let _ = close_reports.send(true);
        if tokio::time::timeout(FINAL_REPORTS_TIMEOUT, reporter)
            .await
            .is_err()
        {
            tracing::warn!(
                "gave up sending the last reports: their jobs are retried once their leases expire"
            );
        }
        tracing::info!("stopped");
        Ok(())
    }

    /// Refreshes the agent token whenever it is half-way to its expiry.
    async fn refresh_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.client.refresh_due_in().max(MIN_REFRESH_INTERVAL)).await;
            self.client.refresh().await;
        }
    }

    /// Tells the server the VM is alive and extends every running job's lease.
    async fn heartbeat_loop(self: Arc<Self>) {
        let mut sent_facts = self.inventory.last_good().facts().clone();
        let mut ticker = tokio::time::interval(self.settings.heartbeat);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick is immediate, and enrolling just told the server all this.
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let facts = self.inventory.current().facts().clone();
            let changed = (facts != sent_facts).then_some(facts);
            let body = AgentHeartbeat {
                facts: changed.clone(),
                jobs: self.running.leases(),
            };
            // Give up by the next tick, which sends fresher leases anyway.
            match self.client.heartbeat(&body, self.settings.heartbeat).await {
                Ok(response) => {
                    // A job that finished while this heartbeat was under way is `lost` to
                    // the server too: its lease ended with its result. Only jobs still at
                    // work have really lost theirs.
                    for job_id in response.lost {
                        if self.running.stop(job_id, Stop::Lost) {
                            tracing::warn!(%job_id, "heartbeat: lease lost");
                        }
                    }
                    for job_id in response.cancel_requested {
                        if self.running.stop(job_id, Stop::Cancelled) {
                            tracing::info!(%job_id, "heartbeat: cancel requested");
                        }
                    }
                    if let Some(facts) = changed {
                        tracing::info!("sent updated VM facts");
                        sent_facts = facts;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    }

    /// Claims as many jobs as there are free slots, until shutdown.
    async fn claim_loop(self: &Arc<Self>, jobs: &mut JoinSet<()>, mut shutdown: Shutdown) {
        let slots = Arc::new(Semaphore::new(self.settings.concurrency as usize));
        let mut refused = Backoff::new();
        loop {
            while let Some(finished) = jobs.try_join_next() {
                if let Err(e) = finished {
                    tracing::error!(error = %e, "job task failed");
                }
            }
            let first = tokio::select! {
                permit = Arc::clone(&slots).acquire_owned() => permit.expect("never closed"),
                () = shutdown.requested() => return,
            };
            let mut permits = vec![first];
            while permits.len() < MAX_JOBS_PER_CLAIM {
                match Arc::clone(&slots).try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }

            let asked = Instant::now();
            let max_jobs = u32::try_from(permits.len()).expect("at most 50");
            let reports = self.outbox.take_batch();
            let reported = !reports.is_empty();
            let claimed = if reported {
                // Not abandoned at shutdown: the reports hold finished work. No wait, so
                // that the reports' outcomes come back at once.
                let (request, held) = reports.into_request(max_jobs, 0);
                let claimed = self.exchange(request).await;
                drop(held);
                claimed
            } else {
                let (request, _) = reports.into_request(max_jobs, self.settings.claim_wait_seconds);
                tokio::select! {
                    claimed = self.exchange(request) => claimed,
                    () = shutdown.requested() => {
                        tracing::info!("shutdown: abandoning the claim in progress");
                        return;
                    }
                }
            };
            let pause = match claimed {
                Ok(claimed) => {
                    refused.reset();
                    if claimed.is_empty() && reported {
                        Duration::ZERO
                    } else if claimed.is_empty() {
                        MIN_POLL_INTERVAL.saturating_sub(asked.elapsed())
                    } else {
                        self.start_jobs(claimed, permits, jobs);
                        Duration::ZERO
                    }
                }
                Err(e) => {
                    let delay = refused.next_delay();
                    tracing::error!(error = %e, retry_in = ?delay, "claim refused");
                    delay
                }
            };
            if !pause.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shutdown.requested() => return,
                }
            }
        }
    }

    fn start_jobs(
        self: &Arc<Self>,
        claimed: Vec<ClaimedJob>,
        mut permits: Vec<OwnedSemaphorePermit>,
        jobs: &mut JoinSet<()>,
    ) {
        if self.inventory.current().faults.crash_after_claim {
            tracing::error!(
                jobs = claimed.len(),
                "crash_after_claim: exiting abruptly without doing the claimed jobs"
            );
            std::process::exit(101);
        }
        for job in claimed {
            let permit = permits.pop();
            if permit.is_none() {
                tracing::warn!(job_id = %job.job_id, "the server sent more jobs than asked for; running it anyway");
            }
            let span = tracing::info_span!(
                "job",
                job_id = %job.job_id,
                kind = job.kind.as_str(),
                attempt = job.attempt
            );
            jobs.spawn(Arc::clone(self).run_job(job, permit).instrument(span));
        }
    }

    /// Does one job and reports how it went, unless the lease went to someone else.
    async fn run_job(self: Arc<Self>, job: ClaimedJob, _slot: Option<OwnedSemaphorePermit>) {
        let mut registration = self.running.start(job.job_id, job.lease);
        let lease = (job.lease_expires_at - Utc::now())
            .to_std()
            .unwrap_or_default();
        // Three beats per lease: one lost request does not cost the lease.
        let every = (lease / 3).clamp(MIN_JOB_HEARTBEAT, MAX_JOB_HEARTBEAT);
        let _heartbeats = AbortOnDrop(tokio::spawn(
            Arc::clone(&self)
                .job_heartbeat_loop(job.job_id, job.lease, every)
                .in_current_span(),
        ));
        tracing::info!(items = job.items.len(), lease = ?lease, "job started");

        let progress = |percent: u8| {
            self.running.set_progress(
                job.job_id,
                JobProgress {
                    percent: Some(percent),
                    message: None,
                },
            );
        };
        let outcome = tokio::select! {
            outcome = worker::execute(&job, &self.inventory, &self.store, self.settings.backup_clock, progress) => outcome,
            why = registration.stopped() => match why {
                Stop::Lost => {
                    // Backups it took stay taken; a retry of the job reports them.
                    tracing::warn!("lease lost: abandoning the job");
                    return;
                }
                Stop::Cancelled => Outcome::Fail(Failure {
                    code: "JobCancelled",
                    message: "The job was cancelled before it finished.".to_owned(),
                    retryable: false,
                }),
                Stop::Shutdown => Outcome::Fail(Failure {
                    code: "AgentShuttingDown",
                    message: "The agent shut down before the job finished.".to_owned(),
                    retryable: true,
                }),
            },
        };
        registration.reporting();
        self.report(&job, outcome, registration);
    }

    async fn job_heartbeat_loop(self: Arc<Self>, job_id: Uuid, lease: i64, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let body = JobHeartbeat {
                lease,
                progress: self.running.progress(job_id),
            };
            match self.client.job_heartbeat(job_id, &body, every).await {
                Ok(response) if response.cancel_requested => {
                    if self.running.stop(job_id, Stop::Cancelled) {
                        tracing::info!("cancel requested");
                    }
                }
                Ok(_) => {}
                Err(e) if e.is_lease_lost() => {
                    self.running.stop(job_id, Stop::Lost);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "job heartbeat failed"),
            }
        }
    }

    /// Hands the job's outcome to the outbox: the next claim, or the reporter, tells the
    /// server.
    fn report(&self, job: &ClaimedJob, outcome: Outcome, registration: Registration) {
        let report = match outcome {
            Outcome::Complete { result, warnings } => Report::Completed(JobCompletion {
                job_id: job.job_id,
                lease: job.lease,
                result,
                warnings,
            }),
            Outcome::Fail(failure) => Report::Failed(failed(job.job_id, job.lease, failure)),
        };
        self.outbox.post(report, Some(registration));
    }

    /// Sends the reports no claim took within [`REPORT_LINGER`]: those of jobs that finish
    /// while the claim loop long-polls. At `closing`, sends what is left and returns.
    async fn report_loop(self: Arc<Self>, mut closing: Shutdown) {
        loop {
            let last = tokio::select! {
                () = self.outbox.posted() => false,
                () = closing.requested() => true,
            };
            if !last {
                tokio::time::sleep(REPORT_LINGER).await;
            }
            loop {
                let reports = self.outbox.take_batch();
                if reports.is_empty() {
                    break;
                }
                let (request, held) = reports.into_request(0, 0);
                if let Err(e) = self.exchange(request).await {
                    tracing::error!(error = %e, "the server refused the reports");
                }
                drop(held);
            }
            if last {
                return;
            }
        }
    }

    /// One claim carrying reports (version 2), or the same through version 1's calls when
    /// the server is older. Returns the jobs claimed.
    async fn exchange(&self, request: ClaimV2Request) -> Result<Vec<ClaimedJob>, CallError> {
        let reports = !request.completions.is_empty() || !request.failures.is_empty();
        match self.client.claim_v2(&request).await {
            Ok(Some(response)) => {
                self.settle(&request, &response);
                Ok(response.jobs)
            }
            Ok(None) => self.exchange_v1(request).await,
            Err(e @ CallError::Rejected { .. }) if reports => {
                // Refused as a whole (a report the server cannot even read): each alone, so
                // that only the one at fault is refused.
                tracing::warn!(error = %e, "the server refused a claim with reports; sending each report alone");
                self.exchange_v1(request).await
            }
            Err(e) => Err(e),
        }
    }

    async fn exchange_v1(&self, request: ClaimV2Request) -> Result<Vec<ClaimedJob>, CallError> {
        for completion in request.completions {
            let (job_id, body) = completion.into_parts();
            let answer = self.client.complete(job_id, &body).await;
            self.completion_answered(job_id, body.lease, answer.map(Some));
        }
        for failure in request.failures {
            let (job_id, body) = failure.into_parts();
            let answer = self.client.fail(job_id, &body).await;
            failure_answered(job_id, &body.code, body.retryable, answer.map(Some));
        }
        if request.max_jobs == 0 {
            return Ok(Vec::new());
        }
        self.client
            .claim(request.max_jobs, request.wait_seconds)
            .await
    }

    /// Acts on what a version 2 claim said of each report, as on version 1's answers.
    fn settle(&self, request: &ClaimV2Request, response: &ClaimV2Response) {
        for (sent, outcome) in request.completions.iter().zip(&response.completions) {
            self.completion_answered(sent.job_id, sent.lease, answer_of(outcome));
        }
        for (sent, outcome) in request.failures.iter().zip(&response.failures) {
            failure_answered(sent.job_id, &sent.code, sent.retryable, answer_of(outcome));
        }
    }

    fn completion_answered(
        &self,
        job_id: Uuid,
        lease: i64,
        answer: Result<Option<String>, CallError>,
    ) {
        match answer {
            Ok(status) => {
                tracing::info!(%job_id, status = status.as_deref().unwrap_or("unknown"), "job completed")
            }
            Err(e) if e.is_lease_lost() => {
                // SQL Server cannot undo a backup, so neither does the simulation: the job's
                // next attempt finds its backups in the history and reports them.
                tracing::warn!(
                    %job_id,
                    "lease lost before the result was accepted: a retry of the job reports it again"
                );
            }
            Err(e) => {
                tracing::error!(%job_id, error = %e, "the server refused the job's result");
                // Otherwise the job would sit until its lease expired, and then run again
                // only to be refused again.
                let failure = Failure {
                    code: "AgentResultRejected",
                    message: format!("The server refused the job's result: {e}"),
                    retryable: false,
                };
                self.outbox
                    .post(Report::Failed(failed(job_id, lease, failure)), None);
            }
        }
    }

    /// Lets running jobs finish; hands back those that take longer than the grace period.
    async fn drain(&self, mut jobs: JoinSet<()>) {
        while jobs.try_join_next().is_some() {}
        if jobs.is_empty() {
            return;
        }
        tracing::info!(
            running = jobs.len(),
            grace = ?self.settings.shutdown_grace,
            "shutting down: waiting for running jobs"
        );
        let finished = tokio::time::timeout(self.settings.shutdown_grace, async {
            while jobs.join_next().await.is_some() {}
        })
        .await;
        if finished.is_ok() {
            return;
        }
        tracing::warn!(
            running = jobs.len(),
            "grace period over: handing the remaining jobs back"
        );
        self.running.stop_all(Stop::Shutdown);
        let _ = tokio::time::timeout(HAND_BACK_TIMEOUT, async {
            while jobs.join_next().await.is_some() {}
        })
        .await;
    }
}

/// A report's outcome as its version 1 call would have answered it.
fn answer_of(outcome: &ReportOutcome) -> Result<Option<String>, CallError> {
    match &outcome.refused {
        None => Ok(outcome.status.map(|s| s.as_str().to_owned())),
        Some(refused) => Err(CallError::Rejected {
            status: refused.status,
            code: refused.code.clone(),
            detail: refused.detail.clone(),
        }),
    }
}

fn failed(job_id: Uuid, lease: i64, failure: Failure) -> JobFailure {
    JobFailure {
        job_id,
        lease,
        code: failure.code.to_owned(),
        message: failure.message,
        retryable: failure.retryable,
    }
}

fn failure_answered(
    job_id: Uuid,
    code: &str,
    retryable: bool,
    answer: Result<Option<String>, CallError>,
) {
    match answer {
        Ok(status) => tracing::info!(
            %job_id,
            code,
            retryable,
            status = status.as_deref().unwrap_or("unknown"),
            "job failed"
        ),
        Err(e) if e.is_lease_lost() => {
            tracing::warn!(%job_id, code, "lease lost before the failure was accepted");
        }
        Err(e) => {
            tracing::error!(%job_id, error = %e, code, "the server refused the failure")
        }
    }
}
