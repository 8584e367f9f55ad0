//! Waiting for what a test needs, never for a guessed amount of time: poll the condition
//! with a deadline, and fail with what was awaited and the last state seen.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it answers `Ok(value)` and returns the value. `Err(state)` means
/// "not yet"; when `within` has passed the test fails with `what` and the last `state`.
///
/// The closure is called once per poll and returns a future; capture references (`let
/// app = &app;`) and write `|| async move { ... }`.
pub async fn wait_for<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Deadline::within(within, what);
    loop {
        match check().await {
            Ok(value) => return value,
            Err(state) => deadline.check(|| state),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `holds` until it is true; fails with `what` once `within` has passed.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut holds: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(within, what, || {
        let holds = holds();
        async move {
            if holds.await {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        }
    })
    .await
}

/// A deadline for loops that do more than poll between checks (keeping load on, say).
pub struct Deadline {
    at: Instant,
    what: String,
}

impl Deadline {
    pub fn within(limit: Duration, what: &str) -> Self {
        Self {
            at: Instant::now() + limit,
            what: what.to_owned(),
        }
    }

    /// Fails the test, with `state()` in the message, once the deadline has passed.
    pub fn check(&self, state: impl FnOnce() -> String) {
        assert!(
            Instant::now() < self.at,
            "gave up waiting for {}: {}",
            self.what,
            state()
        );
    }
}
