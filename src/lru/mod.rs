//! The storage both caches are built on: [`Store`], values bounded in bytes, least recently used
//! out, each with an optional expiry; and [`SingleFlight`], which coalesces concurrent loads of
//! one key. Ours rather than moka's, because moka applies reads, evictions and its eviction
//! listener in deferred batches under a frequency-based admission policy, while the caches promise
//! an exact byte bound the moment an insert returns and a strict least-recently-used order.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    hash::Hash,
    mem::size_of,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Instant,
};

use dashmap::DashMap;
use tokio::sync::OnceCell;

/// How a [`Store`] weighs its values and tells what it did. The hooks run under the store's
/// lock, in the order the changes happened, so gauges they publish never go back in time; they
/// must not call into the store.
pub trait Meter<K, V> {
    /// Bytes `value` counts for against the capacity, under `key`.
    fn weigh(&self, key: &K, value: &V) -> usize;

    /// `value` was kept under `key`.
    fn added(&self, _key: &K, _value: &V) {}

    /// `value` left the store.
    fn removed(&self, _key: &K, _value: &V, _why: Removal) {}

    /// A change is complete; the store now holds `bytes` in `len` values.
    fn settled(&self, _bytes: usize, _len: usize) {}
}

/// Why a value left a [`Store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The least recently used, out to make room within the capacity.
    Evicted,
    /// Its expiry came.
    Expired,
    /// Another value was inserted under its key.
    Replaced,
    /// [`Store::remove`].
    Removed,
}

/// Bytes a [`Store`] spends on one value besides the value itself: its record and the copies of
/// its key in the map and the recency and expiry indexes. A [`Meter`] that counts a value's
/// whole footprint adds it.
pub const fn bookkeeping<K, V>() -> usize {
    size_of::<Entry<V>>() + 3 * size_of::<K>()
}

struct Entry<V> {
    value: V,
    bytes: usize,
    /// Position in `Inner::recency`.
    tick: u64,
    /// Position in `Inner::expiry`.
    expires: Option<(Instant, u64)>,
}

struct Inner<K, V> {
    entries: HashMap<K, Entry<V>>,
    /// Keys by last use, oldest first.
    recency: BTreeMap<u64, K>,
    /// Keys that expire, soonest first.
    expiry: BTreeMap<(Instant, u64), K>,
    next_tick: u64,
    bytes: usize,
}

/// Values by key, at most `capacity` bytes of them as the [`Meter`] weighs them, the least
/// recently used out first. An expired value is never served; it leaves at the next lookup or
/// insert. The state sits behind a std `Mutex` held for a few map operations and never across an
/// `.await`.
pub struct Store<K, V, M> {
    inner: Mutex<Inner<K, V>>,
    capacity: usize,
    meter: M,
}

impl<K: Eq + Hash + Clone, V: Clone, M: Meter<K, V>> Store<K, V, M> {
    /// A store keeping at most `capacity` bytes (0 keeps nothing).
    pub fn new(capacity: usize, meter: M) -> Self {
        let inner = Inner {
            entries: HashMap::new(),
            recency: BTreeMap::new(),
            expiry: BTreeMap::new(),
            next_tick: 0,
            bytes: 0,
        };
        Self { inner: Mutex::new(inner), capacity, meter }
    }

