//! How every call is observed: counted by service and final status (gRPC's canonical code names),
//! timed, tracked as in flight, bounded by the caller's deadline, and logged inside a span carrying
//! its correlation key (the server's own, as its label) and, apart, the key a caller sent in
//! metadata; the span continues the trace the caller's `traceparent` names.

use std::{future::Future, time::Instant};

use metrics::{counter, gauge, histogram};
use tonic::{metadata::MetadataMap, Code};
use tracing::Instrument;

use super::error::Refused;
use crate::{
    cascade::{image::label, CascadeError, Failed},
    engine::{Admission, EngineError},
    pb,
    telemetry::{self, untrusted, TraceParent, Untrusted},
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

/// What a call's metadata says about where it comes from, for its span.
pub struct Caller {
    /// The correlation key a cascade tier sends along with a call to its upstreams, so that their
    /// log lines for it can be found. Any caller can set it, so it is logged escaped and cut,
    /// beside the key the server derives itself and never instead of it.
    sent_key: Option<Untrusted>,
    trace: TraceParent,
}

impl Caller {
    pub fn of(metadata: &MetadataMap) -> Self {
        let sent_key = metadata.get(pb::KEY_HEADER).map(|key| untrusted(key.as_bytes(), SENT_KEY_CHARS));
        Self { sent_key, trace: TraceParent::of(metadata) }
    }

    /// A caller that sent no key: one of a stream's requests, in the stream's trace.
    pub fn in_trace(trace: TraceParent) -> Self {
        Self { sent_key: None, trace }
    }
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
        counter!("caption_requests_total", "service" => self.service, "code" => pb::code_name(code)).increment(1);
        histogram!("caption_request_duration_seconds", "service" => self.service)
            .record(self.start.elapsed().as_secs_f64());
    }
}

/// Runs `call` observed and bounded by the caller's deadline, so an expired deadline is answered
/// DEADLINE_EXCEEDED wherever the call is (fetching, queued, computing). Its span carries the
/// label of the key the call named its image by, once known, and the key sent in metadata; the
/// `answered` line adds only what the span does not hold: the code and the duration.
pub async fn observed<T, F>(
    service: &'static str,
    caller: Caller,
    admission: Admission,
    call: impl FnOnce(Admission) -> F,
) -> Result<T, Refused>
where
    T: Keyed,
    F: Future<Output = Result<T, Failed>>,
{
    let span = tracing::info_span!("call", service, key = tracing::field::Empty, sent_key = tracing::field::Empty);
    caller.trace.adopt(&span);
    if let Some(sent) = &caller.sent_key {
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
        let span = tracing::Span::current();
        if let Some(key) = key {
            span.record("key", tracing::field::display(label(key)));
        }
        if code != Code::Ok {
            telemetry::failed(&span, pb::code_name(code));
        }
        observer.code = Some(code);
        let duration_ms = observer.start.elapsed().as_millis() as u64;
        tracing::info!(code = %pb::code_name(code), duration_ms, "answered");
        result
    }
    .instrument(span)
    .await
}
