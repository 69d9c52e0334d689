//! Logits processing with one set of parameters per row, in the reference's order:
//! repetition penalty → min length → temperature → top-k → top-p (the last three for sampled rows).

use tch::{Kind, Tensor};

/// Per-row parameters, as tensors on the logits' device.
pub struct RowParams {
    /// `[rows, 1]`
    pub repetition_penalty: Tensor,
    /// `[rows, 1]`; 1 for greedy rows.
    pub temperature: Tensor,
    /// `[rows]`; vocabulary size where top-k is off.
    pub top_k: Tensor,
    /// `[rows, 1]`; 1 where top-p is off.
    pub top_p: Tensor,
}

impl Default for RowParams {
    /// No rows, no tensors (a placeholder while the real ones are elsewhere).
    fn default() -> Self {
        Self {
            repetition_penalty: Tensor::new(),
            temperature: Tensor::new(),
            top_k: Tensor::new(),
            top_p: Tensor::new(),
        }
    }
}

impl RowParams {
    /// The first `n` rows.
    pub fn narrow(&self, n: i64) -> Self {
        self.zip(self, |a, _| a.narrow(0, 0, n))
    }

    /// These rows, then ones up to `rows` rows (room for rows that join later).
    pub fn grown(&self, rows: i64) -> Self {
        self.zip(self, |a, _| {
            let mut size = a.size();
            size[0] = rows - size[0];
            Tensor::cat(&[a, &Tensor::ones(size.as_slice(), (a.kind(), a.device()))], 0)
        })
    }

    /// Writes `src`'s rows over rows `idx`, in place.
    pub fn put(&mut self, idx: &Tensor, src: &Self) {
        for (dst, src) in [
            (&mut self.repetition_penalty, &src.repetition_penalty),
            (&mut self.temperature, &src.temperature),
            (&mut self.top_k, &src.top_k),
            (&mut self.top_p, &src.top_p),
        ] {
            let _ = dst.index_copy_(0, idx, src);
        }
    }

    /// The rows at `idx`, in that order.
    pub fn select(&self, idx: &Tensor) -> Self {
        self.zip(self, |a, _| a.index_select(0, idx))
    }

    fn zip(&self, other: &Self, f: impl Fn(&Tensor, &Tensor) -> Tensor) -> Self {
        Self {
            repetition_penalty: f(&self.repetition_penalty, &other.repetition_penalty),
            temperature: f(&self.temperature, &other.temperature),
            top_k: f(&self.top_k, &other.top_k),
            top_p: f(&self.top_p, &other.top_p),
        }
    }
}

/// Divides positive (multiplies negative) scores of tokens already in each row by its penalty.
/// `seen` is a `[rows, vocab]` boolean mask of tokens present in the row's sequence.
pub fn repetition_penalty(scores: &Tensor, seen: &Tensor, penalty: &Tensor) -> Tensor {
    // tch's `a.where_self(cond, b)` is `torch.where(cond, a, b)`.
    let penalised = (scores * penalty).where_self(&scores.lt(0.0), &(scores / penalty));
    penalised.where_self(seen, scores)
}

/// Forbids `eos` in the rows flagged by `too_short` (`[rows]` bool).
pub fn suppress_eos(scores: &Tensor, too_short: &Tensor, eos: i64) -> Tensor {
    let vocab = scores.size()[1];
    let is_eos = Tensor::arange(vocab, (Kind::Int64, scores.device())).eq(eos).unsqueeze(0);
    scores.masked_fill(&is_eos.logical_and(&too_short.unsqueeze(1)), f64::NEG_INFINITY)
}

/// Keeps every token scoring at least the row's k-th best score (ties kept).
pub fn top_k(scores: &Tensor, k: &Tensor) -> Tensor {
    let (sorted, _) = scores.sort(-1, true);
    let kth = sorted.gather(1, &(k - 1).unsqueeze(1), false);
    scores.masked_fill(&scores.lt_tensor(&kth), f64::NEG_INFINITY)
}

