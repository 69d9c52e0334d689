//! Model-ready images by key, bounded in bytes. Concurrent requests for the same key share one
//! fetch and decode; recent successes are kept, least recently used first out, so a Generate
//! followed by a Rank of the same URL does not fetch twice. Failures are never kept, and a load
//! whose every caller went away leaves nothing behind.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{Arc, Mutex},
};

use tokio::sync::OnceCell;

use super::ImageError;

/// What a cached image is known by. URLs and inline bytes live in separate namespaces: inline
/// bytes are found only by their digest, which only a caller holding the bytes can compute, so
/// no URL can name another caller's upload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CacheKey {
    Url(String),
    /// SHA-256 of the encoded bytes: inline bytes, and the bytes the result cache fetched for a
    /// URL (pixels kept by content, so never an older version of what the URL now serves).
    Inline([u8; 32]),
}

/// Values the cache can account for.
pub trait Weighed {
    /// Bytes of memory the value holds.
    fn bytes(&self) -> usize;
}

/// Whether a lookup was served from the cache (or joined another request's load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Loaded,
}

type Slot<V> = Arc<OnceCell<Arc<V>>>;

struct Entry<V> {
    value: Arc<V>,
    bytes: usize,
    /// Position in `State::recency`.
    tick: u64,
}

struct State<V> {
    loading: HashMap<CacheKey, Slot<V>>,
    ready: HashMap<CacheKey, Entry<V>>,
    /// Ready keys by last use, oldest first.
    recency: BTreeMap<u64, CacheKey>,
    next_tick: u64,
    bytes: usize,
}

pub struct ImageCache<V> {
    state: Mutex<State<V>>,
    capacity_bytes: usize,
}

