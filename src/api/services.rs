//! The three gRPC services, each a thin adapter over the use cases: [`Cascade`] with the models
//! in this process, or [`RemoteChain`] over other processes' generators and rankers.

use std::{future::Future, sync::Arc, time::Instant};

use metrics::{counter, gauge, histogram};
use tonic::{metadata::MetadataMap, Code, Request, Response, Status};
use tracing::Instrument;

use super::{convert, pb};
use crate::{
    cascade::{Cascade, CascadeError, ImageSource, Listing, SeedOrigin},
    engine::{Admission, EngineError},
    models::generation::GenerationParams,
    upstream::{RemoteChain, KEY_HEADER},
};

#[derive(Clone)]
pub struct Services {
    /// The models in this process; the Generator and Ranker services (and Cascade without
    /// `chain`) are only registered when it runs theirs.
    pub local: Option<Arc<Cascade>>,
    /// Cascade over remote models.
    pub chain: Option<Arc<RemoteChain>>,
    /// Requests of one CaptionStream worked on at once.
    pub stream_inflight: usize,
}

/// The correlation key a call's log lines carry: the one the cascade tier sent along, else the
/// image URL, else "inline" (the digest is only known once the bytes are hashed).
pub(super) fn log_key(metadata: Option<&MetadataMap>, image: Option<&pb::Image>) -> String {
    if let Some(key) = metadata.and_then(|m| m.get(KEY_HEADER)).and_then(|v| v.to_str().ok()) {
        return key.chars().take(200).collect();
    }
    match image.and_then(|i| i.source.as_ref()) {
        Some(pb::image::Source::Url(url)) => url.chars().take(200).collect(),
        _ => "inline".into(),
    }
}

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
/// DEADLINE_EXCEEDED wherever the call is (fetching, queued, computing), inside a span that
/// carries the correlation key, and logs its outcome with it.
pub(super) async fn observed<T, F>(
    service: &'static str,
    key: String,
    admission: Admission,
    call: impl FnOnce(Admission) -> F,
) -> Result<T, Status>
where
    F: Future<Output = Result<T, Status>>,
{
    let span = tracing::info_span!("call", service, key = %key);
    async move {
        let mut observer = CallObserver::new(service);
        let result = match admission.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), call(admission))
                .await
                .unwrap_or_else(|_| Err(CascadeError::from(EngineError::DeadlineExceeded).into())),
            None => call(admission).await,
        };
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        observer.code = Some(code);
        tracing::info!(code = ?code, ms = observer.start.elapsed().as_millis() as u64, "answered");
        result
    }
    .instrument(span)
    .await
}

#[tonic::async_trait]
impl pb::generator_server::Generator for Services {
    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let key = log_key(Some(request.metadata()), request.get_ref().image.as_ref());
        observed("Generate", key, convert::admission(request.metadata()), |admission| {
            self.generate_call(request, admission)
        })
        .await
    }
}

impl Services {
    /// The models in this process: the services that need them are only registered with them.
    fn local(&self) -> Result<&Arc<Cascade>, Status> {
        self.local.as_ref().ok_or_else(|| Status::unimplemented("this server runs no models"))
    }

    /// A request's generation parameters over this server's defaults.
    fn params(&self, p: Option<pb::GenerationParams>) -> Result<GenerationParams, Status> {
        let local = self.local()?;
        convert::generation_params(p, &local.default_params(), local.limits().generation.max_length)
    }

    async fn generate_call(
        &self,
        request: Request<pb::GenerateRequest>,
        admission: Admission,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let req = request.into_inner();
        let source = convert::image_source(req.image)?;
        let params = self.params(req.params)?;
        let out = self.local()?.generate(source, params, admission).await?;
        tracing::Span::current().record("key", out.key.as_str());
        Ok(Response::new(pb::GenerateResponse {
            key: out.key,
            candidates: out
                .candidates
                .into_iter()
                .map(|c| pb::Candidate { text: c.text, token_ids: c.token_ids })
                .collect(),
            timings: Some(convert::timings(&out.timings)),
        }))
    }
}

#[tonic::async_trait]
impl pb::ranker_server::Ranker for Services {
    async fn rank(&self, request: Request<pb::RankRequest>) -> Result<Response<pb::RankResponse>, Status> {
        let key = log_key(Some(request.metadata()), request.get_ref().image.as_ref());
        observed("Rank", key, convert::admission(request.metadata()), |admission| self.rank_call(request, admission))
            .await
    }
}

impl Services {
    async fn rank_call(
        &self,
        request: Request<pb::RankRequest>,
        admission: Admission,
    ) -> Result<Response<pb::RankResponse>, Status> {
        let req = request.into_inner();
        let source = convert::image_source(req.image)?;
        let out = self.local()?.rank(source, req.captions, admission).await?;
        tracing::Span::current().record("key", out.key.as_str());
        Ok(Response::new(pb::RankResponse {
            key: out.key,
            captions: out.captions.into_iter().map(pb::RankedCaption::from).collect(),
            timings: Some(convert::timings(&out.timings)),
        }))
    }
}

/// Captions shown when a Caption request does not say how many.
const DEFAULT_TOP_K: u32 = 3;

#[tonic::async_trait]
impl pb::cascade_server::Cascade for Services {
    type CaptionStreamStream = super::stream::AnswerStream;

    async fn caption_stream(
        &self,
        request: Request<tonic::Streaming<pb::CaptionStreamRequest>>,
    ) -> Result<Response<Self::CaptionStreamStream>, Status> {
        self.caption_stream_call(request).await
    }

    async fn caption(&self, request: Request<pb::CaptionRequest>) -> Result<Response<pb::CaptionResponse>, Status> {
        let key = log_key(Some(request.metadata()), request.get_ref().image.as_ref());
        observed("Caption", key, convert::admission(request.metadata()), |admission| {
            self.caption_call(request, admission)
        })
        .await
    }
}

impl Services {
    async fn caption_call(
        &self,
        request: Request<pb::CaptionRequest>,
        admission: Admission,
    ) -> Result<Response<pb::CaptionResponse>, Status> {
        let mut req = request.into_inner();
        let source = convert::image_source(req.image.take())?;
        Ok(Response::new(self.caption_of(source, req, admission).await?))
    }

    /// A Caption request whose image has been taken out as `source`.
    pub(super) async fn caption_of(
        &self,
        source: ImageSource,
        req: pb::CaptionRequest,
        admission: Admission,
    ) -> Result<pb::CaptionResponse, Status> {
        // Every field by name: one added later must be weighed for the result cache's key, which
        // covers the parameters and the listing (the image is `source`).
        let pb::CaptionRequest { image: _, params, top_k, each_candidate } = req;
        let listing = Listing { top_k: top_k.unwrap_or(DEFAULT_TOP_K) as usize, each_candidate };
        let out = match &self.chain {
            // The generator applies its own defaults to the parameters as sent.
            Some(chain) => chain.caption(source, params, listing, admission).await?,
            None => {
                let seed = match params.as_ref().and_then(|p| p.seed) {
                    Some(_) => SeedOrigin::Caller,
                    None => SeedOrigin::Server,
                };
                self.local()?.caption(source, self.params(params)?, seed, listing, admission).await?
            }
        };
        tracing::Span::current().record("key", out.key.as_str());
        Ok(pb::CaptionResponse {
            key: out.key,
            captions: out.captions.into_iter().map(pb::RankedCaption::from).collect(),
            candidates: out.candidates,
            timings: Some(convert::timings(&out.timings)),
        })
    }
}
