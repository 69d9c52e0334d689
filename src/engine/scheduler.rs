//! Executor threads over the two model queues.
//!
//! An idle executor waits until either queue holds a ready batch (full, or its oldest request has
//! waited `max_queue_delay`), preferring the older head so neither model starves. While it runs a
//! generation batch it goes back to the queues between decode steps: newly queued generation
//! requests join the running batch at once (up to `max_batch_size` requests), a ready rank batch
//! runs in between, and requests whose callers left or whose deadline passed are dropped.

use std::{
    collections::HashMap,
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use metrics::{counter, gauge, histogram};
use tokio::sync::oneshot;

use super::{
    clock::Clock,
    queue::{BatchQueue, Pending, QueueConfig},
    Admission, EngineError, OneShot, RunningBatch, StepWise,
};

/// Run on each executor thread before it takes work.
pub type ExecutorInit = Arc<dyn Fn() + Send + Sync>;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Executor threads; each runs one batch at a time (on CUDA, each on its own stream).
    pub executors: usize,
    pub generate: QueueConfig,
    pub rank: QueueConfig,
}

struct State<G: StepWise, R: OneShot> {
    generate: BatchQueue<G::Input, G::Output>,
    rank: BatchQueue<R::Input, R::Output>,
    shutting_down: bool,
}

struct Shared<G: StepWise, R: OneShot> {
    state: Mutex<State<G, R>>,
    wake: Condvar,
    /// `None` when this process does not serve the model: its requests are refused at submit,
    /// so its queue never holds work.
    generate: Option<Arc<G>>,
    rank: Option<Arc<R>>,
    clock: Arc<dyn Clock>,
    executor_init: ExecutorInit,
    next_id: AtomicU64,
    /// Requests a decode batch may hold; fixed at start, so read without the lock between steps.
    generate_max_batch: usize,
}

/// Handle to the scheduler; clones share the same queues and executors. When the last handle
/// goes, the executors finish what was accepted and exit.
pub struct Scheduler<G: StepWise, R: OneShot> {
    shared: Arc<Shared<G, R>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    _stop: Arc<StopOnDrop<G, R>>,
}

impl<G: StepWise, R: OneShot> Clone for Scheduler<G, R> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone(), threads: self.threads.clone(), _stop: self._stop.clone() }
    }
}

/// Owned by the handles alone (executors hold `Shared`): its drop tells the executors to stop
/// once the queues are empty. It does not join them, since it may run on an async worker thread.
struct StopOnDrop<G: StepWise, R: OneShot>(Arc<Shared<G, R>>);

impl<G: StepWise, R: OneShot> Drop for StopOnDrop<G, R> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.0.state.lock() {
            st.shutting_down = true;
        }
        self.0.wake.notify_all();
    }
}

/// What an executor took from the queues in one visit.
struct Work<G: StepWise, R: OneShot> {
    generate: Vec<Pending<G::Input, G::Output>>,
    rank: Vec<Pending<R::Input, R::Output>>,
}

/// A request being computed, with the means to answer it.
struct InFlight<O> {
    reply: oneshot::Sender<Result<O, EngineError>>,
    deadline: Option<Instant>,
    started: Instant,
}

impl<G: StepWise, R: OneShot> Scheduler<G, R> {
    /// Starts the executors, with batching delays and deadlines measured on `clock`.
    pub fn start_with_clock(config: SchedulerConfig, generate: Arc<G>, rank: Arc<R>, clock: Arc<dyn Clock>) -> Self {
        Self::start_with(config, Some(generate), Some(rank), clock, Arc::new(|| {}))
    }