/// Removes the least likely tokens whose cumulative probability is at most `1 - p`, always
/// keeping the most likely one.
pub fn top_p(scores: &Tensor, p: &Tensor) -> Tensor {
    let (sorted, order) = scores.sort(-1, false);
    let cumulative = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
    let vocab = scores.size()[1];
    let remove_sorted = cumulative.le_tensor(&(1.0 - p));
    let not_last = Tensor::arange(vocab, (Kind::Int64, scores.device())).lt(vocab - 1).unsqueeze(0);
    let remove_sorted = remove_sorted.logical_and(&not_last);
    let remove = remove_sorted.scatter(1, &order, &remove_sorted);
    // Rows with p = 1 are left untouched, as the reference skips the filter for them.
    let active = p.lt(1.0);
    scores.masked_fill(&remove.logical_and(&active), f64::NEG_INFINITY)
}

/// Sampled scores: temperature, then top-k, then top-p.
pub fn warp(scores: &Tensor, params: &RowParams) -> Tensor {
    let scores = scores / &params.temperature;
    let scores = top_k(&scores, &params.top_k);
    top_p(&scores, &params.top_p)
}

/// Samples one token per row (`u` `[rows, 1]`, each in (0, 1]) from the warped distribution,
/// looking only at each row's best tokens (`max_k` ≥ every row's top-k, and below the vocabulary
/// size): the same draw as warping and sampling the whole vocabulary, since top-k leaves nothing
/// else, without the two full-vocabulary sorts per step. Top-k keeps every token tied with the
/// k-th, so twice `max_k` tokens are looked at (bf16 logits tie often). Returns the tokens `[rows]`
/// and whether each row's ties reach beyond even those (`[rows]` bool; then [`warp`] and
/// [`sample`] over the whole vocabulary give the answer).
pub fn sample_top_k(scores: &Tensor, params: &RowParams, max_k: i64, u: &Tensor) -> (Tensor, Tensor) {
    let scores = scores / &params.temperature;
    let window = (2 * max_k).min(scores.size()[1] - 1);
    let (values, ids) = scores.topk(window + 1, -1, true, true);
    let kth = values.gather(1, &(&params.top_k - 1).clamp_max(max_k - 1).unsqueeze(1), false);
    let tie_beyond = values.narrow(1, window, 1).ge_tensor(&kth).squeeze_dim(1);
    let (values, ids) = (values.narrow(1, 0, window), ids.narrow(1, 0, window));
    let kept = values.masked_fill(&values.lt_tensor(&kth), f64::NEG_INFINITY);
    // Vocabulary order, as the whole-vocabulary draw walks its cumulative distribution.
    let (ids, order) = ids.sort(-1, false);
    let kept = top_p(&kept.gather(1, &order, false), &params.top_p);
    let pick = sample(&kept.softmax(-1, Kind::Float), u);
    (ids.gather(1, &pick.unsqueeze(1), false).squeeze_dim(1), tie_beyond)
}

