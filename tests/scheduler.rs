//! The shared scheduler with fake models: batches fill to max_batch_size, a lone request waits at
//! most max_queue_delay, a full queue refuses at once, deadlines and cancellations drop work,
//! joiners enter a running decode batch, neither model starves the other, and every executor
//! prepares the generator (`StepWise::start_executor`) once before it takes work. Batching delays and
//! deadlines run on a manual clock, so those checks do not race real time.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use caption_cascade::engine::{
    Admission, Clock, EngineError, ManualClock, OneShot, QueueConfig, RunningBatch, Scheduler, SchedulerConfig,
    StepWise,
};

/// What the fake models saw, for assertions.
#[derive(Default)]
struct Log {
    /// Requests per step (generate) or per batch (rank).
    generate_steps: Vec<usize>,
    rank_batches: Vec<usize>,
    started: Vec<u64>,
    cancelled: Vec<u64>,
    /// "start executor-N" when an executor prepares the generator, "prefill executor-N" when it
    /// prefills, in order.
    executor_events: Vec<String>,
}

fn thread_name() -> String {
    std::thread::current().name().unwrap_or("unnamed").to_string()
}

/// A "generator" whose input is the number of steps a request needs.
struct FakeGenerate {
    log: Arc<Mutex<Log>>,
    step_time: Duration,
}

struct FakeGenerateBatch<'a> {
    runner: &'a FakeGenerate,
    /// (id, steps left, input)
    rows: Vec<(u64, u32, u32)>,
}

impl StepWise for FakeGenerate {
    type Input = u32;
    type Output = u32;
    type Batch<'a> = FakeGenerateBatch<'a>;
    const NAME: &'static str = "generate";

    fn prefill(&self, inputs: Vec<(u64, u32)>) -> (FakeGenerateBatch<'_>, Vec<(u64, Result<u32, EngineError>)>) {
        let mut log = self.log.lock().unwrap();
        log.started.extend(inputs.iter().map(|(id, _)| *id));
        log.executor_events.push(format!("prefill {}", thread_name()));
        drop(log);
        let mut batch =
            FakeGenerateBatch { runner: self, rows: inputs.into_iter().map(|(id, n)| (id, n, n)).collect() };
        let done = batch.decode();
        (batch, done)
    }

    fn start_executor(&self) {
        self.log.lock().unwrap().executor_events.push(format!("start {}", thread_name()));
    }
}

impl RunningBatch for FakeGenerateBatch<'_> {
    type Output = u32;

    fn decode(&mut self) -> Vec<(u64, Result<u32, EngineError>)> {
        std::thread::sleep(self.runner.step_time);
        self.runner.log.lock().unwrap().generate_steps.push(self.rows.len());
        for row in &mut self.rows {
            row.1 -= 1;
        }
        let done = self.rows.iter().filter(|r| r.1 == 0).map(|r| (r.0, Ok(r.2))).collect();
        self.rows.retain(|r| r.1 > 0);
        done
    }
    fn concatenate(&mut self, other: Self) {
        self.rows.extend(other.rows);
    }
    fn filter(&mut self, id: u64) {
        self.runner.log.lock().unwrap().cancelled.push(id);
        self.rows.retain(|r| r.0 != id);
    }
    fn requests(&self) -> usize {
        self.rows.len()
    }
}

/// An input on which the fake ranker panics.
const PANICS: u32 = 999;

/// A "ranker" that answers each input doubled, one batch per step (and panics on [`PANICS`]).
struct FakeRank {
    log: Arc<Mutex<Log>>,
}

impl OneShot for FakeRank {
    type Input = u32;
    type Output = u32;
    const NAME: &'static str = "rank";

    fn run(&self, inputs: Vec<(u64, u32)>) -> Vec<(u64, Result<u32, EngineError>)> {
        self.log.lock().unwrap().rank_batches.push(inputs.len());
        // As libtorch errors surface through tch.
        assert!(inputs.iter().all(|(_, x)| *x != PANICS), "fake libtorch error");
        inputs.into_iter().map(|(id, x)| (id, Ok(2 * x))).collect()
    }
}

fn queue(max_batch_size: usize, delay_ms: u64, max_queue_size: usize) -> QueueConfig {
    QueueConfig { max_batch_size, max_queue_delay: Duration::from_millis(delay_ms), max_queue_size }
}

/// A scheduler with one executor whose batching delays and deadlines run on a manual clock: time
/// stands still unless a test advances it, so a queue with delay 0 is ready at once and any other
/// waits exactly until the test says so.
fn scheduler(
    generate: QueueConfig,
    rank: QueueConfig,
    step_ms: u64,
) -> (Scheduler<FakeGenerate, FakeRank>, Arc<Mutex<Log>>, Arc<ManualClock>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let clock = Arc::new(ManualClock::new());
    let s = Scheduler::start_with_clock(
        SchedulerConfig { executors: 1, generate, rank },
        Arc::new(FakeGenerate { log: log.clone(), step_time: Duration::from_millis(step_ms) }),
        Arc::new(FakeRank { log: log.clone() }),
        clock.clone(),
    );
    (s, log, clock)
}