    /// As [`Scheduler::start_with_clock`], running `executor_init` first on each executor thread
    /// (its device settings: thread counts, its own CUDA stream), once for both models. A model
    /// given as `None` is not served here (a process in a split deployment loads only its own).
    pub fn start_with(
        config: SchedulerConfig,
        generate: Option<Arc<G>>,
        rank: Option<Arc<R>>,
        clock: Arc<dyn Clock>,
        executor_init: ExecutorInit,
    ) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                generate: BatchQueue::new(config.generate),
                rank: BatchQueue::new(config.rank),
                shutting_down: false,
            }),
            wake: Condvar::new(),
            generate,
            rank,
            clock,
            executor_init,
            next_id: AtomicU64::new(0),
            generate_max_batch: config.generate.max_batch_size,
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
        let stop = Arc::new(StopOnDrop(shared.clone()));
        Self { shared, threads: Arc::new(Mutex::new(threads)), _stop: stop }
    }

    /// Queues a request for the step-wise model and waits for its answer.
    pub async fn submit_step_wise(&self, input: G::Input, admission: Admission) -> Result<G::Output, EngineError> {
        if self.shared.generate.is_none() {
            return Err(EngineError::NotServed(G::NAME));
        }
        self.submit(input, admission, G::NAME, |st| &mut st.generate).await
    }

    /// Queues a request for the one-shot model and waits for its answer.
    pub async fn submit_one_shot(&self, input: R::Input, admission: Admission) -> Result<R::Output, EngineError> {
        if self.shared.rank.is_none() {
            return Err(EngineError::NotServed(R::NAME));
        }
        self.submit(input, admission, R::NAME, |st| &mut st.rank).await
    }

    /// Queues one request (refusing at once when the queue is full) and waits for its answer.
    async fn submit<I, O>(
        &self,
        input: I,
        admission: Admission,
        model: &'static str,
        queue: impl FnOnce(&mut State<G, R>) -> &mut BatchQueue<I, O>,
    ) -> Result<O, EngineError> {
        let (reply, rx) = oneshot::channel();
        let pending = self.pending(input, reply, admission);
        {
            let mut st = self.lock();
            if st.shutting_down {
                return Err(EngineError::ShuttingDown);
            }
            let q = queue(&mut st);
            if q.push(pending).is_err() {
                counter!("caption_rejected_requests_total", "model" => model).increment(1);
                return Err(EngineError::Overloaded(model));
            }
            gauge!("caption_queue_depth", "model" => model).set(q.len() as f64);
        }
        self.shared.wake.notify_one();
        rx.await.unwrap_or(Err(EngineError::ShuttingDown))
    }

    fn pending<I, O>(
        &self,
        input: I,
        reply: oneshot::Sender<Result<O, EngineError>>,
        admission: Admission,
    ) -> Pending<I, O> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        Pending { id, input, reply, enqueued: self.shared.clock.now(), admission }
    }

    /// Requests waiting in the (generate, rank) queues.
    pub fn queue_depths(&self) -> (usize, usize) {
        let st = self.lock();
        (st.generate.len(), st.rank.len())
    }

    /// Makes idle executors look at the queues again (after moving a manual clock).
    pub fn wake(&self) {
        self.shared.wake.notify_all();
    }

    /// Stops accepting work, lets executors finish everything accepted, and joins them.
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

