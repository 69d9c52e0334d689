//! The store and single-flight loads on their own: the byte bound, the recency order, expiry,
//! oversized values, what the meter hears, coalescing, failures and callers that leave.

use std::{
    future::pending,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use futures::poll;

use super::*;

type Key = &'static str;

/// Weighs a value as its number and records what the store reports.
#[derive(Default)]
struct Log {
    added: Mutex<Vec<Key>>,
    removed: Mutex<Vec<(Key, usize, Removal)>>,
    settled: Mutex<Vec<(usize, usize)>>,
}

impl Meter<Key, usize> for Log {
    fn weigh(&self, _key: &Key, value: &usize) -> usize {
        *value
    }

    fn added(&self, key: &Key, _value: &usize) {
        self.added.lock().unwrap().push(key);
    }

    fn removed(&self, key: &Key, value: &usize, why: Removal) {
        self.removed.lock().unwrap().push((key, *value, why));
    }

    fn settled(&self, bytes: usize, len: usize) {
        self.settled.lock().unwrap().push((bytes, len));
    }
}

fn store(capacity: usize) -> Store<Key, usize, Log> {
    Store::new(capacity, Log::default())
}

fn removed(store: &Store<Key, usize, Log>) -> Vec<(Key, usize, Removal)> {
    store.meter().removed.lock().unwrap().clone()
}

#[test]
fn the_byte_bound_holds_after_every_insert() {
    let store = store(10);
    let keys = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    let weights = [3, 4, 5, 2, 6, 1, 7, 10, 4];
    for (n, (key, weight)) in keys.iter().zip(weights).enumerate() {
        assert!(store.insert(key, weight, None));
        let held: usize = keys[..=n].iter().zip(weights).filter(|(k, _)| store.contains(k)).map(|(_, w)| w).sum();
        assert!(store.bytes() <= 10, "after {key}: {}", store.bytes());
        assert_eq!(store.bytes(), held, "after {key}: the bytes are the kept values' weights");
        let last = *store.meter().settled.lock().unwrap().last().unwrap();
        assert_eq!(last, (store.bytes(), store.len()), "the meter heard the totals after {key}");
    }
    assert_eq!(store.meter().added.lock().unwrap().len(), keys.len());
}

#[test]
fn the_least_recently_used_leave_first_and_the_meter_hears_which() {
    let store = store(3);
    for key in ["a", "b", "c"] {
        store.insert(key, 1, None);
    }
    assert_eq!(store.get(&"a"), Some(1)); // b is now the oldest
    store.insert("d", 1, None);
    assert_eq!(removed(&store), [("b", 1, Removal::Evicted)]);
    assert_eq!(store.get(&"c"), Some(1)); // a is now the oldest
                                          // Looking without using changes nothing.
    assert!(store.contains(&"a"));
    store.insert("e", 2, None);
    assert_eq!(removed(&store), [("b", 1, Removal::Evicted), ("a", 1, Removal::Evicted), ("d", 1, Removal::Evicted)]);
    assert_eq!((store.get(&"c"), store.get(&"e"), store.len(), store.bytes()), (Some(1), Some(2), 2, 3));
}

#[test]
fn expired_values_are_never_served_and_leave_at_the_next_look() {
    let store = store(100);
    let later = Instant::now() + Duration::from_secs(3600);
    store.insert("later", 7, Some(later));
    store.insert("never", 11, None);
    store.insert("now", 5, Some(Instant::now()));
    // Counted until something looks.
    assert_eq!((store.len(), store.bytes()), (3, 23));
    assert_eq!(store.get(&"now"), None);
    assert_eq!((store.len(), store.bytes()), (2, 18));
    assert_eq!(removed(&store), [("now", 5, Removal::Expired)]);
    assert_eq!(*store.meter().settled.lock().unwrap().last().unwrap(), (18, 2));
    assert_eq!((store.get(&"later"), store.get(&"never")), (Some(7), Some(11)));
    // An insert sweeps too, and a replaced value's expiry goes with it.
    store.insert("later", 8, None);
    store.insert("gone", 1, Some(Instant::now()));
    store.insert("x", 1, None);
    assert!(!store.contains(&"gone"));
    assert_eq!(store.get(&"later"), Some(8));
    assert_eq!(removed(&store)[1..], [("later", 7, Removal::Replaced), ("gone", 1, Removal::Expired)]);
}

#[test]
fn a_value_heavier_than_the_capacity_is_not_kept() {
    let store = store(10);
    assert!(store.insert("a", 4, None));
    assert!(!store.insert("huge", 11, None));
    assert_eq!((store.contains(&"huge"), store.contains(&"a"), store.bytes()), (false, true, 4));
    assert!(removed(&store).is_empty(), "nothing was evicted for it");
    // It still replaces what its key held.
    assert!(!store.insert("a", 11, None));
    assert_eq!((store.len(), store.bytes()), (0, 0));
    assert_eq!(removed(&store), [("a", 4, Removal::Replaced)]);
    let none = Store::new(0, Log::default());
    assert!(!none.insert("a", 1, None) && none.is_empty());
}

#[test]
fn replacing_and_removing_keep_the_bytes_right() {
    let store = store(10);
    store.insert("a", 4, None);
    store.insert("a", 6, None);
    assert_eq!((store.len(), store.bytes()), (1, 6));
    assert_eq!(store.remove(&"a"), Some(6));
    assert_eq!(store.remove(&"a"), None);
    assert_eq!((store.len(), store.bytes()), (0, 0));
    assert_eq!(removed(&store), [("a", 4, Removal::Replaced), ("a", 6, Removal::Removed)]);
}

#[tokio::test]
async fn concurrent_callers_share_one_load() {
    let flights = SingleFlight::new();
    let loads = AtomicUsize::new(0);
    let load = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        tokio::task::yield_now().await;
        Ok::<_, ()>((7, "mine"))
    };
    let (a, b, c) =
        tokio::join!(flights.get_or_load(&1, load), flights.get_or_load(&1, load), flights.get_or_load(&2, load));
    assert_eq!(loads.load(Ordering::SeqCst), 2, "one load per key");
    assert_eq!((a, b, c), (Ok(Loaded::Own(7, "mine")), Ok(Loaded::Shared(7)), Ok(Loaded::Own(7, "mine"))));
    assert!(flights.is_empty());
}

