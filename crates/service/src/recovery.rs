//! Recovery points and what follows from them: recording them in the completion's
//! transaction (with the recovery chain and gap detection), the scheduler, retention,
//! restore plans and jobs, and the RPO report.

use std::collections::HashMap;

use backvault_domain::agent::{JobItem, RecoveryPointReport, RecoveryPointType};
use backvault_domain::jobs::{JobKind, MAX_ITEMS_PER_JOB, Priority};
use backvault_domain::policy::{Policy, PolicySpec};
use backvault_domain::preview::{rpo_breached, rpo_deadline};
use backvault_domain::restore::{
    self, ChainTip, PlanError, Point, RestoreTargetFacts, TimeRange, check_restore_target,
};
use backvault_domain::retention::BackupType;
use backvault_domain::text::check_instant;
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

fn lsn(s: &str) -> u128 {
    s.parse().unwrap_or(0)
}

fn point_type(s: &str) -> RecoveryPointType {
    match s {
        "full" => RecoveryPointType::Full,
        "copy_only_full" => RecoveryPointType::CopyOnlyFull,
        "differential" => RecoveryPointType::Differential,
        _ => RecoveryPointType::Log,
    }
}

fn type_str(t: RecoveryPointType) -> &'static str {
    match t {
        RecoveryPointType::Full => "full",
        RecoveryPointType::CopyOnlyFull => "copy_only_full",
        RecoveryPointType::Differential => "differential",
        RecoveryPointType::Log => "log",
    }
}