impl<V: Weighed> ImageCache<V> {
    /// A cache keeping at most `capacity_bytes` of values (0 keeps none, concurrent loads of
    /// one key are still shared).
    pub fn new(capacity_bytes: usize) -> Self {
        let state =
            State { loading: HashMap::new(), ready: HashMap::new(), recency: BTreeMap::new(), next_tick: 0, bytes: 0 };
        Self { state: Mutex::new(state), capacity_bytes }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<V>> {
        // The state is consistent after every statement that holds the lock; a panic elsewhere
        // cannot leave it half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn get_or_load<F, Fut>(&self, key: &CacheKey, load: F) -> Result<(Arc<V>, Lookup), ImageError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, ImageError>>,
    {
        let slot = {
            let mut state = self.lock();
            if let Some(value) = state.touch(key) {
                return Ok((value, Lookup::Hit));
            }
            state.loading.entry(key.clone()).or_default().clone()
        };
        let mut guard = LoadGuard { cache: self, key, slot: &slot, armed: true };
        let mut loaded_here = false;
        let result = slot
            .get_or_try_init(|| {
                loaded_here = true;
                async { load().await.map(Arc::new) }
            })
            .await;
        guard.armed = false;
        let mut state = self.lock();
        state.forget_load(key, &slot);
        match result {
            Ok(value) => {
                if loaded_here {
                    state.insert(key, value.clone(), self.capacity_bytes);
                }
                let lookup = if loaded_here { Lookup::Loaded } else { Lookup::Hit };
                Ok((value.clone(), lookup))
            }
            Err(e) => Err(e),
        }
    }

    /// Bytes held by kept values.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Kept values plus loads in progress.
    pub fn len(&self) -> usize {
        let state = self.lock();
        state.ready.len() + state.loading.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<V: Weighed> State<V> {
    /// The kept value of `key`, marked as just used.
    fn touch(&mut self, key: &CacheKey) -> Option<Arc<V>> {
        let tick = self.next_tick;
        let entry = self.ready.get_mut(key)?;
        self.recency.remove(&entry.tick);
        entry.tick = tick;
        self.recency.insert(tick, key.clone());
        self.next_tick += 1;
        Some(entry.value.clone())
    }

    /// Drops the in-progress marker of `key` if it is still `slot` and holds no value.
    fn forget_load(&mut self, key: &CacheKey, slot: &Slot<V>) {
        if self.loading.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            self.loading.remove(key);
        }
    }

    fn insert(&mut self, key: &CacheKey, value: Arc<V>, capacity: usize) {
        let bytes = value.bytes();
        if bytes > capacity || self.ready.contains_key(key) {
            return;
        }
        let tick = self.next_tick;
        self.next_tick += 1;
        self.ready.insert(key.clone(), Entry { value, bytes, tick });
        self.recency.insert(tick, key.clone());
        self.bytes += bytes;
        let mut evicted = 0u64;
        while self.bytes > capacity {
            let Some((_, oldest)) = self.recency.pop_first() else { break };
            if let Some(e) = self.ready.remove(&oldest) {
                self.bytes -= e.bytes;
                evicted += 1;
            }
        }
        metrics::counter!("caption_image_cache_evictions_total").increment(evicted);
        metrics::gauge!("caption_image_cache_bytes").set(self.bytes as f64);
        metrics::gauge!("caption_image_cache_entries").set(self.ready.len() as f64);
    }
}

/// Removes the in-progress marker when the loading call is dropped part-way (its caller went
/// away), so the key does not stay pinned; a caller still waiting on the same load takes it over.
struct LoadGuard<'a, V: Weighed> {
    cache: &'a ImageCache<V>,
    key: &'a CacheKey,
    slot: &'a Slot<V>,
    armed: bool,
}

impl<V: Weighed> Drop for LoadGuard<'_, V> {
    fn drop(&mut self) {
        if self.armed && self.slot.get().is_none() {
            self.cache.lock().forget_load(self.key, self.slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use super::*;
    use crate::images::DecodeError;

    struct Blob(usize);

    impl Weighed for Blob {
        fn bytes(&self) -> usize {
            self.0
        }
    }

    fn url(s: &str) -> CacheKey {
        CacheKey::Url(s.into())
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_load_and_failures_are_retried() {
        let cache = ImageCache::new(100);
        let loads = AtomicUsize::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok(Blob(1))
        };
        let k = url("k");
        let (a, b) = tokio::join!(cache.get_or_load(&k, load), cache.get_or_load(&k, load));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        let mut lookups = [a.unwrap().1, b.unwrap().1];
        lookups.sort_by_key(|l| *l == Lookup::Hit);
        assert_eq!(lookups, [Lookup::Loaded, Lookup::Hit]);

        let bad = url("bad");
        let err = cache.get_or_load(&bad, || async { Err(DecodeError::Empty.into()) }).await;
        assert_eq!(err.err(), Some(ImageError::Decode(DecodeError::Empty)));
        let ok = cache.get_or_load(&bad, || async { Ok(Blob(1)) }).await.unwrap();
        assert_eq!(ok.1, Lookup::Loaded);
    }

    #[tokio::test]
    async fn keeps_at_most_capacity_bytes_least_recently_used_out() {
        let cache = ImageCache::new(10);
        for k in ["a", "b", "c"] {
            cache.get_or_load(&url(k), || async { Ok(Blob(4)) }).await.unwrap();
        }
        assert_eq!(cache.bytes(), 8, "a was evicted to fit c");
        // Using b makes c the oldest.
        assert_eq!(cache.get_or_load(&url("b"), || async { Ok(Blob(4)) }).await.unwrap().1, Lookup::Hit);
        cache.get_or_load(&url("d"), || async { Ok(Blob(4)) }).await.unwrap();
        assert_eq!(cache.get_or_load(&url("b"), || async { Ok(Blob(4)) }).await.unwrap().1, Lookup::Hit);
        assert_eq!(cache.get_or_load(&url("c"), || async { Ok(Blob(4)) }).await.unwrap().1, Lookup::Loaded);
        // A value larger than the whole cache is served but never kept.
        let (_, lookup) = cache.get_or_load(&url("huge"), || async { Ok(Blob(11)) }).await.unwrap();
        assert_eq!(lookup, Lookup::Loaded);
        assert!(cache.bytes() <= 10);
    }

    #[tokio::test]
    async fn a_cancelled_load_leaves_nothing_behind() {
        let cache = ImageCache::new(10);
        let k = url("slow");
        let slow = cache.get_or_load(&k, || async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(Blob(1))
        });
        assert!(tokio::time::timeout(Duration::from_millis(10), slow).await.is_err());
        assert!(cache.is_empty(), "the abandoned load was removed");
        assert_eq!(cache.get_or_load(&k, || async { Ok(Blob(1)) }).await.unwrap().1, Lookup::Loaded);
    }

    #[tokio::test]
    async fn urls_and_inline_bytes_never_share_an_entry() {
        let cache = ImageCache::new(10);
        let digest = [7u8; 32];
        cache.get_or_load(&CacheKey::Inline(digest), || async { Ok(Blob(1)) }).await.unwrap();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let by_url = cache.get_or_load(&url(&format!("sha256:{hex}")), || async { Ok(Blob(1)) }).await.unwrap();
        assert_eq!(by_url.1, Lookup::Loaded);
    }
}
