//! The rules on their own: each field named when refused, defaults and presets, captions and
//! listings, and a property test over random requests.

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::*;
use crate::models::generation::Strategy;

const LIMITS: GenerationLimits = GenerationLimits { max_candidates: 16, max_length: 40 };
const CAPTIONS: CaptionLimits = CaptionLimits { max_captions: 8, max_caption_bytes: 64 };

/// The fields of `pb::GenerationParams`, as an error may name them.
const FIELDS: [&str; 15] = [
    "num_candidates",
    "max_length",
    "min_length",
    "decoding",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "seed",
    "prompt",
    "strip_prompt",
    "preset",
    "num_beams",
    "length_penalty",
    "early_stopping",
];

fn validator() -> Validator {
    Validator::new(LIMITS, CAPTIONS)
}

#[test]
fn defaults_are_valid_and_each_bad_field_is_named() {
    let v = validator();
    assert!(v.params(v.defaults().clone(), SeedOrigin::Caller).is_ok());
    type Breaker = fn(&mut GenerationParams);
    let cases: [(&str, Breaker); 10] = [
        ("num_beams", |p| {
            p.strategy = Strategy::Beam;
            p.num_beams = 0
        }),
        ("num_candidates", |p| {
            p.strategy = Strategy::Beam;
            p.num_beams = 2
        }),
        ("num_candidates", |p| p.num_candidates = 0),
        ("num_candidates", |p| p.num_candidates = 17),
        ("max_length", |p| p.max_length = 41),
        ("min_length", |p| p.min_length = 41),
        ("temperature", |p| p.temperature = f32::NAN),
        ("top_p", |p| p.top_p = 0.0),
        ("top_p", |p| p.top_p = 1.5),
        ("repetition_penalty", |p| p.repetition_penalty = -1.0),
    ];
    for (field, break_it) in cases {
        let mut p = v.defaults().clone();
        break_it(&mut p);
        assert_eq!(v.params(p, SeedOrigin::Caller).unwrap_err().field, field);
    }
}

#[test]
fn unset_fields_keep_defaults_and_set_fields_override() {
    let v = validator();
    let p = v.request(None).unwrap();
    assert_eq!(p.seed_origin(), SeedOrigin::Server);
    assert_eq!(GenerationParams { seed: v.defaults().seed, ..p.get().clone() }, *v.defaults());
    let set = pb::GenerationParams {
        top_p: Some(0.5),
        seed: Some(7),
        decoding: pb::Decoding::Greedy as i32,
        ..Default::default()
    };
    let p = v.request(Some(set)).unwrap();
    assert_eq!((p.top_p, p.seed, p.strategy, p.top_k), (0.5, 7, Strategy::Greedy, v.defaults().top_k));
    assert_eq!(p.seed_origin(), SeedOrigin::Caller);
    let bad = pb::GenerationParams { decoding: 99, ..Default::default() };
    assert_eq!(v.request(Some(bad)).unwrap_err().field, "decoding");
    let nb = pb::GenerationParams { preset: pb::Preset::Notebook as i32, top_k: Some(7), ..Default::default() };
    let p = v.request(Some(nb)).unwrap();
    assert_eq!((p.max_length, p.min_length, p.repetition_penalty, p.top_k), (40, 10, 1.1, 7));
}

#[test]
fn a_cascade_tier_knows_how_many_candidates_a_generator_answers_with() {
    let v = validator();
    let asked = |p: pb::GenerationParams| v.candidates_asked(&v.sent(Some(p)).unwrap());
    assert_eq!(asked(Default::default()), v.defaults().num_candidates);
    assert_eq!(asked(pb::GenerationParams { num_candidates: Some(3), ..Default::default() }), 3);
    let notebook = GenerationParams::notebook(LIMITS.max_length).num_candidates;
    assert_eq!(asked(pb::GenerationParams { preset: pb::Preset::Notebook as i32, ..Default::default() }), notebook);
}

#[test]
fn captions_and_listing_have_their_limits() {
    let v = validator();
    assert_eq!(v.captions(vec![]).unwrap_err().field, "captions");
    assert_eq!(v.captions(vec!["x".into(); 9]).unwrap_err().field, "captions");
    assert_eq!(v.captions(vec!["y".repeat(65)]).unwrap_err().field, "captions");
    assert_eq!(v.captions(vec!["a".into(), "b".into()]).unwrap().get(), ["a", "b"]);
    assert_eq!(v.listing(Some(0), false).unwrap_err().field, "top_k");
    assert_eq!(v.listing(None, true).unwrap(), Listing { top_k: DEFAULT_TOP_K as usize, each_candidate: true });
}

fn some<T: Copy>(rng: &mut StdRng, values: &[T]) -> Option<T> {
    rng.random_bool(0.6).then(|| values[rng.random_range(0..values.len())])
}

/// A request with each field unset or one of the values at and around its limits.
pub(crate) fn any_request(rng: &mut StdRng) -> pb::GenerationParams {
    let counts = [0, 1, 2, 3, 10, 15, 16, 17, 39, 40, 41, u32::MAX];
    let reals = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1.0, 0.0, -0.0, 1e-30, 0.5, 1.0, 1.5, 1e30];
    let prompts = ["", "a photo of", "  ", "x"];
    pb::GenerationParams {
        num_candidates: some(rng, &counts),
        max_length: some(rng, &counts),
        min_length: some(rng, &counts),
        decoding: some(rng, &[0, 1, 2, 3, 4, -1]).unwrap_or(0),
        temperature: some(rng, &reals),
        top_k: some(rng, &counts),
        top_p: some(rng, &reals),
        repetition_penalty: some(rng, &reals),
        seed: some(rng, &[0, 1, u64::MAX]),
        prompt: some(rng, &prompts).map(String::from).or_else(|| rng.random_bool(0.05).then(|| "p".repeat(513))),
        strip_prompt: some(rng, &[true, false]),
        preset: some(rng, &[0, 1, 2, -5]).unwrap_or(0),
        num_beams: some(rng, &counts),
        length_penalty: some(rng, &reals),
        early_stopping: some(rng, &[true, false]),
    }
}

/// Any request validates or is refused naming one of its fields, and the cascade tier, with the
/// same flags, never refuses what a generator would accept.
#[test]
fn any_request_validates_or_is_refused_naming_its_field() {
    let v = validator();
    let mut rng = StdRng::seed_from_u64(26);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..20_000 {
        let request = any_request(&mut rng);
        let sent = v.sent(Some(request.clone()));
        match v.request(Some(request.clone())) {
            Ok(_) => {
                accepted += 1;
                assert!(sent.is_ok(), "the cascade tier refused what the generator accepts: {request:?}");
            }
            Err(e) => {
                refused += 1;
                assert!(FIELDS.contains(&e.field), "{e} names no field of {request:?}");
            }
        }
        if let Err(e) = sent {
            assert!(FIELDS.contains(&e.field), "{e}");
        }
    }
    assert!(accepted > 500 && refused > 500, "both outcomes drawn: {accepted} accepted, {refused} refused");
}
