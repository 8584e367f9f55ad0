//! Wake-ups for the waiters of jobs (`GET /v1/jobs/{id}?wait=`, on any replica)
//! after claims and completions, sent outside the transactions that made the change.
//!
//! A transaction that NOTIFYs takes a lock of the whole cluster when it commits and holds
//! it until its commit record is flushed, so notifying transactions commit one at a time,
//! each behind the flush of the one before. When every batch of claims and of completions
//! notified, half the active Postgres backends of the `steady` benchmark were waiting for
//! that lock at `COMMIT`. So claims and completions hand the ids of the jobs they changed
//! to this publisher once committed; it sends whatever is pending in one statement (on a
//! connection of the pool, one statement at a time) while the next ids gather. Enqueues
//! still notify in their transaction: they are few (one per use case or scheduler tick),
//! and whoever calls the store's enqueue wakes the agents; so do the rarer retries,
//! failures and cancellations.
//!
//! Should the process die between a commit and its notification, a waiter notices the
//! change at its next re-check (`--long-poll-recheck`), as when the listener reconnects;
//! a send that fails wakes every waiter with the next one.

use std::sync::{Mutex, PoisonError};

use backvault_store::PgPool;
use backvault_store::jobs as store;
use tokio::sync::Notify;
use uuid::Uuid;

/// Beyond this many ids pending (Postgres unreachable for a while), every waiter is woken
/// once instead: each re-reads its job, and the memory stays bounded.
const MAX_PENDING: usize = 50_000;

#[derive(Default)]
pub struct JobEvents {
    pending: Mutex<Pending>,
    ready: Notify,
}

#[derive(Default)]
struct Pending {
    ids: Vec<Uuid>,
    everything: bool,
}

impl Pending {
    fn payloads(&self) -> Vec<String> {
        if self.everything {
            vec!["j:*".to_owned()]
        } else {
            store::notify_payloads('j', &self.ids)
        }
    }
}

impl JobEvents {
    /// These jobs changed, and the change is committed.
    pub fn changed(&self, ids: impl IntoIterator<Item = Uuid>) {
        let mut ids = ids.into_iter().peekable();
        if ids.peek().is_none() {
            return;
        }
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if !pending.everything {
                pending.ids.extend(ids);
                if pending.ids.len() > MAX_PENDING {
                    pending.everything = true;
                    pending.ids = Vec::new();
                }
            }
        }
        self.ready.notify_one();
    }

    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Sends what is pending whenever something is; runs for the life of the process.
    pub async fn publish(self: std::sync::Arc<Self>, pool: PgPool) {
        loop {
            self.ready.notified().await;
            let pending = self.take();
            let payloads = pending.payloads();
            if payloads.is_empty() {
                continue;
            }
            if let Err(e) = store::notify_all(&pool, &payloads).await {
                tracing::warn!(error = %e, ids = pending.ids.len(),
                    "job wake-ups not sent; the next send wakes every waiter");
                // Which waiters these were is not kept: the next change wakes them all, and
                // until then they have their re-check.
                self.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .everything = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_ids_are_taken_once_and_an_overflow_wakes_everyone() {
        let events = JobEvents::default();
        events.changed([Uuid::from_u128(1), Uuid::from_u128(2)]);
        events.changed([Uuid::from_u128(3)]);
        let taken = events.take();
        assert_eq!(taken.ids.len(), 3);
        assert_eq!(taken.payloads().len(), 1);
        assert!(events.take().payloads().is_empty(), "taken once");

        events.changed((0..=MAX_PENDING as u128).map(Uuid::from_u128));
        events.changed([Uuid::from_u128(7)]);
        assert_eq!(events.take().payloads(), vec!["j:*".to_owned()]);
    }
}
