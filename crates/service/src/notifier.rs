//! Wake-ups for long-polls. One `LISTEN` connection per replica receives the NOTIFYs that
//! enqueues and state changes send at commit, and wakes the requests waiting in this
//! process for those VMs or jobs. Waiters also re-check on a slow timer, which covers a
//! notification lost while the listener reconnects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backvault_store::PgPool;
use backvault_store::jobs::NOTIFY_CHANNEL;
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
}

pub const GENERATION_TTL: Duration = Duration::from_secs(5);

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

    /// Listens until the process ends, reconnecting with backoff. After a reconnect every
    /// waiter re-checks, since notifications may have been missed meanwhile.
    pub async fn listen(self: Arc<Self>, pool: PgPool) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match PgListener::connect_with(&pool).await {
                Ok(mut listener) => {
                    if let Err(e) = listener.listen(NOTIFY_CHANNEL).await {
                        tracing::warn!(error = %e, "cannot LISTEN; retrying");
                    } else {
                        backoff = Duration::from_millis(100);
                        self.wake_all();
                        loop {
                            match listener.try_recv().await {
                                Ok(Some(n)) => self.dispatch(n.payload()),
                                Ok(None) => {
                                    tracing::warn!(
                                        "notification listener lost its connection; reconnecting"
                                    );
                                    self.wake_all();
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "notification listener failed; reconnecting");
                                    break;
                                }
                            }
                        }
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
