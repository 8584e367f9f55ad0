//! Wake-ups for long-polls. One `LISTEN` connection per replica receives the NOTIFYs that
//! enqueues and state changes send at commit, and wakes the requests waiting in this
//! process for those VMs or jobs. Waiters also re-check on a slow timer, which covers a
//! notification lost while the listener reconnects. The same connection keeps this
//! replica's copy of the token deny list current.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backvault_store::PgPool;
use backvault_store::jobs::NOTIFY_CHANNEL;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use uuid::Uuid;

#[derive(Default)]
pub struct Notifier {
    vms: Mutex<HashMap<Uuid, Arc<Notify>>>,
    jobs: Mutex<HashMap<Uuid, Arc<Notify>>>,
    /// Agent token generations by VM, so that agent calls need no lookup; an enrollment or
    /// removal anywhere invalidates the entry through `g:` notifications, and entries
    /// expire after [`GENERATION_TTL`] should a notification be lost.
    generations: Mutex<HashMap<Uuid, (i64, Instant)>>,
    /// Revoked token ids until their tokens expire, loaded once the listener listens and
    /// then kept by `r:` notifications. `None` while this replica cannot vouch for it: not
    /// loaded yet, or the listener lost its connection (revocations may have been missed).
    revoked: Mutex<Option<HashMap<Uuid, DateTime<Utc>>>>,
}

/// The notification of a revocation: `r:<jti>@<expiry, Unix seconds>`.
pub fn revoked_payload(jti: Uuid, until: DateTime<Utc>) -> String {
    format!("r:{jti}@{}", until.timestamp())
}

pub const GENERATION_TTL: Duration = Duration::from_secs(5);

/// How often the deny list is read again besides notifications: a listener on a half-open
/// connection notices nothing, and would otherwise miss revocations for good.
pub const DENY_LIST_REFRESH: Duration = Duration::from_secs(30);

/// A registration; dropping it forgets the key once nobody else waits on it.
pub struct Subscription<'a> {
    map: &'a Mutex<HashMap<Uuid, Arc<Notify>>>,
    key: Uuid,
    pub notify: Arc<Notify>,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("notifier lock");
        // Two references: ours and the map's; nobody else is waiting.
        if Arc::strong_count(&self.notify) == 2 {
            map.remove(&self.key);
        }
    }
}

fn subscribe(map: &Mutex<HashMap<Uuid, Arc<Notify>>>, key: Uuid) -> Subscription<'_> {
    let notify = map
        .lock()
        .expect("notifier lock")
        .entry(key)
        .or_default()
        .clone();
    Subscription { map, key, notify }
}

fn wake(map: &Mutex<HashMap<Uuid, Arc<Notify>>>, ids: &str) {
    let map = map.lock().expect("notifier lock");
    if ids == "*" {
        map.values().for_each(|n| n.notify_waiters());
        return;
    }
    for id in ids.split(',').filter_map(|s| s.parse::<Uuid>().ok()) {
        if let Some(n) = map.get(&id) {
            n.notify_waiters();
        }
    }
}

