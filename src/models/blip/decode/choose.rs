//! How greedy and sampled rows choose their next tokens: computed on the device, read back with
//! the rest of the step, and the whole-vocabulary draw kept for the rare step that needs it.

use tch::{Kind, Tensor};

use super::{DecodeBatch, LiveRows, Row};
use crate::models::{
    generation::logits::{self, RowParams},
    transfer::{self, Upload},
};

impl DecodeBatch<'_> {
    /// Every row's next token as greedy and sampled rows choose it, computed on the device (beam
    /// rows' entries are ignored); the step reads it back with whatever else it reads.
    pub(super) fn choose_tokens(&mut self, scores: &Tensor, rows: &LiveRows) -> Choice {
        let params = &rows.params;
        let scores = logits::repetition_penalty(scores, &rows.seen, &params.repetition_penalty);
        let scores = logits::suppress_eos(&scores, &rows.too_short, self.special.eos);
        let greedy = scores.argmax(-1, false);
        if !self.rows.iter().any(Row::samples) {
            return Choice { read: greedy, fallback: None };
        }
        let u: Vec<f64> = self.rows.iter_mut().map(Row::draw).collect();
        let u = Tensor::from_slice(&u).view([-1, 1]).upload(self.device);
        let is_sample: Vec<bool> = self.rows.iter().map(Row::samples).collect();
        let is_sample = Tensor::from_slice(&is_sample).upload(self.device);
        let vocab = scores.size()[1];
        let max_k = self.rows.iter().map(|r| r.params.top_k_within(vocab)).max();
        if let Some(max_k) = max_k.filter(|&k| k < vocab) {
            let (sampled, tie) = logits::sample_top_k(&scores, params, max_k, &u);
            // Tokens and the tie flag come back in the step's one transfer.
            let read =
                Tensor::cat(&[sampled.where_self(&is_sample, &greedy), tie.any().to_kind(Kind::Int64).view([1])], 0);
            return Choice { read, fallback: Some(Fallback { scores, u, is_sample, greedy }) };
        }
        Choice { read: whole_vocabulary(&scores, params, &u, &is_sample, &greedy), fallback: None }
    }
}

/// A step's chosen tokens on the device, before the step reads them.
pub(super) struct Choice {
    /// `[rows]` tokens, followed by the top-k draw's tie flag when `fallback` is set.
    pub(super) read: Tensor,
    fallback: Option<Fallback>,
}

/// What the whole-vocabulary draw needs when ties at some row's k-th score reach beyond the
/// top-k window: nothing of it is computed unless the flag says so.
pub(super) struct Fallback {
    scores: Tensor,
    u: Tensor,
    is_sample: Tensor,
    greedy: Tensor,
}

impl Choice {
    /// The tokens from `read`, this choice's part of the step's read (`params`: the rows').
    pub(super) fn tokens(self, read: &[f64], params: &RowParams) -> Vec<i64> {
        let mut tokens: Vec<i64> = read.iter().map(|&t| t as i64).collect();
        let Some(f) = self.fallback else { return tokens };
        if tokens.pop() == Some(0) {
            return tokens;
        }
        // Ties beyond the window are rare (it holds twice the largest k), and which rows they
        // hit is known only once the flag is read: drawing over the whole vocabulary on every
        // step instead would bring back the two full-vocabulary sorts the window avoids. So this
        // step, and only this one, waits on the device a second time.
        transfer::read(&whole_vocabulary(&f.scores, params, &f.u, &f.is_sample, &f.greedy))
    }
}

/// Every row's token drawn over the whole vocabulary (sampled rows; `greedy` for the others): the
/// answer when ties reach beyond the top-k window.
pub(super) fn whole_vocabulary(
    scores: &Tensor,
    params: &RowParams,
    u: &Tensor,
    is_sample: &Tensor,
    greedy: &Tensor,
) -> Tensor {
    logits::sample(&logits::warp(scores, params).softmax(-1, Kind::Float), u).where_self(is_sample, greedy)
}
