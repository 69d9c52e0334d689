//! Validation, in one place: what a caller asks for becomes a value that proves it was checked
//! before anything is fetched or queued. Only a [`ValidParams`] reaches the generator and only
//! [`ValidCaptions`] reach the ranker; the cascade tier of a split deployment sends [`SentParams`]
//! to its remote generators.
//!
//! Which tier checks what: every rule that depends on no model (each field's range, the limit
//! flags `--max-candidates`, `--max-length`, `--max-captions`, `--max-caption-bytes`) is checked
//! by whichever tier receives the request, the cascade tier included, with the same flags; what
//! depends on the loaded model is checked by the model tier alone: `max_length` against the
//! decoder's position table, the defaults of unset fields (so the rules that tie two fields
//! together) and the prompt's and captions' tokens.

mod params;
#[cfg(test)]
pub(crate) mod tests;

pub use params::{decoding, resolved_strategy, MAX_BEAMS, MAX_PROMPT_BYTES};

use crate::{models::generation::GenerationParams, pb};

/// A refused request field, named as the proto names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidParam {
    pub field: &'static str,
    pub reason: String,
}

impl InvalidParam {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self { field, reason: reason.into() }
    }
}

/// Upper bounds the server enforces on generation requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationLimits {
    pub max_candidates: u32,
    /// Longest sequence a request may ask for (start token + prompt + generated tokens).
    pub max_length: u32,
}

/// Upper bounds on the captions of one Rank request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptionLimits {
    /// Most captions one Rank request may carry.
    pub max_captions: usize,
    /// Longest caption accepted, in bytes.
    pub max_caption_bytes: usize,
}

/// Who chose a request's sampling seed. A seed the server drew makes a sampled answer
/// unrepeatable, so such a request is never answered from the result cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedOrigin {
    Caller,
    Server,
}

/// Generation parameters that passed every rule that can be checked before tokenizing.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidParams {
    params: GenerationParams,
    seed_origin: SeedOrigin,
}

impl ValidParams {
    pub fn get(&self) -> &GenerationParams {
        &self.params
    }

    pub fn seed_origin(&self) -> SeedOrigin {
        self.seed_origin
    }
}

impl std::ops::Deref for ValidParams {
    type Target = GenerationParams;
    fn deref(&self) -> &GenerationParams {
        &self.params
    }
}

/// Captions within the count and length limits, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidCaptions(Vec<String>);

impl ValidCaptions {
    pub fn get(&self) -> &[String] {
        &self.0
    }

    pub fn into_inner(self) -> Vec<String> {
        self.0
    }
}

/// A remote generator's parameters as the caller sent them, every field that is set within the
/// ranges that hold whatever the model; the generator applies its defaults and checks the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct SentParams(pb::GenerationParams);

impl SentParams {
    pub fn get(&self) -> &pb::GenerationParams {
        &self.0
    }
}

/// What a Caption call returns of its ranked candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listing {
    /// Entries kept, most probable first (at least one).
    pub top_k: usize,
    /// One entry per candidate (duplicates included) instead of one per distinct caption.
    pub each_candidate: bool,
}

impl Listing {
    pub fn merged(top_k: usize) -> Self {
        Self { top_k, each_candidate: false }
    }
}

/// Captions shown when a Caption request does not say how many.
pub const DEFAULT_TOP_K: u32 = 3;

/// The rules of one server: its limits and the defaults unset fields take.
#[derive(Debug, Clone)]
pub struct Validator {
    generation: GenerationLimits,
    captions: CaptionLimits,
    defaults: GenerationParams,
}

impl Validator {
    /// `generation.max_length` is the most a request may ask for: with a model loaded, the
    /// smaller of the flag and the decoder's position table. The defaults' `max_length` is
    /// fitted under it.
    pub fn new(generation: GenerationLimits, captions: CaptionLimits) -> Self {
        let mut defaults = GenerationParams::default();
        defaults.max_length = defaults.max_length.min(generation.max_length);
        Self { generation, captions, defaults }
    }

    pub fn generation_limits(&self) -> &GenerationLimits {
        &self.generation
    }

    pub fn caption_limits(&self) -> &CaptionLimits {
        &self.captions
    }

    /// What an unset field of a request takes.
    pub fn defaults(&self) -> &GenerationParams {
        &self.defaults
    }

    /// A request's parameters, unset fields taken from the defaults (or the preset); an unset
    /// seed is drawn.
    pub fn request(&self, p: Option<pb::GenerationParams>) -> Result<ValidParams, InvalidParam> {
        let (params, seed_origin) = params::merged(p, &self.defaults, self.generation.max_length)?;
        self.params(params, seed_origin)
    }

    /// Parameters built in code (the CLI's, the warm-up's), under the same rules.
    pub fn params(&self, params: GenerationParams, seed_origin: SeedOrigin) -> Result<ValidParams, InvalidParam> {
        params::check(&params, &self.generation)?;
        Ok(ValidParams { params, seed_origin })
    }

    /// A cascade tier's check of parameters it passes on: every field that is set, as the
    /// generator would check it whatever its model.
    pub fn sent(&self, p: Option<pb::GenerationParams>) -> Result<SentParams, InvalidParam> {
        let p = p.unwrap_or_default();
        params::check_sent(&p, &self.generation)?;
        Ok(SentParams(p))
    }

    /// How many candidates a generator with these flags answers `sent` with: the number it asks
    /// for, or the one its preset or the defaults fill in, as a generator fills it in.
    pub fn candidates_asked(&self, sent: &SentParams) -> u32 {
        match params::merged(Some(sent.0.clone()), &self.defaults, self.generation.max_length) {
            Ok((params, _)) => params.num_candidates,
            // Not for a checked `SentParams`, whose preset and decoding are known.
            Err(_) => self.generation.max_candidates,
        }
    }

    /// Captions for Rank.
    pub fn captions(&self, captions: Vec<String>) -> Result<ValidCaptions, InvalidParam> {
        let CaptionLimits { max_captions, max_caption_bytes } = self.captions;
        if captions.is_empty() || captions.len() > max_captions {
            return Err(InvalidParam::new(
                "captions",
                format!("give 1..={max_captions} captions, got {}", captions.len()),
            ));
        }
        if let Some((i, c)) = captions.iter().enumerate().find(|(_, c)| c.len() > max_caption_bytes) {
            return Err(InvalidParam::new(
                "captions",
                format!("caption {i} is {} bytes, over the limit of {max_caption_bytes}", c.len()),
            ));
        }
        Ok(ValidCaptions(captions))
    }

    /// What a Caption request lists: `top_k` (unset: [`DEFAULT_TOP_K`]) entries, merged or each.
    pub fn listing(&self, top_k: Option<u32>, each_candidate: bool) -> Result<Listing, InvalidParam> {
        match top_k.unwrap_or(DEFAULT_TOP_K) {
            0 => Err(InvalidParam::new("top_k", "must be at least 1")),
            k => Ok(Listing { top_k: k as usize, each_candidate }),
        }
    }
}
