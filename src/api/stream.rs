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

use super::{convert, pb, services::Services};
use crate::{cascade, engine::Admission};

pub type AnswerStream = ReceiverStream<Result<pb::CaptionStreamResponse, Status>>;

impl Services {
    pub(super) async fn caption_stream_call(
        &self,
        request: Request<Streaming<pb::CaptionStreamRequest>>,
    ) -> Result<Response<AnswerStream>, Status> {
        // The stream's deadline bounds every image in it.
        let admission = convert::admission(request.metadata());
        let (tx, rx) = mpsc::channel(self.stream_inflight);
        tokio::spawn(drive(self.clone(), request.into_inner(), admission, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

type Answers = mpsc::Sender<Result<pb::CaptionStreamResponse, Status>>;

async fn drive(
    services: Services,
    mut inbound: Streaming<pb::CaptionStreamRequest>,
    admission: Admission,
    tx: Answers,
) {
    let slots = Arc::new(Semaphore::new(services.stream_inflight));
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
                let (services, tx) = (services.clone(), tx.clone());
                running.spawn(async move {
                    let answer = answer(&services, item, admission).await;
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

/// One request's answer: its response or, whatever went wrong, its status — never the stream's end.
async fn answer(
    services: &Services,
    item: pb::CaptionStreamRequest,
    admission: Admission,
) -> pb::CaptionStreamResponse {
    let id = item.id;
    let failed = |key: String, status: Status| pb::CaptionStreamResponse {
        id: id.clone(),
        key,
        result: Some(pb::caption_stream_response::Result::Error(pb::google::rpc::Status {
            code: status.code() as i32,
            message: status.message().to_string(),
            details: Vec::new(),
        })),
    };
    let Some(mut request) = item.request else {
        return failed(String::new(), Status::invalid_argument("request: set the CaptionRequest to answer"));
    };
    let key = super::services::log_key(None, request.image.as_ref());
    let source = match convert::image_source(request.image.take()) {
        Ok(source) => source,
        Err(status) => return failed(String::new(), status),
    };
    let call = super::services::observed("CaptionStream", key, admission, |admission| {
        services.caption_of(source.clone(), request, admission)
    });
    match call.await {
        Ok(response) => pb::CaptionStreamResponse {
            id,
            key: response.key.clone(),
            result: Some(pb::caption_stream_response::Result::Response(response)),
        },
        Err(status) => failed(cascade::key_of(&source).await.unwrap_or_default(), status),
    }
}
