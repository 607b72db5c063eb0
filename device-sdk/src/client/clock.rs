//! Clocks the client reads for flush ages and re-send timers.
//!
//! The core only ever sees milliseconds; where they come from is up to the caller.
//! Units use [`SystemClock`]; a simulator running hours of driving in minutes uses
//! [`ManualClock`] and advances it itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Milliseconds on a clock that never goes backwards.
pub trait Clock: Send + Sync + 'static {
    /// Current time in milliseconds from the clock's origin.
    fn now_ms(&self) -> u64;
}

/// Monotonic wall time since the clock was made.
#[derive(Clone, Copy, Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock starting at zero now.
    pub fn new() -> Self {
        Self { origin: Instant::now() }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }
}

/// A clock set from outside; clones share the same time.
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    ms: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at `ms`.
    pub fn new(ms: u64) -> Self {
        Self { ms: Arc::new(AtomicU64::new(ms)) }
    }

    /// Moves the clock to `ms`; earlier values are ignored so time never runs back.
    pub fn set(&self, ms: u64) {
        self.ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.ms.fetch_add(ms, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.ms.load(Ordering::Relaxed)
    }
}

impl<C: Clock> Clock for Arc<C> {
    fn now_ms(&self) -> u64 {
        (**self).now_ms()
    }
}
