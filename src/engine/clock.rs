//! The scheduler's notion of time: the system clock in service, a manual clock in tests, so that
//! batching delays and deadlines can be checked without racing real time.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;

    /// How long an idle executor may sleep (in real time) when nothing is due before `due`. A
    /// manual clock does not move by itself, so its executors wait for a wake instead.
    fn sleep_until(&self, due: Instant) -> Duration;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep_until(&self, due: Instant) -> Duration {
        due.saturating_duration_since(Instant::now())
    }
}

/// Time that stands still until [`ManualClock::advance`]; after moving it, call
/// `Scheduler::wake` so executors look at the queues again.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    elapsed: Mutex<Duration>,
}

impl ManualClock {
    pub fn new() -> Self {
        Self { start: Instant::now(), elapsed: Mutex::new(Duration::ZERO) }
    }

    pub fn advance(&self, by: Duration) {
        *self.elapsed.lock().expect("clock lock") += by;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *self.elapsed.lock().expect("clock lock")
    }

    fn sleep_until(&self, _due: Instant) -> Duration {
        // Only a wake moves things on; the bound merely limits the cost of a missed one.
        Duration::from_millis(100)
    }
}
