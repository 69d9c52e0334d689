//! The Cascade use case when the models run in other processes: the image is resolved to bytes
//! once here (a URL is fetched here, never by the upstreams), sent to the generator, then with the
//! distinct candidates to the ranker, and the ranked list is built exactly as in-process. Answers
//! of deterministic requests may come from the same [`ResultCache`] as in-process.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;

use super::{
    check_url, key_of, listing, listing::distinct_with_counts, Captioned, CascadeError, Identity, ImageInput,
    ImageSource, Listing, ResultCache, ResultCacheConfig, Timings,
};
use crate::{
    backend::RankScore,
    engine::{Admission, EngineError},
    images::Fetcher,
    models::generation::InvalidParam,
};

/// One image's calls to the upstreams: its correlation key, its bytes, the caller's deadline.
pub struct UpstreamCall {
    pub key: String,
    pub image: Arc<Vec<u8>>,
    pub deadline: Option<Instant>,
}

/// The generator and the ranker of another process.
pub trait Upstreams: Send + Sync + 'static {
    /// The caller's generation parameters, passed on as given, so the generator applies its own
    /// defaults and limits exactly as it does for its own callers.
    type Params: Send + Sync;

    /// The candidates for one image, in generation order.
    fn generate(
        &self,
        call: &UpstreamCall,
        params: &Self::Params,
    ) -> impl Future<Output = Result<Vec<String>, CascadeError>> + Send;

    /// One score per caption, in the order given.
    fn rank(
        &self,
        call: &UpstreamCall,
        captions: Vec<String>,
    ) -> impl Future<Output = Result<Vec<RankScore>, CascadeError>> + Send;

    /// The result cache's identity of `params`: every field as sent (the generator resolves
    /// them), or `None` when they do not make the answer repeatable (sampling without a seed).
    fn identity(&self, params: &Self::Params) -> Option<Identity>;
}

pub struct Chain<U: Upstreams> {
    upstreams: U,
    fetcher: Fetcher,
    inflight: Semaphore,
    /// Caption answers of deterministic requests (off unless set).
    results: ResultCache,
}

impl<U: Upstreams> Chain<U> {
    pub fn new(upstreams: U, fetcher: Fetcher, max_inflight: usize) -> Self {
        Self { upstreams, fetcher, inflight: Semaphore::new(max_inflight.max(1)), results: ResultCache::off() }
    }

    /// The chain with a result cache for its Caption answers.
    pub fn with_result_cache(mut self, config: ResultCacheConfig) -> Self {
        self.results = ResultCache::new(config);
        self
    }

    pub fn upstreams(&self) -> &U {
        &self.upstreams
    }

    pub async fn caption(
        &self,
        source: ImageSource,
        params: U::Params,
        listing: Listing,
        admission: Admission,
    ) -> Result<Captioned, CascadeError> {
        let start = Instant::now();
        let _admitted = self.inflight.try_acquire().map_err(|_| EngineError::Overloaded("server"))?;
        if listing.top_k == 0 {
            return Err(InvalidParam { field: "top_k", reason: "must be at least 1".into() }.into());
        }
        let identity = self.upstreams.identity(&params);
        self.results
            .caption(&self.fetcher, source, identity, listing, |image| {
                self.caption_image(image, &params, listing, admission, start)
            })
            .await
    }

    async fn caption_image(
        &self,
        image: ImageInput,
        params: &U::Params,
        listing: Listing,
        admission: Admission,
        start: Instant,
    ) -> Result<Captioned, CascadeError> {
        let (key, image) = match image {
            ImageInput::Source(ImageSource::Url(url)) => {
                check_url(&self.fetcher, &url)?;
                let bytes = Arc::new(self.fetcher.fetch(&url).await?);
                (url, bytes)
            }
            ImageInput::Source(ImageSource::Bytes(data)) => {
                self.fetcher.check_inline(&data)?;
                (key_of(&ImageSource::Bytes(data.clone())).await?, data)
            }
            ImageInput::Content(content) => (content.key, content.bytes),
        };
        let fetch = start.elapsed();
        let call = UpstreamCall { key: key.clone(), image, deadline: admission.deadline };
        let t = Instant::now();
        let candidates = self.upstreams.generate(&call, params).await?;
        if candidates.is_empty() {
            return Err(EngineError::Internal("the generator returned no candidates".into()).into());
        }
        let generate = t.elapsed();
        let (distinct, counts, of) = distinct_with_counts(&candidates);
        let t = Instant::now();
        let scores = self.upstreams.rank(&call, distinct.clone()).await?;
        if scores.len() != distinct.len() {
            return Err(EngineError::Internal("the ranker scored another number of captions".into()).into());
        }
        let captions = listing::rank_candidates(&candidates, &distinct, &counts, &of, &scores, listing);
        Ok(Captioned {
            key,
            captions,
            candidates,
            timings: Timings { fetch, preprocess: Duration::ZERO, generate, rank: t.elapsed(), total: start.elapsed() },
        })
    }
}
