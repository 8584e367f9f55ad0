//! Use cases: one function per operation. Each authorizes the principal, opens the
//! transaction, applies the `domain` rules and calls the `store`. Transport-agnostic: the
//! `api` crate maps requests in and `Error` out.
// Input reaches every use case: arithmetic that could overflow must say why it cannot
// (tests are exempt: their numbers are their own).
#![cfg_attr(not(test), warn(clippy::arithmetic_side_effects))]

pub mod agents;
pub mod audit;
pub mod auth;
pub mod auto_protection;
pub mod availability;
pub mod background;
mod batcher;
pub mod claims;
mod clock;
mod completions;
pub mod data_safety;
pub mod error;
pub mod idempotency;
pub mod inventory;
pub mod job_events;
pub mod jobs;
pub mod keys;
pub mod metrics;
pub mod notifier;
pub mod on_demand;
pub mod pagination;
pub mod policies;
pub mod protectable_items;
pub mod protection;
pub mod recovery;
pub mod registration;
pub mod reports;
pub mod restore;
pub mod retention;
pub mod scheduler;
pub mod tokens;
pub mod vaults;
pub mod vms;

use std::sync::Arc;
use std::time::Duration;

pub use auth::{Auth, AuthConfig, Principal, Role};
pub use batcher::panic_message;
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, ErrorKind, Result};

use backvault_domain::jobs::{
    DEFAULT_MAX_RUNNING_BACKUPS_PER_VM, DEFAULT_MAX_RUNNING_RESTORES_PER_VM,
};
use backvault_store::PgPool;

/// Operational settings of the job machinery.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a claim or heartbeat keeps a job for its agent.
    pub lease: chrono::Duration,
    pub max_running_backups_per_vm: u32,
    pub max_running_restores_per_vm: u32,
    /// Finished jobs older than this leave the history.
    pub job_retention: chrono::Duration,
    pub agent_token_ttl: chrono::Duration,
    /// A waiting long-poll re-checks this often even without a notification.
    pub long_poll_recheck: Duration,
    /// Registered VMs are discovered again this often.
    pub discovery_period: chrono::Duration,
    /// Registration needs the VM's agent heard from within this window.
    pub agent_heard_within: chrono::Duration,
    /// How often the scheduler looks for due backup slots.
    pub scheduler_interval: Duration,
    /// Lets an admin run a scheduler tick at a chosen instant (development and tests only).
    pub allow_clock_override: bool,
    /// Audit events older than this many days are purged; at least
    /// `domain::audit::MIN_RETENTION_DAYS` (a shorter setting is refused where it is read,
    /// and the database refuses to delete younger events).
    pub audit_retention_days: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lease: chrono::Duration::seconds(60),
            max_running_backups_per_vm: DEFAULT_MAX_RUNNING_BACKUPS_PER_VM,
            max_running_restores_per_vm: DEFAULT_MAX_RUNNING_RESTORES_PER_VM,
            job_retention: chrono::Duration::days(90),
            agent_token_ttl: chrono::Duration::days(90),
            long_poll_recheck: Duration::from_secs(10),
            discovery_period: chrono::Duration::hours(8),
            agent_heard_within: chrono::Duration::minutes(30),
            scheduler_interval: Duration::from_secs(30),
            allow_clock_override: false,
            audit_retention_days: backvault_domain::audit::DEFAULT_RETENTION_DAYS,
        }
    }
}

/// What every use case needs. Cheap to clone: one reference count, since the HTTP layer
/// clones it for every request (its state, each route layer's state).
#[derive(Clone)]
pub struct Service(Arc<Shared>);

