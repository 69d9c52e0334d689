//! The use cases with the models in this process: Generate, Rank and Caption over the shared
//! scheduler. The image is named once, its pixels are prepared once per image (shared by
//! concurrent calls) off the async runtime, and Caption answers of deterministic requests may
//! come from the [`ResultCache`].

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;

use super::{
    image::Resolver,
    listing::{distinct_with_counts, rank_candidates},
    Captioned, CascadeError, Failed, Generated, Identity, ImageInput, ImageSource, Models, PreparedImage, Ranked,
    RankedCaption, ResultCache, ResultCacheConfig, Timings,
};
use crate::{
    backend::{GenerateInput, Prompt, RankInput},
    engine::{Admission, EngineError},
    images::{cache::Lookup, CacheKey, DecodeLanes, DecodeLimits, Fetcher, ImageCache, RgbImage},
    models::preprocess::{ImageProcessor, Pixels},
    validate::{CaptionLimits, GenerationLimits, Listing, ValidCaptions, ValidParams, Validator},
};

/// Bounds on what one request may ask for and on the work admitted at once.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub generation: GenerationLimits,
    pub captions: CaptionLimits,
    /// Calls admitted at once (fetching, decoding, queued or computing); beyond it calls are
    /// refused with RESOURCE_EXHAUSTED, so memory stays bounded under any load.
    pub max_inflight: usize,
    /// Bounds on each image decode.
    pub decode: DecodeLimits,
    /// Decodes (and resizes) running at once in each of the two decode lanes; each may hold a
    /// full-resolution image.
    pub max_concurrent_decodes: usize,
}

/// The captioning use cases over the models this process runs.
pub struct Captioner<M: Models = super::LocalModels> {
    models: M,
    resolver: Resolver,
    cache: ImageCache<PreparedImage>,
    lanes: DecodeLanes,
    validator: Validator,
    /// Admission slots; see [`RequestLimits::max_inflight`].
    inflight: Semaphore,
    /// Caption answers of deterministic requests (off unless set).
    results: ResultCache,
}

impl<M: Models> Captioner<M> {
    pub fn new(models: M, fetcher: Fetcher, cache: ImageCache<PreparedImage>, limits: RequestLimits) -> Self {
        let mut generation = limits.generation;
        // No request may outgrow the decoder's position table.
        generation.max_length = generation.max_length.min(models.max_positions());
        Self {
            models,
            resolver: Resolver::new(fetcher),
            cache,
            lanes: DecodeLanes::new(limits.decode, limits.max_concurrent_decodes),
            validator: Validator::new(generation, limits.captions),
            inflight: Semaphore::new(limits.max_inflight.max(1)),
            results: ResultCache::off(),
        }
    }

    /// The captioner with a result cache for its Caption answers.
    pub fn with_result_cache(mut self, config: ResultCacheConfig) -> Self {
        self.results = ResultCache::new(config);
        self
    }

    /// The rules requests to this captioner are checked by, its limits fitted to the models.
    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    pub fn models(&self) -> &M {
        &self.models
    }

    fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, CascadeError> {
        self.inflight.try_acquire().map_err(|_| EngineError::Overloaded("server").into())
    }

    pub async fn generate(
        &self,
        source: ImageSource,
        params: ValidParams,
        admission: Admission,
    ) -> Result<Generated, Failed> {
        let start = Instant::now();
        let processor =
            self.models.generator_processor().ok_or(CascadeError::from(EngineError::NotServed("generate")))?;
        let _admitted = self.admit()?;
        let image = self.resolver.name(source).await?;
        let key = image.key.clone();
        let work = async {
            let prompt = self.models.prompt(&params)?;
            let (image, fetch) = self.prepared(&ImageInput::Named(image)).await?;
            let t = Instant::now();
            let pixels = processor.normalize(prepared(&image.generator)?);
            let preprocess = t.elapsed();
            let t = Instant::now();
            let out = self.models.generate_candidates(GenerateInput { pixels, params, prompt }, admission).await?;
            let timings =
                Timings { fetch, preprocess, generate: t.elapsed(), rank: Duration::ZERO, total: start.elapsed() };
            Ok::<_, CascadeError>(Generated { key: key.clone(), candidates: out.candidates, timings })
        };
        work.await.map_err(|e| Failed::keyed(&key, e))
    }

    pub async fn rank(
        &self,
        source: ImageSource,
        captions: ValidCaptions,
        admission: Admission,
    ) -> Result<Ranked, Failed> {
        let start = Instant::now();
        let processor = self.models.ranker_processor().ok_or(CascadeError::from(EngineError::NotServed("rank")))?;
        let _admitted = self.admit()?;
        let image = self.resolver.name(source).await?;
        let key = image.key.clone();
        let work = async {
            let tokens = self.models.tokenize(captions.get())?;
            let (image, fetch) = self.prepared(&ImageInput::Named(image)).await?;
            let t = Instant::now();
            let pixels = processor.normalize(prepared(&image.ranker)?);
            let preprocess = t.elapsed();
            let t = Instant::now();
            let captions = self.rank_pixels(pixels, captions.into_inner(), tokens, admission).await?;
            let timings =
                Timings { fetch, preprocess, generate: Duration::ZERO, rank: t.elapsed(), total: start.elapsed() };
            Ok::<_, CascadeError>(Ranked { key: key.clone(), captions, timings })
        };
        work.await.map_err(|e| Failed::keyed(&key, e))
    }