    pub fn meter(&self) -> &M {
        &self.meter
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K, V>> {
        // Every statement that holds the lock leaves the state consistent; a panic elsewhere
        // cannot leave it half-changed.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value under `key` if it has not expired, marked as just used.
    pub fn get(&self, key: &K) -> Option<V> {
        let mut inner = self.lock();
        inner.sweep(Instant::now(), &self.meter);
        let tick = inner.tick();
        let entry = inner.entries.get_mut(key)?;
        let old = std::mem::replace(&mut entry.tick, tick);
        let value = entry.value.clone();
        inner.recency.remove(&old);
        inner.recency.insert(tick, key.clone());
        Some(value)
    }

    /// Whether an unexpired value is kept under `key`; its recency is unchanged.
    pub fn contains(&self, key: &K) -> bool {
        let mut inner = self.lock();
        inner.sweep(Instant::now(), &self.meter);
        inner.entries.contains_key(key)
    }

    /// Keeps `value` under `key` as the most recently used, until `expires` if given, replacing
    /// what was there; the least recently used leave until the bytes fit. A value heavier than
    /// the whole capacity is not kept. Returns whether it was kept.
    pub fn insert(&self, key: K, value: V, expires: Option<Instant>) -> bool {
        let bytes = self.meter.weigh(&key, &value);
        let mut inner = self.lock();
        inner.sweep(Instant::now(), &self.meter);
        inner.unlink(&key, Removal::Replaced, &self.meter);
        let kept = bytes <= self.capacity;
        if kept {
            let tick = inner.tick();
            let expires = expires.map(|at| (at, tick));
            self.meter.added(&key, &value);
            if let Some(at) = expires {
                inner.expiry.insert(at, key.clone());
            }
            inner.recency.insert(tick, key.clone());
            inner.entries.insert(key, Entry { value, bytes, tick, expires });
            inner.bytes += bytes;
            while inner.bytes > self.capacity {
                let Some((_, oldest)) = inner.recency.pop_first() else { break };
                inner.unlink(&oldest, Removal::Evicted, &self.meter);
            }
        }
        self.meter.settled(inner.bytes, inner.entries.len());
        kept
    }

    /// Takes the value under `key` out.
    pub fn remove(&self, key: &K) -> Option<V> {
        let mut inner = self.lock();
        let value = inner.unlink(key, Removal::Removed, &self.meter)?;
        self.meter.settled(inner.bytes, inner.entries.len());
        Some(value)
    }

    /// Bytes held, as the meter weighed them.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Values held, expired ones included until they are next looked at.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Eq + Hash + Clone, V> Inner<K, V> {
    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    /// Drops every value whose expiry is not after `now`.
    fn sweep<M: Meter<K, V>>(&mut self, now: Instant, meter: &M) {
        let mut any = false;
        while let Some(first) = self.expiry.first_entry() {
            if first.key().0 > now {
                break;
            }
            let key = first.remove();
            self.unlink(&key, Removal::Expired, meter);
            any = true;
        }
        if any {
            meter.settled(self.bytes, self.entries.len());
        }
    }

    /// Takes `key`'s value out of the map and both indexes.
    fn unlink<M: Meter<K, V>>(&mut self, key: &K, why: Removal, meter: &M) -> Option<V> {
        let entry = self.entries.remove(key)?;
        self.recency.remove(&entry.tick);
        if let Some(at) = entry.expires {
            self.expiry.remove(&at);
        }
        self.bytes -= entry.bytes;
        meter.removed(key, &entry.value, why);
        Some(entry.value)
    }
}

/// How [`SingleFlight::get_or_load`] came by its value.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded<V, T> {
    /// From another caller's load, joined.
    Shared(V),
    /// From this caller's own loader, with what the loader handed back beside the value.
    Own(V, T),
}

/// A load in progress, and how many callers wait on it or run it.
struct Flight<V> {
    cell: OnceCell<V>,
    /// Changed only under the table's shard lock for the flight's key, so joining and leaving
    /// never race.
    callers: AtomicUsize,
}

/// Loads in progress by key: concurrent callers for one key share one load. The table is a
/// sharded concurrent map, so coalescing never waits on a store's lock, and no shard guard is
/// held across an `.await`.
pub struct SingleFlight<K, V> {
    flights: DashMap<K, Arc<Flight<V>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self { flights: DashMap::new() }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads in progress.
    pub fn len(&self) -> usize {
        self.flights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flights.is_empty()
    }

    /// The value of `key`'s load: the first caller runs `load`, concurrent callers wait for its
    /// value. If the loader fails, or its caller goes away, a waiting caller runs its own loader
    /// in its place; a failure reaches only the caller whose loader failed. A load whose every
    /// caller went away leaves nothing behind. Whatever should outlive the load (keeping the
    /// value) is the loader's to do, before it returns.
    pub async fn get_or_load<T, E, F, Fut>(&self, key: &K, load: F) -> Result<Loaded<V, T>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, T), E>>,
    {
        let flight = self.join(key);
        let _leave = Leave { flights: self, key, flight: &flight };
        let mut own = None;
        let extra = &mut own;
        let value = flight
            .cell
            .get_or_try_init(|| async move {
                let (value, beside) = load().await?;
                *extra = Some(beside);
                Ok(value)
            })
            .await?
            .clone();
        Ok(match own {
            Some(beside) => Loaded::Own(value, beside),
            None => Loaded::Shared(value),
        })
    }

    fn join(&self, key: &K) -> Arc<Flight<V>> {
        let flight = self
            .flights
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Flight { cell: OnceCell::new(), callers: AtomicUsize::new(0) }));
        flight.callers.fetch_add(1, Ordering::Relaxed);
        flight.clone()
    }

    /// A caller is done with `flight`: it leaves the table once it holds a value (later callers
    /// find that in the store) or once nobody is left to load it.
    fn leave(&self, key: &K, flight: &Arc<Flight<V>>) {
        self.flights.remove_if(key, |_, current| {
            Arc::ptr_eq(current, flight) && {
                let was_last = current.callers.fetch_sub(1, Ordering::Relaxed) <= 1;
                was_last || current.cell.initialized()
            }
        });
    }
}

/// Leaves the flight however the call ends: with a value, with a failure, or dropped part-way
/// because its caller went away.
struct Leave<'a, K: Eq + Hash + Clone, V: Clone> {
    flights: &'a SingleFlight<K, V>,
    key: &'a K,
    flight: &'a Arc<Flight<V>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Drop for Leave<'_, K, V> {
    fn drop(&mut self) {
        self.flights.leave(self.key, self.flight);
    }
}

#[cfg(test)]
mod tests;