impl std::ops::Deref for Service {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What a [`Service`] holds, shared by its clones.
#[derive(Clone)]
pub struct Shared {
    pub pool: PgPool,
    pub auth: Arc<Auth>,
    pub config: Arc<Config>,
    pub notifier: Arc<notifier::Notifier>,
    pub job_events: Arc<job_events::JobEvents>,
    pub metrics: Arc<metrics::Metrics>,
    /// Flips when the server shuts down, so that long-polls answer at once.
    stopping: tokio::sync::watch::Sender<bool>,
    pub health: Arc<Health>,
    clock: Arc<dyn Clock>,
    claimer:
        batcher::Batcher<claims::ClaimRequest, Vec<backvault_domain::agent::protocol::ClaimedJob>>,
    completer: batcher::Batcher<backvault_store::jobs::Completion, ()>,
}

/// Pool connections the group commits leave to requests and background work.
const CONNECTIONS_BESIDE_BATCHES: u32 = 8;

/// Transactions each group commit (claims, completions) runs at once: the pool beyond
/// what requests and background work keep, shared by the two, at most 8 each. A batch
/// waits for its commit's flush, so more batches in flight keep Postgres busy while
/// others flush (8 against 4: about 5 % more jobs/s in the `http` benchmark); fewer than 2 would
/// leave one batcher's agents waiting behind every flush.
fn batch_workers(pool_connections: u32) -> usize {
    let spare = pool_connections.saturating_sub(CONNECTIONS_BESIDE_BATCHES) / 2;
    spare.clamp(2, 8) as usize
}

impl Service {
    /// Builds the service and starts this replica's notification listener, job wake-up
    /// publisher and batchers (needs a Tokio runtime).
    pub fn new(pool: PgPool, auth: Auth, config: Config) -> Self {
        let config = Arc::new(config);
        let notifier = Arc::new(notifier::Notifier::default());
        tokio::spawn(notifier.clone().listen(pool.clone()));
        tokio::spawn(notifier.clone().refresh_revocations(pool.clone()));
        let job_events = Arc::new(job_events::JobEvents::default());
        tokio::spawn(job_events.clone().publish(pool.clone()));
        let metrics = Arc::new(metrics::Metrics::default());
        let workers = batch_workers(pool.options().get_max_connections());
        let claimer = claims::claim_batcher(
            pool.clone(),
            config.clone(),
            metrics.clone(),
            job_events.clone(),
            workers,
        );
        let completer = completions::complete_batcher(
            pool.clone(),
            config.clone(),
            metrics.clone(),
            job_events.clone(),
            workers,
        );
        Self(Arc::new(Shared {
            pool,
            auth: Arc::new(auth),
            config,
            notifier,
            job_events,
            metrics,
            health: Arc::default(),
            clock: Arc::new(SystemClock),
            stopping: tokio::sync::watch::Sender::new(false),
            claimer,
            completer,
        }))
    }

    /// The same service reading "now" from `clock` (tests; rehearsals on a `--dev` server).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        Arc::make_mut(&mut self.0).clock = clock;
        self
    }

    /// Now, by the service's clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    /// Ends waiting long-polls (they answer with what they have) so that a graceful
    /// shutdown does not wait out their timeouts.
    pub fn begin_shutdown(&self) {
        self.stopping.send_replace(true);
    }

    /// Waits until `timeout` passes, `notified` fires or the server begins shutting down;
    /// true when shutting down.
    pub(crate) async fn wait_for_change(
        &self,
        timeout: Duration,
        notified: impl std::future::Future<Output = ()>,
    ) -> bool {
        let mut stopping = self.stopping.subscribe();
        if *stopping.borrow_and_update() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::timeout(timeout, notified) => false,
            _ = stopping.changed() => true,
        }
    }

    /// Database reachable, every embedded migration applied, and this replica's shared
    /// tasks running: the batchers, and the background loop once it was started.
    pub async fn readiness(&self) -> Result<()> {
        let stopped = [
            ("claims batcher", !self.claimer.is_running()),
            ("completions batcher", !self.completer.is_running()),
            ("background loop", self.health.background_stopped()),
        ];
        if let Some((task, _)) = stopped.iter().find(|(_, stopped)| *stopped) {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "task_stopped",
                format!("this replica's {task} is not running; restart the replica"),
            ));
        }
        let applied = backvault_store::migrations_applied(&self.pool)
            .await?
            .unwrap_or(0);
        let expected = backvault_store::MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .count();
        if usize::try_from(applied).unwrap_or(0) < expected {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "migrations_pending",
                "database migrations are not applied; run `backvault migrate`",
            ));
        }
        Ok(())
    }

    /// Refreshes the gauges read from Postgres; called at scrape time.
    pub async fn refresh_queue_gauges(&self) -> Result<()> {
        use backvault_domain::jobs::JobKind;
        use metrics::KindLabels;
        let stats = backvault_store::jobs::queue_stats(&self.pool).await?;
        let now = self.now();
        for kind in JobKind::ALL {
            let labels = KindLabels {
                kind: kind.as_str().to_owned(),
            };
            let stat = stats.iter().find(|s| s.kind == kind);
            self.metrics
                .queue_pending
                .get_or_create(&labels)
                .set(stat.map_or(0, |s| s.pending));
            self.metrics
                .queue_running
                .get_or_create(&labels)
                .set(stat.map_or(0, |s| s.running));
            let age = stat.and_then(|s| s.oldest_pending).map_or(0, |oldest| {
                now.signed_duration_since(oldest).num_seconds().max(0)
            });
            self.metrics
                .queue_oldest_pending_seconds
                .get_or_create(&labels)
                .set(age);
        }
        self.metrics
            .long_polls_waiting
            .set(self.notifier.waiting_vms() as i64);
        self.metrics
            .rpo_breaching_items
            .set(self.rpo_breaching(self.now()).await?);
        Ok(())
    }
}

