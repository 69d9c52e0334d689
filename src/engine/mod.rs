//! The shared scheduler: one queue per model, dynamic batching, and executor threads that take
//! the next ready batch from either queue. Generation runs at iteration level: requests that
//! arrive while a decode batch runs join it at the next step boundary. The engine knows models
//! only through [`Runner`] and [`Batch`].

mod clock;
mod queue;
mod scheduler;

pub use clock::{Clock, ManualClock, SystemClock};
pub use queue::QueueConfig;
pub use scheduler::{ExecutorInit, Scheduler, SchedulerConfig};

use std::time::Instant;

/// Runs one model. Implementations own (a share of) the model and run on executor threads,
/// never on the async runtime.
pub trait Runner: Send + Sync + 'static {
    type Input: Send + 'static;
    type Output: Send + 'static;
    type Batch<'a>: Batch<Output = Self::Output>
    where
        Self: 'a;

    /// Short model name for logs and metrics.
    const NAME: &'static str;

    /// Starts work on `inputs`, each tagged with the engine's request id.
    fn start(&self, inputs: Vec<(u64, Self::Input)>) -> Self::Batch<'_>;
}

/// Work in progress on an executor: advanced one step at a time so that new requests can join
/// and abandoned ones can leave between steps.
pub trait Batch {
    type Output;

    /// Runs one step; returns the requests that completed.
    fn step(&mut self) -> Vec<(u64, Result<Self::Output, EngineError>)>;

    /// Takes `other`'s requests into this batch; both continue as one from the next step.
    fn join(&mut self, other: Self);

    /// Drops a request whose caller went away.
    fn cancel(&mut self, id: u64);

    fn is_done(&self) -> bool;

    /// Whether requests arriving now should join this batch instead of waiting for it to end.
    fn joinable(&self) -> bool;

    /// Requests in the batch.
    fn requests(&self) -> usize;
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
    #[error("the request's deadline passed before it could complete")]
    DeadlineExceeded,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("inference failed: {0}")]
    Internal(String),
}
