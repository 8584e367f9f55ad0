//! The RPO report: per protected item, the latest backups, the gap its policy allows and
//! whether that gap is breached; and the count of breaching items for `/metrics`.

use std::collections::HashMap;

use backvault_domain::preview::{rpo_breached, rpo_deadline};
use backvault_store::recovery::{self as store};
use backvault_store::schedule::{self};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::Result;
use crate::recovery::policy_of;
use crate::{Principal, Service};

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

impl Service {
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
