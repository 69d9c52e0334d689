//! The result cache of `Cascade.Caption` (each `CaptionStream` item goes through it too), shared
//! by the in-process cascade and the split tier's chain. It owns which requests it may answer
//! (deterministic ones), their key (the image's content and every parameter that changes the
//! answer), the store (bounded in bytes, least recently used out, answers older than the time to
//! live never served), each URL's validators so that a changed image is never answered from it,
//! and its metrics.
//!
//! A URL is never trusted for its content: every request learns the image's current bytes, or
//! that they did not change. When an answer is kept for the content last seen at a URL and the
//! origin described that content with validators (a strong ETag, a Last-Modified), the request
//! asks with a conditional GET: 304 is answered from the cache, a 200 brings new bytes, which are
//! keyed by their digest and, on a miss, computed from. Without validators the image is fetched
//! in full every time and keyed by its digest.

use std::{
    future::Future,
    mem::size_of,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use metrics::{counter, gauge};

mod identity;
use identity::{result_key, Key};
pub use identity::{Field, Identity};

use super::{
    image::{digest, Fetch, NamedImage, Origin, Resolver},
    Captioned, CascadeError, RankedCaption, Timings,
};
use crate::{
    images::Validators,
    lru::{self, Loaded, Meter, SingleFlight, Store},
    validate::Listing,
};

/// How much the result cache keeps, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultCacheConfig {
    /// Bytes of answers (and of the URLs' validators) kept; 0 turns the cache off.
    pub capacity_bytes: usize,
    /// Age from which an answer is never served; zero turns the cache off.
    pub ttl: Duration,
}

impl ResultCacheConfig {
    pub const OFF: Self = Self { capacity_bytes: 0, ttl: Duration::ZERO };
}

/// The image a Caption computation starts from.
#[derive(Debug)]
pub enum ImageInput {
    /// Not through the result cache: the image as the request named it.
    Named(NamedImage),
    /// The image's current bytes, as the result cache was given or fetched them.
    Content(Content),
}

impl ImageInput {
    /// The request's correlation key.
    pub fn key(&self) -> &str {
        match self {
            ImageInput::Named(named) => &named.key,
            ImageInput::Content(content) => &content.key,
        }
    }
}

#[derive(Debug)]
pub struct Content {
    /// The request's correlation key (its URL, or `sha256:<hex>` of its bytes).
    pub key: String,
    pub bytes: Arc<Vec<u8>>,
    /// SHA-256 of `bytes`.
    pub digest: Key,
    /// Time spent fetching (or revalidating) and hashing them.
    pub fetch: Duration,
}

/// What is kept of an answer: everything a Caption response carries except the key and the
/// timings, which belong to each call.
#[derive(Debug)]
struct Answer {
    captions: Vec<RankedCaption>,
    candidates: Vec<String>,
}

/// Bookkeeping bytes per kept item beyond its own fields and what the store counts for itself:
/// its hash-map slot and its nodes in the recency (and age) indexes, estimated.
const INDEX_OVERHEAD: usize = 64;

impl Answer {
    fn of(out: &Captioned) -> Self {
        Self { captions: out.captions.clone(), candidates: out.candidates.clone() }
    }

    /// Bytes the kept answer's strings and the structs around them hold.
    fn bytes(&self) -> usize {
        let captions: usize = self.captions.iter().map(|c| size_of::<RankedCaption>() + c.text.len()).sum();
        let candidates: usize = self.candidates.iter().map(|c| size_of::<String>() + c.len()).sum();
        captions + candidates + size_of::<Self>()
    }

    fn answer(&self, key: String, timings: Timings) -> Captioned {
        Captioned { key, captions: self.captions.clone(), candidates: self.candidates.clone(), timings }
    }
}

/// What the origin said of the content last fetched from a URL.
#[derive(Clone)]
struct Known {
    validators: Validators,
    /// SHA-256 of the bytes that came with `validators`.
    digest: Key,
}

/// What the store keeps an item under: answers and URLs share one byte budget and one recency
/// order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Held {
    Answer(Key),
    Url(Arc<str>),
}

#[derive(Clone)]
enum Item {
    Answer(Arc<Answer>),
    Url(Known),
}

/// Weighs the kept items, counts the answers among them and publishes both.
#[derive(Default)]
struct Tally {
    answers: AtomicUsize,
}

impl Meter<Held, Item> for Tally {
    /// An item's own bytes (for a URL, its string too), the store's record of it and the
    /// indexes' share.
    fn weigh(&self, key: &Held, item: &Item) -> usize {
        let own = match item {
            Item::Answer(answer) => answer.bytes(),
            Item::Url(known) => known.validators.bytes() + size_of::<Known>(),
        };
        let url = match key {
            Held::Url(url) => url.len(),
            Held::Answer(_) => 0,
        };
        own + url + lru::bookkeeping::<Held, Item>() + INDEX_OVERHEAD
    }

