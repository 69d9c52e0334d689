//! The shared scheduler: one queue per model, dynamic batching, and executor threads that take
//! the next ready batch from either queue. Generation runs at iteration level: requests that
//! arrive while a decode batch runs join it at the next step boundary. The engine knows models
//! only through [`OneShot`] (ranking) and [`StepWise`] with its [`RunningBatch`] (generation).

mod clock;
mod queue;
mod scheduler;

pub use clock::{Clock, ManualClock, SystemClock};
pub use queue::QueueConfig;
pub use scheduler::{ExecutorInit, Scheduler, SchedulerConfig};

use std::time::Instant;

/// A model run once per batch (ranking). Implementations own (a share of) the model and run on
/// executor threads, never on the async runtime.
pub trait OneShot: Send + Sync + 'static {
    type Input: Send + 'static;
    type Output: Send + 'static;

    /// Short model name for logs and metrics.
    const NAME: &'static str;

    /// Computes every request of the batch, each tagged with the engine's request id.
    fn run(&self, inputs: Vec<(u64, Self::Input)>) -> Vec<(u64, Result<Self::Output, EngineError>)>;
}

/// A model run step by step (generation), so requests can enter and leave a running batch
/// between steps. The scheduler drives it with the verbs of iteration-level batching: prefill
/// new requests, decode the running batch a step at a time, concatenate prefilled requests into
/// it, filter out requests whose caller left.
pub trait StepWise: Send + Sync + 'static {
    type Input: Send + 'static;
    type Output: Send + 'static;
    type Batch<'a>: RunningBatch<Output = Self::Output>
    where
        Self: 'a;

    /// Short model name for logs and metrics.
    const NAME: &'static str;

    /// Starts `inputs` (each tagged with the engine's request id): encodes what they bring and
    /// runs their first decoding step, after which the batch may be concatenated into a running
    /// one at once. Returns the batch and the requests that already finished.
    #[allow(clippy::type_complexity)]
    fn prefill(
        &self,
        inputs: Vec<(u64, Self::Input)>,
    ) -> (Self::Batch<'_>, Vec<(u64, Result<Self::Output, EngineError>)>);

    /// Prepares this executor thread for the model before it takes work (after the executor's
    /// own device set-up), e.g. captures what a step replays, so serving never stops for it.
    fn start_executor(&self) {}
}

/// Requests being decoded together. A verb need not copy: an implementation may keep its rows in
/// fixed slots and move only indices.
pub trait RunningBatch {
    type Output;

    /// Runs one step for every request; returns those that finished.
    fn decode(&mut self) -> Vec<(u64, Result<Self::Output, EngineError>)>;

    /// Takes a prefilled batch's requests into this one; both continue as one from the next step.
    fn concatenate(&mut self, other: Self);

    /// Removes a request whose caller went away.
    fn filter(&mut self, id: u64);

    /// Requests still decoding (0: the batch is done).
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
    #[error("this server does not run the {0} model")]
    NotServed(&'static str),
    #[error("inference failed: {0}")]
    Internal(String),
}
