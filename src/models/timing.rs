//! Where decode steps spend their time: process-wide totals of decode-step wall time and of the
//! part of it spent waiting for the device in [`transfer::read`](super::transfer::read), so the
//! benchmark can split a step into host time (launching, bookkeeping) and device waits.

use std::{
    cell::Cell,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

static STEPS: AtomicU64 = AtomicU64::new(0);
static WHOLE_STEPS: AtomicU64 = AtomicU64::new(0);
static STEP_NANOS: AtomicU64 = AtomicU64::new(0);
static WAIT_NANOS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Time this thread has waited in device reads, inside a step or not.
    static WAITED: Cell<u64> = const { Cell::new(0) };
    /// Steps this thread ran whole.
    static WHOLE_HERE: Cell<u64> = const { Cell::new(0) };
}

/// Totals of every decode step this process has run so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepTimes {
    pub steps: u64,
    /// Of `steps`, those run whole (`--cuda-graphs=whole`); the others went through the layers.
    pub whole: u64,
    /// Wall time of the steps.
    pub wall: Duration,
    /// The part of `wall` spent waiting for the device (reading results back).
    pub device_wait: Duration,
}

impl StepTimes {
    /// The totals now.
    pub fn now() -> Self {
        Self {
            steps: STEPS.load(Ordering::Relaxed),
            whole: WHOLE_STEPS.load(Ordering::Relaxed),
            wall: Duration::from_nanos(STEP_NANOS.load(Ordering::Relaxed)),
            device_wait: Duration::from_nanos(WAIT_NANOS.load(Ordering::Relaxed)),
        }
    }

    /// The steps run between `earlier` and `self`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            steps: self.steps - earlier.steps,
            whole: self.whole - earlier.whole,
            wall: self.wall.saturating_sub(earlier.wall),
            device_wait: self.device_wait.saturating_sub(earlier.device_wait),
        }
    }

    /// Mean host time per step (wall time not spent waiting for the device), in ms.
    pub fn host_ms_per_step(&self) -> f64 {
        self.per_step(self.wall.saturating_sub(self.device_wait))
    }

    /// Mean device wait per step, in ms.
    pub fn device_wait_ms_per_step(&self) -> f64 {
        self.per_step(self.device_wait)
    }

    fn per_step(&self, d: Duration) -> f64 {
        if self.steps == 0 {
            return f64::NAN;
        }
        d.as_secs_f64() * 1e3 / self.steps as f64
    }
}

/// Counts a step that ran whole.
pub fn ran_whole() {
    WHOLE_STEPS.fetch_add(1, Ordering::Relaxed);
    WHOLE_HERE.with(|w| w.set(w.get() + 1));
}

/// Steps this thread has run whole so far.
pub fn whole_steps_here() -> u64 {
    WHOLE_HERE.with(Cell::get)
}

/// Adds a device wait of this thread (called by the read helper).
pub(super) fn waited(d: Duration) {
    WAITED.with(|w| w.set(w.get() + d.as_nanos() as u64));
}

/// Times one decode step: its wall time, and the device waits this thread makes during it.
pub struct StepTimer {
    started: Instant,
    waited: u64,
}

impl StepTimer {
    pub fn start() -> Self {
        Self { started: Instant::now(), waited: WAITED.with(Cell::get) }
    }
}

impl Drop for StepTimer {
    fn drop(&mut self) {
        STEPS.fetch_add(1, Ordering::Relaxed);
        STEP_NANOS.fetch_add(self.started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        WAIT_NANOS.fetch_add(WAITED.with(Cell::get) - self.waited, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_counts_its_own_waits_and_not_those_outside_it() {
        waited(Duration::from_millis(50));
        let before = StepTimes::now();
        {
            let _t = StepTimer::start();
            waited(Duration::from_millis(3));
            std::thread::sleep(Duration::from_millis(5));
        }
        // Other tests' steps may run meanwhile on other threads; this one's are at least these.
        let d = StepTimes::now().since(&before);
        assert!(d.steps >= 1);
        assert!(d.device_wait >= Duration::from_millis(3) && d.device_wait < Duration::from_millis(50), "{d:?}");
        assert!(d.wall >= Duration::from_millis(5), "{d:?}");
    }
}
