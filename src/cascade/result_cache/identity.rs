//! What a cacheable request is known by: which requests are repeatable, and the canonical
//! encoding of every field that changes their answer, hashed with the image's content digest
//! into the cache key.

use sha2::{Digest, Sha256};

use crate::{
    models::generation::{GenerationParams, Strategy},
    pb,
    validate::{resolved_strategy, Listing, SeedOrigin},
};

/// A value as the identity encodes it.
pub trait Field {
    fn encode(&self, out: &mut Vec<u8>);
}

impl Field for u32 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl Field for u64 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl Field for i32 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// By its bits: two spellings of one number that differ in bits (0.0 and -0.0) are two keys,
/// which costs a hit at worst.
impl Field for f32 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bits().to_le_bytes());
    }
}

impl Field for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl Field for str {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

impl Field for [u8] {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
}

impl Field for String {
    fn encode(&self, out: &mut Vec<u8>) {
        self.as_str().encode(out);
    }
}

/// Absent and present never encode alike (an unset prompt is not an empty one).
impl<T: Field> Field for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                v.encode(out);
            }
        }
    }
}

/// What decides a Caption answer besides the image, in a canonical encoding: each field is its
/// name and its value, both length-prefixed, in a fixed order, so two requests encode alike only
/// when every field is equal. Only deterministic requests have one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity(pub(super) Vec<u8>);

impl Identity {
    /// The identity of a request decoded with `strategy`, its parameters spelt as `scope` says,
    /// or `None` when its answer is not repeatable: sampling without the caller's seed. Greedy
    /// and beam search never read the seed (only sampled rows draw from it), so it is left out
    /// of theirs; a sampled request's includes it.
    pub fn deterministic(scope: &str, strategy: Strategy, caller_seed: Option<u64>) -> Option<Self> {
        let id = Self(Vec::new()).with("scope", scope);
        Some(match strategy {
            Strategy::Greedy => id.with("strategy", "greedy"),
            Strategy::Beam => id.with("strategy", "beam"),
            Strategy::Sample => id.with("strategy", "sample").with("seed", &caller_seed?),
        })
    }

    /// The identity of an in-process request: every generation parameter as resolved (preset,
    /// defaults and limits applied), which is what the models see.
    pub fn of_params(params: &GenerationParams, seed: SeedOrigin) -> Option<Self> {
        // Field by field, without `..`: a parameter added later does not compile here until it
        // is weighed.
        let GenerationParams {
            num_candidates,
            max_length,
            min_length,
            strategy,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed: value,
            prompt,
            strip_prompt,
            num_beams,
            length_penalty,
            early_stopping,
        } = params;
        let caller_seed = (seed == SeedOrigin::Caller).then_some(*value);
        Some(
            Self::deterministic("resolved", *strategy, caller_seed)?
                .with("num_candidates", num_candidates)
                .with("max_length", max_length)
                .with("min_length", min_length)
                .with("temperature", temperature)
                .with("top_k", top_k)
                .with("top_p", top_p)
                .with("repetition_penalty", repetition_penalty)
                .with("prompt", prompt)
                .with("strip_prompt", strip_prompt)
                .with("num_beams", num_beams)
                .with("length_penalty", length_penalty)
                .with("early_stopping", early_stopping),
        )
    }

    /// The identity of parameters a cascade tier passes on, as the generator receives them: the
    /// message as the wire encodes it, which spells every field with whether it was set (an
    /// unset field takes the generator's default, which is not known here), so a field added to
    /// the proto is part of it as it stands. Two spellings of the same resolved request are two
    /// keys, which costs a hit; two different requests never share one. The strategy is resolved
    /// as the generator resolves it.
    pub fn of_sent(params: &pb::GenerationParams) -> Option<Self> {
        let strategy = resolved_strategy(params.decoding).ok()?;
        let message = prost::Message::encode_to_vec(params);
        Some(Self::deterministic("as-sent", strategy, params.seed)?.with("message", message.as_slice()))
    }

    /// Appends one field.
    pub fn with<T: Field + ?Sized>(mut self, name: &str, value: &T) -> Self {
        let mut encoded = Vec::new();
        value.encode(&mut encoded);
        for part in [name.as_bytes(), &encoded] {
            self.0.extend_from_slice(&(part.len() as u64).to_le_bytes());
            self.0.extend_from_slice(part);
        }
        self
    }

    /// The identity with how the answer lists its captions.
    pub(super) fn with_listing(self, listing: Listing) -> Self {
        let Listing { top_k, each_candidate } = listing;
        self.with("listing.top_k", &(top_k as u64)).with("listing.each_candidate", &each_candidate)
    }
}

pub(super) type Key = [u8; 32];

/// The cache key: SHA-256 over the image's content digest and the request's identity.
pub(super) fn result_key(content: &Key, identity: &Identity) -> Key {
    let mut hasher = Sha256::new();
    hasher.update(b"caption-cascade result v1\0");
    hasher.update(content);
    hasher.update(&identity.0);
    hasher.finalize().into()
}