/// Records the recovery points of completed backup jobs in the caller's transaction:
/// expiry from the policy (or the job's own retention), the full each depends on, the
/// chain extension of that full, and gap detection (a broken log chain or a differential
/// without its full marks the item for a full at its next slot).
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
    let states = store::chain_lock(tx, &item_ids).await?;
    let mut chains: HashMap<Uuid, (store::ChainState, Option<Policy>, ChainUpdate)> = states
        .into_iter()
        .map(|s| {
            let policy = policy_of(s.spec.as_ref());
            let update = ChainUpdate {
                id: s.id,
                last_full_id: None,
                last_full_first_lsn: None,
                last_log_lsn: None,
                last_full_at: None,
                last_differential_at: None,
                last_log_at: None,
                needs_full: None,
            };
            (s.id, (s, policy, update))
        })
        .collect();
    // In time order: a full satisfies the need for one, a gap creates it.
    let mut needs_full: HashMap<Uuid, bool> = HashMap::new();
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
                .find(|i| i.instance.eq_ignore_ascii_case(&p.instance) && i.database == p.database)
                .and_then(|i| i.protected_item_id)
            else {
                continue;
            };
            let Some((state, policy, update)) = chains.get_mut(&item) else {
                continue;
            };
            let id = Uuid::now_v7();
            let full_first = update
                .last_full_first_lsn
                .clone()
                .or(state.last_full_first_lsn.clone());
            let last_log = update.last_log_lsn.clone().or(state.last_log_lsn.clone());
            let tip = ChainTip {
                full_first_lsn: full_first.as_deref().map(lsn),
                log_end_lsn: last_log.as_deref().map(lsn),
                log_chain_started: update.last_log_at.or(state.last_log_at).is_some(),
            };
            let gap = restore::breaks_chain(
                tip,
                p.backup_type,
                lsn(&p.first_lsn),
                lsn(&p.database_backup_lsn),
            );
            let mut full_id = update.last_full_id.or(state.last_full_id);
            let mut log_from = None;
            match p.backup_type {
                RecoveryPointType::Full => {
                    full_id = None;
                    // Before any log, the first one may start up to this full's end.
                    if last_log.is_none() {
                        update.last_log_lsn = Some(p.last_lsn.clone());
                    }
                    update.last_full_id = Some(id);
                    update.last_full_first_lsn = Some(p.first_lsn.clone());
                    update.last_full_at = Some(p.backup_time);
                    needs_full.insert(item, false);
                }
                RecoveryPointType::CopyOnlyFull => full_id = None,
                RecoveryPointType::Differential => {
                    update.last_differential_at = Some(p.backup_time)
                }
                RecoveryPointType::Log => {
                    log_from = update
                        .last_log_at
                        .or(state.last_log_at)
                        .or(update.last_full_at)
                        .or(state.last_full_at);
                    update.last_log_lsn = Some(p.last_lsn.clone());
                    update.last_log_at = Some(p.backup_time);
                }
            }
            if gap {
                needs_full.insert(item, true);
            }
            let (expires_at, fixed) = match (p.backup_type, fixed_days, policy.as_ref()) {
                (RecoveryPointType::CopyOnlyFull, Some(days), _)
                | (RecoveryPointType::Full, Some(days), _) => {
                    (Some(fixed_expiry(p.backup_time, days)?), true)
                }
                (_, _, None) => (None, false),
                (t, _, Some(policy)) => {
                    let kind = match t {
                        RecoveryPointType::Full | RecoveryPointType::CopyOnlyFull => {
                            BackupType::Full
                        }
                        RecoveryPointType::Differential => BackupType::Differential,
                        RecoveryPointType::Log => BackupType::Log,
                    };
                    (
                        policy.expiry(kind, p.backup_time).map(|e| e.expires_at),
                        false,
                    )
                }
            };
            points.push(NewPoint {
                id,
                protected_item_id: item,
                job_id: report.job_id,
                backup_type: type_str(p.backup_type),
                started_at: p.started_at,
                backup_time: p.backup_time,
                log_from,
                first_lsn: p.first_lsn.clone(),
                last_lsn: p.last_lsn.clone(),
                database_backup_lsn: p.database_backup_lsn.clone(),
                size_bytes: p.size_bytes,
                full_id: if matches!(
                    p.backup_type,
                    RecoveryPointType::Differential | RecoveryPointType::Log
                ) {
                    full_id
                } else {
                    None
                },
                expires_at,
                fixed_retention: fixed,
                chain_gap: gap,
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
        .into_values()
        .map(|(state, _, mut u)| {
            u.needs_full = needs_full.get(&state.id).copied();
            u
        })
        .collect();
    store::chain_update(tx, &updates).await?;
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
    pub first_lsn: String,
    pub last_lsn: String,
    pub database_backup_lsn: String,
    pub size_bytes: i64,
    /// The full this point restores on top of.
    pub full_id: Option<Uuid>,
    /// Its own expiry (none while retained without a policy).
    pub expires_at: Option<DateTime<Utc>>,
    /// For a full: kept at least until then for the points that depend on it.
    pub chain_until: Option<DateTime<Utc>>,
    /// When the retention sweep may remove it.
    pub delete_after: Option<DateTime<Utc>>,
    pub chain_gap: bool,
    pub job_id: Option<Uuid>,
}

impl From<&PointRow> for RecoveryPoint {
    fn from(r: &PointRow) -> Self {
        Self {
            id: r.id,
            backup_type: point_type(&r.backup_type),
            started_at: r.started_at,
            backup_time: r.backup_time,
            log_from: r.log_from,
            first_lsn: r.first_lsn.clone(),
            last_lsn: r.last_lsn.clone(),
            database_backup_lsn: r.database_backup_lsn.clone(),
            size_bytes: r.size_bytes,
            full_id: r.full_id,
            expires_at: r.expires_at,
            chain_until: r.chain_until,
            delete_after: r.delete_after,
            chain_gap: r.chain_gap,
            job_id: r.job_id,
        }
    }
}

fn domain_point(r: &PointRow) -> Point {
    Point {
        id: r.id,
        backup_type: point_type(&r.backup_type),
        backup_time: r.backup_time,
        log_from: r.log_from,
        first_lsn: lsn(&r.first_lsn),
        last_lsn: lsn(&r.last_lsn),
        full_id: r.full_id,
        size_bytes: r.size_bytes,
    }
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
    /// The points to restore, in order: a full, at most one differential, then logs.
    pub steps: Vec<RecoveryPoint>,
    pub total_size_bytes: i64,
    pub restores_to: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
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
    #[schema(min_length = 1, max_length = 128)]
    pub target_database: Option<String>,
    /// The SQL Server instance on the target VM; the item's instance when absent.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 128)]
    pub target_instance: Option<String>,
    #[serde(default)]
    pub overwrite: bool,
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
pub fn slot_jobs(kind: JobKind) -> SlotJobs {
    SlotJobs {
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
            slot_jobs(kind),
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
            let kind = match kind.as_str() {
                "full" => BackupType::Full,
                "differential" => BackupType::Differential,
                "log" => BackupType::Log,
                _ => continue,
            };
            if let Some(e) = policy.expiry(kind, at) {
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
        let domain: Vec<Point> = rows.iter().map(domain_point).collect();
        Ok(RecoveryPoints {
            items: rows.iter().map(RecoveryPoint::from).collect(),
            restorable_ranges: restore::restorable_ranges(&domain),
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
        let present: Vec<_> = databases
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
        // Overwriting a protected database starts a new recovery fork there: its log chain
        // no longer continues, so its next backup must be a full (as Azure Backup does).
        let overwritten: Vec<Uuid> = present
            .iter()
            .filter(|d| req.overwrite && d.name.eq_ignore_ascii_case(&database))
            .map(|d| d.id)
            .collect();
        if !overwritten.is_empty() {
            let items: Vec<Uuid> =
                backvault_store::protection::items_for_databases(&mut *tx, &overwritten)
                    .await?
                    .into_iter()
                    .map(|(_, item, _, _)| item)
                    .collect();
            store::needs_full_set(&mut *tx, &items).await?;
        }
        let payload = serde_json::json!({
            "target_database": database,
            "target_instance": instance,
            "overwrite": req.overwrite,
            "restores_to": plan.restores_to,
            "steps": plan.steps.iter().map(|s| serde_json::json!({"recovery_point_id": s.id, "backup_type": s.backup_type, "backup_time": s.backup_time})).collect::<Vec<_>>(),
        });
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
    let domain: Vec<Point> = rows.iter().map(domain_point).collect();
    match restore::plan_to(&domain, at) {
        Ok(steps) => {
            let steps: Vec<RecoveryPoint> = steps
                .iter()
                .filter_map(|s| rows.iter().find(|r| r.id == s.id))
                .map(RecoveryPoint::from)
                .collect();
            Ok(RestorePlan {
                // Sizes are agent-reported: a sum that cannot overflow.
                total_size_bytes: steps
                    .iter()
                    .fold(0i64, |total, s| total.saturating_add(s.size_bytes)),
                restores_to: at,
                steps,
            })
        }
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
