//! What the chain accepts of an upstream's answer: it is checked as a caller's request is, before
//! anything is built from it or kept in the result cache, whichever [`super::Upstreams`] gave it.
//! A broken answer fails the call with a [`BrokenAnswer`] naming the upstream and what was wrong.

use super::BrokenAnswer;
use crate::backend::RankScore;

/// The generator's method, as the upstream metrics name it.
pub const GENERATE: &str = "Generate";
/// The ranker's method, as the upstream metrics name it.
pub const RANK: &str = "Rank";

/// A ranker's score of one caption, with the caption's position among those sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IndexedScore {
    pub index: u32,
    pub score: RankScore,
}

/// The generator's candidates, when there is at least one, no more than the `asked` number, and
/// none longer than a caption may be (`--max-caption-bytes`, as the ranker will check it).
pub fn candidates(candidates: Vec<String>, asked: u32, max_caption_bytes: usize) -> Result<Vec<String>, BrokenAnswer> {
    let broken = |reason, detail: String| Err(BrokenAnswer::new(GENERATE, reason, detail));
    if candidates.is_empty() {
        return broken("no_candidates", "no candidates".into());
    }
    if candidates.len() > asked as usize {
        return broken(
            "too_many_candidates",
            format!("{} candidates, more than the {asked} asked for", candidates.len()),
        );
    }
    if let Some((i, c)) = candidates.iter().enumerate().find(|(_, c)| c.len() > max_caption_bytes) {
        return broken(
            "caption_too_long",
            format!("candidate {i} is {} bytes, over --max-caption-bytes {max_caption_bytes}", c.len()),
        );
    }
    Ok(candidates)
}

/// The ranker's scores back in the order the `sent` captions were: every index in range exactly
/// once, every number finite. (More scores than captions means an index out of range or
/// repeated; fewer, a missing one.)
pub fn scores(answer: Vec<IndexedScore>, sent: usize) -> Result<Vec<RankScore>, BrokenAnswer> {
    let broken = |reason, detail: String| Err(BrokenAnswer::new(RANK, reason, detail));
    let mut scores: Vec<Option<RankScore>> = vec![None; sent];
    for IndexedScore { index, score } in answer {
        let RankScore { probability, cosine, logit } = score;
        if let Some((name, x)) = [("probability", probability), ("cosine", cosine), ("logit", logit)]
            .into_iter()
            .find(|(_, x)| !x.is_finite())
        {
            return broken("non_finite_score", format!("caption {index} has {name} {x}"));
        }
        match scores.get_mut(index as usize) {
            None => return broken("index_out_of_range", format!("index {index}, but {sent} captions were sent")),
            Some(Some(_)) => return broken("duplicate_index", format!("caption {index} is scored twice")),
            Some(slot) => *slot = Some(score),
        }
    }
    if let Some(missing) = scores.iter().position(Option::is_none) {
        let scored = scores.iter().filter(|s| s.is_some()).count();
        return broken("missing_index", format!("{scored} of {sent} captions scored; caption {missing} is missing"));
    }
    Ok(scores.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(index: u32, logit: f32) -> IndexedScore {
        IndexedScore { index, score: RankScore { probability: 0.5, cosine: 0.2, logit } }
    }

    fn reason<T: std::fmt::Debug>(r: Result<T, BrokenAnswer>) -> &'static str {
        r.unwrap_err().reason
    }

    #[test]
    fn candidates_are_at_least_one_at_most_asked_and_each_a_caption() {
        let three = vec!["a".to_string(), "b".into(), "a".into()];
        assert_eq!(candidates(three.clone(), 3, 8).unwrap(), three);
        assert_eq!(candidates(three.clone()[..1].to_vec(), 3, 8).unwrap(), ["a"]);
        assert_eq!(reason(candidates(vec![], 3, 8)), "no_candidates");
        let err = candidates(three.clone(), 2, 8).unwrap_err();
        assert_eq!(err.reason, "too_many_candidates");
        assert_eq!(
            err.to_string(),
            "the Generate upstream's answer is invalid: 3 candidates, more than the 2 asked for"
        );
        let long = vec!["a".to_string(), "x".repeat(9)];
        let err = candidates(long, 3, 8).unwrap_err();
        assert_eq!(
            (err.reason, err.detail.as_str()),
            ("caption_too_long", "candidate 1 is 9 bytes, over --max-caption-bytes 8")
        );
    }

    #[test]
    fn scores_come_back_in_the_order_sent() {
        let out = scores(vec![score(2, 3.0), score(0, 1.0), score(1, 2.0)], 3).unwrap();
        assert_eq!(out.iter().map(|s| s.logit).collect::<Vec<_>>(), [1.0, 2.0, 3.0]);
    }

    #[test]
    fn every_caption_is_scored_once_with_finite_numbers() {
        assert_eq!(reason(scores(vec![score(0, 1.0), score(3, 1.0)], 2)), "index_out_of_range");
        assert_eq!(reason(scores(vec![score(0, 1.0), score(0, 2.0)], 2)), "duplicate_index");
        assert_eq!(reason(scores(vec![score(0, 1.0), score(1, 1.0), score(1, 1.0)], 2)), "duplicate_index");
        let err = scores(vec![score(1, 1.0)], 2).unwrap_err();
        assert_eq!(
            (err.reason, err.detail.as_str()),
            ("missing_index", "1 of 2 captions scored; caption 0 is missing")
        );
        assert_eq!(reason(scores(vec![], 1)), "missing_index");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(reason(scores(vec![score(0, bad)], 1)), "non_finite_score");
            let mut s = score(0, 1.0);
            s.score.probability = bad;
            assert_eq!(reason(scores(vec![s], 1)), "non_finite_score");
            s = score(0, 1.0);
            s.score.cosine = bad;
            let err = scores(vec![s], 1).unwrap_err();
            assert_eq!(err.detail, format!("caption 0 has cosine {bad}"));
        }
    }
}
