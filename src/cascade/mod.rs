//! The captioning use cases behind the three services, usable in-process by the CLI too:
//! validate the request, resolve the image once per key, preprocess it for each model off the
//! async runtime, call the models through [`Models`] (in-process: the shared scheduler), and
//! assemble ranked results with timings. Caption answers of deterministic requests may come from
//! the [`ResultCache`].

mod chain;
mod listing;
mod models;
mod result_cache;
mod types;

pub use chain::{Chain, UpstreamCall, Upstreams};
use listing::distinct_with_counts;
pub use listing::Listing;
pub use models::{LocalModels, ModelScheduler, Models};
pub use result_cache::{Content, Field, Identity, ImageInput, ResultCache, ResultCacheConfig, SeedOrigin};
pub use types::*;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::{
    backend::{GenerateInput, Prompt, RankInput},
    engine::{Admission, EngineError},
    images::{
        cache::Lookup, decode_image, dimensions, CacheKey, DecodeError, DecodeLimits, Fetcher, ImageCache, ImageError,
        RgbImage,
    },
    models::{
        generation::{GenerationLimits, GenerationParams, InvalidParam},
        preprocess::{ImageProcessor, Pixels},
    },
};

/// Images up to this many pixels (a 2560 × 1600 photo) decode in their own lane.
pub const SMALL_IMAGE_PIXELS: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CascadeError {
    #[error(transparent)]
    Invalid(#[from] InvalidParam),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// What another process serving a model answered (its gRPC status code and message).
    #[error("{message}")]
    Upstream { code: i32, message: String },
}

/// Bounds on what one request may ask for.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub generation: GenerationLimits,
    /// Most captions one Rank request may carry.
    pub max_captions: usize,
    /// Longest caption accepted by Rank, in bytes.
    pub max_caption_bytes: usize,
    /// Calls admitted at once (fetching, decoding, queued or computing); beyond it calls are
    /// refused with RESOURCE_EXHAUSTED, so memory stays bounded under any load.
    pub max_inflight: usize,
    /// Bounds on each image decode.
    pub decode: DecodeLimits,
    /// Decodes (and resizes) running at once in each of two lanes, images up to
    /// [`SMALL_IMAGE_PIXELS`] and larger ones; each may hold a full-resolution image.
    pub max_concurrent_decodes: usize,
}

pub struct Cascade<M: Models = LocalModels> {
    models: M,
    fetcher: Fetcher,
    cache: ImageCache<PreparedImage>,
    limits: RequestLimits,
    /// Bounds decodes (with their resizes) of images over [`SMALL_IMAGE_PIXELS`] running at once
    /// on the blocking pool, and so the full-resolution images alive at once.
    decode_slots: Semaphore,
    /// The same for smaller images (as many slots).
    small_decode_slots: Semaphore,
    /// Admission slots; see [`RequestLimits::max_inflight`].
    inflight: Semaphore,
    /// Caption answers of deterministic requests (off unless set).
    results: ResultCache,
}

impl<M: Models> Cascade<M> {
    pub fn new(models: M, fetcher: Fetcher, cache: ImageCache<PreparedImage>, limits: RequestLimits) -> Self {
        let mut limits = limits;
        // No request may outgrow the decoder's position table.
        limits.generation.max_length = limits.generation.max_length.min(models.max_positions());
        let inflight = Semaphore::new(limits.max_inflight.max(1));
        let decode_slots = Semaphore::new(limits.max_concurrent_decodes.max(1));
        let small_decode_slots = Semaphore::new(limits.max_concurrent_decodes.max(1));
        let results = ResultCache::off();
        Self { models, fetcher, cache, limits, decode_slots, small_decode_slots, inflight, results }
    }

    /// The cascade with a result cache for its Caption answers.
    pub fn with_result_cache(mut self, config: ResultCacheConfig) -> Self {
        self.results = ResultCache::new(config);
        self
    }

    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    pub fn models(&self) -> &M {
        &self.models
    }

    /// Generation defaults with `max_length` fitted to the loaded model.
    pub fn default_params(&self) -> GenerationParams {
        let mut p = GenerationParams::default();
        p.max_length = p.max_length.min(self.limits.generation.max_length);
        p
    }

    fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, CascadeError> {
        self.inflight.try_acquire().map_err(|_| EngineError::Overloaded("server").into())
    }

