//! Recovery points: recording those of completed backup jobs in the completion's
//! transaction (each through its item's recovery chain, `domain::chain`), and reading
//! them with the ranges they restore to.

use std::collections::{HashMap, HashSet};

use backvault_domain::agent::{JobItem, RecoveryModel, RecoveryPointReport, RecoveryPointType};
use backvault_domain::chain::TimeRange;
use backvault_domain::chain::{self, ChainBreak, ChainState};
use backvault_domain::lsn::Lsn;
use backvault_domain::policy::{Policy, PolicySpec};
use backvault_store::recovery::{self as store, ChainUpdate, NewPoint, PointRow, RecordedSet};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result};
use crate::{Principal, Service};

/// A backup job's report, as the group commit hands it over, with the job's databases
/// and payload as the commit's lock of the job read them.
pub(crate) struct BackupReport<'a> {
    pub job_id: Uuid,
    pub items: &'a serde_json::Value,
    pub payload: &'a serde_json::Value,
    pub points: Vec<&'a RecoveryPointReport>,
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

/// An LSN of a report, which [`RecoveryPointReport::violations`] checked.
fn reported_lsn(raw: &str, job_id: Uuid) -> Result<Lsn> {
    Lsn::parse(raw).ok_or_else(|| {
        Error::internal(format!(
            "an unchecked LSN {raw:?} in a report of job {job_id}"
        ))
    })
}

