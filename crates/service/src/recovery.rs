//! Recovery points and what follows from them: recording them in the completion's
//! transaction (with the recovery chain and gap detection), the scheduler, retention,
//! restore plans and jobs, and the RPO report.

use std::collections::HashMap;

use std::collections::HashSet;

use backvault_domain::agent::{JobItem, RecoveryModel, RecoveryPointReport, RecoveryPointType};
use backvault_domain::chain::{self, ChainBreak, ChainState};
use backvault_domain::chain::{PlanError, TimeRange};
use backvault_domain::jobs::{JobKind, MAX_ITEMS_PER_JOB, Priority};
use backvault_domain::lsn::Lsn;
use backvault_domain::policy::{Policy, PolicySpec};
use backvault_domain::preview::{rpo_breached, rpo_deadline};
use backvault_domain::restore::{
    Overwritten, RestoreJobPayload, RestoreStep, RestoreTargetFacts, check_restore_target,
    overwrite_mode,
};
use backvault_domain::text::check_instant;
use backvault_store::inventory::DatabaseRow;
use backvault_store::jobs as queue;
use backvault_store::recovery::{self as store, ChainUpdate, NewPoint, PointRow};
use backvault_store::schedule::{self, SlotJobs};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::jobs::{Job, new_job};
use crate::{Principal, Service};

/// A backup job's report, as the group commit hands it over.
pub(crate) struct BackupReport {
    pub job_id: Uuid,
    pub points: Vec<RecoveryPointReport>,
}

pub(crate) fn policy_of(spec: Option<&sqlx::types::Json<serde_json::Value>>) -> Option<Policy> {
    let spec: PolicySpec = serde_json::from_value(spec?.0.clone()).ok()?;
    spec.validate("").ok()
}

/// When a point kept `days` from `backup_time` expires. The request that set `days` and
/// the report that set `backup_time` were both bounded at the edge, so this fails only
/// for a job enqueued before those bounds existed; that job's completion fails alone.
fn fixed_expiry(backup_time: DateTime<Utc>, days: u64) -> Result<DateTime<Utc>> {
    i64::try_from(days)
        .ok()
        .and_then(chrono::TimeDelta::try_days)
        .and_then(|d| backup_time.checked_add_signed(d))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Validation,
                "retention_out_of_range",
                format!("a retention of {days} days from {backup_time} is past the latest instant backvault keeps"),
            )
        })
}

fn point_type(s: &str) -> Result<RecoveryPointType> {
    RecoveryPointType::parse(s).ok_or_else(|| data_error(format!("a recovery point of type {s:?}")))
}

pub(crate) fn model_of(s: &str) -> Result<RecoveryModel> {
    RecoveryModel::parse(s).ok_or_else(|| data_error(format!("a recovery model {s:?}")))
}

/// The database holds a value its constraints should have kept out.
fn data_error(what: String) -> Error {
    Error::internal(format!("stored data out of its domain: {what}"))
}

fn stored_lsn(raw: &str) -> Result<Lsn> {
    Lsn::parse(raw).ok_or_else(|| data_error(format!("an LSN {raw:?}")))
}

/// A protected item's chain while a batch of its points is recorded.
struct Recording {
    chain: ChainState,
    policy: Option<Policy>,
    last_full_id: Option<Uuid>,
    last_full_at: Option<DateTime<Utc>>,
    last_differential_at: Option<DateTime<Utc>>,
    last_log_at: Option<DateTime<Utc>>,
    stored_full_at: Option<DateTime<Utc>>,
    stored_log_at: Option<DateTime<Utc>>,
}

