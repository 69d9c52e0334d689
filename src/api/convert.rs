//! Proto messages ⇄ domain types, with field-level validation of what the proto cannot express.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tonic::{metadata::MetadataMap, Status};

use super::pb;
use crate::{
    cascade::{ImageSource, RankedCaption, Timings},
    engine::Admission,
    models::generation::{GenerationParams, Strategy},
};

pub fn image_source(image: Option<pb::Image>) -> Result<ImageSource, Status> {
    match image.and_then(|i| i.source) {
        Some(pb::image::Source::Url(url)) => Ok(ImageSource::Url(url)),
        Some(pb::image::Source::Data(data)) => Ok(ImageSource::Bytes(Arc::new(data))),
        None => Err(Status::invalid_argument("image: set either image.url or image.data")),
    }
}

/// Request parameters over `defaults`; range checks happen in the domain (`validate`).
pub fn generation_params(
    p: Option<pb::GenerationParams>,
    defaults: &GenerationParams,
    max_positions: u32,
) -> Result<GenerationParams, Status> {
    let mut out = defaults.clone();
    out.seed = rand::random();
    let Some(p) = p else { return Ok(out) };
    match pb::Preset::try_from(p.preset) {
        Ok(pb::Preset::Unspecified) => {}
        Ok(pb::Preset::Notebook) => {
            out = GenerationParams { seed: out.seed, ..GenerationParams::notebook(max_positions) }
        }
        Err(_) => return Err(Status::invalid_argument(format!("preset: unknown value {}", p.preset))),
    }
    out.strategy = match pb::Decoding::try_from(p.decoding) {
        Ok(pb::Decoding::Unspecified) => defaults.strategy,
        Ok(pb::Decoding::Greedy) => Strategy::Greedy,
        Ok(pb::Decoding::Sample) => Strategy::Sample,
        Ok(pb::Decoding::Beam) => Strategy::Beam,
        Err(_) => return Err(Status::invalid_argument(format!("decoding: unknown value {}", p.decoding))),
    };
    out.num_candidates = p.num_candidates.unwrap_or(out.num_candidates);
    out.max_length = p.max_length.unwrap_or(out.max_length);
    out.min_length = p.min_length.unwrap_or(out.min_length);
    out.temperature = p.temperature.unwrap_or(out.temperature);
    out.top_k = p.top_k.unwrap_or(out.top_k);
    out.top_p = p.top_p.unwrap_or(out.top_p);
    out.repetition_penalty = p.repetition_penalty.unwrap_or(out.repetition_penalty);
    out.seed = p.seed.unwrap_or(out.seed);
    out.prompt = p.prompt.or(out.prompt);
    out.strip_prompt = p.strip_prompt.unwrap_or(out.strip_prompt);
    out.num_beams = p.num_beams.unwrap_or(out.num_beams);
    out.length_penalty = p.length_penalty.unwrap_or(out.length_penalty);
    out.early_stopping = p.early_stopping.unwrap_or(out.early_stopping);
    Ok(out)
}

/// The caller's gRPC deadline, from the `grpc-timeout` header.
pub fn admission(metadata: &MetadataMap) -> Admission {
    let deadline = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        // A timeout too far ahead to represent is no deadline at all.
        .and_then(|d| Instant::now().checked_add(d));
    Admission { deadline }
}

fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    // The gRPC spec allows at most 8 digits.
    if digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub fn timings(t: &Timings) -> pb::Timings {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    pb::Timings {
        fetch_ms: ms(t.fetch),
        preprocess_ms: ms(t.preprocess),
        generate_ms: ms(t.generate),
        rank_ms: ms(t.rank),
        total_ms: ms(t.total),
    }
}

impl From<RankedCaption> for pb::RankedCaption {
    fn from(c: RankedCaption) -> Self {
        Self {
            text: c.text,
            probability: c.probability,
            cosine: c.cosine,
            logit: c.logit,
            index: c.index,
            count: c.count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None, "over 8 digits");
        assert_eq!(parse_grpc_timeout("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
    }

    #[test]
    fn absurd_timeouts_never_panic() {
        for v in ["18446744073709551615S", "99999999H", "99999999n", "0S"] {
            let mut metadata = MetadataMap::new();
            metadata.insert("grpc-timeout", v.parse().unwrap());
            let _ = admission(&metadata);
        }
    }

    #[test]
    fn unset_fields_keep_defaults_and_set_fields_override() {
        let d = GenerationParams::default();
        let p = generation_params(None, &d, 512).unwrap();
        assert_eq!(GenerationParams { seed: d.seed, ..p }, d);
        let p = generation_params(
            Some(pb::GenerationParams {
                top_p: Some(0.5),
                seed: Some(7),
                decoding: pb::Decoding::Greedy as i32,
                ..Default::default()
            }),
            &d,
            512,
        )
        .unwrap();
        assert_eq!((p.top_p, p.seed, p.strategy, p.top_k), (0.5, 7, Strategy::Greedy, d.top_k));
        let bad = pb::GenerationParams { decoding: 99, ..Default::default() };
        assert_eq!(generation_params(Some(bad), &d, 512).unwrap_err().code(), tonic::Code::InvalidArgument);
        let nb = pb::GenerationParams { preset: pb::Preset::Notebook as i32, top_k: Some(7), ..Default::default() };
        let p = generation_params(Some(nb), &d, 40).unwrap();
        assert_eq!((p.max_length, p.min_length, p.repetition_penalty, p.top_k), (40, 10, 1.1, 7));
    }
}