fn executor_loop<G: StepWise, R: OneShot>(shared: &Shared<G, R>) {
    (shared.executor_init)();
    let generate = shared.generate.as_deref();
    if let Some(g) = generate {
        g.start_executor();
    }
    let mut running: Option<G::Batch<'_>> = None;
    let mut inflight: HashMap<u64, InFlight<G::Output>> = HashMap::new();
    loop {
        let join_room = running.as_ref().map(|b| shared.generate_max_batch.saturating_sub(b.requests()));
        let Some(work) = next_work(shared, running.is_some(), join_room.unwrap_or(0)) else {
            return;
        };
        if !work.rank.is_empty() {
            let rank = shared.rank.as_deref().expect("rank work is only queued for a served model");
            run_to_completion(rank, work.rank, &*shared.clock);
        }
        // A batch prefilled in this visit has had its step; the running batch steps below.
        let mut prefilled_alone = false;
        if !work.generate.is_empty() {
            let inputs = admit(work.generate, &mut inflight, G::NAME, shared.clock.now());
            let new_ids: Vec<u64> = inputs.iter().map(|(id, _)| *id).collect();
            if !inputs.is_empty() {
                let generate = generate.expect("generate work is only queued for a served model");
                match guarded(|| generate.prefill(inputs)) {
                    Ok((batch, done)) => {
                        deliver(done, &mut inflight, G::NAME, shared.clock.now());
                        match running.as_mut() {
                            Some(r) => r.concatenate(batch),
                            None => {
                                running = Some(batch);
                                prefilled_alone = true;
                            }
                        }
                    }
                    Err(msg) => fail(&mut inflight, &new_ids, &msg),
                }
            }
        }
        let mut finished = false;
        if let Some(batch) = running.as_mut() {
            drop_abandoned(batch, &mut inflight, G::NAME, shared.clock.now());
            if batch.requests() > 0 && !prefilled_alone {
                let size = batch.requests();
                match guarded(|| batch.decode()) {
                    Ok(done) => {
                        histogram!("caption_batch_size", "model" => G::NAME).record(size as f64);
                        counter!("caption_decode_steps_total").increment(1);
                        deliver(done, &mut inflight, G::NAME, shared.clock.now());
                    }
                    Err(msg) => {
                        let ids: Vec<u64> = inflight.keys().copied().collect();
                        fail(&mut inflight, &ids, &msg);
                    }
                }
            }
            finished = batch.requests() == 0 || inflight.is_empty();
        }
        if finished {
            running = None;
            // Anything a finished batch did not answer is a runner bug; never leave a caller hanging.
            let ids: Vec<u64> = inflight.keys().copied().collect();
            fail(&mut inflight, &ids, "the batch ended without a result for this request");
        }
    }
}

/// Blocks until there is something to do. With a batch already running it never blocks: it takes
/// joiners (up to `join_room`) and a ready rank batch, possibly nothing. `None` once shutting
/// down with nothing left.
fn next_work<G: StepWise, R: OneShot>(shared: &Shared<G, R>, busy: bool, join_room: usize) -> Option<Work<G, R>> {
    let mut st = shared.state.lock().expect("scheduler lock poisoned");
    loop {
        let now = shared.clock.now();
        count_dropped(G::NAME, st.generate.prune(now));
        count_dropped(R::NAME, st.rank.prune(now));
        // While draining, run whatever is queued without waiting to fill batches.
        let drain = st.shutting_down;
        let g_ready = st.generate.len() > 0 && (drain || st.generate.ready(now));
        let r_ready = st.rank.len() > 0 && (drain || st.rank.ready(now));
        let mut work = Work { generate: Vec::new(), rank: Vec::new() };
        if busy {
            work.generate = st.generate.take(join_room);
            if r_ready {
                work.rank = st.rank.take(usize::MAX);
            }
        } else if g_ready && (!r_ready || st.generate.oldest() <= st.rank.oldest()) {
            work.generate = st.generate.take(usize::MAX);
        } else if r_ready {
            work.rank = st.rank.take(usize::MAX);
        }
        gauge!("caption_queue_depth", "model" => G::NAME).set(st.generate.len() as f64);
        gauge!("caption_queue_depth", "model" => R::NAME).set(st.rank.len() as f64);
        if busy || !work.generate.is_empty() || !work.rank.is_empty() {
            return Some(work);
        }
        if drain {
            return None;
        }
        let wake_at = [st.generate.ready_at(), st.rank.ready_at()].into_iter().flatten().min();
        // With nothing queued, sleep until a submit notifies; the timeout only bounds a missed wake.
        let wait = wake_at.map_or(Duration::from_secs(1), |at| shared.clock.sleep_until(at));
        st = shared.wake.wait_timeout(st, wait).expect("scheduler lock poisoned").0;
    }
}

fn count_dropped(model: &'static str, (cancelled, expired): (usize, usize)) {
    if cancelled > 0 {
        counter!("caption_dropped_requests_total", "model" => model, "reason" => "cancelled")
            .increment(cancelled as u64);
    }
    if expired > 0 {
        counter!("caption_dropped_requests_total", "model" => model, "reason" => "deadline").increment(expired as u64);
    }
}