/// A backup job whose report is being recorded: its databases, and the retention its
/// on-demand fulls keep.
struct ReportedBackup {
    id: Uuid,
    items: Vec<JobItem>,
    retention_days: Option<u64>,
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
pub(crate) async fn record_points(
    tx: &mut PgConnection,
    reports: &[BackupReport<'_>],
) -> Result<()> {
    // A report without points (a backup that wrote nothing) has nothing to record: the
    // group commit skips the statements below instead of running them on empty arrays.
    let reports: Vec<&BackupReport<'_>> = reports.iter().filter(|r| !r.points.is_empty()).collect();
    if reports.is_empty() {
        return Ok(());
    }
    let jobs: Vec<ReportedBackup> = reports
        .iter()
        .map(|r| {
            Ok(ReportedBackup {
                id: r.job_id,
                items: Vec::<JobItem>::deserialize(r.items).map_err(Error::internal)?,
                retention_days: r
                    .payload
                    .get("retention_days")
                    .and_then(serde_json::Value::as_u64),
            })
        })
        .collect::<Result<_>>()?;
    let mut item_ids: Vec<Uuid> = jobs
        .iter()
        .flat_map(|j| j.items.iter().filter_map(|i| i.protected_item_id))
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
    let mut recorded: HashSet<RecordedSet> = if backup_sets.is_empty() {
        HashSet::new()
    } else {
        store::points_recorded(&mut *tx, &item_ids, &backup_sets)
            .await?
            .into_iter()
            .collect()
    };
    let mut points = Vec::new();
    for report in reports {
        let Some(job) = jobs.iter().find(|j| j.id == report.job_id) else {
            continue;
        };
        let fixed_days = job.retention_days;
        let mut reported: Vec<&RecoveryPointReport> = report.points.clone();
        reported.sort_by_key(|p| p.backup_time);
        for p in reported {
            let Some(item) = job
                .items
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
                && !recorded.insert(RecordedSet {
                    protected_item_id: item,
                    backup_set_uuid: set,
                })
            {
                continue;
            }
            let id = Uuid::now_v7();
            let point = chain::Point::from_report(id, p).ok_or_else(|| {
                Error::internal(format!(
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
            points.push(NewPoint {
                point,
                protected_item_id: item,
                job_id: report.job_id,
                started_at: p.started_at,
                log_from,
                database_backup_lsn: reported_lsn(&p.database_backup_lsn, report.job_id)?,
                backup_set_uuid: p.backup_set_uuid,
                begins_log_chain: p.begins_log_chain,
                fork_point_lsn: p
                    .fork_point_lsn
                    .as_deref()
                    .map(|raw| reported_lsn(raw, report.job_id))
                    .transpose()?,
                database_guid: p.database_guid,
                size_bytes: p.size_bytes,
                full_id: applied.full_id,
                expires_at,
                fixed_retention: fixed,
                chain_break: applied.chain_break,
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

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RecoveryPoint {
    pub id: Uuid,
    pub backup_type: RecoveryPointType,
    pub started_at: DateTime<Utc>,
    pub backup_time: DateTime<Utc>,
    /// Logs cover the instants after this one up to `backup_time`.
    pub log_from: Option<DateTime<Utc>>,
    /// LSNs in decimal, as `msdb` holds them.
    #[schema(value_type = String)]
    pub first_lsn: Lsn,
    #[schema(value_type = String)]
    pub last_lsn: Lsn,
    #[schema(value_type = String)]
    pub database_backup_lsn: Lsn,
    #[schema(value_type = Option<String>)]
    pub checkpoint_lsn: Option<Lsn>,
    #[schema(value_type = Option<String>)]
    pub differential_base_lsn: Option<Lsn>,
    pub differential_base_guid: Option<Uuid>,
    pub backup_set_uuid: Option<Uuid>,
    pub begins_log_chain: Option<bool>,
    /// A log holding minimally logged changes: it restores to its end only.
    pub has_bulk_logged_data: bool,
    /// The recovery model when the backup was taken, when the agent said.
    pub recovery_model: Option<RecoveryModel>,
    pub recovery_fork_guid: Option<Uuid>,
    #[schema(value_type = Option<String>)]
    pub fork_point_lsn: Option<Lsn>,
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
    /// The VM whose agent took the backup (for a group database: which replica); none
    /// for points recorded before backvault kept it.
    pub vm_id: Option<Uuid>,
    pub chain_gap: bool,
    pub chain_break: Option<ChainBreak>,
    /// Checks the server could not make because the agent did not report the facts
    /// (agents of the first report version): `checkpoint_lsn`, `differential_base`,
    /// `recovery_model`, `recovery_fork`.
    pub unverified: Vec<String>,
    pub job_id: Option<Uuid>,
}

/// The API's view of a stored point: the row, less the item it belongs to.
impl From<PointRow> for RecoveryPoint {
    fn from(r: PointRow) -> Self {
        Self {
            id: r.id,
            backup_type: r.backup_type,
            started_at: r.started_at,
            backup_time: r.backup_time,
            log_from: r.log_from,
            first_lsn: r.first_lsn,
            last_lsn: r.last_lsn,
            database_backup_lsn: r.database_backup_lsn,
            checkpoint_lsn: r.checkpoint_lsn,
            differential_base_lsn: r.differential_base_lsn,
            differential_base_guid: r.differential_base_guid,
            backup_set_uuid: r.backup_set_uuid,
            begins_log_chain: r.begins_log_chain,
            has_bulk_logged_data: r.has_bulk_logged_data,
            recovery_model: r.recovery_model,
            recovery_fork_guid: r.recovery_fork_guid,
            fork_point_lsn: r.fork_point_lsn,
            database_guid: r.database_guid,
            size_bytes: r.size_bytes,
            full_id: r.full_id,
            expires_at: r.expires_at,
            chain_until: r.chain_until,
            delete_after: r.delete_after,
            chain_gap: r.chain_gap,
            chain_break: r.chain_break,
            unverified: r.unverified,
            job_id: r.job_id,
            vm_id: r.vm_id,
        }
    }
}

/// The chain's view of a stored point.
pub(crate) fn chain_point(r: &PointRow) -> chain::Point {
    chain::Point {
        id: r.id,
        backup_type: r.backup_type,
        backup_time: r.backup_time,
        first_lsn: r.first_lsn,
        last_lsn: r.last_lsn,
        checkpoint_lsn: r.checkpoint_lsn,
        differential_base_lsn: r.differential_base_lsn,
        differential_base_guid: r.differential_base_guid,
        has_bulk_logged_data: r.has_bulk_logged_data,
        recovery_model: r.recovery_model,
        recovery_fork_guid: r.recovery_fork_guid,
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RecoveryPoints {
    pub items: Vec<RecoveryPoint>,
    /// Continuous ranges the database can be restored to (point in time).
    pub restorable_ranges: Vec<TimeRange>,
}

impl Service {
    pub(crate) async fn item_points(
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
        let points: Vec<chain::Point> = rows.iter().map(chain_point).collect();
        Ok(RecoveryPoints {
            restorable_ranges: chain::Catalogue::new(&points).restorable_ranges(),
            items: rows.into_iter().map(RecoveryPoint::from).collect(),
        })
    }
}
