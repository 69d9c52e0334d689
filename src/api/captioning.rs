//! What answers the services' calls, behind one seam: the models in this process (a
//! [`Captioner`]) or, for a cascade tier of a split deployment, the chain over other processes'
//! models. Each request is validated by the rules of the side that answers it before anything is
//! fetched or queued.

use std::sync::Arc;

use super::convert;
use crate::{
    cascade::{Captioner, CascadeError, Failed, ImageSource},
    engine::{Admission, EngineError},
    pb,
    upstream::RemoteChain,
};

#[derive(Clone)]
pub enum Captioning {
    /// The models in this process (both, or one in a split deployment).
    Local(Arc<Captioner>),
    /// A cascade tier: the models run in other processes.
    Remote(Arc<RemoteChain>),
}

impl Captioning {
    /// The models in this process; Generate and Rank are only registered with them.
    pub fn local(&self) -> Result<&Captioner, Failed> {
        match self {
            Captioning::Local(local) => Ok(local),
            Captioning::Remote(_) => Err(CascadeError::from(EngineError::NotServed("generate and rank")).into()),
        }
    }

    /// A Caption request whose image has been taken out as `source`.
    pub async fn caption(
        &self,
        source: ImageSource,
        req: pb::CaptionRequest,
        admission: Admission,
    ) -> Result<pb::CaptionResponse, Failed> {
        // Every field by name: one added later must be weighed for validation and for the
        // result cache's key, which covers the parameters and the listing (the image is `source`).
        let pb::CaptionRequest { image: _, params, top_k, each_candidate } = req;
        let out = match self {
            Captioning::Local(local) => {
                let validator = local.validator();
                let listing = validator.listing(top_k, each_candidate).map_err(CascadeError::from)?;
                let params = validator.request(params).map_err(CascadeError::from)?;
                local.caption(source, params, listing, admission).await?
            }
            Captioning::Remote(chain) => {
                let validator = chain.validator();
                let listing = validator.listing(top_k, each_candidate).map_err(CascadeError::from)?;
                let params = validator.sent(params).map_err(CascadeError::from)?;
                chain.caption(source, params, listing, admission).await?
            }
        };
        Ok(pb::CaptionResponse {
            key: out.key,
            captions: out.captions.into_iter().map(pb::RankedCaption::from).collect(),
            candidates: out.candidates,
            timings: Some(convert::timings(&out.timings)),
        })
    }
}