/// Registers the replies of `batch` and returns its inputs, skipping requests already dead.
fn admit<I, O>(
    batch: Vec<Pending<I, O>>,
    inflight: &mut HashMap<u64, InFlight<O>>,
    model: &'static str,
    now: Instant,
) -> Vec<(u64, I)> {
    let mut inputs = Vec::with_capacity(batch.len());
    for p in batch {
        if p.abandoned() {
            count_dropped(model, (1, 0));
            continue;
        }
        if p.expired(now) {
            count_dropped(model, (0, 1));
            let _ = p.reply.send(Err(EngineError::DeadlineExceeded));
            continue;
        }
        histogram!("caption_queue_duration_seconds", "model" => model).record((now - p.enqueued).as_secs_f64());
        inflight.insert(p.id, InFlight { reply: p.reply, deadline: p.admission.deadline, started: now });
        inputs.push((p.id, p.input));
    }
    inputs
}

fn deliver<O>(
    done: Vec<(u64, Result<O, EngineError>)>,
    inflight: &mut HashMap<u64, InFlight<O>>,
    model: &'static str,
    now: Instant,
) {
    for (id, result) in done {
        if let Some(f) = inflight.remove(&id) {
            let compute = now.saturating_duration_since(f.started);
            histogram!("caption_compute_duration_seconds", "model" => model).record(compute.as_secs_f64());
            let _ = f.reply.send(result);
        }
    }
}

fn fail<O>(inflight: &mut HashMap<u64, InFlight<O>>, ids: &[u64], msg: &str) {
    for id in ids {
        if let Some(f) = inflight.remove(id) {
            let _ = f.reply.send(Err(EngineError::Internal(msg.to_string())));
        }
    }
}

/// Between steps: requests whose caller left or whose deadline passed leave the batch.
fn drop_abandoned<B: RunningBatch>(
    batch: &mut B,
    inflight: &mut HashMap<u64, InFlight<B::Output>>,
    model: &'static str,
    now: Instant,
) {
    let gone: Vec<(u64, bool)> = inflight
        .iter()
        .filter_map(|(&id, f)| {
            if f.reply.is_closed() {
                Some((id, false))
            } else if f.deadline.is_some_and(|d| d <= now) {
                Some((id, true))
            } else {
                None
            }
        })
        .collect();
    for (id, expired) in gone {
        batch.filter(id);
        let f = inflight.remove(&id).expect("listed");
        if expired {
            let _ = f.reply.send(Err(EngineError::DeadlineExceeded));
            count_dropped(model, (0, 1));
        } else {
            count_dropped(model, (1, 0));
        }
    }
}

/// Runs a batch of a one-shot model.
fn run_to_completion<M: OneShot>(runner: &M, batch: Vec<Pending<M::Input, M::Output>>, clock: &dyn Clock) {
    let mut inflight = HashMap::new();
    let inputs = admit(batch, &mut inflight, M::NAME, clock.now());
    if inputs.is_empty() {
        return;
    }
    histogram!("caption_batch_size", "model" => M::NAME).record(inputs.len() as f64);
    let result = guarded(|| runner.run(inputs));
    let ids: Vec<u64> = inflight.keys().copied().collect();
    match result {
        Ok(done) => deliver(done, &mut inflight, M::NAME, clock.now()),
        Err(msg) => fail(&mut inflight, &ids, &msg),
    }
    fail(&mut inflight, &ids, "the batch ended without a result for this request");
}

/// Runs `f`, turning a panic (a libtorch error surfaced by tch) into an error message, so a bad
/// batch fails its requests instead of killing the executor.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        // libtorch errors carry a C++ backtrace; the first line says what went wrong.
        let msg = msg.lines().next().unwrap_or_default().to_string();
        tracing::error!(%msg, "batch failed");
        msg
    })
}
