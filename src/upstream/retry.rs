//! When an upstream call is tried again: on another replica (the balancer picks again), after a
//! jittered exponential pause, and only while the retry budget allows, so retries cannot multiply
//! the load on an upstream that is already failing (Envoy's and Finagle's retry budgets).

use std::{sync::Mutex, time::Duration};

use rand::Rng;

/// Attempts per call, the first included.
pub const MAX_ATTEMPTS: u32 = 4;

const BASE: Duration = Duration::from_millis(20);
const CAP: Duration = Duration::from_millis(500);

/// The pause before retry `attempt` (1-based): uniformly random up to 20 ms × 2^(attempt−1),
/// capped at 500 ms ("full jitter"), so retries from many callers do not arrive together.
pub fn backoff(attempt: u32) -> Duration {
    let ceiling = BASE.saturating_mul(1 << (attempt.saturating_sub(1)).min(10)).min(CAP);
    ceiling.mul_f64(rand::rng().random::<f64>())
}

/// Retries may add at most 20 % to the calls made, plus a small reserve for quiet periods.
pub struct RetryBudget {
    tokens: Mutex<f64>,
}

const RATIO: f64 = 0.2;
const RESERVE: f64 = 10.0;

impl Default for RetryBudget {
    fn default() -> Self {
        Self { tokens: Mutex::new(RESERVE) }
    }
}

impl RetryBudget {
    /// Every call earns a fifth of a retry.
    pub fn deposit(&self) {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        *t = (*t + RATIO).min(RESERVE + 100.0);
    }

    /// Spends one retry if there is one.
    pub fn withdraw(&self) -> bool {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if *t >= 1.0 {
            *t -= 1.0;
            true
        } else {
            metrics::counter!("caption_upstream_retry_budget_exhausted_total").increment(1);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_a_fifth_of_the_calls_beyond_its_reserve() {
        let budget = RetryBudget::default();
        let mut retries = 0;
        for _ in 0..100 {
            budget.deposit();
            if budget.withdraw() {
                retries += 1;
            }
        }
        // 10 in reserve, then one per five calls: 10 + 20 at most, well under one per call.
        assert!((28..=31).contains(&retries), "{retries}");
    }

    #[test]
    fn backoff_grows_then_caps_and_is_jittered() {
        for attempt in 1..12 {
            let ceiling = BASE.saturating_mul(1 << (attempt - 1).min(10)).min(CAP);
            let pauses: Vec<Duration> = (0..50).map(|_| backoff(attempt)).collect();
            assert!(pauses.iter().all(|p| *p <= ceiling));
            assert!(pauses.iter().any(|p| *p != pauses[0]), "jittered");
        }
    }
}
