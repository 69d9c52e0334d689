//! How a Caption call's candidates become its ranked list: the softmax over all N candidates,
//! duplicates included, as the origin job computes it; then either one entry per distinct caption
//! (its copies' probabilities summed) or one entry per candidate, as the origin prints them.

use std::collections::HashMap;

use super::RankedCaption;
use crate::{backend::RankScore, validate::Listing};

/// The distinct captions in first-seen order, how many candidates each stands for, and for each
/// candidate the position of its distinct caption. Linear in the candidates (one map lookup
/// each); the chain checks an upstream's answer holds at most --max-candidates first.
pub fn distinct_with_counts(candidates: &[String]) -> (Vec<String>, Vec<u32>, Vec<usize>) {
    let mut position: HashMap<&str, usize> = HashMap::with_capacity(candidates.len());
    let mut distinct: Vec<String> = Vec::new();
    let mut counts: Vec<u32> = Vec::new();
    let mut of = Vec::with_capacity(candidates.len());
    for c in candidates {
        let i = *position.entry(c.as_str()).or_insert_with(|| {
            distinct.push(c.clone());
            counts.push(0);
            distinct.len() - 1
        });
        counts[i] += 1;
        of.push(i);
    }
    (distinct, counts, of)
}

/// The probability of one copy of each distinct caption in the softmax over all candidates:
/// e^l / Σ_j n_j e^l_j, computed in f64 from the largest logit down so nothing overflows.
fn per_copy(scores: &[RankScore], counts: &[u32]) -> Vec<f64> {
    let max = scores.iter().map(|s| s.logit as f64).fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s.logit as f64 - max).exp()).collect();
    let total: f64 = weights.iter().zip(counts).map(|(w, &n)| w * n as f64).sum();
    weights.into_iter().map(|w| w / total).collect()
}

/// The ranked list of a Caption call from the scores of its distinct captions.
pub fn rank_candidates(
    candidates: &[String],
    distinct: &[String],
    counts: &[u32],
    of: &[usize],
    scores: &[RankScore],
    listing: Listing,
) -> Vec<RankedCaption> {
    let p = per_copy(scores, counts);
    let entry = |i: usize, index: usize, count: u32| RankedCaption {
        text: distinct[i].clone(),
        probability: (p[i] * count as f64) as f32,
        cosine: scores[i].cosine,
        logit: scores[i].logit,
        index: index as u32,
        count,
    };
    let mut ranked: Vec<RankedCaption> = if listing.each_candidate {
        (0..candidates.len()).map(|j| entry(of[j], j, 1)).collect()
    } else {
        (0..distinct.len()).map(|i| entry(i, i, counts[i])).collect()
    };
    // Stable: equal probabilities keep generation order.
    ranked.sort_by(|a, b| b.probability.total_cmp(&a.probability));
    ranked.truncate(listing.top_k);
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    /// The origin's computation: a softmax over every candidate's logit, duplicates included.
    fn softmax_over_all(logits: &[f64]) -> Vec<f64> {
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let total: f64 = e.iter().sum();
        e.into_iter().map(|x| x / total).collect()
    }

    #[test]
    fn distinct_keeps_first_seen_order_and_counts() {
        let (d, n, of) = distinct_with_counts(&strings(&["b", "a", "b", "c", "b"]));
        assert_eq!(d, ["b", "a", "c"]);
        assert_eq!(n, [3, 1, 1]);
        assert_eq!(of, [0, 1, 0, 2, 0]);
    }

    #[test]
    fn merging_is_linear_in_the_candidates() {
        // 80,000 distinct candidates took seconds when each was compared with those before it.
        let many: Vec<String> = (0..80_000).map(|i| format!("caption {i}")).chain(["caption 7".into()]).collect();
        let start = std::time::Instant::now();
        let (d, n, of) = distinct_with_counts(&many);
        assert!(start.elapsed() < std::time::Duration::from_secs(2), "{:?}", start.elapsed());
        assert_eq!((d.len(), n[7], of[80_000]), (80_000, 2, 7));
    }

    #[test]
    fn probabilities_are_the_softmax_over_all_candidates_merged_or_each() {
        let candidates = strings(&["x", "y", "x", "z", "x", "y", "w", "x", "z", "x"]);
        let logit = |c: &str| match c {
            "x" => 21.5,
            "y" => 22.0,
            "z" => 20.25,
            _ => 19.0,
        };
        let (distinct, counts, of) = distinct_with_counts(&candidates);
        let scores: Vec<RankScore> =
            distinct.iter().map(|c| RankScore { probability: f32::NAN, cosine: 0.1, logit: logit(c) }).collect();
        let reference = softmax_over_all(&candidates.iter().map(|c| logit(c) as f64).collect::<Vec<_>>());

        let each =
            rank_candidates(&candidates, &distinct, &counts, &of, &scores, Listing { top_k: 10, each_candidate: true });
        assert_eq!(each.len(), 10);
        for e in &each {
            assert_eq!(candidates[e.index as usize], e.text);
            assert!((e.probability as f64 - reference[e.index as usize]).abs() < 1e-7, "{e:?}");
            assert_eq!(e.count, 1);
        }
        assert!(each.windows(2).all(|w| w[0].probability >= w[1].probability));
        // Ties keep generation order: the five copies of "x" come in the order generated.
        let xs: Vec<u32> = each.iter().filter(|e| e.text == "x").map(|e| e.index).collect();
        assert_eq!(xs, [0, 2, 4, 7, 9]);

        let merged = rank_candidates(&candidates, &distinct, &counts, &of, &scores, Listing::merged(10));
        let total: f32 = merged.iter().map(|m| m.probability).sum();
        assert!((total - 1.0).abs() < 1e-6);
        for m in &merged {
            let want: f64 = (0..candidates.len()).filter(|&j| candidates[j] == m.text).map(|j| reference[j]).sum();
            assert!((m.probability as f64 - want).abs() < 1e-7, "{m:?} want {want}");
            assert_eq!(m.count as usize, candidates.iter().filter(|c| **c == m.text).count());
        }
        // Five copies of the second-best logit outweigh two of the best.
        assert_eq!(merged[0].text, "x");
        assert_eq!(rank_candidates(&candidates, &distinct, &counts, &of, &scores, Listing::merged(2)).len(), 2);
    }

    #[test]
    fn ten_identical_candidates_are_a_tenth_each_as_the_origin_prints() {
        let candidates = strings(&["same"; 10]);
        let (distinct, counts, of) = distinct_with_counts(&candidates);
        let scores = [RankScore { probability: 1.0, cosine: 0.3, logit: 30.0 }];
        let each =
            rank_candidates(&candidates, &distinct, &counts, &of, &scores, Listing { top_k: 3, each_candidate: true });
        assert_eq!(each.iter().map(|e| e.probability).collect::<Vec<_>>(), [0.1f32; 3]);
        let merged = rank_candidates(&candidates, &distinct, &counts, &of, &scores, Listing::merged(3));
        assert_eq!((merged.len(), merged[0].probability, merged[0].count), (1, 1.0, 10));
    }
}
