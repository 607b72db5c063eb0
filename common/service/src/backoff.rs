//! Exponential backoff with jitter, for every reconnect and retry loop: a delay
//! that doubles from `initial` up to `max` after each failure, is drawn from
//! 0.5–1.5 times its value (so a fleet of clients cut off together does not come
//! back in step), and starts over after a success.

use std::time::Duration;

use rand::Rng;

/// A retry delay.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starting at `initial`, doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(max);
        Self { initial, max, next: initial }
    }

    /// The delay before the next attempt (jittered); the one after doubles.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
    }

    /// Sleeps for [`next_delay`](Self::next_delay).
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// An attempt succeeded: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_and_starts_over_after_a_success() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let bases = [100, 200, 350, 350];
        for base in bases {
            let d = b.next_delay().as_secs_f64() * 1000.0;
            assert!(d >= base as f64 * 0.5 - 1e-6 && d <= base as f64 * 1.5 + 1e-6, "{d} for {base}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(150));
        // An initial above the cap is the cap.
        let mut b = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert!(b.next_delay() <= Duration::from_millis(1500));
    }
}