/// Polls (with a generous real-time bound) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(5), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn advance(s: &Scheduler<FakeGenerate, FakeRank>, clock: &ManualClock, ms: u64) {
    clock.advance(Duration::from_millis(ms));
    s.wake();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_batches_fill_to_max_batch_size() {
    let (s, log, clock) = scheduler(queue(8, 0, 64), queue(4, 100, 64), 1);
    let calls = tokio::spawn({
        let s = s.clone();
        async move { futures::future::join_all((0..10).map(|i| s.submit_one_shot(i, Admission::default()))).await }
    });
    // Two full batches run at once; the two left over wait for the delay, which has not passed.
    until("two batches ran and two requests wait", || {
        log.lock().unwrap().rank_batches.len() == 2 && s.queue_depths().1 == 2
    })
    .await;
    assert_eq!(log.lock().unwrap().rank_batches, [4, 4]);
    advance(&s, &clock, 100);
    assert_eq!(calls.await.unwrap(), (0..10).map(|i| Ok(2 * i)).collect::<Vec<_>>());
    assert_eq!(log.lock().unwrap().rank_batches, [4, 4, 2]);
    s.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_waits_at_most_the_queue_delay() {
    let (s, log, clock) = scheduler(queue(8, 0, 64), queue(32, 150, 64), 1);
    let call = tokio::spawn({
        let s = s.clone();
        async move { s.submit_one_shot(21, Admission::default()).await }
    });
    until("the request is queued", || s.queue_depths().1 == 1).await;
    advance(&s, &clock, 149);
    // Give a wrongly eager executor real time to misbehave: 1 ms short of the delay, nothing runs.
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(log.lock().unwrap().rank_batches.is_empty(), "ran before the delay");
    assert!(!call.is_finished());
    advance(&s, &clock, 1);
    assert_eq!(call.await.unwrap(), Ok(42));
    assert_eq!(log.lock().unwrap().rank_batches, [1]);
    s.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_and_accepted_work_still_completes() {
    let (s, log, clock) = scheduler(queue(8, 0, 64), queue(32, 300, 2), 1);
    let accepted: Vec<_> = (1..=2)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.submit_one_shot(i, Admission::default()).await })
        })
        .collect();
    until("both requests are queued", || s.queue_depths().1 == 2).await;
    // Refused without the clock moving: the answer does not wait for any batch.
    assert_eq!(s.submit_one_shot(3, Admission::default()).await, Err(EngineError::Overloaded("rank")));
    assert!(log.lock().unwrap().rank_batches.is_empty());
    advance(&s, &clock, 300);
    for (call, want) in accepted.into_iter().zip([2, 4]) {
        assert_eq!(call.await.unwrap(), Ok(want));
    }
    s.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_drop_work_queued_or_between_steps() {
    let (s, log, clock) = scheduler(queue(8, 0, 64), queue(8, 1_000, 64), 2);
    // Already expired when queued: never reaches the model.
    let past = Admission { deadline: Some(clock.now()) };
    assert_eq!(s.submit_step_wise(5, past).await, Err(EngineError::DeadlineExceeded));
    // Expires while waiting for its batch to fill: answered without reaching the model.
    let queued = tokio::spawn({
        let s = s.clone();
        let admission = Admission { deadline: Some(clock.now() + Duration::from_millis(10)) };
        async move { s.submit_one_shot(7, admission).await }
    });
    until("the rank request is queued", || s.queue_depths().1 == 1).await;
    advance(&s, &clock, 10);
    assert_eq!(queued.await.unwrap(), Err(EngineError::DeadlineExceeded));
    assert!(log.lock().unwrap().rank_batches.is_empty());
    // Expires while decoding a long request: leaves the batch between steps.
    let decoding = tokio::spawn({
        let s = s.clone();
        let admission = Admission { deadline: Some(clock.now() + Duration::from_millis(60)) };
        async move { s.submit_step_wise(10_000, admission).await }
    });
    until("the long request started", || !log.lock().unwrap().started.is_empty()).await;
    advance(&s, &clock, 60);
    assert_eq!(decoding.await.unwrap(), Err(EngineError::DeadlineExceeded));
    let log = log.lock().unwrap();
    assert_eq!(log.started.len(), 1, "only the long request started");
    assert_eq!(log.cancelled.len(), 1, "and it was dropped from its batch");
    assert!(log.generate_steps.len() < 10_000);
    drop(log);
    s.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_leaves_the_batch() {
    let (s, log, _clock) = scheduler(queue(8, 0, 64), queue(8, 0, 64), 2);
    let call = tokio::spawn({
        let s = s.clone();
        async move { s.submit_step_wise(10_000, Admission::default()).await }
    });
    until("the long request started", || !log.lock().unwrap().started.is_empty()).await;
    call.abort();
    let start = Instant::now();
    while log.lock().unwrap().cancelled.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(2), "never cancelled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The executor is free again.
    assert_eq!(s.submit_step_wise(2, Admission::default()).await, Ok(2));
    s.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_request_joins_a_running_batch_and_finishes_first() {
    let (s, log, _clock) = scheduler(queue(8, 0, 64), queue(8, 0, 64), 3);
    let long = tokio::spawn({
        let s = s.clone();
        async move {
            let r = s.submit_step_wise(200, Admission::default()).await;
            (r, Instant::now())
        }
    });
    until("the long request started", || !log.lock().unwrap().started.is_empty()).await;
    let (short, short_done) = (s.submit_step_wise(5, Admission::default()).await, Instant::now());
    let (long, long_done) = long.await.unwrap();
    assert_eq!((short, long), (Ok(5), Ok(200)));
    assert!(short_done < long_done);
    let steps = &log.lock().unwrap().generate_steps;
    assert!(steps.contains(&2), "the short request shared steps with the long one: {steps:?}");
    s.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranking_is_not_starved_by_running_generation() {
    let (s, log, _clock) = scheduler(queue(8, 0, 64), queue(8, 0, 64), 3);
    let long = tokio::spawn({
        let s = s.clone();
        async move { s.submit_step_wise(500, Admission::default()).await }
    });
    until("generation is decoding", || !log.lock().unwrap().started.is_empty()).await;
    let start = Instant::now();
    assert_eq!(s.submit_one_shot(4, Admission::default()).await, Ok(8));
    assert!(start.elapsed() < Duration::from_millis(500), "rank waited {:?}", start.elapsed());
    assert!(!long.is_finished(), "rank ran while generation was still decoding");
    assert_eq!(long.await.unwrap(), Ok(500));
    s.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_is_not_starved_by_ranking_traffic() {
    let (s, _log, _clock) = scheduler(queue(8, 0, 64), queue(1, 0, 1024), 1);
    let flood: Vec<_> = (0..200)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.submit_one_shot(i, Admission::default()).await })
        })
        .collect();
    let start = Instant::now();
    assert_eq!(s.submit_step_wise(3, Admission::default()).await, Ok(3));
    let waited = start.elapsed();
    for f in flood {
        assert!(f.await.unwrap().is_ok());
    }
    assert!(waited < Duration::from_secs(2), "generate waited {waited:?} behind ranking");
    s.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_the_executors() {
    let log = Arc::new(Mutex::new(Log::default()));
    let generate = Arc::new(FakeGenerate { log: log.clone(), step_time: Duration::ZERO });
    let s = Scheduler::start_with_clock(
        SchedulerConfig { executors: 2, generate: queue(4, 0, 8), rank: queue(4, 0, 8) },
        generate.clone(),
        Arc::new(FakeRank { log }),
        Arc::new(ManualClock::new()),
    );
    assert_eq!(s.submit_step_wise(3, Admission::default()).await, Ok(3));
    assert!(Arc::strong_count(&generate) > 1, "the executors hold the model");
    // Not shutdown(): a handle dropped on an async worker must not block it, and must not leave
    // the executor threads (and the models they hold) behind.
    drop(s);
    until("both executor threads exited", || Arc::strong_count(&generate) == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_batch_fails_its_own_requests_only() {
    let (s, _log, _clock) = scheduler(queue(4, 0, 64), queue(4, 0, 64), 1);
    let err = s.submit_one_shot(PANICS, Admission::default()).await.unwrap_err();
    assert!(matches!(&err, EngineError::Internal(m) if m.contains("fake libtorch error")), "{err:?}");
    // The executor survived: later batches of both models are served.
    assert_eq!(s.submit_one_shot(5, Admission::default()).await, Ok(10));
    assert_eq!(s.submit_step_wise(2, Admission::default()).await, Ok(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_executor_prepares_the_generator_once_before_it_takes_work() {
    let log = Arc::new(Mutex::new(Log::default()));
    let s = Scheduler::start_with_clock(
        SchedulerConfig { executors: 2, generate: queue(1, 0, 8), rank: queue(4, 0, 8) },
        Arc::new(FakeGenerate { log: log.clone(), step_time: Duration::from_millis(5) }),
        Arc::new(FakeRank { log: log.clone() }),
        Arc::new(ManualClock::new()),
    );
    let runs: Vec<_> = (0..6).map(|_| s.submit_step_wise(3, Admission::default())).collect();
    for r in futures::future::join_all(runs).await {
        assert_eq!(r, Ok(3));
    }
    until("both executors started", || {
        log.lock().unwrap().executor_events.iter().filter(|e| e.starts_with("start")).count() == 2
    })
    .await;
    let events = log.lock().unwrap().executor_events.clone();
    for (i, e) in events.iter().enumerate() {
        let thread = e.split_once(' ').unwrap().1;
        let starts = events.iter().filter(|x| *x == &format!("start {thread}")).count();
        assert_eq!(starts, 1, "{events:?}");
        if e.starts_with("prefill") {
            assert!(
                events[..i].contains(&format!("start {thread}")),
                "{thread} prefilled before it started: {events:?}"
            );
        }
    }
    s.shutdown();
}
