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
    collections::{BTreeMap, HashMap},
    future::Future,
    mem::size_of,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use metrics::{counter, gauge};
use tokio::sync::OnceCell;

mod identity;
use identity::{result_key, Key};
pub use identity::{Field, Identity};

use super::{
    image::{digest, Fetch, NamedImage, Origin, Resolver},
    Captioned, CascadeError, RankedCaption, Timings,
};
use crate::{images::Validators, validate::Listing};

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

/// Bookkeeping bytes per kept item beyond its own fields: its hash-map slot and its nodes in the
/// recency (and age) indexes, estimated.
const INDEX_OVERHEAD: usize = 64;

impl Answer {
    fn of(out: &Captioned) -> Self {
        Self { captions: out.captions.clone(), candidates: out.candidates.clone() }
    }

    /// Bytes the kept answer holds: its strings, the structs around them, its key (in the map
    /// and the age index) and the indexes' share.
    fn bytes(&self) -> usize {
        let captions: usize = self.captions.iter().map(|c| size_of::<RankedCaption>() + c.text.len()).sum();
        let candidates: usize = self.candidates.iter().map(|c| size_of::<String>() + c.len()).sum();
        captions + candidates + size_of::<Self>() + size_of::<Entry>() + 2 * size_of::<Key>() + INDEX_OVERHEAD
    }

    fn answer(&self, key: String, timings: Timings) -> Captioned {
        Captioned { key, captions: self.captions.clone(), candidates: self.candidates.clone(), timings }
    }
}

struct Entry {
    answer: Arc<Answer>,
    bytes: usize,
    stored: Instant,
    /// Position in `State::recency`.
    tick: u64,
    /// Position in `State::by_age`.
    seq: u64,
}

/// What the origin said of the content last fetched from a URL.
struct Known {
    validators: Validators,
    /// SHA-256 of the bytes that came with `validators`.
    digest: Key,
    bytes: usize,
    tick: u64,
}

/// An item of the recency order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    Answer(Key),
    Url(Arc<str>),
}

type Slot = Arc<OnceCell<Arc<Answer>>>;

#[derive(Default)]
struct State {
    answers: HashMap<Key, Entry>,
    urls: HashMap<Arc<str>, Known>,
    /// Computations in progress, which identical requests join.
    computing: HashMap<Key, Slot>,
    /// Answers and URLs by last use, oldest first.
    recency: BTreeMap<u64, Held>,
    /// Answers by when they were stored, oldest first: the order they expire in.
    by_age: BTreeMap<u64, Key>,
    next_tick: u64,
    bytes: usize,
}

/// Caption answers by image content and request identity, with each URL's validators. Its state
/// sits behind a std `Mutex` that no code holds across an `.await`. Concurrent identical misses
/// are coalesced (see [`ResultCache::caption`]).
pub struct ResultCache {
    config: ResultCacheConfig,
    state: Mutex<State>,
}

impl ResultCache {
    pub fn new(config: ResultCacheConfig) -> Self {
        Self { config, state: Mutex::default() }
    }

    pub fn off() -> Self {
        Self::new(ResultCacheConfig::OFF)
    }

    pub fn enabled(&self) -> bool {
        self.config.capacity_bytes > 0 && !self.config.ttl.is_zero()
    }

    /// Bytes held (answers and URLs' validators).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Answers held, expired ones included until they are next looked at.
    pub fn len(&self) -> usize {
        self.lock().answers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every statement that holds the lock leaves the state consistent; no lock is held
        // across an await.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
        if let Some(answer) = self.lock().lookup(&result_key, Instant::now(), self.config.ttl) {
            return Ok(hit(&answer, key, start));
        }
        let content = Content { key: key.clone(), bytes, digest, fetch: start.elapsed() };
        self.compute(result_key, content, compute, start).await
    }