    fn added(&self, key: &Held, _item: &Item) {
        if let Held::Answer(_) = key {
            self.answers.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn removed(&self, key: &Held, _item: &Item, _why: lru::Removal) {
        if let Held::Answer(_) = key {
            self.answers.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn settled(&self, bytes: usize, _len: usize) {
        gauge!("caption_result_cache_bytes").set(bytes as f64);
        gauge!("caption_result_cache_entries").set(self.answers.load(Ordering::Relaxed) as f64);
    }
}

/// Caption answers by image content and request identity, with each URL's validators, in one
/// [`Store`]. Concurrent identical misses are coalesced (see [`ResultCache::caption`]).
pub struct ResultCache {
    config: ResultCacheConfig,
    kept: Store<Held, Item, Tally>,
    /// Computations in progress, which identical requests join.
    computing: SingleFlight<Key, Arc<Answer>>,
}

impl ResultCache {
    pub fn new(config: ResultCacheConfig) -> Self {
        Self { config, kept: Store::new(config.capacity_bytes, Tally::default()), computing: SingleFlight::new() }
    }

    pub fn off() -> Self {
        Self::new(ResultCacheConfig::OFF)
    }

    pub fn enabled(&self) -> bool {
        self.config.capacity_bytes > 0 && !self.config.ttl.is_zero()
    }

    /// Bytes held (answers and URLs' validators).
    pub fn bytes(&self) -> usize {
        self.kept.bytes()
    }

    /// Answers held, expired ones included until they are next looked at.
    pub fn len(&self) -> usize {
        self.kept.meter().answers.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A Caption call through the cache: `compute` is called with the image to caption when the
    /// answer is not kept — with the bytes this call fetched or was given when the request is
    /// cacheable (so it never sees pixels cached under a URL for an older version), with the
    /// image as named otherwise. `identity` is `None` for a request that is not deterministic.
    /// Concurrent identical misses compute once.
    pub async fn caption<F, Fut>(
        &self,
        resolver: &Resolver,
        image: NamedImage,
        identity: Option<Identity>,
        listing: Listing,
        compute: F,
    ) -> Result<Captioned, CascadeError>
    where
        F: FnOnce(ImageInput) -> Fut,
        Fut: Future<Output = Result<Captioned, CascadeError>>,
    {
        if !self.enabled() {
            return compute(ImageInput::Named(image)).await;
        }
        let Some(identity) = identity else {
            counter!("caption_result_cache_bypassed_total").increment(1);
            return compute(ImageInput::Named(image)).await;
        };
        let start = Instant::now();
        let identity = identity.with_listing(listing);
        let current = match &image.origin {
            Origin::Inline { bytes, digest } => Current::Bytes { bytes: bytes.clone(), digest: *digest },
            Origin::Url(_) => self.current(resolver, &image, &identity).await?,
        };
        let key = image.key;
        let (bytes, digest) = match current {
            Current::Answered(answer) => return Ok(hit(&answer, key, start)),
            Current::Bytes { bytes, digest } => (bytes, digest),
        };
        let result_key = result_key(&digest, &identity);
        if let Some(answer) = self.answer(&result_key) {
            return Ok(hit(&answer, key, start));
        }
        let content = Content { key: key.clone(), bytes, digest, fetch: start.elapsed() };
        self.compute(result_key, key, compute(ImageInput::Content(content)), start).await
    }

    /// The answer kept for the URL's unchanged content, or its current bytes.
    async fn current(
        &self,
        resolver: &Resolver,
        image: &NamedImage,
        identity: &Identity,
    ) -> Result<Current, CascadeError> {
        let url = image.key.as_str();
        let known = self.known(url);
        let Some((validators, digest)) = known else {
            revalidated("no_validator");
            return self.fetch(resolver, image).await;
        };
        let key = result_key(&digest, identity);
        // Revalidating pays only when an answer is kept for that content; otherwise the bytes are
        // needed anyway, and a plain GET brings them in one request.
        if !self.kept.contains(&Held::Answer(key)) {
            return self.fetch(resolver, image).await;
        }
        match resolver.fetch_if_changed(image, &validators).await {
            Ok(Fetch::NotModified { final_url }) if final_url == validators.final_url => {
                revalidated("not_modified");
                if let Some(answer) = self.answer(&key) {
                    return Ok(Current::Answered(answer));
                }
                // The answer left the cache meanwhile (evicted, expired): fetch the bytes.
                self.fetch(resolver, image).await
            }
            // Redirects now lead elsewhere: the validators described another resource.
            Ok(Fetch::NotModified { .. }) => {
                revalidated("changed");
                self.fetch(resolver, image).await
            }
            Ok(Fetch::Bytes { bytes, validators }) => {
                revalidated("changed");
                self.take(url, bytes, validators).await
            }
            Err(e) => {
                self.forget(url);
                Err(e.into())
            }
        }
    }

    /// The URL's current bytes, fetched in full.
    async fn fetch(&self, resolver: &Resolver, image: &NamedImage) -> Result<Current, CascadeError> {
        match resolver.fetch(image).await {
            Ok((bytes, validators)) => self.take(&image.key, bytes, validators).await,
            Err(e) => {
                self.forget(&image.key);
                Err(e.into())
            }
        }
    }

    /// Fetched bytes, hashed; their validators are remembered for `url` (or, if the origin gave
    /// none, whatever was known of it is forgotten).
    async fn take(
        &self,
        url: &str,
        bytes: Arc<Vec<u8>>,
        validators: Option<Validators>,
    ) -> Result<Current, CascadeError> {
        let digest = digest(&bytes).await?;
        match validators {
            Some(validators) => self.remember(url, validators, digest),
            None => self.forget(url),
        }
        Ok(Current::Bytes { bytes, digest })
    }

    /// Computes the answer under `key`, coalescing concurrent identical misses: the first call
    /// computes, the others wait for its answer (and count as hits, under their own correlation
    /// keys); if it fails or its caller goes away, a waiting call computes in its place. Only a
    /// success is kept.
    /// `work` is the computation over this call's content; it is dropped unpolled when the call
    /// joins another's.
    async fn compute(
        &self,
        key: Key,
        correlation: String,
        work: impl Future<Output = Result<Captioned, CascadeError>>,
        start: Instant,
    ) -> Result<Captioned, CascadeError> {
        let loaded = self
            .computing
            .get_or_load(&key, || async {
                // An identical computation may have finished since the caller looked.
                if let Some(answer) = self.answer(&key) {
                    return Ok::<_, CascadeError>((answer, None));
                }
                let out = work.await;
                counter!("caption_result_cache_misses_total").increment(1);
                let out = out?;
                let answer = Arc::new(Answer::of(&out));
                // A time to live past what an `Instant` can hold never ends.
                let expires = Instant::now().checked_add(self.config.ttl);
                self.kept.insert(Held::Answer(key), Item::Answer(answer.clone()), expires);
                Ok((answer, Some(out)))
            })
            .await?;
        match loaded {
            Loaded::Own(_, Some(out)) => Ok(out),
            // Another call's computation, joined, or its answer, kept meanwhile.
            Loaded::Own(answer, None) | Loaded::Shared(answer) => Ok(hit(&answer, correlation, start)),
        }
    }

    /// The unexpired answer under `key`, marked as just used.
    fn answer(&self, key: &Key) -> Option<Arc<Answer>> {
        match self.kept.get(&Held::Answer(*key))? {
            Item::Answer(answer) => Some(answer),
            Item::Url(_) => None,
        }
    }

    /// What is known of `url`'s content, marked as just used.
    fn known(&self, url: &str) -> Option<(Validators, Key)> {
        match self.kept.get(&Held::Url(url.into()))? {
            Item::Url(known) => Some((known.validators, known.digest)),
            Item::Answer(_) => None,
        }
    }

    fn remember(&self, url: &str, validators: Validators, digest: Key) {
        self.kept.insert(Held::Url(url.into()), Item::Url(Known { validators, digest }), None);
    }

    fn forget(&self, url: &str) {
        self.kept.remove(&Held::Url(url.into()));
    }
}

/// What a request learned about its image.
enum Current {
    /// The answer kept for the image's content, which the origin said is unchanged.
    Answered(Arc<Answer>),
    /// The image's bytes as they are now.
    Bytes { bytes: Arc<Vec<u8>>, digest: Key },
}

/// A kept answer, under the call's own correlation key, with timings that say it was not
/// computed: no preprocessing, generation or ranking; `fetch` is the time spent learning the
/// image's content (revalidating, fetching, hashing).
fn hit(answer: &Answer, key: String, start: Instant) -> Captioned {
    counter!("caption_result_cache_hits_total").increment(1);
    let elapsed = start.elapsed();
    answer.answer(key, Timings { fetch: elapsed, total: elapsed, ..Timings::default() })
}

fn revalidated(outcome: &'static str) {
    counter!("caption_result_cache_revalidations_total", "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests;
