//! The three gRPC services, each a thin adapter over [`Captioning`]: the request's fields become
//! validated domain values, the use case answers, the answer becomes the response.

use tonic::{Request, Response, Status};

use super::{
    captioning::Captioning,
    convert,
    observe::{observed, Caller},
    stream,
};
use crate::{
    cascade::{CascadeError, Failed},
    engine::Admission,
    pb,
};

#[derive(Clone)]
pub struct Services {
    pub captioning: Captioning,
    pub streams: stream::Streams,
}

#[tonic::async_trait]
impl pb::generator_server::Generator for Services {
    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let (caller, admission) = (Caller::of(request.metadata()), convert::admission(request.metadata()));
        let answer =
            observed("Generate", caller, admission, |admission| self.generate_call(request, admission)).await?;
        Ok(Response::new(answer))
    }
}

#[tonic::async_trait]
impl pb::ranker_server::Ranker for Services {
    async fn rank(&self, request: Request<pb::RankRequest>) -> Result<Response<pb::RankResponse>, Status> {
        let (caller, admission) = (Caller::of(request.metadata()), convert::admission(request.metadata()));
        let answer = observed("Rank", caller, admission, |admission| self.rank_call(request, admission)).await?;
        Ok(Response::new(answer))
    }
}

#[tonic::async_trait]
impl pb::cascade_server::Cascade for Services {
    type CaptionStreamStream = stream::AnswerStream;

    async fn caption_stream(
        &self,
        request: Request<tonic::Streaming<pb::CaptionStreamRequest>>,
    ) -> Result<Response<Self::CaptionStreamStream>, Status> {
        self.streams.answer(self.captioning.clone(), request)
    }

    async fn caption(&self, request: Request<pb::CaptionRequest>) -> Result<Response<pb::CaptionResponse>, Status> {
        let (caller, admission) = (Caller::of(request.metadata()), convert::admission(request.metadata()));
        let answer = observed("Caption", caller, admission, |admission| async move {
            let mut req = request.into_inner();
            let source = convert::image_source(req.image.take()).map_err(CascadeError::from)?;
            self.captioning.caption(source, req, admission).await
        })
        .await?;
        Ok(Response::new(answer))
    }
}

impl Services {
    async fn generate_call(
        &self,
        request: Request<pb::GenerateRequest>,
        admission: Admission,
    ) -> Result<pb::GenerateResponse, Failed> {
        let local = self.captioning.local()?;
        // Every field by name: one added later must be weighed here.
        let pb::GenerateRequest { image, params } = request.into_inner();
        let source = convert::image_source(image).map_err(CascadeError::from)?;
        let params = local.validator().request(params).map_err(CascadeError::from)?;
        let out = local.generate(source, params, admission).await?;
        Ok(pb::GenerateResponse {
            key: out.key,
            candidates: out
                .candidates
                .into_iter()
                .map(|c| pb::Candidate { text: c.text, token_ids: c.token_ids })
                .collect(),
            timings: Some(convert::timings(&out.timings)),
        })
    }

    async fn rank_call(
        &self,
        request: Request<pb::RankRequest>,
        admission: Admission,
    ) -> Result<pb::RankResponse, Failed> {
        let local = self.captioning.local()?;
        let pb::RankRequest { image, captions } = request.into_inner();
        let source = convert::image_source(image).map_err(CascadeError::from)?;
        let captions = local.validator().captions(captions).map_err(CascadeError::from)?;
        let out = local.rank(source, captions, admission).await?;
        Ok(pb::RankResponse {
            key: out.key,
            captions: out.captions.into_iter().map(pb::RankedCaption::from).collect(),
            timings: Some(convert::timings(&out.timings)),
        })
    }
}