    /// The answer kept for the URL's unchanged content, or its current bytes.
    async fn current(
        &self,
        resolver: &Resolver,
        image: &NamedImage,
        identity: &Identity,
    ) -> Result<Current, CascadeError> {
        let url = image.key.as_str();
        let known = self.lock().known(url);
        let Some((validators, digest)) = known else {
            revalidated("no_validator");
            return self.fetch(resolver, image).await;
        };
        let key = result_key(&digest, identity);
        // Revalidating pays only when an answer is kept for that content; otherwise the bytes are
        // needed anyway, and a plain GET brings them in one request.
        if !self.lock().holds(&key, Instant::now(), self.config.ttl) {
            return self.fetch(resolver, image).await;
        }
        match resolver.fetch_if_changed(image, &validators).await {
            Ok(Fetch::NotModified { final_url }) if final_url == validators.final_url => {
                revalidated("not_modified");
                if let Some(answer) = self.lock().lookup(&key, Instant::now(), self.config.ttl) {
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
                self.lock().forget_url(url);
                Err(e.into())
            }
        }
    }

    /// The URL's current bytes, fetched in full.
    async fn fetch(&self, resolver: &Resolver, image: &NamedImage) -> Result<Current, CascadeError> {
        match resolver.fetch(image).await {
            Ok((bytes, validators)) => self.take(&image.key, bytes, validators).await,
            Err(e) => {
                self.lock().forget_url(&image.key);
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
        let mut state = self.lock();
        match validators {
            Some(validators) => state.remember(url, validators, digest, self.config.capacity_bytes),
            None => state.forget_url(url),
        }
        Ok(Current::Bytes { bytes, digest })
    }

    /// Computes the answer under `key`, coalescing concurrent identical misses: the first call
    /// computes, the others wait for its answer (and count as hits, under their own correlation
    /// keys); if it fails or its caller goes away, a waiting call computes in its place. Only a
    /// success is kept.
    async fn compute<F, Fut>(
        &self,
        key: Key,
        content: Content,
        compute: F,
        start: Instant,
    ) -> Result<Captioned, CascadeError>
    where
        F: FnOnce(ImageInput) -> Fut,
        Fut: Future<Output = Result<Captioned, CascadeError>>,
    {
        let correlation = content.key.clone();
        let slot = self.lock().computing.entry(key).or_default().clone();
        let mut guard = ComputeGuard { cache: self, key, slot: &slot, armed: true };
        let (mut ran, mut computed) = (false, None::<Captioned>);
        let own = &mut computed;
        let result = slot
            .get_or_try_init(|| {
                ran = true;
                async move {
                    let out = compute(ImageInput::Content(content)).await?;
                    let answer = Arc::new(Answer::of(&out));
                    *own = Some(out);
                    Ok::<_, CascadeError>(answer)
                }
            })
            .await;
        guard.armed = false;
        if ran {
            counter!("caption_result_cache_misses_total").increment(1);
        }
        let answer = {
            let mut state = self.lock();
            state.forget_compute(&key, &slot);
            let answer = result?.clone();
            if computed.is_some() {
                state.insert(key, answer.clone(), Instant::now(), self.config);
            }
            answer
        };
        match computed {
            Some(out) => Ok(out),
            // Another call's computation, joined.
            None => Ok(hit(&answer, correlation, start)),
        }
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

impl State {
    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    /// Drops the answers that reached the time to live.
    fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some((&seq, &key)) = self.by_age.first_key_value() {
            match self.answers.get(&key) {
                Some(entry) if now.duration_since(entry.stored) < ttl => break,
                Some(_) => self.remove_answer(&key),
                None => {
                    self.by_age.remove(&seq);
                }
            }
        }
        self.publish();
    }

    /// Whether an answer younger than `ttl` is kept under `key` (its recency unchanged).
    fn holds(&mut self, key: &Key, now: Instant, ttl: Duration) -> bool {
        self.expire(now, ttl);
        self.answers.contains_key(key)
    }

    /// The answer under `key` if it is younger than `ttl`, marked as just used.
    fn lookup(&mut self, key: &Key, now: Instant, ttl: Duration) -> Option<Arc<Answer>> {
        self.expire(now, ttl);
        let tick = self.tick();
        let entry = self.answers.get_mut(key)?;
        self.recency.remove(&entry.tick);
        entry.tick = tick;
        self.recency.insert(tick, Held::Answer(*key));
        Some(entry.answer.clone())
    }

    fn insert(&mut self, key: Key, answer: Arc<Answer>, now: Instant, config: ResultCacheConfig) {
        self.expire(now, config.ttl);
        let bytes = answer.bytes();
        if bytes > config.capacity_bytes {
            return;
        }
        self.remove_answer(&key);
        let tick = self.tick();
        self.answers.insert(key, Entry { answer, bytes, stored: now, tick, seq: tick });
        self.recency.insert(tick, Held::Answer(key));
        self.by_age.insert(tick, key);
        self.bytes += bytes;
        self.make_room(config.capacity_bytes);
    }

    /// What is known of `url`'s content, marked as just used.
    fn known(&mut self, url: &str) -> Option<(Validators, Key)> {
        let held = self.urls.get_key_value(url)?.0.clone();
        let tick = self.tick();
        let known = self.urls.get_mut(url)?;
        self.recency.remove(&known.tick);
        known.tick = tick;
        self.recency.insert(tick, Held::Url(held));
        Some((known.validators.clone(), known.digest))
    }

    fn remember(&mut self, url: &str, validators: Validators, digest: Key, capacity: usize) {
        self.forget_url(url);
        let bytes = url.len() + validators.bytes() + size_of::<Known>() + size_of::<Held>() + INDEX_OVERHEAD;
        if bytes > capacity {
            return;
        }
        let url: Arc<str> = url.into();
        let tick = self.tick();
        self.urls.insert(url.clone(), Known { validators, digest, bytes, tick });
        self.recency.insert(tick, Held::Url(url));
        self.bytes += bytes;
        self.make_room(capacity);
    }

    fn forget_url(&mut self, url: &str) {
        if let Some(known) = self.urls.remove(url) {
            self.recency.remove(&known.tick);
            self.bytes -= known.bytes;
            self.publish();
        }
    }

    fn remove_answer(&mut self, key: &Key) {
        if let Some(entry) = self.answers.remove(key) {
            self.recency.remove(&entry.tick);
            self.by_age.remove(&entry.seq);
            self.bytes -= entry.bytes;
        }
    }

    /// Least recently used out until the bytes fit.
    fn make_room(&mut self, capacity: usize) {
        while self.bytes > capacity {
            let Some((_, oldest)) = self.recency.pop_first() else { break };
            match oldest {
                Held::Answer(key) => self.remove_answer(&key),
                Held::Url(url) => self.forget_url(&url),
            }
        }
        self.publish();
    }

    /// Drops the in-progress marker of `key` if it is still `slot`.
    fn forget_compute(&mut self, key: &Key, slot: &Slot) {
        if self.computing.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            self.computing.remove(key);
        }
    }

    fn publish(&self) {
        gauge!("caption_result_cache_bytes").set(self.bytes as f64);
        gauge!("caption_result_cache_entries").set(self.answers.len() as f64);
    }
}

/// Removes the in-progress marker when the computing call is dropped part-way (its caller went
/// away), so the key does not stay pinned; a caller still waiting computes in its place.
struct ComputeGuard<'a> {
    cache: &'a ResultCache,
    key: Key,
    slot: &'a Slot,
    armed: bool,
}

impl Drop for ComputeGuard<'_> {
    fn drop(&mut self) {
        if self.armed && self.slot.get().is_none() {
            self.cache.lock().forget_compute(&self.key, self.slot);
        }
    }
}

#[cfg(test)]
mod tests;
