//! The scheduler: each tick turns the due slot of every policy and backup type into
//! backup jobs (`store::schedule`, one statement per slot), and an operator's "run the
//! schedule now", with a `--dev` clock for rehearsals.

use backvault_domain::jobs::{JobKind, MAX_ITEMS_PER_JOB, Priority};
use backvault_domain::policy::Policy;
use backvault_domain::text::check_instant;
use backvault_store::jobs as queue;
use backvault_store::schedule::{self, SlotJobs};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result};
use crate::recovery::policy_of;
use crate::{Principal, Service};

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunScheduler {
    /// Tick as if it were this instant (only on a server started with `--dev`).
    #[serde(default)]
    pub now: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SchedulerRun {
    pub now: DateTime<Utc>,
    pub jobs_enqueued: usize,
}

/// What the jobs of a scheduled slot of `kind` are made of.
pub fn slot_jobs(kind: JobKind, policy: Option<&Policy>) -> SlotJobs {
    SlotJobs {
        heal_with_differential: policy.is_some_and(|p| p.differential.is_some()),
        priority: Priority::Scheduled.rank(),
        max_attempts: kind.max_attempts(),
        max_items_per_job: MAX_ITEMS_PER_JOB as i32,
    }
}

impl Service {
    /// Runs a scheduler tick now (an operator's "run the schedule"); with `now` given, at
    /// that instant, which only a development server allows.
    pub async fn scheduler_run(
        &self,
        principal: &Principal,
        req: RunScheduler,
    ) -> Result<SchedulerRun> {
        principal.require(Operation::RunScheduler)?;
        let now = match req.now {
            Some(_) if !self.config.allow_clock_override => {
                return Err(Error::new(
                    ErrorKind::Forbidden,
                    "clock_override_disabled",
                    "ticking at a chosen instant is only allowed on a server started with --dev",
                ));
            }
            Some(at) => {
                if let Some(v) = check_instant(at, "/now") {
                    return Err(Error::validation(vec![v]));
                }
                at
            }
            None => self.now(),
        };
        let jobs_enqueued = self.schedule_tick(now).await?;
        Ok(SchedulerRun { now, jobs_enqueued })
    }

    /// Forgets what `--dev` rehearsals (`scheduler_run` with `now`) left in the schedule,
    /// so that a server started without `--dev` on the same database schedules from real
    /// time. Jobs the rehearsal made stay: they are real jobs.
    pub async fn forget_rehearsals(&self) -> Result<u64> {
        let forgotten = schedule::schedule_forget_rehearsals(&self.pool).await?;
        if forgotten > 0 {
            tracing::warn!(
                slots = forgotten,
                "forgot schedule slots a --dev rehearsal left in the future"
            );
        }
        Ok(forgotten)
    }

    /// One scheduler tick: the due slot of each policy and backup type becomes that
    /// policy's backup jobs, per VM in jobs of at most 50 databases. Safe in every replica
    /// at once: a slot is claimed by one of them.
    pub async fn schedule_tick(&self, now: DateTime<Utc>) -> Result<usize> {
        let started = std::time::Instant::now();
        // Routes first, so that this tick's jobs go where the replicas stand now. A
        // failure here leaves the last routes in place; scheduling goes on.
        if let Err(e) = self.reroute_groups().await {
            tracing::warn!(error = %e, "refreshing availability-group routes failed");
        }
        let enqueued = self.schedule_due_slots(now).await?;
        self.metrics
            .scheduler_tick_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.scheduled_jobs.inc_by(enqueued as u64);
        Ok(enqueued)
    }

    async fn schedule_due_slots(&self, now: DateTime<Utc>) -> Result<usize> {
        let mut enqueued: usize = 0;
        let mut first_error = None;
        for schedules in schedule::schedules_in_use(&self.pool).await? {
            let Some(policy) = policy_of(Some(&schedules.spec)) else {
                continue;
            };
            let next_at = |kind: JobKind| schedules.next_at(kind);
            for (kind, next) in policy.slots_to_claim(now, next_at) {
                // One policy failing (a statement timeout, say) must not hold back the rest.
                match self.fire_slot(&schedules, kind, now, next).await {
                    Ok(jobs) => enqueued = enqueued.saturating_add(jobs),
                    Err(e) => {
                        tracing::warn!(policy = %schedules.id, kind = kind.as_str(), error = %e, "scheduling a slot failed");
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(enqueued),
        }
    }

    /// Claims the due slot of a policy's `kind` and makes its jobs, in one transaction.
    async fn fire_slot(
        &self,
        schedules: &schedule::PolicySchedule,
        kind: JobKind,
        now: DateTime<Utc>,
        next: DateTime<Utc>,
    ) -> Result<usize> {
        let mut tx = self.pool.begin().await?;
        let Some(slot) = schedule::schedule_claim_slot(
            &mut tx,
            schedules.id,
            schedules.version,
            kind,
            now,
            next,
        )
        .await?
        else {
            // Keeps a schedule that just started.
            tx.commit().await?;
            return Ok(0);
        };
        let done = schedule::schedule_enqueue(
            &mut tx,
            schedules.id,
            kind,
            slot,
            now,
            slot_jobs(kind, policy_of(Some(&schedules.spec)).as_ref()),
        )
        .await?;
        if !done.vm_ids.is_empty() {
            queue::notify(&mut *tx, &queue::notify_payload('v', done.vm_ids)).await?;
        }
        tx.commit().await?;
        Ok(done.jobs as usize)
    }
}
