//! The rules of generation parameters, each written once and applied both to a whole request
//! (defaults filled in) and to the fields a cascade tier passes on; and the wire's enums read as
//! the domain's.

use super::{GenerationLimits, InvalidParam, SeedOrigin};
use crate::{
    models::generation::{GenerationParams, Strategy},
    pb,
};

/// Longest accepted prompt; its tokens must also leave room under `max_length`.
pub const MAX_PROMPT_BYTES: usize = 512;

/// Most beams one request may use.
pub const MAX_BEAMS: u32 = 16;

fn num_candidates(n: u32, limits: &GenerationLimits) -> Result<(), InvalidParam> {
    if n == 0 || n > limits.max_candidates {
        return Err(InvalidParam::new("num_candidates", format!("must be in 1..={}, got {n}", limits.max_candidates)));
    }
    Ok(())
}

fn max_length(n: u32, limits: &GenerationLimits) -> Result<(), InvalidParam> {
    if n < 2 || n > limits.max_length {
        return Err(InvalidParam::new("max_length", format!("must be in 2..={}, got {n}", limits.max_length)));
    }
    Ok(())
}

fn min_length(n: u32, max_length: u32) -> Result<(), InvalidParam> {
    if n > max_length {
        return Err(InvalidParam::new("min_length", format!("must not exceed max_length {max_length}, got {n}")));
    }
    Ok(())
}

fn positive(field: &'static str, x: f32) -> Result<(), InvalidParam> {
    if !(x.is_finite() && x > 0.0) {
        return Err(InvalidParam::new(field, format!("must be a finite number > 0, got {x}")));
    }
    Ok(())
}

fn top_p(x: f32) -> Result<(), InvalidParam> {
    if !(x.is_finite() && x > 0.0 && x <= 1.0) {
        return Err(InvalidParam::new("top_p", format!("must be in (0, 1], got {x}")));
    }
    Ok(())
}

fn prompt(p: &str) -> Result<(), InvalidParam> {
    if p.len() > MAX_PROMPT_BYTES {
        return Err(InvalidParam::new("prompt", format!("must be at most {MAX_PROMPT_BYTES} bytes")));
    }
    Ok(())
}

fn num_beams(n: u32) -> Result<(), InvalidParam> {
    if n == 0 || n > MAX_BEAMS {
        return Err(InvalidParam::new("num_beams", format!("must be in 1..={MAX_BEAMS}, got {n}")));
    }
    Ok(())
}

fn candidates_within_beams(candidates: u32, beams: u32) -> Result<(), InvalidParam> {
    if candidates > beams {
        return Err(InvalidParam::new(
            "num_candidates",
            format!("beam search returns at most num_beams ({beams}) candidates, got {candidates}"),
        ));
    }
    Ok(())
}

fn length_penalty(x: f32) -> Result<(), InvalidParam> {
    if !x.is_finite() {
        return Err(InvalidParam::new("length_penalty", format!("must be finite, got {x}")));
    }
    Ok(())
}

/// Every rule over a whole request.
pub(super) fn check(p: &GenerationParams, limits: &GenerationLimits) -> Result<(), InvalidParam> {
    num_candidates(p.num_candidates, limits)?;
    max_length(p.max_length, limits)?;
    min_length(p.min_length, p.max_length)?;
    positive("temperature", p.temperature)?;
    top_p(p.top_p)?;
    if let Some(text) = &p.prompt {
        prompt(text)?;
    }
    if p.strategy == Strategy::Beam {
        num_beams(p.num_beams)?;
        candidates_within_beams(p.num_candidates, p.num_beams)?;
        length_penalty(p.length_penalty)?;
    }
    positive("repetition_penalty", p.repetition_penalty)
}