#[tokio::test]
async fn an_abandoned_load_leaves_nothing_behind_and_a_waiter_takes_over() {
    let flights = SingleFlight::<u8, u8>::new();
    let hang = flights.get_or_load(&1, || async { pending::<Result<(u8, ()), ()>>().await });
    assert!(tokio::time::timeout(Duration::from_millis(10), hang).await.is_err());
    assert!(flights.is_empty(), "the abandoned load was removed");

    let mut first = Box::pin(flights.get_or_load(&1, || async { pending::<Result<(u8, &str), ()>>().await }));
    assert!(poll!(&mut first).is_pending(), "the first caller runs its load");
    let mut waiter = Box::pin(flights.get_or_load(&1, || async { Ok::<_, ()>((2, "waiter")) }));
    assert!(poll!(&mut waiter).is_pending(), "the second caller waits for it");
    assert_eq!(flights.len(), 1);
    drop(first);
    assert_eq!(flights.len(), 1, "the waiter still needs the load");
    assert_eq!(waiter.await, Ok(Loaded::Own(2, "waiter")));
    assert!(flights.is_empty());
}

#[tokio::test]
async fn a_failure_reaches_only_its_caller_and_is_not_kept() {
    let flights = SingleFlight::<u8, u8>::new();
    let fail = || async {
        tokio::task::yield_now().await;
        Err::<(u8, ()), _>("failed")
    };
    let (a, b) =
        tokio::join!(flights.get_or_load(&1, fail), flights.get_or_load(&1, || async { Ok::<_, &str>((3, ())) }));
    assert_eq!((a, b), (Err("failed"), Ok(Loaded::Own(3, ()))), "the waiter loaded in its place");
    assert!(flights.is_empty());
    let again = flights.get_or_load(&1, || async { Ok::<_, ()>((4, ())) }).await;
    assert_eq!(again, Ok(Loaded::Own(4, ())), "nothing of the failure was kept");
}
