//! The result cache on its own: identities, hits under their own keys, off, the byte bound,
//! the TTL, coalesced misses and a caller that leaves.

use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest as _, Sha256};

use super::*;
use crate::{
    cascade::image::inline_key,
    engine::EngineError,
    images::{FetchLimits, Fetcher},
    models::generation::{GenerationParams, Strategy},
    validate::SeedOrigin,
};

fn resolver() -> Resolver {
    Resolver::new(Fetcher::new(FetchLimits::default()).unwrap())
}

fn new_cache(capacity_bytes: usize, ttl: Duration) -> ResultCache {
    ResultCache::new(ResultCacheConfig { capacity_bytes, ttl })
}

fn seeded(seed: u64) -> Option<Identity> {
    Identity::of_params(&GenerationParams { seed, ..GenerationParams::default() }, SeedOrigin::Caller)
}

/// Inline bytes, named as the resolver names them.
fn image(byte: u8) -> NamedImage {
    let bytes = Arc::new(vec![byte; 64]);
    let digest: [u8; 32] = Sha256::digest(bytes.as_slice()).into();
    NamedImage { key: inline_key(&digest), origin: Origin::Inline { bytes, digest } }
}

/// A computation that counts its calls and answers with a caption naming the image's first
/// byte and the call's number.
async fn compute(calls: &AtomicUsize, image: ImageInput) -> Result<Captioned, CascadeError> {
    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
    let ImageInput::Content(content) = &image else {
        return Ok(answer("not through the cache".into(), n));
    };
    Ok(answer(content.key.clone(), content.bytes[0] as usize * 1000 + n))
}

fn answer(key: String, n: usize) -> Captioned {
    let text = format!("caption {n}");
    let ranked = RankedCaption { text: text.clone(), probability: 1.0, cosine: 0.5, logit: 1.0, index: 0, count: 2 };
    let timings = Timings { generate: Duration::from_millis(5), ..Timings::default() };
    Captioned { key, captions: vec![ranked], candidates: vec![text.clone(), text], timings }
}

async fn call(cache: &ResultCache, calls: &AtomicUsize, source: NamedImage, id: Option<Identity>) -> Captioned {
    let listing = Listing::merged(3);
    cache.caption(&resolver(), source, id, listing, |image| compute(calls, image)).await.unwrap()
}

#[test]
fn only_deterministic_requests_have_an_identity_and_it_covers_every_parameter() {
    let base = GenerationParams { seed: 7, ..GenerationParams::default() };
    assert_eq!(base.strategy, Strategy::Sample);
    assert!(Identity::of_params(&base, SeedOrigin::Server).is_none(), "a drawn seed is never cached");
    let id = |p: &GenerationParams| Identity::of_params(p, SeedOrigin::Caller).unwrap();
    // Greedy and beam search do not read the seed: a drawn one does not stop caching.
    for strategy in [Strategy::Greedy, Strategy::Beam] {
        let p = GenerationParams { strategy, ..base.clone() };
        let drawn = Identity::of_params(&GenerationParams { seed: 99, ..p.clone() }, SeedOrigin::Server);
        assert_eq!(drawn, Some(id(&p)));
    }
    let changes: Vec<GenerationParams> = vec![
        GenerationParams { seed: 8, ..base.clone() },
        GenerationParams { num_candidates: 3, ..base.clone() },
        GenerationParams { max_length: 20, ..base.clone() },
        GenerationParams { min_length: 2, ..base.clone() },
        GenerationParams { strategy: Strategy::Greedy, ..base.clone() },
        GenerationParams { temperature: 0.7, ..base.clone() },
        GenerationParams { top_k: 0, ..base.clone() },
        GenerationParams { top_p: 0.5, ..base.clone() },
        GenerationParams { repetition_penalty: 1.1, ..base.clone() },
        GenerationParams { prompt: Some(String::new()), ..base.clone() },
        GenerationParams { prompt: Some("a picture of".into()), ..base.clone() },
        GenerationParams { strip_prompt: true, ..base.clone() },
        GenerationParams { num_beams: 4, ..base.clone() },
        GenerationParams { length_penalty: 2.0, ..base.clone() },
        GenerationParams { early_stopping: true, ..base.clone() },
    ];
    let mut seen = vec![id(&base)];
    for p in &changes {
        let i = id(p);
        assert!(!seen.contains(&i), "{p:?} shares an identity");
        seen.push(i);
    }
    // The listing is part of the key.
    let listed = |l| id(&base).with_listing(l);
    assert_ne!(listed(Listing::merged(3)), listed(Listing::merged(4)));
    assert_ne!(listed(Listing::merged(3)), listed(Listing { top_k: 3, each_candidate: true }));
    // Length prefixes: moving bytes between a name and a value changes the encoding.
    assert_ne!(Identity(Vec::new()).with("ab", "c"), Identity(Vec::new()).with("a", "bc"));
}