    pub async fn generate(
        &self,
        source: ImageSource,
        params: GenerationParams,
        admission: Admission,
    ) -> Result<Generated, CascadeError> {
        let start = Instant::now();
        let processor = self.models.generator_processor().ok_or(EngineError::NotServed("generate"))?;
        let _admitted = self.admit()?;
        params.validate(&self.limits.generation)?;
        let prompt = self.models.prompt(&params)?;
        let (key, image, fetch) = self.resolve(&ImageInput::Source(source)).await?;
        let t = Instant::now();
        let pixels = processor.normalize(prepared(&image.generator)?);
        let preprocess = t.elapsed();
        let t = Instant::now();
        let out = self.models.generate_candidates(GenerateInput { pixels, params, prompt }, admission).await?;
        let generate = t.elapsed();
        Ok(Generated {
            key,
            candidates: out.candidates,
            timings: Timings { fetch, preprocess, generate, rank: Duration::ZERO, total: start.elapsed() },
        })
    }

    pub async fn rank(
        &self,
        source: ImageSource,
        captions: Vec<String>,
        admission: Admission,
    ) -> Result<Ranked, CascadeError> {
        let start = Instant::now();
        let processor = self.models.ranker_processor().ok_or(EngineError::NotServed("rank"))?;
        let _admitted = self.admit()?;
        self.check_captions(&captions)?;
        let tokens = self.models.tokenize(&captions)?;
        let (key, image, fetch) = self.resolve(&ImageInput::Source(source)).await?;
        let t = Instant::now();
        let pixels = processor.normalize(prepared(&image.ranker)?);
        let preprocess = t.elapsed();
        let t = Instant::now();
        let captions = self.rank_pixels(pixels, captions, tokens, admission).await?;
        Ok(Ranked {
            key,
            captions,
            timings: Timings { fetch, preprocess, generate: Duration::ZERO, rank: t.elapsed(), total: start.elapsed() },
        })
    }

    /// Generates candidates, scores the distinct ones and lists the best as `listing` asks; a
    /// deterministic request (`seed` says who chose the seed) may be answered from the result
    /// cache.
    pub async fn caption(
        &self,
        source: ImageSource,
        params: GenerationParams,
        seed: SeedOrigin,
        listing: Listing,
        admission: Admission,
    ) -> Result<Captioned, CascadeError> {
        let start = Instant::now();
        if self.models.generator_processor().is_none() || self.models.ranker_processor().is_none() {
            return Err(EngineError::NotServed("generate and rank").into());
        }
        let _admitted = self.admit()?;
        params.validate(&self.limits.generation)?;
        if listing.top_k == 0 {
            return Err(InvalidParam { field: "top_k", reason: "must be at least 1".into() }.into());
        }
        let prompt = self.models.prompt(&params)?;
        let identity = Identity::of_params(&params, seed);
        self.results
            .caption(&self.fetcher, source, identity, listing, |image| {
                self.caption_image(image, params, prompt, listing, admission, start)
            })
            .await
    }

