//! The three gRPC services, each a thin adapter over [`Cascade`].

use std::{future::Future, sync::Arc, time::Instant};

use metrics::{counter, gauge, histogram};
use tonic::{Code, Request, Response, Status};

use super::{convert, pb};
use crate::{cascade::Cascade, models::generation::GenerationParams};

#[derive(Clone)]
pub struct Services {
    pub cascade: Arc<Cascade>,
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

async fn observed<T>(service: &'static str, call: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
    let mut observer = CallObserver::new(service);
    let result = call.await;
    observer.code = Some(match &result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    });
    result
}

#[tonic::async_trait]
impl pb::generator_server::Generator for Services {
    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        observed("Generate", self.generate_call(request)).await
    }
}

impl Services {
    /// A request's generation parameters over this server's defaults.
    fn params(&self, p: Option<pb::GenerationParams>) -> Result<GenerationParams, Status> {
        convert::generation_params(p, &self.cascade.default_params(), self.cascade.limits().generation.max_length)
    }

    async fn generate_call(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let admission = convert::admission(request.metadata());
        let req = request.into_inner();
        let source = convert::image_source(req.image)?;
        let params = self.params(req.params)?;
        let out = self.cascade.generate(source, params, admission).await?;
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
        observed("Rank", self.rank_call(request)).await
    }
}

impl Services {
    async fn rank_call(&self, request: Request<pb::RankRequest>) -> Result<Response<pb::RankResponse>, Status> {
        let admission = convert::admission(request.metadata());
        let req = request.into_inner();
        let source = convert::image_source(req.image)?;
        let out = self.cascade.rank(source, req.captions, admission).await?;
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
    async fn caption(&self, request: Request<pb::CaptionRequest>) -> Result<Response<pb::CaptionResponse>, Status> {
        observed("Caption", self.caption_call(request)).await
    }
}

impl Services {
    async fn caption_call(
        &self,
        request: Request<pb::CaptionRequest>,
    ) -> Result<Response<pb::CaptionResponse>, Status> {
        let admission = convert::admission(request.metadata());
        let req = request.into_inner();
        let source = convert::image_source(req.image)?;
        let params = self.params(req.params)?;
        let top_k = req.top_k.unwrap_or(DEFAULT_TOP_K) as usize;
        let out = self.cascade.caption(source, params, top_k, admission).await?;
        Ok(Response::new(pb::CaptionResponse {
            key: out.key,
            captions: out.captions.into_iter().map(pb::RankedCaption::from).collect(),
            candidates: out.candidates,
            timings: Some(convert::timings(&out.timings)),
        }))
    }
}
