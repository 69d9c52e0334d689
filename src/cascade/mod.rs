//! The captioning use cases behind the three services, usable in-process by the CLI too:
//! resolve the image once per key, preprocess it for each model off the async runtime, queue the
//! model work on the shared scheduler, and assemble ranked results with timings.

mod types;

pub use types::*;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::{
    backend::{BlipRunner, ClipRunner, GenerateInput, RankInput},
    engine::{Admission, EngineError, Scheduler},
    images::{
        cache::Lookup, decode_image, dimensions, CacheKey, DecodeError, DecodeLimits, Fetcher, ImageCache, ImageError,
    },
    models::{
        generation::{GenerationLimits, GenerationParams, InvalidParam},
        preprocess::Pixels,
    },
};

pub type ModelScheduler = Scheduler<BlipRunner, ClipRunner>;

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

pub struct Cascade {
    scheduler: ModelScheduler,
    blip: Arc<BlipRunner>,
    clip: Arc<ClipRunner>,
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
}

impl Cascade {
    pub fn new(
        scheduler: ModelScheduler,
        blip: Arc<BlipRunner>,
        clip: Arc<ClipRunner>,
        fetcher: Fetcher,
        cache: ImageCache<PreparedImage>,
        limits: RequestLimits,
    ) -> Self {
        let mut limits = limits;
        // No request may outgrow the decoder's position table.
        limits.generation.max_length = limits.generation.max_length.min(blip.max_positions());
        let inflight = Semaphore::new(limits.max_inflight.max(1));
        let decode_slots = Semaphore::new(limits.max_concurrent_decodes.max(1));
        let small_decode_slots = Semaphore::new(limits.max_concurrent_decodes.max(1));
        Self { scheduler, blip, clip, fetcher, cache, limits, decode_slots, small_decode_slots, inflight }
    }

    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    pub fn scheduler(&self) -> &ModelScheduler {
        &self.scheduler
    }

    pub fn blip(&self) -> &BlipRunner {
        &self.blip
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
        let _admitted = self.admit()?;
        params.validate(&self.limits.generation)?;
        let prompt = self.blip.prompt(&params)?;
        let (key, image, fetch) = self.resolve(&source).await?;
        let t = Instant::now();
        let pixels = self.blip.processor().normalize(&image.blip);
        let preprocess = t.elapsed();
        let t = Instant::now();
        let out = self.scheduler.generate(GenerateInput { pixels, params, prompt }, admission).await?;
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
        let _admitted = self.admit()?;
        self.check_captions(&captions)?;
        let tokens = self.clip.tokenize(&captions)?;
        let (key, image, fetch) = self.resolve(&source).await?;
        let t = Instant::now();
        let pixels = self.clip.processor().normalize(&image.clip);
        let preprocess = t.elapsed();
        let t = Instant::now();
        let captions = self.rank_pixels(pixels, captions, tokens, &[], admission).await?;
        Ok(Ranked {
            key,
            captions,
            timings: Timings { fetch, preprocess, generate: Duration::ZERO, rank: t.elapsed(), total: start.elapsed() },
        })
    }

    /// Generates candidates, ranks the distinct ones and keeps the best `top_k`.
    pub async fn caption(
        &self,
        source: ImageSource,
        params: GenerationParams,
        top_k: usize,
        admission: Admission,
    ) -> Result<Captioned, CascadeError> {
        let start = Instant::now();
        let _admitted = self.admit()?;
        params.validate(&self.limits.generation)?;
        if top_k == 0 {
            return Err(InvalidParam { field: "top_k", reason: "must be at least 1".into() }.into());
        }
        let prompt = self.blip.prompt(&params)?;
        let (key, image, fetch) = self.resolve(&source).await?;
        let t = Instant::now();
        let (blip_px, clip_px) =
            (self.blip.processor().normalize(&image.blip), self.clip.processor().normalize(&image.clip));
        let preprocess = t.elapsed();
        let t = Instant::now();
        let generated = self.scheduler.generate(GenerateInput { pixels: blip_px, params, prompt }, admission).await?;
        let generate = t.elapsed();
        let candidates: Vec<String> = generated.candidates.into_iter().map(|c| c.text).collect();
        let (distinct, counts) = distinct_with_counts(&candidates);
        // Generated text always tokenizes; a failure here is the server's, not the caller's.
        let tokens = self.clip.tokenize(&distinct).map_err(|e| EngineError::Internal(e.to_string()))?;
        let t = Instant::now();
        let mut ranked = self.rank_pixels(clip_px, distinct, tokens, &counts, admission).await?;
        ranked.truncate(top_k);
        Ok(Captioned {
            key,
            captions: ranked,
            candidates,
            timings: Timings { fetch, preprocess, generate, rank: t.elapsed(), total: start.elapsed() },
        })
    }