    /// Generates candidates, scores the distinct ones and lists the best as `listing` asks; a
    /// deterministic request may be answered from the result cache.
    pub async fn caption(
        &self,
        source: ImageSource,
        params: ValidParams,
        listing: Listing,
        admission: Admission,
    ) -> Result<Captioned, Failed> {
        let start = Instant::now();
        if self.models.generator_processor().is_none() || self.models.ranker_processor().is_none() {
            return Err(CascadeError::from(EngineError::NotServed("generate and rank")).into());
        }
        let _admitted = self.admit()?;
        let image = self.resolver.name(source).await?;
        let key = image.key.clone();
        let work = async {
            let prompt = self.models.prompt(&params)?;
            let identity = Identity::of_params(params.get(), params.seed_origin());
            self.results
                .caption(&self.resolver, image, identity, listing, |image| {
                    self.caption_image(image, params, prompt, listing, admission, start)
                })
                .await
        };
        work.await.map_err(|e| Failed::keyed(&key, e))
    }

    async fn caption_image(
        &self,
        image: ImageInput,
        params: ValidParams,
        prompt: Prompt,
        listing: Listing,
        admission: Admission,
        start: Instant,
    ) -> Result<Captioned, CascadeError> {
        let (Some(generator), Some(ranker)) = (self.models.generator_processor(), self.models.ranker_processor())
        else {
            return Err(EngineError::NotServed("generate and rank").into());
        };
        let key = image.key().to_string();
        let (image, fetch) = self.prepared(&image).await?;
        let t = Instant::now();
        let (blip_px, clip_px) =
            (generator.normalize(prepared(&image.generator)?), ranker.normalize(prepared(&image.ranker)?));
        let preprocess = t.elapsed();
        let t = Instant::now();
        let generated =
            self.models.generate_candidates(GenerateInput { pixels: blip_px, params, prompt }, admission).await?;
        let generate = t.elapsed();
        let candidates: Vec<String> = generated.candidates.into_iter().map(|c| c.text).collect();
        let (distinct, counts, of) = distinct_with_counts(&candidates);
        // Generated text always tokenizes; a failure here is the server's, not the caller's.
        let tokens = self.models.tokenize(&distinct).map_err(|e| EngineError::Internal(e.to_string()))?;
        let t = Instant::now();
        let scores = self.models.score_captions(RankInput { pixels: clip_px, captions: tokens }, admission).await?;
        let captions = rank_candidates(&candidates, &distinct, &counts, &of, &scores.scores, listing);
        Ok(Captioned {
            key,
            captions,
            candidates,
            timings: Timings { fetch, preprocess, generate, rank: t.elapsed(), total: start.elapsed() },
        })
    }

    async fn rank_pixels(
        &self,
        pixels: Pixels,
        captions: Vec<String>,
        tokens: Vec<Vec<i64>>,
        admission: Admission,
    ) -> Result<Vec<RankedCaption>, CascadeError> {
        let out = self.models.score_captions(RankInput { pixels, captions: tokens }, admission).await?;
        let mut ranked: Vec<RankedCaption> = captions
            .into_iter()
            .zip(out.scores)
            .enumerate()
            .map(|(index, (text, s))| RankedCaption {
                text,
                probability: s.probability,
                cosine: s.cosine,
                logit: s.logit,
                index: index as u32,
                count: 0,
            })
            .collect();
        // Stable: equal probabilities keep their input order.
        ranked.sort_by(|a, b| b.probability.total_cmp(&a.probability));
        Ok(ranked)
    }

    /// What each model sees of the image, and the time spent getting its bytes. The same image
    /// is fetched, decoded and resized once. Bytes the result cache fetched are known by their
    /// digest, never by the URL: pixels kept under the URL may be an older version's.
    async fn prepared(&self, image: &ImageInput) -> Result<(Arc<PreparedImage>, Duration), CascadeError> {
        let start = Instant::now();
        let (cache_key, earlier) = match image {
            ImageInput::Named(named) => (named.cache_key(), Duration::ZERO),
            ImageInput::Content(content) => (CacheKey::Inline(content.digest), content.fetch),
        };
        let (image, lookup) = self
            .cache
            .get_or_load(&cache_key, || async {
                let bytes = match image {
                    ImageInput::Named(named) => self.resolver.bytes(named).await?,
                    ImageInput::Content(content) => content.bytes.clone(),
                };
                let (generator, ranker) =
                    (self.models.generator_processor().cloned(), self.models.ranker_processor().cloned());
                self.lanes
                    .decode(bytes, move |decoded| {
                        let prepare = |p: Option<ImageProcessor>| p.map(|p| p.prepare(&decoded)).transpose();
                        Ok(PreparedImage { generator: prepare(generator)?, ranker: prepare(ranker)? })
                    })
                    .await
            })
            .await?;
        if lookup == Lookup::Hit {
            metrics::counter!("caption_image_cache_hits_total").increment(1);
        }
        Ok((image, earlier + start.elapsed()))
    }
}

/// The pixels prepared for a model this process runs (prepared with the image, so always there).
fn prepared(image: &Option<RgbImage>) -> Result<&RgbImage, EngineError> {
    image.as_ref().ok_or_else(|| EngineError::Internal("the image was not prepared for this model".into()))
}

#[cfg(test)]
mod tests;
