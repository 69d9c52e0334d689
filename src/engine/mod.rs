//! The shared scheduler: one queue per model, dynamic batching, and executor threads that take
//! the next ready batch from either queue. It knows models only through [`Runner`].

mod queue;
mod scheduler;

pub use queue::QueueConfig;
pub use scheduler::{Scheduler, SchedulerConfig};

use std::time::Instant;

/// Runs batches of one model. Implementations own (a share of) the model and run on executor
/// threads, never on the async runtime.
pub trait Runner: Send + Sync + 'static {
    type Input: Send + 'static;
    type Output: Send + 'static;

    /// Called once on each executor thread before it takes work (thread-local libtorch settings).
    fn init_thread(&self) {}

    /// Runs one batch; returns one result per input, in order.
    fn run(&self, inputs: Vec<Self::Input>) -> Vec<Result<Self::Output, EngineError>>;
}

/// Per-request options the scheduler honours.
#[derive(Debug, Clone, Copy, Default)]
pub struct Admission {
    /// Drop the request instead of running it once this has passed.
    pub deadline: Option<Instant>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("the {0} queue is full; retry later")]
    Overloaded(&'static str),
    #[error("the request's deadline passed before it could run")]
    DeadlineExceeded,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Invalid(String),
    #[error("inference failed: {0}")]
    Internal(String),
}
