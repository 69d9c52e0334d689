//! Model-ready images by key, bounded in bytes. Concurrent requests for the same key share one
//! fetch and decode; recent successes are kept, least recently used first out, so a Generate
//! followed by a Rank of the same URL does not fetch twice. Failures are never kept, and a load
//! whose every caller went away leaves nothing behind.

use std::{future::Future, marker::PhantomData, sync::Arc};

use super::ImageError;
use crate::lru::{Loaded, Meter, Removal, SingleFlight, Store};

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

/// Weighs images by their own bytes and publishes the cache's metrics.
struct Metrics<V>(PhantomData<fn(&V)>);

impl<V: Weighed> Meter<CacheKey, Arc<V>> for Metrics<V> {
    fn weigh(&self, _key: &CacheKey, value: &Arc<V>) -> usize {
        value.bytes()
    }

    fn removed(&self, _key: &CacheKey, _value: &Arc<V>, why: Removal) {
        if why == Removal::Evicted {
            metrics::counter!("caption_image_cache_evictions_total").increment(1);
        }
    }

    fn settled(&self, bytes: usize, len: usize) {
        metrics::gauge!("caption_image_cache_bytes").set(bytes as f64);
        metrics::gauge!("caption_image_cache_entries").set(len as f64);
    }
}

pub struct ImageCache<V> {
    kept: Store<CacheKey, Arc<V>, Metrics<V>>,
    loads: SingleFlight<CacheKey, Arc<V>>,
}

impl<V: Weighed> ImageCache<V> {
    /// A cache keeping at most `capacity_bytes` of values (0 keeps none, concurrent loads of
    /// one key are still shared).
    pub fn new(capacity_bytes: usize) -> Self {
        Self { kept: Store::new(capacity_bytes, Metrics(PhantomData)), loads: SingleFlight::new() }
    }

    pub async fn get_or_load<F, Fut>(&self, key: &CacheKey, load: F) -> Result<(Arc<V>, Lookup), ImageError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, ImageError>>,
    {
        if let Some(value) = self.kept.get(key) {
            return Ok((value, Lookup::Hit));
        }
        let loaded = self
            .loads
            .get_or_load(key, || async {
                // A load of the same key may have finished since the look above.
                if let Some(value) = self.kept.get(key) {
                    return Ok::<_, ImageError>((value, Lookup::Hit));
                }
                let value = Arc::new(load().await?);
                self.kept.insert(key.clone(), value.clone(), None);
                Ok((value, Lookup::Loaded))
            })
            .await?;
        Ok(match loaded {
            Loaded::Own(value, lookup) => (value, lookup),
            Loaded::Shared(value) => (value, Lookup::Hit),
        })
    }

    /// Bytes held by kept values.
    pub fn bytes(&self) -> usize {
        self.kept.bytes()
    }

    /// Kept values plus loads in progress.
    pub fn len(&self) -> usize {
        self.kept.len() + self.loads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
