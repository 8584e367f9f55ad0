//! Counters of what the job machinery does, exported at `/metrics`. Gauges that describe
//! the queue are read from Postgres at scrape time, so every replica reports the truth.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: &'static str,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

pub struct Metrics {
    pub http_request_seconds: Family<HttpLabels, Histogram>,
    pub jobs_claimed: Counter,
    pub jobs_completed: Counter,
    pub jobs_failed: Counter,
    pub lease_expiries: Counter,
    pub queue_pending: Family<KindLabels, Gauge>,
    pub queue_running: Family<KindLabels, Gauge>,
    pub queue_oldest_pending_seconds: Family<KindLabels, Gauge>,
    pub long_polls_waiting: Gauge,
    pub rpo_breaching_items: Gauge,
    pub scheduler_tick_seconds: Histogram,
    pub scheduled_jobs: Counter,
    /// Panics caught in shared tasks (batchers, background loops), by task.
    pub task_panics: Family<TaskLabels, Counter>,
    /// Batches split because their shared statement failed, by batcher.
    pub batch_splits: Family<TaskLabels, Counter>,
    /// Jobs failed because the server could not record what their agent reported.
    pub results_not_recorded: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            http_request_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            jobs_claimed: Counter::default(),
            jobs_completed: Counter::default(),
            jobs_failed: Counter::default(),
            lease_expiries: Counter::default(),
            queue_pending: Family::default(),
            queue_running: Family::default(),
            queue_oldest_pending_seconds: Family::default(),
            long_polls_waiting: Gauge::default(),
            rpo_breaching_items: Gauge::default(),
            scheduler_tick_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            scheduled_jobs: Counter::default(),
            task_panics: Family::default(),
            batch_splits: Family::default(),
            results_not_recorded: Counter::default(),
        }
    }
}

impl Metrics {
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("backvault");
        r.register(
            "http_request_duration_seconds",
            "HTTP request latency by route and status",
            self.http_request_seconds.clone(),
        );
        r.register(
            "jobs_claimed",
            "Jobs handed to agents",
            self.jobs_claimed.clone(),
        );
        r.register(
            "jobs_completed",
            "Jobs completed by agents",
            self.jobs_completed.clone(),
        );
        r.register(
            "jobs_failed",
            "Job attempts agents reported failed",
            self.jobs_failed.clone(),
        );
        r.register(
            "lease_expiries",
            "Job leases that expired and were rescued",
            self.lease_expiries.clone(),
        );
        r.register(
            "queue_pending_jobs",
            "Jobs waiting to be claimed, by kind",
            self.queue_pending.clone(),
        );
        r.register(
            "queue_running_jobs",
            "Jobs held by agents, by kind",
            self.queue_running.clone(),
        );
        r.register(
            "queue_oldest_pending_age_seconds",
            "Age of the oldest claimable job, by kind",
            self.queue_oldest_pending_seconds.clone(),
        );
        r.register(
            "long_polls_waiting",
            "VMs with a claim waiting in a long-poll on this replica",
            self.long_polls_waiting.clone(),
        );
        r.register(
            "rpo_breaching_items",
            "Protected items whose latest recovery point is older than their policy allows",
            self.rpo_breaching_items.clone(),
        );
        r.register(
            "scheduler_tick_duration_seconds",
            "Time a scheduler tick of this replica took, including the jobs it enqueued",
            self.scheduler_tick_seconds.clone(),
        );
        r.register(
            "scheduled_jobs",
            "Backup jobs this replica's scheduler enqueued",
            self.scheduled_jobs.clone(),
        );
        r.register(
            "task_panics",
            "Panics caught in a batcher or background loop, which kept running",
            self.task_panics.clone(),
        );
        r.register(
            "batch_splits",
            "Group-committed batches split to isolate a failing request",
            self.batch_splits.clone(),
        );
        r.register(
            "results_not_recorded",
            "Jobs failed with JobResultNotRecorded: the server could not record their result",
            self.results_not_recorded.clone(),
        );
        r
    }
}
