//! Proto messages ⇄ domain types (the rules requests obey are `crate::validate`'s).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tonic::metadata::MetadataMap;

use crate::{
    cascade::{ImageSource, RankedCaption, Timings},
    engine::Admission,
    pb,
    validate::InvalidParam,
};

pub fn image_source(image: Option<pb::Image>) -> Result<ImageSource, InvalidParam> {
    match image.and_then(|i| i.source) {
        Some(pb::image::Source::Url(url)) => Ok(ImageSource::Url(url)),
        Some(pb::image::Source::Data(data)) => Ok(ImageSource::Bytes(Arc::new(data))),
        None => Err(InvalidParam::new("image", "set either image.url or image.data")),
    }
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
}