    async fn caption_image(
        &self,
        image: ImageInput,
        params: GenerationParams,
        prompt: Prompt,
        listing: Listing,
        admission: Admission,
        start: Instant,
    ) -> Result<Captioned, CascadeError> {
        let (Some(generator), Some(ranker)) = (self.models.generator_processor(), self.models.ranker_processor())
        else {
            return Err(EngineError::NotServed("generate and rank").into());
        };
        let (key, image, fetch) = self.resolve(&image).await?;
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
        let captions = listing::rank_candidates(&candidates, &distinct, &counts, &of, &scores.scores, listing);
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

    fn check_captions(&self, captions: &[String]) -> Result<(), InvalidParam> {
        let max = self.limits.max_captions;
        if captions.is_empty() || captions.len() > max {
            return Err(InvalidParam {
                field: "captions",
                reason: format!("give 1..={max} captions, got {}", captions.len()),
            });
        }
        if let Some((i, c)) = captions.iter().enumerate().find(|(_, c)| c.len() > self.limits.max_caption_bytes) {
            return Err(InvalidParam {
                field: "captions",
                reason: format!(
                    "caption {i} is {} bytes, over the limit of {}",
                    c.len(),
                    self.limits.max_caption_bytes
                ),
            });
        }
        Ok(())
    }

    /// The image's correlation key and what each model sees of it; the same image is fetched,
    /// decoded and resized once. The URL is checked before any lookup, so a string that is not
    /// a fetchable URL never reaches the cache. The bytes the result cache fetched are known by
    /// their digest, never by the URL: pixels kept under the URL may be an older version's.
    async fn resolve(&self, image: &ImageInput) -> Result<(String, Arc<PreparedImage>, Duration), CascadeError> {
        let start = Instant::now();
        let (key, cache_key, earlier) = match image {
            ImageInput::Source(ImageSource::Url(url)) => {
                check_url(&self.fetcher, url)?;
                (url.clone(), CacheKey::Url(url.clone()), Duration::ZERO)
            }
            ImageInput::Source(ImageSource::Bytes(data)) => {
                self.fetcher.check_inline(data)?;
                let digest = digest(data).await?;
                (inline_key(&digest), CacheKey::Inline(digest), Duration::ZERO)
            }
            ImageInput::Content(content) => (content.key.clone(), CacheKey::Inline(content.digest), content.fetch),
        };
        let (image, lookup) = self
            .cache
            .get_or_load(&cache_key, || async {
                let bytes = match image {
                    ImageInput::Source(ImageSource::Url(url)) => {
                        let fetched = self.fetcher.fetch(url).await;
                        let outcome = if fetched.is_ok() { "ok" } else { "error" };
                        metrics::counter!("caption_images_fetched_total", "outcome" => outcome).increment(1);
                        Arc::new(fetched?)
                    }
                    ImageInput::Source(ImageSource::Bytes(data)) => data.clone(),
                    ImageInput::Content(content) => content.bytes.clone(),
                };
                // Small images decode in a lane of their own, so a few huge ones cannot hold up
                // normal traffic. Reading the header costs microseconds.
                let small = dimensions(&bytes, &self.limits.decode)
                    .is_ok_and(|(w, h)| u64::from(w) * u64::from(h) <= SMALL_IMAGE_PIXELS);
                let lane = if small { &self.small_decode_slots } else { &self.decode_slots };
                let _slot = lane.acquire().await.expect("semaphore never closed");
                let limits = self.limits.decode;
                let (generator, ranker) =
                    (self.models.generator_processor().cloned(), self.models.ranker_processor().cloned());
                tokio::task::spawn_blocking(move || {
                    let decoded = decode_image(bytes.as_slice(), &limits)?;
                    drop(bytes);
                    let prepare = |p: Option<ImageProcessor>| p.map(|p| p.prepare(&decoded)).transpose();
                    Ok(PreparedImage { generator: prepare(generator)?, ranker: prepare(ranker)? })
                })
                .await
                // Only the input can have made the decoder fail this way.
                .map_err(|e| ImageError::Decode(DecodeError::Corrupt(format!("the decoder failed: {e}"))))?
            })
            .await?;
        if lookup == Lookup::Hit {
            metrics::counter!("caption_image_cache_hits_total").increment(1);
        }
        Ok((key, image, earlier + start.elapsed()))
    }
}

/// Checks an image URL names something this server may fetch, before any lookup.
fn check_url(fetcher: &Fetcher, url: &str) -> Result<(), CascadeError> {
    if url.is_empty() {
        return Err(InvalidParam { field: "image.url", reason: "is empty".into() }.into());
    }
    fetcher.check_url(url)?;
    Ok(())
}

/// The pixels prepared for a model this process runs (prepared with the image, so always there).
fn prepared(image: &Option<RgbImage>) -> Result<&RgbImage, EngineError> {
    image.as_ref().ok_or_else(|| EngineError::Internal("the image was not prepared for this model".into()))
}

/// The correlation key of an image: its URL, or `sha256:<hex>` of its bytes.
pub async fn key_of(source: &ImageSource) -> Result<String, EngineError> {
    match source {
        ImageSource::Url(url) => Ok(url.clone()),
        ImageSource::Bytes(data) => Ok(inline_key(&digest(data).await?)),
    }
}

/// SHA-256 of inline bytes; hashing 20 MB takes tens of milliseconds, so not on an async worker.
async fn digest(data: &Arc<Vec<u8>>) -> Result<[u8; 32], EngineError> {
    let bytes = data.clone();
    tokio::task::spawn_blocking(move || Sha256::digest(bytes.as_slice()).into())
        .await
        .map_err(|e| EngineError::Internal(format!("hashing task failed: {e}")))
}

fn inline_key(digest: &[u8; 32]) -> String {
    let mut key = String::with_capacity(7 + 64);
    key.push_str("sha256:");
    for b in digest {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::{
        backend::{GenerateOutput, GeneratedCaption, Prompt, RankOutput, RankScore},
        images::FetchLimits,
        models::{generation::GenerationLimits, preprocess::ImageProcessor},
    };

    /// Models that generate fixed candidates and score a caption by its length, counting calls.
    struct FakeModels {
        processor: ImageProcessor,
        candidates: Vec<&'static str>,
        calls: AtomicUsize,
    }

    impl Models for FakeModels {
        fn generator_processor(&self) -> Option<&ImageProcessor> {
            Some(&self.processor)
        }
        fn ranker_processor(&self) -> Option<&ImageProcessor> {
            Some(&self.processor)
        }
        fn max_positions(&self) -> u32 {
            20
        }
        fn prompt(&self, params: &GenerationParams) -> Result<Prompt, InvalidParam> {
            match params.prompt.as_deref() {
                Some("bad") => Err(InvalidParam { field: "prompt", reason: "refused".into() }),
                _ => Ok(Prompt { prefix: vec![1], strip: None }),
            }
        }
        fn tokenize(&self, captions: &[String]) -> Result<Vec<Vec<i64>>, InvalidParam> {
            Ok(captions.iter().map(|c| vec![c.len() as i64]).collect())
        }
        async fn generate_candidates(&self, _: GenerateInput, _: Admission) -> Result<GenerateOutput, EngineError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let caption = |t: &&str| GeneratedCaption { text: t.to_string(), token_ids: vec![] };
            Ok(GenerateOutput { candidates: self.candidates.iter().map(caption).collect() })
        }
        async fn score_captions(&self, input: RankInput, _: Admission) -> Result<RankOutput, EngineError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let total: i64 = input.captions.iter().map(|t| t[0]).sum();
            let score = |t: &Vec<i64>| RankScore {
                probability: t[0] as f32 / total as f32,
                cosine: 0.0,
                logit: (t[0] as f32).ln(),
            };
            Ok(RankOutput { scores: input.captions.iter().map(score).collect() })
        }
    }

