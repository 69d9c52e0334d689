//! How much an upstream may answer and how long it may take: the size bound of each answer,
//! derived from the request limit flags this tier shares with the model tiers, and the wait an
//! upstream call gets when its caller set no deadline (`--upstream-timeout`).

use std::time::Duration;

use crate::validate::{CaptionLimits, GenerationLimits};

/// How long one upstream call may take unless its caller's deadline comes sooner.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// What bounds each upstream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    pub answers: AnswerBounds,
    /// How long a call may take; a caller's earlier deadline still applies.
    pub timeout: Duration,
}

impl Default for CallLimits {
    /// tonic's own message size bound (4 MiB) and [`DEFAULT_TIMEOUT`]; a tier sets its own from
    /// its flags.
    fn default() -> Self {
        const TONIC: usize = 4 << 20;
        Self { answers: AnswerBounds { generate: TONIC, rank: TONIC }, timeout: DEFAULT_TIMEOUT }
    }
}

/// The largest encoded answer, in bytes, of each upstream method; a larger one is refused from
/// its length prefix, before it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerBounds {
    pub generate: usize,
    pub rank: usize,
}

/// A length-delimited field: a one-byte tag (fields below 16) and its length, a varint of at most
/// 10 bytes.
const DELIMITED: usize = 1 + 10;
/// A varint field (`uint32`): tag and value.
const VARINT: usize = 1 + 10;
/// A `float` field: tag and 4 bytes.
const FIXED32: usize = 1 + 4;
/// A token id in a packed `repeated uint32`.
const TOKEN_ID: usize = 5;
/// What an answer holds besides its list: the key ("sha256:<hex>" of the bytes sent, or a URL),
/// the five timings, their tags; with room to spare.
const ENVELOPE: usize = 4096;

impl AnswerBounds {
    /// The bounds of the answers a model tier with these limits gives this tier: a Generate
    /// answer has at most `max_candidates` candidates, each a caption of at most
    /// `max_caption_bytes` and the token ids of at most `max_length` tokens; a Rank answer scores
    /// the captions sent, each with its text, three floats and two integers: no more than a ranker
    /// takes (`max_captions`) nor than this tier sends (the distinct candidates, at most
    /// `max_candidates`), counted as the larger of the two so that a ranker whose flags differ
    /// from this tier's is not refused an honest answer.
    pub fn of(generation: &GenerationLimits, captions: &CaptionLimits) -> Self {
        let text = DELIMITED.saturating_add(captions.max_caption_bytes);
        let token_ids = DELIMITED.saturating_add(TOKEN_ID.saturating_mul(generation.max_length as usize));
        let candidate = DELIMITED.saturating_add(text).saturating_add(token_ids);
        let scored = DELIMITED.saturating_add(text).saturating_add(3 * FIXED32 + 2 * VARINT);
        let list = |n: usize, item: usize| n.saturating_mul(item).saturating_add(ENVELOPE);
        Self {
            generate: list(generation.max_candidates as usize, candidate),
            rank: list(captions.max_captions.max(generation.max_candidates as usize), scored),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::pb;

    const GENERATION: GenerationLimits = GenerationLimits { max_candidates: 32, max_length: 80 };
    const CAPTIONS: CaptionLimits = CaptionLimits { max_captions: 64, max_caption_bytes: 1024 };

    #[test]
    fn the_largest_honest_answers_fit_and_little_more() {
        let bounds = AnswerBounds::of(&GENERATION, &CAPTIONS);
        let timings =
            Some(pb::Timings { fetch_ms: 1e9, preprocess_ms: 1e9, generate_ms: 1e9, rank_ms: 1e9, total_ms: 1e9 });
        let key = format!("sha256:{}", "f".repeat(64));
        let text = "é".repeat(512);
        let generate = pb::GenerateResponse {
            key: key.clone(),
            candidates: vec![pb::Candidate { text: text.clone(), token_ids: vec![u32::MAX; 80] }; 32],
            timings,
        };
        let rank = pb::RankResponse {
            key,
            captions: vec![
                pb::RankedCaption {
                    text,
                    probability: 1.0,
                    cosine: 1.0,
                    logit: 100.0,
                    index: u32::MAX,
                    count: u32::MAX
                };
                64
            ],
            timings,
        };
        let (g, r) = (generate.encoded_len(), rank.encoded_len());
        assert!(g <= bounds.generate && r <= bounds.rank, "{g} {r} {bounds:?}");
        // Within a few hundred bytes per item of the largest honest answer: nothing like the
        // megabytes tonic allows by default.
        assert!(bounds.generate < g + 32 * 64 + ENVELOPE, "{g} {bounds:?}");
        assert!(bounds.rank < r + 64 * 64 + ENVELOPE, "{r} {bounds:?}");
        assert_eq!((bounds.generate, bounds.rank), (50_720, 73_408));
        // A 60 MB answer is far over either bound.
        assert!(bounds.generate.max(bounds.rank) < 100 << 10);
    }

    #[test]
    fn a_rank_answer_may_score_every_candidate_sent() {
        let few_captions = CaptionLimits { max_captions: 8, ..CAPTIONS };
        assert_eq!(
            AnswerBounds::of(&GENERATION, &few_captions).rank,
            AnswerBounds::of(&GENERATION, &CaptionLimits { max_captions: 32, ..CAPTIONS }).rank
        );
    }

    #[test]
    fn huge_flags_saturate() {
        let huge = AnswerBounds::of(
            &GenerationLimits { max_candidates: u32::MAX, max_length: u32::MAX },
            &CaptionLimits { max_captions: usize::MAX, max_caption_bytes: usize::MAX },
        );
        assert_eq!(huge, AnswerBounds { generate: usize::MAX, rank: usize::MAX });
    }
}