/// Picks, for each row, the token at which its cumulative probability first reaches `u`
/// (`[rows, 1]`, each in (0, 1]); tokens of zero probability are never picked.
pub fn sample(probs: &Tensor, u: &Tensor) -> Tensor {
    let cdf = probs.cumsum(-1, Kind::Double);
    let total = cdf.narrow(1, cdf.size()[1] - 1, 1);
    let below = cdf.lt_tensor(&(u.to_kind(Kind::Double) * total));
    below.sum_dim_intlist(1, false, Kind::Int64).clamp_max(probs.size()[1] - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: &[f32]) -> Tensor {
        Tensor::from_slice(v).view([1, -1])
    }

    fn vec(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let scores = row(&[2.0, -2.0, 1.0]);
        let seen = Tensor::from_slice(&[true, true, false]).view([1, 3]);
        let out = repetition_penalty(&scores, &seen, &Tensor::from_slice(&[2.0f32]).view([1, 1]));
        assert_eq!(vec(&out), [1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_ties_and_top_p_keeps_at_least_one() {
        let scores = row(&[3.0, 1.0, 3.0, 0.0]);
        let out = top_k(&scores, &Tensor::from_slice(&[1i64]));
        assert_eq!(vec(&out), [3.0, f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY]);
        // probabilities ≈ [0.643, 0.237, 0.087, 0.032]
        let scores = row(&[3.0, 2.0, 1.0, 0.0]);
        let out = top_p(&scores, &Tensor::from_slice(&[0.8f32]).view([1, 1]));
        assert_eq!(vec(&out), [3.0, 2.0, f32::NEG_INFINITY, f32::NEG_INFINITY]);
        let out = top_p(&scores, &Tensor::from_slice(&[0.01f32]).view([1, 1]));
        assert_eq!(vec(&out), [3.0, f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY]);
        let out = top_p(&scores, &Tensor::from_slice(&[1.0f32]).view([1, 1]));
        assert_eq!(vec(&out), [3.0, 2.0, 1.0, 0.0]);
    }

    #[test]
    fn sampling_follows_the_cdf_and_skips_impossible_tokens() {
        let probs = row(&[0.0, 0.25, 0.0, 0.75]).repeat([3, 1]);
        let u = Tensor::from_slice(&[1e-9f32, 0.25, 0.2501]).view([3, 1]);
        let picked = Vec::<i64>::try_from(sample(&probs, &u)).unwrap();
        assert_eq!(picked, [1, 1, 3]);
        let u = Tensor::from_slice(&[1.0f32]).view([1, 1]);
        assert_eq!(Vec::<i64>::try_from(sample(&row(&[0.5, 0.5, 0.0]), &u)).unwrap(), [1]);
    }

    /// The top-k draw picks what the whole-vocabulary draw picks, for every row and threshold.
    #[test]
    fn sampling_within_top_k_matches_the_whole_vocabulary() {
        tch::manual_seed(7);
        let (rows, vocab) = (6, 300);
        let scores = Tensor::randn([rows, vocab], (Kind::Float, tch::Device::Cpu)) * 3.0;
        let params = RowParams {
            repetition_penalty: Tensor::ones([rows, 1], (Kind::Float, tch::Device::Cpu)),
            temperature: Tensor::from_slice(&[1.0f32, 0.7, 1.3, 1.0, 1.0, 2.0]).view([rows, 1]),
            top_k: Tensor::from_slice(&[50i64, 1, 7, 50, 20, 3]),
            top_p: Tensor::from_slice(&[0.9f32, 1.0, 0.5, 1.0, 0.99, 0.3]).view([rows, 1]),
        };
        for step in 0..50 {
            let u = Tensor::rand([rows, 1], (Kind::Double, tch::Device::Cpu)).clamp_min(1e-9);
            let whole = sample(&warp(&scores, &params).softmax(-1, Kind::Float), &u);
            let (fast, tie) = sample_top_k(&scores, &params, 50, &u);
            assert!(!bool::try_from(tie.any()).unwrap());
            assert_eq!(Vec::<i64>::try_from(fast).unwrap(), Vec::<i64>::try_from(whole).unwrap(), "step {step}");
        }
    }

    #[test]
    fn ties_at_the_kth_score_are_kept_or_reported() {
        let params = |k: i64| RowParams {
            repetition_penalty: Tensor::ones([1, 1], (Kind::Float, tch::Device::Cpu)),
            temperature: Tensor::ones([1, 1], (Kind::Float, tch::Device::Cpu)),
            top_k: Tensor::from_slice(&[k]),
            top_p: Tensor::ones([1, 1], (Kind::Float, tch::Device::Cpu)),
        };
        let u = |x: f64| Tensor::from_slice(&[x]).view([1, 1]);
        // k = 2 keeps 5.0 and the three tokens tied at 1.0: the window (4 tokens) holds them all.
        let scores = row(&[1.0, 5.0, 1.0, 0.0, 1.0, -1.0]);
        for x in [0.1, 0.9, 0.97, 0.99, 1.0] {
            let (fast, tie) = sample_top_k(&scores, &params(2), 2, &u(x));
            assert!(!bool::try_from(tie.any()).unwrap());
            let whole = sample(&warp(&scores, &params(2)).softmax(-1, Kind::Float), &u(x));
            assert_eq!(i64::try_from(fast).unwrap(), i64::try_from(whole).unwrap(), "u = {x}");
        }
        // Five tokens tied at 1.0 reach beyond the window: reported.
        let scores = row(&[5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
        let (_, tie) = sample_top_k(&scores, &params(2), 2, &u(0.5));
        assert!(bool::try_from(tie.any()).unwrap());
    }

    #[test]
    fn eos_is_suppressed_only_for_short_rows() {
        let scores = row(&[1.0, 1.0]).repeat([2, 1]);
        let out = suppress_eos(&scores, &Tensor::from_slice(&[true, false]), 1);
        assert_eq!(vec(&out), [1.0, f32::NEG_INFINITY, 1.0, 1.0]);
    }
}
