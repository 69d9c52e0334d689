//! How every call is observed: counted by service and final status, timed, tracked as in flight,
//! bounded by the caller's deadline, and logged inside a span carrying its correlation key (the
//! server's own, as its label) and, apart, the key a caller sent in metadata.

use std::{future::Future, time::Instant};

use metrics::{counter, gauge, histogram};
use tonic::{metadata::MetadataMap, Code};
use tracing::Instrument;

use super::error::Refused;
use crate::{
    cascade::{image::label, CascadeError, Failed},
    engine::{Admission, EngineError},
    pb,
    telemetry::{untrusted, Untrusted},
};

/// Answers that carry their image's correlation key.
pub trait Keyed {
    fn key(&self) -> &str;
}

impl Keyed for pb::GenerateResponse {
    fn key(&self) -> &str {
        &self.key
    }
}

impl Keyed for pb::RankResponse {
    fn key(&self) -> &str {
        &self.key
    }
}

impl Keyed for pb::CaptionResponse {
    fn key(&self) -> &str {
        &self.key
    }
}

/// The correlation key a cascade tier sends along with a call to its upstreams, so that their
/// log lines for it can be found. Any caller can set it, so it is logged escaped and cut, beside
/// the key the server derives itself and never instead of it.
pub fn sent_key(metadata: &MetadataMap) -> Option<Untrusted> {
    Some(untrusted(metadata.get(pb::KEY_HEADER)?.as_bytes(), SENT_KEY_CHARS))
}

/// Enough for the label of any URL a cascade tier accepts by default.
const SENT_KEY_CHARS: usize = 256;

/// Counts a call by service and final status, times it and tracks it as in flight. A call whose
/// future is dropped (client cancelled, deadline) is counted as CANCELLED.
struct CallObserver {
    service: &'static str,
    start: Instant,
    code: Option<Code>,
}

impl CallObserver {
    fn new(service: &'static str) -> Self {
        gauge!("caption_inflight_requests", "service" => service).increment(1.0);
        Self { service, start: Instant::now(), code: None }
    }
}

impl Drop for CallObserver {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(Code::Cancelled);
        gauge!("caption_inflight_requests", "service" => self.service).decrement(1.0);
        counter!("caption_requests_total", "service" => self.service, "code" => format!("{code:?}")).increment(1);
        histogram!("caption_request_duration_seconds", "service" => self.service)
            .record(self.start.elapsed().as_secs_f64());
    }
}

/// Runs `call` observed and bounded by the caller's deadline, so an expired deadline is answered
/// DEADLINE_EXCEEDED wherever the call is (fetching, queued, computing). Its span carries the
/// label of the key the call named its image by, once known, and the key sent in metadata.
pub async fn observed<T, F>(
    service: &'static str,
    sent: Option<Untrusted>,
    admission: Admission,
    call: impl FnOnce(Admission) -> F,
) -> Result<T, Refused>
where
    T: Keyed,
    F: Future<Output = Result<T, Failed>>,
{
    let span = tracing::info_span!("call", service, key = tracing::field::Empty, sent_key = tracing::field::Empty);
    if let Some(sent) = &sent {
        span.record("sent_key", tracing::field::display(sent));
    }
    async move {
        let mut observer = CallObserver::new(service);
        let result = match admission.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), call(admission))
                .await
                .unwrap_or_else(|_| Err(CascadeError::from(EngineError::DeadlineExceeded).into())),
            None => call(admission).await,
        }
        .map_err(Refused::from);
        let (code, key) = match &result {
            Ok(answer) => (Code::Ok, Some(answer.key())),
            Err(refused) => (refused.status.code(), refused.key.as_deref()),
        };
        if let Some(key) = key {
            tracing::Span::current().record("key", tracing::field::display(label(key)));
        }
        observer.code = Some(code);
        tracing::info!(code = ?code, ms = observer.start.elapsed().as_millis() as u64, "answered");
        result
    }
    .instrument(span)
    .await
}