/// Records the recovery points of completed backup jobs in the caller's transaction:
/// each applied to its item's chain (`domain::chain::apply`: the full it depends on, a
/// break and what heals it), with its expiry from the policy (or the job's own
/// retention). A backup set already recorded for the item (a re-report) is skipped.
pub(crate) async fn record_points(tx: &mut PgConnection, reports: &[BackupReport]) -> Result<()> {
    if reports.is_empty() {
        return Ok(());
    }
    let job_ids: Vec<Uuid> = reports.iter().map(|r| r.job_id).collect();
    let jobs: Vec<(Uuid, Vec<JobItem>, serde_json::Value)> =
        queue::jobs_content(&mut *tx, &job_ids)
            .await?
            .into_iter()
            .map(|(id, _, items, payload)| {
                (
                    id,
                    serde_json::from_value(items.0).unwrap_or_default(),
                    payload.0,
                )
            })
            .collect();
    let mut item_ids: Vec<Uuid> = jobs
        .iter()
        .flat_map(|j| j.1.iter().filter_map(|i| i.protected_item_id))
        .collect();
    item_ids.sort();
    item_ids.dedup();
    let mut chains: HashMap<Uuid, Recording> = store::chain_lock(tx, &item_ids)
        .await?
        .into_iter()
        .map(|row| {
            let recording = Recording {
                chain: row.chain.0,
                policy: policy_of(row.spec.as_ref()),
                last_full_id: None,
                last_full_at: None,
                last_differential_at: None,
                last_log_at: None,
                stored_full_at: row.last_full_at,
                stored_log_at: row.last_log_at,
            };
            (row.id, recording)
        })
        .collect();
    let backup_sets: Vec<Uuid> = reports
        .iter()
        .flat_map(|r| r.points.iter().filter_map(|p| p.backup_set_uuid))
        .collect();
    let mut recorded: HashSet<(Uuid, Uuid)> = if backup_sets.is_empty() {
        HashSet::new()
    } else {
        store::points_recorded(&mut *tx, &item_ids, &backup_sets)
            .await?
            .into_iter()
            .collect()
    };
    let mut points = Vec::new();
    for report in reports {
        let Some((_, items, payload)) = jobs.iter().find(|j| j.0 == report.job_id) else {
            continue;
        };
        let fixed_days = payload
            .get("retention_days")
            .and_then(serde_json::Value::as_u64);
        let mut reported: Vec<&RecoveryPointReport> = report.points.iter().collect();
        reported.sort_by_key(|p| p.backup_time);
        for p in reported {
            let Some(item) = items
                .iter()
                .find(|i| i.is_named(&p.instance, &p.database))
                .and_then(|i| i.protected_item_id)
            else {
                continue;
            };
            let Some(rec) = chains.get_mut(&item) else {
                continue;
            };
            if let Some(set) = p.backup_set_uuid
                && !recorded.insert((item, set))
            {
                continue;
            }
            let id = Uuid::now_v7();
            let point = chain::Point::from_report(id, p).ok_or_else(|| {
                data_error(format!(
                    "unchecked LSNs in a report of job {}",
                    report.job_id
                ))
            })?;
            let has_differential = rec
                .policy
                .as_ref()
                .is_some_and(|p| p.differential.is_some());
            let applied = chain::apply(rec.chain, &point, has_differential);
            rec.chain = applied.state;
            let mut log_from = None;
            match p.backup_type {
                RecoveryPointType::Full => {
                    rec.last_full_id = Some(id);
                    rec.last_full_at = Some(p.backup_time);
                }
                RecoveryPointType::CopyOnlyFull => {}
                RecoveryPointType::Differential => rec.last_differential_at = Some(p.backup_time),
                RecoveryPointType::Log => {
                    log_from = rec
                        .last_log_at
                        .or(rec.stored_log_at)
                        .or(rec.last_full_at)
                        .or(rec.stored_full_at);
                    rec.last_log_at = Some(p.backup_time);
                }
            }
            let (expires_at, fixed) = match (p.backup_type, fixed_days, rec.policy.as_ref()) {
                (RecoveryPointType::CopyOnlyFull, Some(days), _)
                | (RecoveryPointType::Full, Some(days), _) => {
                    (Some(fixed_expiry(p.backup_time, days)?), true)
                }
                (_, _, None) => (None, false),
                (t, _, Some(policy)) => (
                    policy
                        .expiry(t.retention_type(), p.backup_time)
                        .map(|e| e.expires_at),
                    false,
                ),
            };
            let optional = |raw: &Option<String>| raw.as_deref().and_then(Lsn::parse);
            points.push(NewPoint {
                id,
                protected_item_id: item,
                job_id: report.job_id,
                backup_type: p.backup_type.as_str(),
                started_at: p.started_at,
                backup_time: p.backup_time,
                log_from,
                first_lsn: point.first_lsn,
                last_lsn: point.last_lsn,
                database_backup_lsn: stored_lsn(&p.database_backup_lsn)?,
                checkpoint_lsn: point.checkpoint_lsn,
                differential_base_lsn: point.differential_base_lsn,
                differential_base_guid: p.differential_base_guid,
                backup_set_uuid: p.backup_set_uuid,
                begins_log_chain: p.begins_log_chain,
                has_bulk_logged_data: point.has_bulk_logged_data,
                recovery_model: p.recovery_model.map(RecoveryModel::as_str),
                recovery_fork_guid: p.recovery_fork_guid,
                fork_point_lsn: optional(&p.fork_point_lsn),
                database_guid: p.database_guid,
                size_bytes: p.size_bytes,
                full_id: applied.full_id,
                expires_at,
                fixed_retention: fixed,
                chain_break: applied.chain_break.map(ChainBreak::as_str),
                unverified: applied.unverified,
            });
        }
    }
    store::points_insert(tx, &points).await?;
    let (fulls, expiries): (Vec<Uuid>, Vec<DateTime<Utc>>) = points
        .iter()
        .filter_map(|p| Some((p.full_id?, p.expires_at?)))
        .unzip();
    store::fulls_extend_chain(&mut *tx, &fulls, &expiries).await?;
    let updates: Vec<ChainUpdate> = chains
        .into_iter()
        .map(|(id, rec)| ChainUpdate {
            id,
            chain: rec.chain,
            last_full_id: rec.last_full_id,
            last_full_at: rec.last_full_at,
            last_differential_at: rec.last_differential_at,
            last_log_at: rec.last_log_at,
        })
        .collect();
    store::chain_update(tx, &updates).await?;
    Ok(())
}