/// Whether this replica's background loop runs. Tests and one-shot commands never start
/// it, so only a loop that started and then ended counts as stopped.
#[derive(Debug, Default)]
pub struct Health {
    /// 0 until the loop starts, then `RUNNING`, then `STOPPED`.
    background: std::sync::atomic::AtomicU8,
}

const RUNNING: u8 = 1;
const STOPPED: u8 = 2;

/// Marks the background loop stopped when dropped, however the loop ends.
pub struct BackgroundRunning<'a>(&'a Health);

impl Drop for BackgroundRunning<'_> {
    fn drop(&mut self) {
        self.0
            .background
            .store(STOPPED, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Health {
    pub fn background_started(&self) -> BackgroundRunning<'_> {
        self.background
            .store(RUNNING, std::sync::atomic::Ordering::SeqCst);
        BackgroundRunning(self)
    }

    pub fn background_stopped(&self) -> bool {
        self.background.load(std::sync::atomic::Ordering::SeqCst) == STOPPED
    }
}

/// A created resource, or the stored first response of a retried create.
#[derive(Debug)]
pub struct Created<T> {
    pub resource: T,
    pub replayed: bool,
}

/// Optimistic-concurrency precondition from `If-Match`: `None` means unconditional.
pub type ExpectedVersion = Option<i64>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The default pool (24) runs 8 batches of each kind and keeps 8 connections for the
    /// rest; a small pool keeps its share for requests down to 2 batches each; a large one
    /// stops at 8.
    #[test]
    fn batch_workers_leave_connections_to_requests() {
        assert_eq!(batch_workers(24), 8);
        assert_eq!(batch_workers(16), 4);
        assert_eq!(batch_workers(10), 2);
        assert_eq!(batch_workers(1), 2);
        assert_eq!(batch_workers(100), 8);
        for pool in 12..=24 {
            let both = 2 * batch_workers(pool) as u32;
            assert!(both + CONNECTIONS_BESIDE_BATCHES <= pool, "pool {pool}");
        }
    }

    /// Clones share one `Shared`; a clone given a clock of its own (a rehearsal) gets its
    /// own copy, and the service it came from keeps the clock it had.
    #[tokio::test]
    async fn a_clock_is_given_to_one_clone() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://127.0.0.1:1/unused")
            .unwrap();
        let auth = Auth::new(AuthConfig {
            secret: vec![7; 32],
            previous_secrets: Vec::new(),
            issuer: None,
            audience: None,
        });
        let service = Service::new(pool, auth, Config::default());
        let pinned: chrono::DateTime<chrono::Utc> = "2030-01-01T00:00:00Z".parse().unwrap();
        let rehearsal = service.clone().with_clock(ManualClock::at(pinned));
        assert_eq!(rehearsal.now(), pinned);
        assert_ne!(service.now(), pinned);
        let clone = service.clone();
        assert!(
            Arc::ptr_eq(&service.0, &clone.0),
            "a clone is a reference count"
        );
    }
}
