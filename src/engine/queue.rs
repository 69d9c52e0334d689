//! A bounded FIFO of requests for one model, and the rule for when it holds a batch worth running.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use super::{Admission, EngineError};

#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// Largest batch handed to the model at once.
    pub max_batch_size: usize,
    /// How long the oldest request may wait for others to fill its batch.
    pub max_queue_delay: Duration,
    /// Requests waiting beyond this are refused at once (RESOURCE_EXHAUSTED).
    pub max_queue_size: usize,
}

pub(super) struct Pending<I, O> {
    pub id: u64,
    pub input: I,
    pub reply: oneshot::Sender<Result<O, EngineError>>,
    pub enqueued: Instant,
    pub admission: Admission,
}

impl<I, O> Pending<I, O> {
    /// The caller went away (its future was dropped: client cancel or gRPC deadline).
    pub fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.admission.deadline.is_some_and(|d| d <= now)
    }
}

pub(super) struct BatchQueue<I, O> {
    pub config: QueueConfig,
    items: VecDeque<Pending<I, O>>,
}

impl<I, O> BatchQueue<I, O> {
    pub fn new(config: QueueConfig) -> Self {
        Self { config, items: VecDeque::new() }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn push(&mut self, p: Pending<I, O>) -> Result<(), Pending<I, O>> {
        if self.items.len() >= self.config.max_queue_size {
            return Err(p);
        }
        self.items.push_back(p);
        Ok(())
    }

    /// When the oldest request arrived, if any.
    pub fn oldest(&self) -> Option<Instant> {
        self.items.front().map(|p| p.enqueued)
    }

    /// A batch is ready when it is full, or when its oldest request has waited long enough.
    pub fn ready(&self, now: Instant) -> bool {
        match self.items.front() {
            None => false,
            Some(head) => {
                self.items.len() >= self.config.max_batch_size
                    || now.saturating_duration_since(head.enqueued) >= self.config.max_queue_delay
            }
        }
    }

    /// When the head's batching delay runs out.
    pub fn ready_at(&self) -> Option<Instant> {
        self.items.front().map(|p| p.enqueued + self.config.max_queue_delay)
    }

    /// Removes requests nobody waits for any more (answering expired ones with
    /// DEADLINE_EXCEEDED); returns how many were cancelled and how many expired.
    pub fn prune(&mut self, now: Instant) -> (usize, usize) {
        let (mut cancelled, mut expired) = (0, 0);
        let mut kept = VecDeque::with_capacity(self.items.len());
        for p in self.items.drain(..) {
            if p.abandoned() {
                cancelled += 1;
            } else if p.expired(now) {
                expired += 1;
                let _ = p.reply.send(Err(EngineError::DeadlineExceeded));
            } else {
                kept.push_back(p);
            }
        }
        self.items = kept;
        (cancelled, expired)
    }

    /// Takes up to `max` of the oldest requests (never more than a batch).
    pub fn take(&mut self, max: usize) -> Vec<Pending<I, O>> {
        let n = self.items.len().min(self.config.max_batch_size).min(max);
        self.items.drain(..n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Reply = oneshot::Receiver<Result<u32, EngineError>>;

    fn pending(id: u64, at: Instant, deadline: Option<Instant>) -> (Pending<u32, u32>, Reply) {
        let (reply, rx) = oneshot::channel();
        (Pending { id, input: 0, reply, enqueued: at, admission: Admission { deadline } }, rx)
    }

    fn queue(max_batch_size: usize, delay_ms: u64, max_queue_size: usize) -> BatchQueue<u32, u32> {
        BatchQueue::new(QueueConfig {
            max_batch_size,
            max_queue_delay: Duration::from_millis(delay_ms),
            max_queue_size,
        })
    }

    #[test]
    fn a_full_queue_refuses_and_gives_the_request_back() {
        let t0 = Instant::now();
        let mut q = queue(4, 10, 2);
        let mut replies = Vec::new();
        for id in 0..2 {
            let (p, rx) = pending(id, t0, None);
            assert!(q.push(p).is_ok());
            replies.push(rx);
        }
        let (p, _rx) = pending(2, t0, None);
        assert_eq!(q.push(p).map_err(|p| p.id), Err(2));
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn ready_when_full_or_when_the_oldest_has_waited_its_delay() {
        let t0 = Instant::now();
        let mut q = queue(3, 10, 8);
        assert!(!q.ready(t0), "empty");
        let mut replies = Vec::new();
        for id in 0..2 {
            let (p, rx) = pending(id, t0, None);
            q.push(p).ok().unwrap();
            replies.push(rx);
        }
        assert!(!q.ready(t0 + Duration::from_millis(9)));
        assert!(q.ready(t0 + Duration::from_millis(10)), "the delay ran out");
        assert_eq!(q.ready_at(), Some(t0 + Duration::from_millis(10)));
        let (p, rx) = pending(2, t0, None);
        q.push(p).ok().unwrap();
        replies.push(rx);
        assert!(q.ready(t0), "a full batch is ready at once");
    }

    #[test]
    fn take_is_oldest_first_and_never_more_than_a_batch() {
        let t0 = Instant::now();
        let mut q = queue(2, 0, 8);
        let mut replies = Vec::new();
        for id in 0..5 {
            let (p, rx) = pending(id, t0, None);
            q.push(p).ok().unwrap();
            replies.push(rx);
        }
        assert_eq!(q.take(10).iter().map(|p| p.id).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(q.take(1).iter().map(|p| p.id).collect::<Vec<_>>(), [2]);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn prune_drops_abandoned_and_answers_expired() {
        let t0 = Instant::now();
        let mut q = queue(4, 0, 8);
        let (gone, rx_gone) = pending(0, t0, None);
        let (late, mut rx_late) = pending(1, t0, Some(t0 + Duration::from_millis(5)));
        let (fine, _rx_fine) = pending(2, t0, Some(t0 + Duration::from_secs(60)));
        for p in [gone, late, fine] {
            q.push(p).ok().unwrap();
        }
        drop(rx_gone);
        assert_eq!(q.prune(t0 + Duration::from_millis(5)), (1, 1));
        assert_eq!(rx_late.try_recv().unwrap(), Err(EngineError::DeadlineExceeded));
        assert_eq!(q.take(4).iter().map(|p| p.id).collect::<Vec<_>>(), [2]);
    }
}
