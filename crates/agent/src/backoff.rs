//! Exponential backoff with jitter, for when the server is away or overloaded.

use std::time::Duration;

pub const MIN_DELAY: Duration = Duration::from_millis(200);
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// Doubles from [`MIN_DELAY`] to [`MAX_DELAY`]. Each delay is drawn from the upper half of
/// the current step ("equal jitter"): agents that lost the server together do not all come
/// back in the same instant, yet every wait still grows.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { step: MIN_DELAY }
    }
}

impl Backoff {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next delay, with random jitter.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with_jitter(rand::random::<f64>())
    }

    /// The next delay, `jitter` in [0, 1] choosing where in the step's upper half it lands.
    pub fn next_with_jitter(&mut self, jitter: f64) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(MAX_DELAY);
        step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// After a success, the next failure starts small again.
    pub fn reset(&mut self) {
        self.step = MIN_DELAY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_200ms_up_to_10s() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_with_jitter(1.0)).collect();
        let millis: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(
            millis,
            [
                200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000, 10_000
            ]
        );
    }

    #[test]
    fn jitter_stays_in_the_upper_half_of_each_step() {
        let mut low = Backoff::new();
        let mut high = Backoff::new();
        for _ in 0..12 {
            let (l, h) = (low.next_with_jitter(0.0), high.next_with_jitter(1.0));
            assert_eq!(l * 2, h);
        }
        let mut random = Backoff::new();
        let mut step = MIN_DELAY;
        for _ in 0..12 {
            let delay = random.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} outside {step:?}"
            );
            step = (step * 2).min(MAX_DELAY);
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new();
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(backoff.next_with_jitter(1.0), MIN_DELAY);
    }
}