    fn cascade(candidates: Vec<&'static str>) -> Cascade<FakeModels> {
        let processor = ImageProcessor::from_json(
            r#"{"size": {"height": 8, "width": 8}, "image_mean": [0.5,0.5,0.5], "image_std": [0.5,0.5,0.5]}"#,
        )
        .unwrap();
        let limits = RequestLimits {
            generation: GenerationLimits { max_candidates: 16, max_length: 40 },
            max_captions: 8,
            max_caption_bytes: 64,
            max_inflight: 4,
            decode: DecodeLimits::default(),
            max_concurrent_decodes: 1,
        };
        let models = FakeModels { processor, candidates, calls: AtomicUsize::new(0) };
        Cascade::new(models, Fetcher::new(FetchLimits::default()).unwrap(), ImageCache::new(1 << 20), limits)
    }

    fn png() -> ImageSource {
        let mut out = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(5, 4).write_to(&mut out, image::ImageFormat::Png).unwrap();
        ImageSource::Bytes(Arc::new(out.into_inner()))
    }

    #[tokio::test]
    async fn caption_merges_duplicates_ranks_them_and_keeps_the_top_k() {
        let c = cascade(vec!["a cat", "a dog sits", "a cat", "a"]);
        // The position limit of the models caps the request limit.
        assert_eq!(c.limits().generation.max_length, 20);
        let out = c
            .caption(png(), c.default_params(), SeedOrigin::Caller, Listing::merged(2), Admission::default())
            .await
            .unwrap();
        assert_eq!(out.candidates, ["a cat", "a dog sits", "a cat", "a"]);
        // Logits ln(len): over all four candidates, "a cat" has 5+5 of 5+10+5+1.
        let got: Vec<_> = out.captions.iter().map(|r| (r.text.as_str(), r.count, r.index)).collect();
        assert_eq!(got, [("a cat", 2, 0), ("a dog sits", 1, 1)]);
        assert!((out.captions[0].probability - 10.0 / 21.0).abs() < 1e-6);
        let each = Listing { top_k: 3, each_candidate: true };
        let out = c.caption(png(), c.default_params(), SeedOrigin::Caller, each, Admission::default()).await.unwrap();
        let got: Vec<_> = out.captions.iter().map(|r| (r.text.as_str(), r.count, r.index)).collect();
        assert_eq!(got, [("a dog sits", 1, 1), ("a cat", 1, 0), ("a cat", 1, 2)]);
        assert!(out.key.starts_with("sha256:"));
    }

    #[tokio::test]
    async fn invalid_requests_never_reach_the_models() {
        let c = cascade(vec!["x"]);
        let bad = GenerationParams { prompt: Some("bad".into()), ..c.default_params() };
        assert!(matches!(c.generate(png(), bad, Admission::default()).await, Err(CascadeError::Invalid(_))));
        let long = vec!["y".repeat(65)];
        assert!(matches!(c.rank(png(), long, Admission::default()).await, Err(CascadeError::Invalid(_))));
        let none =
            c.caption(png(), c.default_params(), SeedOrigin::Caller, Listing::merged(0), Admission::default()).await;
        assert!(matches!(none, Err(CascadeError::Invalid(_))));
        assert_eq!(c.models().calls.load(Ordering::SeqCst), 0);
    }
}