    async fn rank_pixels(
        &self,
        pixels: Pixels,
        captions: Vec<String>,
        tokens: Vec<Vec<i64>>,
        counts: &[u32],
        admission: Admission,
    ) -> Result<Vec<RankedCaption>, CascadeError> {
        let out = self.scheduler.rank(RankInput { pixels, captions: tokens }, admission).await?;
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
                count: counts.get(index).copied().unwrap_or(0),
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
    /// a fetchable URL never reaches the cache.
    async fn resolve(&self, source: &ImageSource) -> Result<(String, Arc<PreparedImage>, Duration), CascadeError> {
        let start = Instant::now();
        let (key, cache_key) = match source {
            ImageSource::Url(url) => {
                if url.is_empty() {
                    return Err(InvalidParam { field: "image.url", reason: "is empty".into() }.into());
                }
                self.fetcher.check_url(url)?;
                (url.clone(), CacheKey::Url(url.clone()))
            }
            ImageSource::Bytes(data) => {
                self.fetcher.check_inline(data)?;
                // Hashing 20 MB takes tens of milliseconds: not on an async worker thread.
                let bytes = data.clone();
                let digest: [u8; 32] = tokio::task::spawn_blocking(move || Sha256::digest(bytes.as_slice()).into())
                    .await
                    .map_err(|e| EngineError::Internal(format!("hashing task failed: {e}")))?;
                (format!("sha256:{}", hex(&digest)), CacheKey::Inline(digest))
            }
        };
        let (image, lookup) = self
            .cache
            .get_or_load(&cache_key, || async {
                let bytes = match source {
                    ImageSource::Url(url) => {
                        let fetched = self.fetcher.fetch(url).await;
                        let outcome = if fetched.is_ok() { "ok" } else { "error" };
                        metrics::counter!("caption_images_fetched_total", "outcome" => outcome).increment(1);
                        Arc::new(fetched?)
                    }
                    ImageSource::Bytes(data) => data.clone(),
                };
                // Small images decode in a lane of their own, so a few huge ones cannot hold up
                // normal traffic. Reading the header costs microseconds.
                let small = dimensions(&bytes).is_ok_and(|(w, h)| u64::from(w) * u64::from(h) <= SMALL_IMAGE_PIXELS);
                let lane = if small { &self.small_decode_slots } else { &self.decode_slots };
                let _slot = lane.acquire().await.expect("semaphore never closed");
                let limits = self.limits.decode;
                let (blip, clip) = (self.blip.processor().clone(), self.clip.processor().clone());
                tokio::task::spawn_blocking(move || {
                    let decoded = decode_image(bytes.as_slice(), &limits)?;
                    drop(bytes);
                    Ok(PreparedImage { blip: blip.prepare(&decoded)?, clip: clip.prepare(&decoded)? })
                })
                .await
                // Only the input can have made the decoder fail this way.
                .map_err(|e| ImageError::Decode(DecodeError::Corrupt(format!("the decoder failed: {e}"))))?
            })
            .await?;
        if lookup == Lookup::Hit {
            metrics::counter!("caption_image_cache_hits_total").increment(1);
        }
        Ok((key, image, start.elapsed()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Distinct captions in first-seen order, with how often each occurred.
pub fn distinct_with_counts(candidates: &[String]) -> (Vec<String>, Vec<u32>) {
    let mut distinct: Vec<String> = Vec::new();
    let mut counts: Vec<u32> = Vec::new();
    for c in candidates {
        match distinct.iter().position(|d| d == c) {
            Some(i) => counts[i] += 1,
            None => {
                distinct.push(c.clone());
                counts.push(1);
            }
        }
    }
    (distinct, counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_keeps_first_seen_order_and_counts() {
        let c: Vec<String> = ["b", "a", "b", "c", "b"].iter().map(|s| s.to_string()).collect();
        let (d, n) = distinct_with_counts(&c);
        assert_eq!(d, ["b", "a", "c"]);
        assert_eq!(n, [3, 1, 1]);
    }
}
