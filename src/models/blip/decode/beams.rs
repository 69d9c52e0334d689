//! Beam search within a decode batch: each beam request's best continuations computed on the
//! device for the step's one read, the search advanced on the host, and beams that continue
//! another beam's history rebuilt in their slots.

use tch::{Kind, Tensor};

use super::{DecodeBatch, LiveRows};
use crate::models::{generation::logits, transfer::Upload};

impl DecodeBatch<'_> {
    /// Each beam request's best `2k` continuations on the device: the requests' spans of rows
    /// (first row, id, beams) and their scores and flat indices as one `f64` tensor, `4k` values
    /// per request in span order, for the step's one read.
    pub(super) fn beam_candidates(&self, scores: &Tensor, rows: &LiveRows) -> (Vec<(usize, u64, usize)>, Tensor) {
        let log_probs = scores.log_softmax(-1, Kind::Float);
        let log_probs = logits::repetition_penalty(&log_probs, &rows.seen, &rows.params.repetition_penalty);
        let log_probs = logits::suppress_eos(&log_probs, &rows.too_short, self.special.eos);
        // Every beam request's running scores go up in one upload.
        let mut spans: Vec<(usize, u64, usize)> = Vec::new();
        let mut running = vec![0f32; self.rows.len()];
        let mut start = 0;
        while start < self.rows.len() {
            let id = self.rows[start].request;
            let Some(state) = self.beams.get(&id) else {
                start += 1;
                continue;
            };
            let k = state.num_beams();
            running[start..start + k].copy_from_slice(state.running_scores());
            spans.push((start, id, k));
            start += k;
        }
        let total = log_probs + Tensor::from_slice(&running).view([-1, 1]).upload(self.device);
        let parts: Vec<Tensor> = spans
            .iter()
            .flat_map(|&(start, _, k)| {
                let (values, indices) =
                    total.narrow(0, start as i64, k as i64).view([-1]).topk((2 * k) as i64, -1, true, true);
                // Scores (f32) and flat indices (below 2^53) are exact as f64: one transfer for both.
                [values.to_kind(Kind::Double), indices.to_kind(Kind::Double)]
            })
            .collect();
        let candidates = if parts.is_empty() { Tensor::new() } else { Tensor::cat(&parts, 0) };
        (spans, candidates)
    }

    /// One beam-search step for every beam request from what [`beam_candidates`](Self::beam_candidates)
    /// computed (`read` back): returns, for all rows, the row each new row continues (`src`), the
    /// tokens beam rows take, and the requests whose search ended.
    #[allow(clippy::type_complexity)]
    pub(super) fn advance_beams(
        &mut self,
        spans: Vec<(usize, u64, usize)>,
        read: &[f64],
        vocab: i64,
    ) -> (Vec<usize>, Vec<(usize, i64)>, Vec<(u64, Vec<Vec<i64>>)>) {
        let mut src: Vec<usize> = (0..self.rows.len()).collect();
        let mut tokens = Vec::new();
        let mut finished = Vec::new();
        let mut at = 0;
        for (start, id, k) in spans {
            let (values, indices) = read[at..at + 4 * k].split_at(2 * k);
            at += 4 * k;
            let top: Vec<(f32, i64)> = values.iter().zip(indices).map(|(&v, &i)| (v as f32, i as i64)).collect();
            let beams_tokens: Vec<Vec<i64>> = self.rows[start..start + k].iter().map(|r| r.tokens.clone()).collect();
            let state = self.beams.get_mut(&id).expect("a beam request of this step");
            let step = state.step(&top, vocab, &beams_tokens);
            for (j, (parent, token)) in step.next.into_iter().enumerate() {
                src[start + j] = start + parent;
                tokens.push((start + j, token));
            }
            if let Some(hyps) = step.done {
                finished.push((id, hyps));
            }
        }
        (src, tokens, finished)
    }

    /// Rebuilds row `i` from row `src[i]` (beams continuing another beam's history): only the
    /// slots of rows that change are written.
    pub(super) fn reorder_rows(&mut self, src: &[usize]) {
        let moved: Vec<(i64, i64)> = src
            .iter()
            .enumerate()
            .filter(|&(i, &s)| i != s)
            .map(|(i, &s)| (self.rows[i].slot as i64, self.rows[s].slot as i64))
            .collect();
        if moved.is_empty() {
            return;
        }
        let to = Tensor::from_slice(&moved.iter().map(|m| m.0).collect::<Vec<_>>()).upload(self.device);
        let from = Tensor::from_slice(&moved.iter().map(|m| m.1).collect::<Vec<_>>()).upload(self.device);
        self.cache.copy_within(&to, &from);
        let seen = self.seen.index_select(0, &from);
        let _ = self.seen.index_copy_(0, &to, &seen);
        let histories: Vec<Vec<i64>> = src.iter().map(|&s| self.rows[s].tokens.clone()).collect();
        for (row, tokens) in self.rows.iter_mut().zip(histories) {
            row.tokens = tokens;
        }
    }
}