/// The rules a field set on the wire obeys whatever the generator's model and defaults: each
/// set field's range, and the rules between two fields when both are set.
pub(super) fn check_sent(p: &pb::GenerationParams, limits: &GenerationLimits) -> Result<(), InvalidParam> {
    preset(p.preset)?;
    let strategy = strategy(p.decoding)?;
    if let Some(n) = p.num_candidates {
        num_candidates(n, limits)?;
    }
    if let Some(n) = p.max_length {
        max_length(n, limits)?;
    }
    if let Some(n) = p.min_length {
        min_length(n, p.max_length.unwrap_or(limits.max_length))?;
    }
    if let Some(x) = p.temperature {
        positive("temperature", x)?;
    }
    if let Some(x) = p.top_p {
        top_p(x)?;
    }
    if let Some(text) = &p.prompt {
        prompt(text)?;
    }
    if strategy == Some(Strategy::Beam) {
        if let Some(n) = p.num_beams {
            num_beams(n)?;
            if let Some(c) = p.num_candidates {
                candidates_within_beams(c, n)?;
            }
        }
        if let Some(x) = p.length_penalty {
            length_penalty(x)?;
        }
    }
    if let Some(x) = p.repetition_penalty {
        positive("repetition_penalty", x)?;
    }
    Ok(())
}

fn preset(value: i32) -> Result<pb::Preset, InvalidParam> {
    pb::Preset::try_from(value).map_err(|_| InvalidParam::new("preset", format!("unknown value {value}")))
}

/// The strategy a `decoding` value names; `None` for unspecified (the server's default).
fn strategy(value: i32) -> Result<Option<Strategy>, InvalidParam> {
    match pb::Decoding::try_from(value) {
        Ok(pb::Decoding::Unspecified) => Ok(None),
        Ok(pb::Decoding::Greedy) => Ok(Some(Strategy::Greedy)),
        Ok(pb::Decoding::Sample) => Ok(Some(Strategy::Sample)),
        Ok(pb::Decoding::Beam) => Ok(Some(Strategy::Beam)),
        Err(_) => Err(InvalidParam::new("decoding", format!("unknown value {value}"))),
    }
}

/// The wire's name of a strategy, for clients of the API.
pub fn decoding(strategy: Strategy) -> pb::Decoding {
    match strategy {
        Strategy::Greedy => pb::Decoding::Greedy,
        Strategy::Sample => pb::Decoding::Sample,
        Strategy::Beam => pb::Decoding::Beam,
    }
}

/// The strategy a request resolves to, as a generator resolves it (unspecified: the server's
/// default, which the notebook preset keeps).
pub fn resolved_strategy(decoding: i32) -> Result<Strategy, InvalidParam> {
    Ok(strategy(decoding)?.unwrap_or(GenerationParams::default().strategy))
}

/// A request's parameters over `defaults` (or the notebook preset, fitted under `max_length`,
/// the longest a request may ask for); an unset seed is drawn, and said so.
pub(super) fn merged(
    p: Option<pb::GenerationParams>,
    defaults: &GenerationParams,
    max_length: u32,
) -> Result<(GenerationParams, SeedOrigin), InvalidParam> {
    let drawn = rand::random();
    let Some(p) = p else { return Ok((GenerationParams { seed: drawn, ..defaults.clone() }, SeedOrigin::Server)) };
    // Every field by name: one added to the proto does not compile here until it is merged.
    let pb::GenerationParams {
        num_candidates,
        max_length: asked_max_length,
        min_length,
        decoding,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        seed,
        prompt,
        strip_prompt,
        preset: preset_value,
        num_beams,
        length_penalty,
        early_stopping,
    } = p;
    let base = match preset(preset_value)? {
        pb::Preset::Unspecified => defaults.clone(),
        pb::Preset::Notebook => GenerationParams::notebook(max_length),
    };
    let origin = if seed.is_some() { SeedOrigin::Caller } else { SeedOrigin::Server };
    let out = GenerationParams {
        strategy: strategy(decoding)?.unwrap_or(defaults.strategy),
        num_candidates: num_candidates.unwrap_or(base.num_candidates),
        max_length: asked_max_length.unwrap_or(base.max_length),
        min_length: min_length.unwrap_or(base.min_length),
        temperature: temperature.unwrap_or(base.temperature),
        top_k: top_k.unwrap_or(base.top_k),
        top_p: top_p.unwrap_or(base.top_p),
        repetition_penalty: repetition_penalty.unwrap_or(base.repetition_penalty),
        seed: seed.unwrap_or(drawn),
        prompt: prompt.or(base.prompt),
        strip_prompt: strip_prompt.unwrap_or(base.strip_prompt),
        num_beams: num_beams.unwrap_or(base.num_beams),
        length_penalty: length_penalty.unwrap_or(base.length_penalty),
        early_stopping: early_stopping.unwrap_or(base.early_stopping),
    };
    Ok((out, origin))
}
