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
use crate::pagination::{page, page_request};
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
    /// One page of the protected items, in id order.
    pub items: Vec<RpoItem>,
    /// The cursor of the next page; absent on the last page.
    pub next_cursor: Option<String>,
    /// Protected items of the vault (all pages). Present on the first page only (the
    /// request without a cursor): counting a large vault is the report's costliest part, and
    /// a client paging through it needs the totals once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protected: Option<usize>,
    /// Of those, the items breaching their RPO now (all pages). Present on the first page
    /// only, like `protected`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breached: Option<usize>,
}

impl Service {
    /// Per protected item: the latest backups, the gap the policy allows and whether it is
    /// breached now, a page at a time; the first page (no cursor) with the totals of the
    /// whole vault.
    pub async fn rpo_report(
        &self,
        principal: &Principal,
        vault_id: Option<Uuid>,
        now: DateTime<Utc>,
        cursor: Option<&str>,
        limit: Option<i64>,
    ) -> Result<RpoReport> {
        principal.require(Operation::Read)?;
        let (request, limit) = page_request(cursor, limit)?;
        if let Some(v) = vault_id {
            self.visible_vault(&self.pool, principal, v).await?;
        }
        let rows = store::rpo_rows(&self.pool, vault_id, request).await?;
        let gaps = self.policy_gaps(now).await?;
        // Only the first page counts the whole vault (a scan of all its items).
        let totals = match cursor {
            Some(_) => None,
            None => {
                let (policies, before) = stale_before(&gaps, now);
                let mut tx = self.pool.begin().await?;
                let totals = store::rpo_totals(
                    &mut tx,
                    vault_id,
                    &policies,
                    &before,
                    stale_before_gap(now, DEFAULT_GAP_MINUTES),
                )
                .await?;
                tx.commit().await?;
                Some(totals)
            }
        };
        let page = page(
            rows,
            limit,
            |r| r.id,
            |r| {
                let allowed = r
                    .policy_id
                    .and_then(|p| gaps.get(&p).copied())
                    .unwrap_or(DEFAULT_GAP_MINUTES);
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
            },
        );
        Ok(RpoReport {
            items: page.items,
            next_cursor: page.next_cursor,
            protected: totals
                .as_ref()
                .map(|t| usize::try_from(t.protected).unwrap_or(0)),
            breached: totals.map(|t| usize::try_from(t.breached).unwrap_or(0)),
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
        let (policies, before) = stale_before(&self.policy_gaps(now).await?, now);
        if policies.is_empty() {
            return Ok(0);
        }
        Ok(store::items_stale(&self.pool, &policies, &before).await?)
    }
}

/// The gap an item whose policy has no schedule is held to.
const DEFAULT_GAP_MINUTES: i64 = 24 * 60;

/// Breached now ⇔ the latest point is before `now - gap - grace`: that instant for a gap.
fn stale_before_gap(now: DateTime<Utc>, gap: i64) -> DateTime<Utc> {
    let allowed = rpo_deadline(now, gap).signed_duration_since(now);
    backvault_domain::instants::earlier(now, allowed)
}

/// Per policy, the instant before which its items' latest point breaches the RPO now.
fn stale_before(gaps: &HashMap<Uuid, i64>, now: DateTime<Utc>) -> (Vec<Uuid>, Vec<DateTime<Utc>>) {
    gaps.iter()
        .map(|(policy, gap)| (*policy, stale_before_gap(now, *gap)))
        .unzip()
}
