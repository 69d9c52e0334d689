//! `Cascade.CaptionStream`: many images over one stream for bulk callers. Each request is answered
//! on its own, in completion order, with a bounded number in flight per stream: further requests
//! are read only as slots free up, so a fast sender is held back by HTTP/2 flow control.

use std::sync::Arc;

use tokio::{
    sync::{mpsc, Semaphore},
    task::JoinSet,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{captioning::Captioning, convert, error::Refused, observe::observed};
use crate::{
    cascade::{CascadeError, Failed},
    engine::Admission,
    pb,
    validate::InvalidParam,
};

pub type AnswerStream = ReceiverStream<Result<pb::CaptionStreamResponse, Status>>;

/// Starts answering the stream's requests with `captioning`, at most `inflight` at once.
pub fn answer(
    captioning: Captioning,
    inflight: usize,
    request: Request<Streaming<pb::CaptionStreamRequest>>,
) -> Response<AnswerStream> {
    // The stream's deadline bounds every image in it.
    let admission = convert::admission(request.metadata());
    let (tx, rx) = mpsc::channel(inflight);
    tokio::spawn(drive(captioning, inflight, request.into_inner(), admission, tx));
    Response::new(ReceiverStream::new(rx))
}

type Answers = mpsc::Sender<Result<pb::CaptionStreamResponse, Status>>;

async fn drive(
    captioning: Captioning,
    inflight: usize,
    mut inbound: Streaming<pb::CaptionStreamRequest>,
    admission: Admission,
    tx: Answers,
) {
    let slots = Arc::new(Semaphore::new(inflight));
    // Dropped on return, which cancels what is running: the caller is gone.
    let mut running = JoinSet::new();
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = tx.closed() => return,
        };
        let next = tokio::select! {
            next = inbound.message() => next,
            _ = tx.closed() => return,
        };
        match next {
            Ok(Some(item)) => {
                let (captioning, tx) = (captioning.clone(), tx.clone());
                running.spawn(async move {
                    let answer = answer_one(&captioning, item, admission).await;
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
    admission: Admission,
) -> pb::CaptionStreamResponse {
    // Every field by name: one added later must be weighed here.
    let pb::CaptionStreamRequest { id, request } = item;
    let call = observed("CaptionStream", None, admission, |admission| async move {
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
            result: Some(pb::caption_stream_response::Result::Error(pb::google::rpc::Status {
                code: status.code() as i32,
                message: status.message().to_string(),
                details: Vec::new(),
            })),
        },
    }
}