#[tokio::test]
async fn a_repeated_request_is_answered_from_the_cache_under_its_own_key() {
    let (cache, calls) = (new_cache(1 << 20, Duration::from_secs(60)), AtomicUsize::new(0));
    let first = call(&cache, &calls, image(1), seeded(5)).await;
    let again = call(&cache, &calls, image(1), seeded(5)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the second call was not computed");
    assert_eq!((&again.captions, &again.candidates), (&first.captions, &first.candidates));
    assert!(again.key.starts_with("sha256:") && again.key == first.key);
    // A cached answer says it computed nothing.
    assert_eq!((again.timings.generate, again.timings.rank, again.timings.preprocess), Default::default());
    assert_eq!(first.timings.generate, Duration::from_millis(5));
    // Another image, seed or listing is another answer.
    call(&cache, &calls, image(2), seeded(5)).await;
    call(&cache, &calls, image(1), seeded(6)).await;
    let listing = Listing::merged(1);
    cache.caption(&resolver(), image(1), seeded(5), listing, |i| compute(&calls, i)).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(cache.len(), 4);
    // Not deterministic: computed every time, from the source as given, and not kept.
    for _ in 0..2 {
        let out = call(&cache, &calls, image(1), None).await;
        assert_eq!(out.captions[0].text, format!("caption {}", calls.load(Ordering::SeqCst)));
    }
    assert_eq!((calls.load(Ordering::SeqCst), cache.len()), (6, 4));
}

#[tokio::test]
async fn an_off_cache_computes_everything_and_keeps_nothing() {
    for off in [ResultCache::off(), new_cache(0, Duration::from_secs(60)), new_cache(1 << 20, Duration::ZERO)] {
        let calls = AtomicUsize::new(0);
        call(&off, &calls, image(1), seeded(5)).await;
        call(&off, &calls, image(1), seeded(5)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(off.is_empty() && off.bytes() == 0);
    }
}

#[tokio::test]
async fn the_byte_bound_evicts_the_least_recently_used() {
    let probe = new_cache(1 << 20, Duration::from_secs(60));
    call(&probe, &AtomicUsize::new(0), image(1), seeded(5)).await;
    let one = probe.bytes();
    assert!(one > 2 * "caption 1001".len() + 64, "strings and overhead are counted: {one}");
    // Room for two answers, not three.
    let (cache, calls) = (new_cache(2 * one + one / 2, Duration::from_secs(60)), AtomicUsize::new(0));
    for byte in [1, 2] {
        call(&cache, &calls, image(byte), seeded(5)).await;
    }
    call(&cache, &calls, image(1), seeded(5)).await; // 1 is now more recent than 2
    call(&cache, &calls, image(3), seeded(5)).await; // evicts 2
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(cache.bytes() <= 2 * one + one / 2 && cache.len() == 2);
    call(&cache, &calls, image(1), seeded(5)).await;
    call(&cache, &calls, image(3), seeded(5)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3, "1 and 3 stayed");
    call(&cache, &calls, image(2), seeded(5)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 4, "2 was evicted");
    // An answer larger than the whole cache is served, never kept.
    let tiny = new_cache(one - 1, Duration::from_secs(60));
    call(&tiny, &calls, image(1), seeded(5)).await;
    assert!(tiny.is_empty());
}

#[tokio::test]
async fn answers_older_than_the_ttl_are_never_served() {
    let (cache, calls) = (new_cache(1 << 20, Duration::from_millis(200)), AtomicUsize::new(0));
    call(&cache, &calls, image(1), seeded(5)).await;
    call(&cache, &calls, image(1), seeded(5)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let out = call(&cache, &calls, image(1), seeded(5)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the expired answer was computed again");
    assert_eq!(out.captions[0].text, "caption 1002");
    // Expired answers are dropped, not just skipped: the bytes fall back to one answer's.
    let one = cache.bytes();
    call(&cache, &calls, image(2), seeded(5)).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    call(&cache, &calls, image(3), seeded(5)).await;
    assert_eq!((cache.len(), cache.bytes()), (1, one));
}

#[tokio::test]
async fn concurrent_identical_misses_compute_once() {
    let (cache, calls) = (new_cache(1 << 20, Duration::from_secs(60)), AtomicUsize::new(0));
    let slow = |image| async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        compute(&calls, image).await
    };
    let (listing, resolver) = (Listing::merged(3), resolver());
    let (a, b) = tokio::join!(
        cache.caption(&resolver, image(1), seeded(5), listing, slow),
        cache.caption(&resolver, image(1), seeded(5), listing, slow),
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(a.unwrap().captions, b.unwrap().captions);
}

#[tokio::test]
async fn a_computation_whose_caller_left_leaves_nothing_behind() {
    let (cache, calls) = (new_cache(1 << 20, Duration::from_secs(60)), AtomicUsize::new(0));
    let (listing, resolver) = (Listing::merged(3), resolver());
    let hang = cache.caption(&resolver, image(1), seeded(5), listing, |_| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Err(EngineError::Internal("never".into()).into())
    });
    assert!(tokio::time::timeout(Duration::from_millis(20), hang).await.is_err());
    assert!(cache.computing.is_empty());
    // A failure is not kept either.
    let failed = cache
        .caption(&resolver, image(1), seeded(5), listing, |_| async {
            Err::<Captioned, _>(EngineError::Internal("failed".into()).into())
        })
        .await;
    assert!(failed.is_err());
    call(&cache, &calls, image(1), seeded(5)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