/// Completed restores (their payloads) that overwrote protected databases: those items'
/// chains restart now (a new recovery fork), after any tail-log backup was recorded.
pub(crate) async fn restores_completed(
    tx: &mut PgConnection,
    payloads: &[&serde_json::Value],
) -> Result<()> {
    let items: Vec<Uuid> = payloads
        .iter()
        .filter_map(|p| RestoreJobPayload::deserialize(*p).ok())
        .flat_map(|p| p.overwritten_items)
        .collect();
    if !items.is_empty() {
        let chains = vec![chain::overwritten(); items.len()];
        store::chains_set(&mut *tx, &items, &chains).await?;
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RecoveryPoint {
    pub id: Uuid,
    pub backup_type: RecoveryPointType,
    pub started_at: DateTime<Utc>,
    pub backup_time: DateTime<Utc>,
    /// Logs cover the instants after this one up to `backup_time`.
    pub log_from: Option<DateTime<Utc>>,
    /// LSNs in decimal, as `msdb` holds them.
    pub first_lsn: String,
    pub last_lsn: String,
    pub database_backup_lsn: String,
    pub checkpoint_lsn: Option<String>,
    pub differential_base_lsn: Option<String>,
    pub differential_base_guid: Option<Uuid>,
    pub backup_set_uuid: Option<Uuid>,
    pub begins_log_chain: Option<bool>,
    /// A log holding minimally logged changes: it restores to its end only.
    pub has_bulk_logged_data: bool,
    /// The recovery model when the backup was taken, when the agent said.
    pub recovery_model: Option<RecoveryModel>,
    pub recovery_fork_guid: Option<Uuid>,
    pub fork_point_lsn: Option<String>,
    pub database_guid: Option<Uuid>,
    pub size_bytes: i64,
    /// The full this point restores on top of (a differential's base) or, for a log, the
    /// latest full before it; kept at least as long as this point.
    pub full_id: Option<Uuid>,
    /// Its own expiry (none while retained without a policy).
    pub expires_at: Option<DateTime<Utc>>,
    /// For a full: kept at least until then for the points that depend on it.
    pub chain_until: Option<DateTime<Utc>>,
    /// When the retention sweep may remove it.
    pub delete_after: Option<DateTime<Utc>>,
    /// The point does not continue the chain; `chain_break` says why.
    pub chain_gap: bool,
    pub chain_break: Option<ChainBreak>,
    /// Checks the server could not make because the agent did not report the facts
    /// (agents of the first report version): `checkpoint_lsn`, `differential_base`,
    /// `recovery_model`, `recovery_fork`.
    pub unverified: Vec<String>,
    pub job_id: Option<Uuid>,
}

fn chain_break_of(s: &str) -> Result<ChainBreak> {
    [
        ChainBreak::LogChainBroken,
        ChainBreak::DifferentialBaseUnknown,
        ChainBreak::NoFullBackup,
        ChainBreak::RecoveryForkChanged,
    ]
    .into_iter()
    .find(|b| b.as_str() == s)
    .ok_or_else(|| data_error(format!("a chain break {s:?}")))
}

impl TryFrom<&PointRow> for RecoveryPoint {
    type Error = Error;

    fn try_from(r: &PointRow) -> Result<Self> {
        Ok(Self {
            id: r.id,
            backup_type: point_type(&r.backup_type)?,
            started_at: r.started_at,
            backup_time: r.backup_time,
            log_from: r.log_from,
            first_lsn: r.first_lsn.clone(),
            last_lsn: r.last_lsn.clone(),
            database_backup_lsn: r.database_backup_lsn.clone(),
            checkpoint_lsn: r.checkpoint_lsn.clone(),
            differential_base_lsn: r.differential_base_lsn.clone(),
            differential_base_guid: r.differential_base_guid,
            backup_set_uuid: r.backup_set_uuid,
            begins_log_chain: r.begins_log_chain,
            has_bulk_logged_data: r.has_bulk_logged_data,
            recovery_model: r.recovery_model.as_deref().map(model_of).transpose()?,
            recovery_fork_guid: r.recovery_fork_guid,
            fork_point_lsn: r.fork_point_lsn.clone(),
            database_guid: r.database_guid,
            size_bytes: r.size_bytes,
            full_id: r.full_id,
            expires_at: r.expires_at,
            chain_until: r.chain_until,
            delete_after: r.delete_after,
            chain_gap: r.chain_gap,
            chain_break: r.chain_break.as_deref().map(chain_break_of).transpose()?,
            unverified: r.unverified.clone(),
            job_id: r.job_id,
        })
    }
}

fn chain_point(r: &PointRow) -> Result<chain::Point> {
    let optional = |raw: &Option<String>| raw.as_deref().map(stored_lsn).transpose();
    Ok(chain::Point {
        id: r.id,
        backup_type: point_type(&r.backup_type)?,
        backup_time: r.backup_time,
        first_lsn: stored_lsn(&r.first_lsn)?,
        last_lsn: stored_lsn(&r.last_lsn)?,
        checkpoint_lsn: optional(&r.checkpoint_lsn)?,
        differential_base_lsn: optional(&r.differential_base_lsn)?,
        differential_base_guid: r.differential_base_guid,
        has_bulk_logged_data: r.has_bulk_logged_data,
        recovery_model: r.recovery_model.as_deref().map(model_of).transpose()?,
        recovery_fork_guid: r.recovery_fork_guid,
    })
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RecoveryPoints {
    pub items: Vec<RecoveryPoint>,
    /// Continuous ranges the database can be restored to (point in time).
    pub restorable_ranges: Vec<TimeRange>,
}

/// What to restore to: an instant, or a recovery point.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreTarget {
    #[serde(default)]
    pub point_in_time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub recovery_point_id: Option<Uuid>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RestorePlan {
    /// The statements to run, in order: a full (or copy-only full), at most one
    /// differential on it, then logs; all `WITH NORECOVERY` but the last, which recovers
    /// (with `STOPAT` when the instant lies inside its log).
    pub steps: Vec<RestoreStep>,
    pub total_size_bytes: i64,
    pub restores_to: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "point_in_time": "2026-11-30T14:05:00Z",
    "target_database": "sales_restored"
}))]
pub struct RestoreRequest {
    #[serde(default)]
    pub point_in_time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub recovery_point_id: Option<Uuid>,
    /// A VM registered with the same vault; the original VM when absent.
    #[serde(default)]
    pub target_vm_id: Option<Uuid>,
    /// The database name to restore as; the original name when absent. A database of that
    /// name on the target instance is replaced only with `overwrite: true`; system
    /// databases are never targets.
    #[serde(default)]
    pub target_database: Option<String>,
    /// The SQL Server instance on the target VM; the item's instance when absent.
    #[serde(default)]
    pub target_instance: Option<String>,
    #[serde(default)]
    pub overwrite: bool,
    /// When overwriting the item's own database: back up the tail of its log first
    /// (`BACKUP LOG … WITH NORECOVERY`). The default where possible (full or bulk-logged
    /// recovery model); `false` overwrites `WITH REPLACE`, losing what was logged since
    /// the last log backup.
    #[serde(default)]
    pub tail_log_backup: Option<bool>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RpoItem {
    pub protected_item_id: Uuid,
    pub vm_name: String,
    pub database: String,
    pub last_full_at: Option<DateTime<Utc>>,
    pub last_differential_at: Option<DateTime<Utc>>,
    pub last_log_at: Option<DateTime<Utc>>,
    /// The longest gap between recovery points the policy allows.
    pub allowed_gap_minutes: i64,
    /// Minutes since the latest recovery point (or since protection began).
    pub current_gap_minutes: i64,
    pub breached: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RpoReport {
    pub items: Vec<RpoItem>,
    pub protected: usize,
    pub breached: usize,
}

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
            None => Utc::now(),
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
            let next_at = |kind: JobKind| schedules.next_at(kind.as_str());
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
            kind.as_str(),
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
            kind.as_str(),
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

    /// Removes expired recovery points, never a full a live point still needs.
    pub async fn sweep_recovery_points(&self) -> Result<u64> {
        self.sweep_recovery_points_in_batches(10_000).await
    }

    pub async fn sweep_recovery_points_in_batches(&self, batch: i64) -> Result<u64> {
        let mut total: u64 = 0;
        loop {
            let mut conn = self.pool.acquire().await?;
            let n = store::points_sweep(&mut conn, batch).await?;
            total = total.saturating_add(n);
            if n == 0 {
                return Ok(total);
            }
        }
    }

    /// Re-computes the expiry of the points that follow a policy, after its retention changed.
    pub(crate) async fn recompute_retention(
        &self,
        tx: &mut PgConnection,
        policy_id: Uuid,
        spec: &PolicySpec,
    ) -> Result<()> {
        let Ok(policy) = spec.validate("") else {
            return Ok(());
        };
        let points = store::points_following_policy(&mut *tx, policy_id).await?;
        let mut ids = Vec::new();
        let mut expiries = Vec::new();
        for (id, kind, at) in points {
            if let Some(e) = policy.expiry(point_type(&kind)?.retention_type(), at) {
                ids.push(id);
                expiries.push(e.expires_at);
            }
        }
        if !ids.is_empty() {
            store::points_set_expiry(tx, &ids, &expiries).await?;
        }
        Ok(())
    }

    async fn item_points(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        item_id: Uuid,
    ) -> Result<(backvault_store::protection::ProtectedItemRow, Vec<PointRow>)> {
        principal.require(Operation::Read)?;
        let item = self
            .protected_item_row(principal, vault_id, item_id)
            .await?;
        let points = store::points_of_item(&self.pool, item_id).await?;
        Ok((item, points))
    }

    pub async fn recovery_points(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        item_id: Uuid,
    ) -> Result<RecoveryPoints> {
        let (_, rows) = self.item_points(principal, vault_id, item_id).await?;
        let points = rows.iter().map(chain_point).collect::<Result<Vec<_>>>()?;
        Ok(RecoveryPoints {
            items: rows
                .iter()
                .map(RecoveryPoint::try_from)
                .collect::<Result<_>>()?,
            restorable_ranges: chain::Catalogue::new(&points).restorable_ranges(),
        })
    }

    pub async fn restore_plan(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        item_id: Uuid,
        target: &RestoreTarget,
    ) -> Result<RestorePlan> {
        let (_, rows) = self.item_points(principal, vault_id, item_id).await?;
        plan(&rows, target)
    }

    /// A restore job: to the original database (overwrite) or under another name, on the
    /// original VM or another one registered with the vault.
    pub async fn restore_start(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        item_id: Uuid,
        req: RestoreRequest,
    ) -> Result<Job> {
        principal.require(if req.overwrite {
            Operation::RestoreOverwrite
        } else {
            Operation::RestoreAsNew
        })?;
        let (item, rows) = self.item_points(principal, vault_id, item_id).await?;
        let target = RestoreTarget {
            point_in_time: req.point_in_time,
            recovery_point_id: req.recovery_point_id,
        };
        let plan = plan(&rows, &target)?;
        let target_vm = req.target_vm_id.unwrap_or(item.vm_id);
        let mut tx = self.pool.begin().await?;
        let vm = self.visible_vm(&mut *tx, principal, target_vm).await?;
        if backvault_store::inventory::vm_vault(&mut *tx, target_vm).await? != Some(vault_id) {
            return Err(Error::new(
                ErrorKind::Conflict,
                "vm_not_registered",
                "the target VM is not registered with this vault",
            ));
        }
        let database = req
            .target_database
            .clone()
            .unwrap_or_else(|| item.database_name.clone());
        let instance = req
            .target_instance
            .clone()
            .unwrap_or_else(|| item.instance_name.clone());
        let instances = backvault_store::inventory::instance_names(&mut *tx, target_vm).await?;
        let instance_id = instances
            .iter()
            .find(|(_, name)| name.eq_ignore_ascii_case(&instance))
            .map(|(id, _)| *id);
        let databases = backvault_store::inventory::databases_of_vm(&mut *tx, target_vm).await?;
        let present: Vec<&DatabaseRow> = databases
            .iter()
            .filter(|d| Some(d.instance_id) == instance_id && d.gone_at.is_none())
            .collect();
        let existing: Vec<&str> = present.iter().map(|d| d.name.as_str()).collect();
        let violations = check_restore_target(RestoreTargetFacts {
            database: &database,
            overwrite: req.overwrite,
            instance_found: instance_id.is_some(),
            existing_databases: &existing,
        });
        if !violations.is_empty() {
            return Err(Error::validation(violations));
        }
        // One restore per target at a time (the queue's unique index settles a race).
        if let Some(running) =
            queue::restore_of_target(&mut *tx, target_vm, &instance, &database).await?
        {
            return Err(restore_in_progress(Some(running)));
        }
        let overwritten: Vec<&DatabaseRow> = present
            .iter()
            .copied()
            .filter(|d| req.overwrite && d.name.eq_ignore_ascii_case(&database))
            .collect();
        let overwritten_database = overwritten
            .iter()
            .find(|d| d.id == item.database_id)
            .or(overwritten.first())
            .map(|d| -> Result<Overwritten> {
                Ok(Overwritten {
                    own_database: d.id == item.database_id,
                    recovery_model: model_of(&d.recovery_model)?,
                    in_availability_group: d.availability_group_id.is_some(),
                })
            })
            .transpose()?;
        let mode = overwrite_mode(overwritten_database, req.tail_log_backup)
            .map_err(|v| Error::validation(vec![v]))?;
        // Overwriting a protected database starts a new recovery fork there: its chain
        // restarts with a full once the restore completes (a restore that never ran
        // overwrote nothing).
        let overwritten_ids: Vec<Uuid> = overwritten.iter().map(|d| d.id).collect();
        let overwritten_items: Vec<Uuid> = if overwritten_ids.is_empty() {
            Vec::new()
        } else {
            backvault_store::protection::items_for_databases(&mut *tx, &overwritten_ids)
                .await?
                .into_iter()
                .map(|(_, item, _, _)| item)
                .collect()
        };
        let payload = serde_json::to_value(RestoreJobPayload {
            target_database: database.clone(),
            target_instance: instance.clone(),
            overwrite: req.overwrite,
            tail_log_backup: mode.tail_log_backup,
            replace: mode.replace,
            restores_to: plan.restores_to,
            steps: plan.steps,
            overwritten_items,
        })
        .map_err(Error::internal)?;
        let items = [JobItem {
            instance: instance.clone(),
            database: database.clone(),
            protected_item_id: Some(item_id),
        }];
        let job = new_job(
            target_vm,
            &vm.subscription_id,
            Some(vault_id),
            JobKind::Restore,
            Priority::OnDemand,
            &items,
            payload,
        )?;
        let id = job.id;
        queue::jobs_enqueue(&mut tx, &[job])
            .await
            .on_constraint(queue::ONE_RESTORE_PER_TARGET, || restore_in_progress(None))?;
        tx.commit().await?;
        self.job_get(principal, id, None).await
    }

    /// Per protected item: the latest backups, the gap the policy allows and whether it is
    /// breached now; with totals.
    pub async fn rpo_report(
        &self,
        principal: &Principal,
        vault_id: Option<Uuid>,
        now: DateTime<Utc>,
    ) -> Result<RpoReport> {
        principal.require(Operation::Read)?;
        if let Some(v) = vault_id {
            self.visible_vault(&self.pool, principal, v).await?;
        }
        let rows = store::rpo_rows(&self.pool, vault_id).await?;
        let gaps = self.policy_gaps(now).await?;
        let items: Vec<RpoItem> = rows
            .into_iter()
            .map(|r| {
                let allowed = r
                    .policy_id
                    .and_then(|p| gaps.get(&p).copied())
                    .unwrap_or(24 * 60);
                let latest = [r.last_full_at, r.last_differential_at, r.last_log_at]
                    .into_iter()
                    .flatten()
                    .max()
                    .unwrap_or(r.created_at);
                let gap = now.signed_duration_since(latest).num_minutes();
                RpoItem {
                    protected_item_id: r.id,
                    vm_name: r.vm_name,
                    database: r.database,
                    last_full_at: r.last_full_at,
                    last_differential_at: r.last_differential_at,
                    last_log_at: r.last_log_at,
                    allowed_gap_minutes: allowed,
                    current_gap_minutes: gap,
                    breached: rpo_breached(latest, allowed, now),
                }
            })
            .collect();
        let breached = items.iter().filter(|i| i.breached).count();
        Ok(RpoReport {
            protected: items.len(),
            breached,
            items,
        })
    }

    async fn policy_gaps(&self, now: DateTime<Utc>) -> Result<HashMap<Uuid, i64>> {
        Ok(schedule::schedules_in_use(&self.pool)
            .await?
            .into_iter()
            .filter_map(|p| Some((p.id, policy_of(Some(&p.spec))?.max_gap_minutes(now))))
            .collect())
    }

    /// Items breaching their RPO now, across all vaults (for `/metrics`): two statements
    /// (the policies in use, then one count over all of them), however many policies.
    pub async fn rpo_breaching(&self, now: DateTime<Utc>) -> Result<i64> {
        let (policies, before): (Vec<Uuid>, Vec<DateTime<Utc>>) = self
            .policy_gaps(now)
            .await?
            .into_iter()
            .map(|(policy, gap)| {
                // Breached now ⇔ the latest point is before `now - gap - grace`.
                let allowed = rpo_deadline(now, gap).signed_duration_since(now);
                (policy, backvault_domain::instants::earlier(now, allowed))
            })
            .unzip();
        if policies.is_empty() {
            return Ok(0);
        }
        Ok(store::items_stale(&self.pool, &policies, &before).await?)
    }
}

/// A restore of the same target (VM, instance, database) is queued or running.
fn restore_in_progress(job: Option<Uuid>) -> Error {
    let which = job.map_or_else(String::new, |id| format!(" (job {id})"));
    Error::new(
        ErrorKind::Conflict,
        "restore_in_progress",
        format!(
            "a restore of this database on the target VM's instance is queued or running{which}; wait for it to finish or cancel it"
        ),
    )
}

fn plan(rows: &[PointRow], target: &RestoreTarget) -> Result<RestorePlan> {
    let at = match (target.point_in_time, target.recovery_point_id) {
        (Some(at), None) => {
            if let Some(v) = check_instant(at, "/point_in_time") {
                return Err(Error::validation(vec![v]));
            }
            at
        }
        (None, Some(id)) => rows
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.backup_time)
            .ok_or_else(|| {
                Error::not_found(
                    "recovery_point_not_found",
                    format_args!("recovery point {id}"),
                )
            })?,
        _ => {
            let mut v = backvault_domain::violation::Violations::default();
            v.push(
                "",
                "restore_target_invalid",
                "give exactly one of point_in_time and recovery_point_id",
            );
            return Err(Error::validation(v.into_vec()));
        }
    };
    let points = rows.iter().map(chain_point).collect::<Result<Vec<_>>>()?;
    match chain::Catalogue::new(&points).plan_to(at) {
        Ok(sequence) => {
            let steps: Vec<RestoreStep> = sequence
                .steps
                .iter()
                .map(|step| {
                    let row = &rows[step.point];
                    Ok(RestoreStep {
                        recovery_point_id: row.id,
                        statement: step.statement,
                        backup_type: point_type(&row.backup_type)?,
                        backup_time: row.backup_time,
                        backup_set_uuid: row.backup_set_uuid,
                        first_lsn: row.first_lsn.clone(),
                        last_lsn: row.last_lsn.clone(),
                        recovery: step.recovery,
                        stop_at: step.stop_at,
                    })
                })
                .collect::<Result<_>>()?;
            Ok(RestorePlan {
                // Sizes are agent-reported: a sum that cannot overflow.
                total_size_bytes: sequence.steps.iter().fold(0i64, |total, s| {
                    total.saturating_add(rows[s.point].size_bytes)
                }),
                restores_to: sequence.restores_to,
                steps,
            })
        }
        Err(PlanError::InsideBulkLoggedLog { log_from, log_to }) => Err(Error::new(
            ErrorKind::Conflict,
            "UserErrorRestoreNotPossibleBecauseLogBackupContainsBulkLoggedChanges",
            format!(
                "the log backup covering that instant holds bulk-logged changes: SQL Server restores it only to its end ({log_to}); choose {log_from} or {log_to}"
            ),
        )),
        Err(PlanError::NoFullBefore) => Err(Error::new(
            ErrorKind::Conflict,
            "point_not_covered",
            "no full backup exists before that instant",
        )),
        Err(PlanError::NotCovered { restorable }) => Err(Error::new(
            ErrorKind::Conflict,
            "point_not_covered",
            format!(
                "the log chain does not reach that instant; restorable ranges: {}",
                restorable
                    .iter()
                    .map(|r| format!("{} to {}", r.from, r.to))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
