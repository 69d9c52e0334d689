//! The Caption use case when the models run in other processes: the image is named and its bytes
//! fetched once here (a URL is fetched here, never by the upstreams), sent to the generator, then
//! with the distinct candidates to the ranker, and the ranked list is built exactly as
//! in-process. Each upstream's answer is checked ([`super::answer`]) before it is used; a broken
//! one fails the call, is counted, and is never cached. Answers of deterministic requests may come
//! from the same [`ResultCache`] as in-process.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use metrics::counter;
use tokio::sync::Semaphore;

use super::{
    answer::{self, IndexedScore},
    image::{self, Resolver},
    listing::{distinct_with_counts, rank_candidates},
    Captioned, CascadeError, Failed, Identity, ImageInput, ImageSource, ResultCache, ResultCacheConfig, Timings,
};
use crate::{
    backend::RankScore,
    engine::{Admission, EngineError},
    images::Fetcher,
    validate::{Listing, SentParams, Validator},
};

/// One image's calls to the upstreams: its correlation key's label (what the upstreams log it
/// by: never the query of a URL), its bytes, the caller's deadline.
pub struct UpstreamCall {
    pub key: String,
    pub image: Arc<Vec<u8>>,
    pub deadline: Option<Instant>,
}

/// The generator and the ranker of another process.
pub trait Upstreams: Send + Sync + 'static {
    /// The candidates for one image, in generation order; the generator applies its own defaults
    /// and model-bound rules to the parameters, exactly as it does for its own callers.
    fn generate(
        &self,
        call: &UpstreamCall,
        params: &SentParams,
    ) -> impl Future<Output = Result<Vec<String>, CascadeError>> + Send;

    /// The ranker's scores of the captions, each with its caption's position among those given,
    /// in the ranker's order (most probable first).
    fn rank(
        &self,
        call: &UpstreamCall,
        captions: Vec<String>,
    ) -> impl Future<Output = Result<Vec<IndexedScore>, CascadeError>> + Send;
}

pub struct Chain<U: Upstreams> {
    upstreams: U,
    resolver: Resolver,
    validator: Validator,
    inflight: Semaphore,
    /// Caption answers of deterministic requests (off unless set).
    results: ResultCache,
}

impl<U: Upstreams> Chain<U> {
    /// `validator` holds the same limit flags as the model tiers (see [`crate::validate`]).
    pub fn new(upstreams: U, fetcher: Fetcher, validator: Validator, max_inflight: usize) -> Self {
        Self {
            upstreams,
            resolver: Resolver::new(fetcher),
            validator,
            inflight: Semaphore::new(max_inflight.max(1)),
            results: ResultCache::off(),
        }
    }

    /// The chain with a result cache for its Caption answers.
    pub fn with_result_cache(mut self, config: ResultCacheConfig) -> Self {
        self.results = ResultCache::new(config);
        self
    }

    pub fn upstreams(&self) -> &U {
        &self.upstreams
    }

    /// The rules this tier checks before passing a request on.
    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    pub async fn caption(
        &self,
        source: ImageSource,
        params: SentParams,
        listing: Listing,
        admission: Admission,
    ) -> Result<Captioned, Failed> {
        let start = Instant::now();
        let _admitted =
            self.inflight.try_acquire().map_err(|_| CascadeError::from(EngineError::Overloaded("server")))?;
        let image = self.resolver.name(source).await?;
        let key = image.key.clone();
        let identity = Identity::of_sent(params.get());
        self.results
            .caption(&self.resolver, image, identity, listing, |image| {
                self.caption_image(image, &params, listing, admission, start)
            })
            .await
            .map_err(|e| Failed::keyed(&key, e))
    }

    async fn caption_image(
        &self,
        image: ImageInput,
        params: &SentParams,
        listing: Listing,
        admission: Admission,
        start: Instant,
    ) -> Result<Captioned, CascadeError> {
        let (key, bytes) = match image {
            ImageInput::Named(named) => {
                let bytes = self.resolver.bytes(&named).await?;
                (named.key, bytes)
            }
            ImageInput::Content(content) => (content.key, content.bytes),
        };
        let fetch = start.elapsed();
        let call = UpstreamCall { key: image::label(&key), image: bytes, deadline: admission.deadline };
        let t = Instant::now();
        let candidates = self.generate(&call, params).await?;
        let generate = t.elapsed();
        // At most --max-candidates (checked just above), so merging them runs inline.
        let (distinct, counts, of) = distinct_with_counts(&candidates);
        let t = Instant::now();
        let scores = self.rank(&call, distinct.clone()).await?;
        let captions = rank_candidates(&candidates, &distinct, &counts, &of, &scores, listing);
        Ok(Captioned {
            key,
            captions,
            candidates,
            timings: Timings { fetch, preprocess: Duration::ZERO, generate, rank: t.elapsed(), total: start.elapsed() },
        })
    }

    /// The generator's candidates, no more than a generator with this tier's flags answers
    /// `params` with, each a caption this tier would accept.
    async fn generate(&self, call: &UpstreamCall, params: &SentParams) -> Result<Vec<String>, CascadeError> {
        let asked = self.validator.candidates_asked(params);
        let max_caption_bytes = self.validator.caption_limits().max_caption_bytes;
        let out = match self.upstreams.generate(call, params).await {
            Ok(candidates) => answer::candidates(candidates, asked, max_caption_bytes).map_err(CascadeError::from),
            Err(e) => Err(e),
        };
        out.map_err(|e| noted(call, e))
    }

    /// The ranker's scores of `captions`, in their order.
    async fn rank(&self, call: &UpstreamCall, captions: Vec<String>) -> Result<Vec<RankScore>, CascadeError> {
        let sent = captions.len();
        let out = match self.upstreams.rank(call, captions).await {
            Ok(scores) => answer::scores(scores, sent).map_err(CascadeError::from),
            Err(e) => Err(e),
        };
        out.map_err(|e| noted(call, e))
    }
}

/// Counts and logs an upstream's broken answer (whether the chain or the [`Upstreams`] found it)
/// on its way to the caller.
fn noted(call: &UpstreamCall, e: CascadeError) -> CascadeError {
    if let CascadeError::BrokenAnswer(b) = &e {
        counter!("caption_upstream_invalid_answers_total", "service" => b.service, "reason" => b.reason).increment(1);
        tracing::warn!(key = %call.key, service = b.service, reason = b.reason, detail = %b.detail, "invalid upstream answer");
    }
    e
}