impl Notifier {
    pub fn vm(&self, vm_id: Uuid) -> Subscription<'_> {
        subscribe(&self.vms, vm_id)
    }

    pub fn job(&self, job_id: Uuid) -> Subscription<'_> {
        subscribe(&self.jobs, job_id)
    }

    /// How many requests wait in long-polls right now.
    pub fn waiting_vms(&self) -> usize {
        self.vms.lock().expect("notifier lock").len()
    }

    pub fn dispatch(&self, payload: &str) {
        match payload.split_once(':') {
            Some(("v", ids)) => wake(&self.vms, ids),
            Some(("j", ids)) => wake(&self.jobs, ids),
            Some(("g", ids)) => self.forget_generations(ids),
            Some(("r", entry)) => match entry
                .split_once('@')
                .and_then(|(jti, at)| Some((jti.parse().ok()?, at.parse().ok()?)))
                .and_then(|(jti, at)| Some((jti, DateTime::from_timestamp(at, 0)?)))
            {
                Some((jti, until)) => self.note_revoked(jti, until),
                None => tracing::warn!(payload, "malformed revocation notification"),
            },
            _ => tracing::warn!(payload, "unknown notification"),
        }
    }

    fn wake_all(&self) {
        wake(&self.vms, "*");
        wake(&self.jobs, "*");
        self.forget_generations("*");
    }

    pub fn cached_generation(&self, vm: Uuid) -> Option<i64> {
        let map = self.generations.lock().expect("notifier lock");
        map.get(&vm)
            .filter(|(_, at)| at.elapsed() < GENERATION_TTL)
            .map(|(g, _)| *g)
    }

    pub fn remember_generation(&self, vm: Uuid, generation: i64) {
        self.generations
            .lock()
            .expect("notifier lock")
            .insert(vm, (generation, Instant::now()));
    }

    pub fn forget_generations(&self, ids: &str) {
        let mut map = self.generations.lock().expect("notifier lock");
        if ids == "*" {
            map.clear();
            return;
        }
        for id in ids.split(',').filter_map(|s| s.parse::<Uuid>().ok()) {
            map.remove(&id);
        }
    }

    /// Whether the token `jti` is revoked; `None` when this replica's list cannot say.
    pub fn revoked(&self, jti: Uuid) -> Option<bool> {
        let revoked = self.revoked.lock().expect("notifier lock");
        revoked
            .as_ref()
            .map(|map| map.get(&jti).is_some_and(|until| *until > Utc::now()))
    }

    /// Adds a revocation to a loaded list (an unloaded one gets it when it loads).
    pub fn note_revoked(&self, jti: Uuid, until: DateTime<Utc>) {
        if let Some(map) = self.revoked.lock().expect("notifier lock").as_mut() {
            let now = Utc::now();
            map.retain(|_, until| *until > now);
            map.insert(jti, until);
        }
    }

    fn revocations_unknown(&self) {
        *self.revoked.lock().expect("notifier lock") = None;
    }

    /// Merges what the database lists into the deny list; with `vouch`, an unknown list
    /// becomes known. Entries are never dropped but at expiry: a revocation noted from a
    /// notification after this read began must stay.
    async fn read_revocations(&self, pool: &PgPool, vouch: bool) -> sqlx::Result<()> {
        let list = backvault_store::tokens::tokens_revoked(pool).await?;
        let mut revoked = self.revoked.lock().expect("notifier lock");
        if revoked.is_none() && !vouch {
            return Ok(());
        }
        let map = revoked.get_or_insert_default();
        let now = Utc::now();
        map.retain(|_, until| *until > now);
        map.extend(list.into_iter().map(|t| (t.jti, t.expires_at)));
        Ok(())
    }

    /// Re-reads the deny list every [`DENY_LIST_REFRESH`] until the process ends.
    pub async fn refresh_revocations(self: Arc<Self>, pool: PgPool) {
        loop {
            tokio::time::sleep(DENY_LIST_REFRESH).await;
            if let Err(e) = self.read_revocations(&pool, false).await {
                tracing::warn!(error = %e, "cannot read the token deny list");
            }
        }
    }

    /// Listens until the process ends, reconnecting with backoff. After a reconnect every
    /// waiter re-checks and the deny list is read again, since notifications may have been
    /// missed meanwhile. The list is read after `LISTEN`, so that a revocation committed
    /// in between is in the read or in a notification.
    pub async fn listen(self: Arc<Self>, pool: PgPool) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match PgListener::connect_with(&pool).await {
                Ok(mut listener) => {
                    if let Err(e) = listener.listen(NOTIFY_CHANNEL).await {
                        tracing::warn!(error = %e, "cannot LISTEN; retrying");
                    } else if let Err(e) = self.read_revocations(&pool, true).await {
                        tracing::warn!(error = %e, "cannot read the token deny list; retrying");
                    } else {
                        backoff = Duration::from_millis(100);
                        self.wake_all();
                        loop {
                            match listener.try_recv().await {
                                Ok(Some(n)) => self.dispatch(n.payload()),
                                // The listener would reconnect by itself at the next
                                // receive, without reading the deny list again: start over.
                                Ok(None) => {
                                    tracing::warn!(
                                        "notification listener lost its connection; reconnecting"
                                    );
                                    break;
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "notification listener failed; reconnecting");
                                    break;
                                }
                            }
                        }
                        self.revocations_unknown();
                        self.wake_all();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect the notification listener; retrying")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2).min(Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_only_the_named_keys_and_forgets_idle_ones() {
        let n = Notifier::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let sub_a = n.vm(a);
        let sub_b = n.vm(b);
        {
            let wait_a = sub_a.notify.notified();
            let wait_b = sub_b.notify.notified();
            tokio::pin!(wait_a, wait_b);
            wait_a.as_mut().enable();
            wait_b.as_mut().enable();
            n.dispatch(&format!("v:{a}"));
            tokio::time::timeout(Duration::from_millis(100), wait_a)
                .await
                .expect("a woken");
            assert!(
                tokio::time::timeout(Duration::from_millis(50), wait_b)
                    .await
                    .is_err(),
                "b not woken"
            );
        }
        assert_eq!(n.waiting_vms(), 2);
        drop(sub_a);
        drop(sub_b);
        assert_eq!(n.waiting_vms(), 0);
    }
}
