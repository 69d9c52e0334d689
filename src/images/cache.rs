//! Decoded images by correlation key. Concurrent requests for the same key share one fetch and
//! decode; recent successes are kept (bounded by count) so a Generate followed by a Rank of the
//! same URL does not fetch twice. Failures are never kept: the next request tries again.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{Arc, Mutex},
};

use dashmap::DashMap;
use tokio::sync::OnceCell;

use super::{ImageError, RgbImage};

type Slot = Arc<OnceCell<Arc<RgbImage>>>;

pub struct ImageCache {
    slots: DashMap<String, Slot>,
    /// Insertion order, for evicting the oldest entries beyond `capacity`.
    order: Mutex<VecDeque<String>>,
    capacity: usize,
}

/// Whether a lookup was served from the cache (or joined another request's load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Loaded,
}

impl ImageCache {
    pub fn new(capacity: usize) -> Self {
        Self { slots: DashMap::new(), order: Mutex::new(VecDeque::new()), capacity }
    }

    pub async fn get_or_load<F, Fut>(&self, key: &str, load: F) -> Result<(Arc<RgbImage>, Lookup), ImageError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<RgbImage, ImageError>>,
    {
        if self.capacity == 0 {
            return Ok((Arc::new(load().await?), Lookup::Loaded));
        }
        let slot = self.slots.entry(key.to_string()).or_default().clone();
        let mut loaded_here = false;
        let result = slot
            .get_or_try_init(|| {
                loaded_here = true;
                async { load().await.map(Arc::new) }
            })
            .await;
        match result {
            Ok(img) => {
                if loaded_here {
                    self.remember(key);
                }
                let lookup = if loaded_here { Lookup::Loaded } else { Lookup::Hit };
                Ok((img.clone(), lookup))
            }
            Err(e) => {
                // Drop the empty slot so a later request retries, unless another request already
                // replaced it with a fresh one.
                self.slots.remove_if(key, |_, s| Arc::ptr_eq(s, &slot) && s.get().is_none());
                Err(e)
            }
        }
    }

    fn remember(&self, key: &str) {
        let evicted: Vec<String> = {
            let mut order = self.order.lock().expect("cache order lock");
            order.push_back(key.to_string());
            let excess = order.len().saturating_sub(self.capacity);
            order.drain(..excess).collect()
        };
        for k in evicted {
            self.slots.remove_if(&k, |_, s| s.get().is_some());
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn tiny() -> RgbImage {
        RgbImage { width: 1, height: 1, pixels: vec![1, 2, 3] }
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_load_and_failures_are_retried() {
        let cache = ImageCache::new(4);
        let loads = AtomicUsize::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok(tiny())
        };
        let (a, b) = tokio::join!(cache.get_or_load("k", load), cache.get_or_load("k", load));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        let mut lookups = [a.unwrap().1, b.unwrap().1];
        lookups.sort_by_key(|l| *l == Lookup::Hit);
        assert_eq!(lookups, [Lookup::Loaded, Lookup::Hit]);

        let err = cache.get_or_load("bad", || async { Err(ImageError::Empty) }).await;
        assert_eq!(err.unwrap_err(), ImageError::Empty);
        let ok = cache.get_or_load("bad", || async { Ok(tiny()) }).await.unwrap();
        assert_eq!(ok.1, Lookup::Loaded);
    }

    #[tokio::test]
    async fn keeps_at_most_capacity_entries() {
        let cache = ImageCache::new(2);
        for k in ["a", "b", "c"] {
            cache.get_or_load(k, || async { Ok(tiny()) }).await.unwrap();
        }
        assert_eq!(cache.len(), 2);
        let (_, lookup) = cache.get_or_load("a", || async { Ok(tiny()) }).await.unwrap();
        assert_eq!(lookup, Lookup::Loaded, "the oldest entry was evicted");
    }
}
