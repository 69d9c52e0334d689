//! `Cascade.CaptionStream`: many images over one stream for bulk callers. Each request is answered
//! on its own, in completion order, with a bounded number in flight per stream: further requests
//! are read only as slots free up, so a fast sender is held back by HTTP/2 flow control. Open
//! streams are bounded process-wide, and one with nothing in flight is ended when it stays idle.

use std::{sync::Arc, time::Duration};

use metrics::gauge;
use tokio::{
    sync::{mpsc, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{
    captioning::Captioning,
    convert,
    error::{self, Refused},
    observe::{observed, Caller},
};
use crate::{
    cascade::{CascadeError, Failed},
    engine::Admission,
    pb,
    telemetry::TraceParent,
    validate::InvalidParam,
};

pub type AnswerStream = ReceiverStream<Result<pb::CaptionStreamResponse, Status>>;

/// What bounds CaptionStreams.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Requests of one stream worked on at once; further ones wait unread.
    pub inflight: usize,
    /// Streams open at once in this process; further ones are refused RESOURCE_EXHAUSTED.
    pub max_open: usize,
    /// How long a stream with nothing in flight may wait for its next request.
    pub idle_timeout: Duration,
}

impl Default for StreamLimits {
    /// A stream costs about 20 KB while open (docs/security.md measures it): a thousand of them
    /// cost tens of megabytes, not the gigabytes the HTTP/2 limits alone would allow.
    fn default() -> Self {
        Self { inflight: 64, max_open: 1024, idle_timeout: Duration::from_secs(120) }
    }
}

/// The CaptionStreams of this process.
#[derive(Clone)]
pub struct Streams {
    limits: StreamLimits,
    open: Arc<Semaphore>,
}

impl Streams {
    pub fn new(limits: StreamLimits) -> Self {
        let limits = StreamLimits { inflight: limits.inflight.max(1), max_open: limits.max_open.max(1), ..limits };
        Self { limits, open: Arc::new(Semaphore::new(limits.max_open)) }
    }

    /// Starts answering the stream's requests with `captioning`, or refuses the stream when as
    /// many as the limit are open.
    pub fn answer(
        &self,
        captioning: Captioning,
        request: Request<Streaming<pb::CaptionStreamRequest>>,
    ) -> Result<Response<AnswerStream>, Status> {
        let open = self.open.clone().try_acquire_owned().map_err(|_| error::too_many_streams(self.limits.max_open))?;
        // The stream's deadline bounds every image in it.
        let admission = convert::admission(request.metadata());
        // Each image's call is a span of the stream's trace.
        let trace = TraceParent::of(request.metadata());
        let (tx, rx) = mpsc::channel(self.limits.inflight);
        tokio::spawn(drive(captioning, self.limits, request.into_inner(), admission, trace, tx, Open::new(open)));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A stream's place among the open ones, given back when its driver ends.
struct Open(#[allow(dead_code)] OwnedSemaphorePermit);

impl Open {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        gauge!("caption_open_streams").increment(1.0);
        Self(permit)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        gauge!("caption_open_streams").decrement(1.0);
    }
}

type Answers = mpsc::Sender<Result<pb::CaptionStreamResponse, Status>>;

async fn drive(
    captioning: Captioning,
    limits: StreamLimits,
    mut inbound: Streaming<pb::CaptionStreamRequest>,
    admission: Admission,
    trace: TraceParent,
    tx: Answers,
    _open: Open,
) {
    let slots = Arc::new(Semaphore::new(limits.inflight));
    // Dropped on return, which cancels what is running: the caller is gone.
    let mut running = JoinSet::new();
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = tx.closed() => return,
        };
        // Only a stream with nothing in flight can be idle: a caller waiting on answers is not.
        let idle = async {
            loop {
                if running.is_empty() {
                    if limits.idle_timeout.is_zero() {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(limits.idle_timeout).await;
                    return;
                }
                running.join_next().await;
            }
        };
        let next = tokio::select! {
            next = inbound.message() => next,
            _ = tx.closed() => return,
            () = idle => {
                let _ = tx.send(Err(Status::deadline_exceeded(format!(
                    "the stream sent no request for {} s with none in flight (--stream-idle-timeout)",
                    limits.idle_timeout.as_secs()
                ))))
                .await;
                return;
            }
        };
        match next {
            Ok(Some(item)) => {
                let (captioning, tx, caller) = (captioning.clone(), tx.clone(), Caller::in_trace(trace.clone()));
                running.spawn(async move {
                    let answer = answer_one(&captioning, item, caller, admission).await;
                    let _ = tx.send(Ok(answer)).await;
                    drop(slot);
                });
            }
            Ok(None) => break,
            Err(status) => {
                // The request side broke (say, a message over the limit): what was accepted is
                // still answered, then the stream ends with that status.
                while running.join_next().await.is_some() {}
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

/// One request's answer: its response or, whatever went wrong, its status and the key of its
/// image if it got as far as naming it — never the stream's end.
async fn answer_one(
    captioning: &Captioning,
    item: pb::CaptionStreamRequest,
    caller: Caller,
    admission: Admission,
) -> pb::CaptionStreamResponse {
    // Every field by name: one added later must be weighed here.
    let pb::CaptionStreamRequest { id, request } = item;
    let call = observed("CaptionStream", caller, admission, |admission| async move {
        let mut request = request.ok_or_else(|| {
            Failed::from(CascadeError::from(InvalidParam::new("request", "set the CaptionRequest to answer")))
        })?;
        let source = convert::image_source(request.image.take()).map_err(CascadeError::from)?;
        captioning.caption(source, request, admission).await
    });
    match call.await {
        Ok(response) => pb::CaptionStreamResponse {
            id,
            key: response.key.clone(),
            result: Some(pb::caption_stream_response::Result::Response(response)),
        },
        Err(Refused { key, status }) => pb::CaptionStreamResponse {
            id,
            key: key.unwrap_or_default(),
            result: Some(pb::caption_stream_response::Result::Error(error::stream_error(&status))),
        },
    }
}
