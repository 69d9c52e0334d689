//! Executor threads over the two model queues. Each executor repeatedly takes the next ready
//! batch from whichever queue has one (the older head first, so neither model starves), runs it
//! outside the lock and answers each request over its oneshot.

use std::{
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use super::{
    queue::{BatchQueue, Pending, QueueConfig},
    Admission, EngineError, Runner,
};

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Executor threads (CPU) — each runs one batch at a time.
    pub executors: usize,
    pub generate: QueueConfig,
    pub rank: QueueConfig,
}

struct State<G: Runner, R: Runner> {
    generate: BatchQueue<G::Input, G::Output>,
    rank: BatchQueue<R::Input, R::Output>,
    shutting_down: bool,
}

struct Shared<G: Runner, R: Runner> {
    state: Mutex<State<G, R>>,
    wake: Condvar,
    generate: Arc<G>,
    rank: Arc<R>,
}

/// Handle to the scheduler; cloning shares the same queues and executors.
pub struct Scheduler<G: Runner, R: Runner> {
    shared: Arc<Shared<G, R>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl<G: Runner, R: Runner> Clone for Scheduler<G, R> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            threads: self.threads.clone(),
        }
    }
}

enum Work<G: Runner, R: Runner> {
    Generate(Vec<Pending<G::Input, G::Output>>),
    Rank(Vec<Pending<R::Input, R::Output>>),
}

impl<G: Runner, R: Runner> Scheduler<G, R> {
    pub fn start(config: SchedulerConfig, generate: Arc<G>, rank: Arc<R>) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                generate: BatchQueue::new("generate", config.generate),
                rank: BatchQueue::new("rank", config.rank),
                shutting_down: false,
            }),
            wake: Condvar::new(),
            generate,
            rank,
        });
        let threads = (0..config.executors.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("executor-{i}"))
                    .spawn(move || executor_loop(&shared))
                    .expect("spawn executor thread")
            })
            .collect();
        Self {
            shared,
            threads: Arc::new(Mutex::new(threads)),
        }
    }

    pub async fn generate(
        &self,
        input: G::Input,
        admission: Admission,
    ) -> Result<G::Output, EngineError> {
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            input,
            reply,
            enqueued: Instant::now(),
            admission,
        };
        {
            let mut st = self.lock();
            if st.shutting_down {
                return Err(EngineError::ShuttingDown);
            }
            if st.generate.push(pending).is_err() {
                return Err(EngineError::Overloaded("generate"));
            }
        }
        self.shared.wake.notify_one();
        rx.await.unwrap_or(Err(EngineError::ShuttingDown))
    }

    pub async fn rank(
        &self,
        input: R::Input,
        admission: Admission,
    ) -> Result<R::Output, EngineError> {
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            input,
            reply,
            enqueued: Instant::now(),
            admission,
        };
        {
            let mut st = self.lock();
            if st.shutting_down {
                return Err(EngineError::ShuttingDown);
            }
            if st.rank.push(pending).is_err() {
                return Err(EngineError::Overloaded("rank"));
            }
        }
        self.shared.wake.notify_one();
        rx.await.unwrap_or(Err(EngineError::ShuttingDown))
    }

    /// Requests waiting in (generate, rank) queues.
    pub fn queue_depths(&self) -> (usize, usize) {
        let st = self.lock();
        (st.generate.len(), st.rank.len())
    }

    /// Stops accepting work, lets executors finish what is queued, and joins them.
    pub fn shutdown(&self) {
        self.lock().shutting_down = true;
        self.shared.wake.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        for t in threads {
            let _ = t.join();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<G, R>> {
        self.shared.state.lock().expect("scheduler lock poisoned")
    }
}

fn executor_loop<G: Runner, R: Runner>(shared: &Shared<G, R>) {
    shared.generate.init_thread();
    shared.rank.init_thread();
    while let Some(work) = next_work(shared) {
        match work {
            Work::Generate(batch) => run_batch(&*shared.generate, batch),
            Work::Rank(batch) => run_batch(&*shared.rank, batch),
        }
    }
}

/// Blocks until a batch is ready; `None` once shutting down with nothing left.
fn next_work<G: Runner, R: Runner>(shared: &Shared<G, R>) -> Option<Work<G, R>> {
    let mut st = shared.state.lock().expect("scheduler lock poisoned");
    loop {
        let now = Instant::now();
        st.generate.prune(now);
        st.rank.prune(now);
        // While draining, run whatever is queued without waiting to fill batches.
        let drain = st.shutting_down;
        let g_ready = st.generate.len() > 0 && (drain || st.generate.ready(now));
        let r_ready = st.rank.len() > 0 && (drain || st.rank.ready(now));
        let pick_generate = match (g_ready, r_ready) {
            (true, true) => st.generate.oldest() <= st.rank.oldest(),
            (g, _) => g,
        };
        if pick_generate {
            return Some(Work::Generate(st.generate.take_batch()));
        }
        if r_ready {
            return Some(Work::Rank(st.rank.take_batch()));
        }
        if drain {
            return None;
        }
        let wake_at = [st.generate.ready_at(), st.rank.ready_at()]
            .into_iter()
            .flatten()
            .min();
        st = match wake_at {
            Some(at) => {
                shared
                    .wake
                    .wait_timeout(st, at.saturating_duration_since(now))
                    .expect("lock")
                    .0
            }
            // Nothing queued: sleep until a submit notifies; the timeout only bounds a missed wake.
            None => {
                shared
                    .wake
                    .wait_timeout(st, Duration::from_secs(1))
                    .expect("lock")
                    .0
            }
        };
    }
}

fn run_batch<M: Runner>(runner: &M, batch: Vec<Pending<M::Input, M::Output>>) {
    let now = Instant::now();
    let mut inputs = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for p in batch {
        if p.abandoned() {
            continue;
        }
        if p.expired(now) {
            let _ = p.reply.send(Err(EngineError::DeadlineExceeded));
            continue;
        }
        inputs.push(p.input);
        replies.push(p.reply);
    }
    if inputs.is_empty() {
        return;
    }
    let n = inputs.len();
    // A panic inside libtorch glue must fail this batch, not kill the executor.
    let outputs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner.run(inputs)))
        .unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            // libtorch errors carry a C++ backtrace; the first line says what went wrong.
            let msg = msg.lines().next().unwrap_or_default().to_string();
            tracing::error!(%msg, "batch panicked");
            (0..n)
                .map(|_| Err(EngineError::Internal(msg.clone())))
                .collect()
        });
    for (reply, out) in replies.into_iter().zip(outputs) {
        let _ = reply.send(out);
    }
}
