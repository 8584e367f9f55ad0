//! Retention: the sweep that removes expired recovery points (never a full a live point
//! still needs), and re-computing expiries after a policy's retention changes.

use backvault_domain::policy::PolicySpec;
use backvault_domain::safety::expiry_after_policy_change;
use backvault_store::recovery::{self as store};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Service;
use crate::error::Result;

impl Service {
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
        // An immutable vault's edit applies to new points only where it would shorten:
        // no expiry moves earlier.
        let immutable =
            backvault_store::safety::policy_vault_immutable(&mut *tx, policy_id).await?;
        let points = store::points_following_policy(&mut *tx, policy_id).await?;
        let mut ids = Vec::new();
        let mut expiries = Vec::new();
        for p in points {
            let proposed = policy
                .expiry(p.backup_type.retention_type(), p.backup_time)
                .map(|e| e.expires_at);
            if let Some(expires_at) = expiry_after_policy_change(immutable, p.expires_at, proposed)
                && Some(expires_at) != p.expires_at
            {
                ids.push(p.id);
                expiries.push(expires_at);
            }
        }
        if !ids.is_empty() {
            store::points_set_expiry(tx, &ids, &expiries).await?;
        }
        Ok(())
    }
}
