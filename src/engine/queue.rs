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
