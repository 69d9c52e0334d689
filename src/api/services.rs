//! The three gRPC services, each a thin adapter over [`Cascade`].

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{convert, pb};
use crate::cascade::Cascade;

#[derive(Clone)]
pub struct Services {
    pub cascade: Arc<Cascade>,
}

#[tonic::async_trait]
impl pb::generator_server::Generator for Services {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let admission = convert::admission(request.metadata());
        let req = request.into_inner();
        let source = convert::image_source(req.image)?;
        let params = convert::generation_params(req.params, &self.cascade.default_params())?;
        let out = self.cascade.generate(source, params, admission).await?;
        Ok(Response::new(pb::GenerateResponse {
            key: out.key,
            candidates: out
                .candidates
                .into_iter()
                .map(|c| pb::Candidate {
                    text: c.text,
                    token_ids: c.token_ids,
                })
                .collect(),
            timings: Some(convert::timings(&out.timings)),
        }))
    }
}

#[tonic::async_trait]
impl pb::ranker_server::Ranker for Services {
    async fn rank(
        &self,
        request: Request<pb::RankRequest>,
    ) -> Result<Response<pb::RankResponse>, Status> {
        let admission = convert::admission(request.metadata());
        let req = request.into_inner();
        let source = convert::image_source(req.image)?;
        let out = self.cascade.rank(source, req.captions, admission).await?;
        Ok(Response::new(pb::RankResponse {
            key: out.key,
            captions: out.captions.into_iter().map(convert::ranked).collect(),
            timings: Some(convert::timings(&out.timings)),
        }))
    }
}

/// Captions shown when a Caption request does not say how many.
const DEFAULT_TOP_K: u32 = 3;

#[tonic::async_trait]
impl pb::cascade_server::Cascade for Services {
    async fn caption(
        &self,
        request: Request<pb::CaptionRequest>,
    ) -> Result<Response<pb::CaptionResponse>, Status> {
        let admission = convert::admission(request.metadata());
        let req = request.into_inner();
        let source = convert::image_source(req.image)?;
        let params = convert::generation_params(req.params, &self.cascade.default_params())?;
        let top_k = req.top_k.unwrap_or(DEFAULT_TOP_K) as usize;
        let out = self
            .cascade
            .caption(source, params, top_k, admission)
            .await?;
        Ok(Response::new(pb::CaptionResponse {
            key: out.key,
            captions: out.captions.into_iter().map(convert::ranked).collect(),
            candidates: out.candidates,
            timings: Some(convert::timings(&out.timings)),
        }))
    }
}
