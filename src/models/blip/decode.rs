//! The decode state of a batch of BLIP requests: token histories, the self-attention cache, the
//! per-image cross-attention cache, and each row's parameters and random stream. The model stays
//! stateless; this struct owns everything that changes from step to step.
//!
//! Each request brings one image and asks for N candidates, which become N rows sharing that
//! image's cross-attention keys and values. Rows leave as soon as they finish, an image leaves
//! with its last row, and a batch started later can [`join`](DecodeBatch::join) a running one at
//! a step boundary: its shorter history is left-padded and masked, and its rows keep their own
//! positions, so every row computes what it would compute alone.

use std::collections::HashMap;

use rand::{rngs::StdRng, Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use super::{
    request::{DecodeRequest, Decoded, SpecialTokens},
    BlipTextDecoder, CrossAttnCache, SelfAttnCache,
};
use crate::models::{
    generation::{
        beam::{BeamParams, BeamState},
        logits::{self, RowParams},
        params::{GenerationParams, Strategy},
    },
    timing,
    transfer::{self, Upload},
};

#[derive(Debug)]
struct Row {
    request: u64,
    candidate: usize,
    tokens: Vec<i64>,
    rng: StdRng,
    params: GenerationParams,
    /// Leading cache positions that are padding for this row (it joined a longer-running batch).
    /// Kept on the host, so masks and trimming never wait on the device.
    pad: i64,
}

pub struct DecodeBatch<'m> {
    decoder: &'m BlipTextDecoder,
    special: SpecialTokens,
    cross: CrossAttnCache,
    cache: SelfAttnCache,
    /// Active rows, grouped by image in the order of `cross`.
    rows: Vec<Row>,
    /// Image index (into `cross`) of each active row, parallel to `rows`.
    row_image: Vec<usize>,
    row_params: RowParams,
    /// `[rows, vocab]`: which tokens each row already contains (repetition penalty).
    seen: Tensor,
    /// Finished candidates of requests still in flight (greedy and sampled requests).
    results: HashMap<u64, Vec<Option<Vec<i64>>>>,
    /// Beam search state of beam requests; their rows are their running beams.
    beams: HashMap<u64, BeamState>,
    steps: u64,
    device: Device,
}

impl<'m> DecodeBatch<'m> {
    /// Starts decoding `requests`, where request `i` reads image `i` of `image_embeds`.
    /// Every prefix must have the same length (batches of other lengths can join later).
    pub fn new(
        decoder: &'m BlipTextDecoder,
        special: SpecialTokens,
        image_embeds: &Tensor,
        requests: &[DecodeRequest],
    ) -> Self {
        assert_eq!(image_embeds.size()[0] as usize, requests.len(), "one image per request");
        assert!(
            requests.windows(2).all(|w| w[0].prefix.len() == w[1].prefix.len()),
            "a decode batch starts from prefixes of equal length"
        );
        let device = image_embeds.device();
        let cross = decoder.cross_attn_cache(image_embeds);
        let mut rows = Vec::new();
        let mut row_image = Vec::new();
        let mut beams = HashMap::new();
        for (i, req) in requests.iter().enumerate() {
            let rows_needed = if req.params.strategy == Strategy::Beam {
                let params = BeamParams {
                    num_beams: req.params.num_beams as usize,
                    length_penalty: req.params.length_penalty,
                    early_stopping: req.params.early_stopping,
                    max_length: req.params.max_length as usize,
                    eos: special.eos,
                };
                beams.insert(req.id, BeamState::new(params, req.prefix.len()));
                req.params.num_beams
            } else {
                req.params.num_candidates
            };
            for c in 0..rows_needed as usize {
                rows.push(Row {
                    request: req.id,
                    candidate: c,
                    tokens: req.prefix.clone(),
                    rng: StdRng::seed_from_u64(candidate_seed(req.params.seed, c)),
                    params: req.params.clone(),
                    pad: 0,
                });
                row_image.push(i);
            }
        }
        let vocab = decoder.vocab_size();
        let prefix_ids = Tensor::from_slice(&rows.iter().flat_map(|r| r.tokens.clone()).collect::<Vec<_>>())
            .view([rows.len() as i64, -1])
            .upload(device);
        let seen = Tensor::zeros([rows.len() as i64, vocab], (Kind::Bool, device)).scatter_value(1, &prefix_ids, 1);
        let row_params = row_params(&rows, vocab, device);
        // On a GPU the self-attention cache is made once with room for the longest request, so a
        // decode step never reallocates it (memory is plentiful there and allocation stalls are
        // not). A CPU grows it as histories lengthen: most captions end far before max_length.
        let reserve = match device {
            Device::Cuda(_) => requests.iter().map(|r| i64::from(r.params.max_length)).max().unwrap_or(0),
            _ => 0,
        };
        let results = requests
            .iter()
            .filter(|r| r.params.strategy != Strategy::Beam)
            .map(|r| (r.id, vec![None; r.params.num_candidates as usize]))
            .collect();
        Self {
            decoder,
            special,
            cross,
            cache: SelfAttnCache::reserving(reserve.min(decoder.max_positions())),
            rows,
            row_image,
            row_params,
            seen,
            results,
            beams,
            steps: 0,
            device,
        }
    }

    pub fn is_done(&self) -> bool {
        self.rows.is_empty()
    }

    /// Requests still decoding.
    pub fn active_requests(&self) -> usize {
        self.results.len() + self.beams.len()
    }

    /// Decodes one token for every active row; returns the requests that completed.
    pub fn step(&mut self) -> Vec<Decoded> {
        if self.rows.is_empty() {
            return Vec::new();
        }
        let _timer = timing::StepTimer::start();
        let n = self.rows.len() as i64;
        let first = self.cache.past_len() == 0;
        let (ids, positions) = if first {
            let flat: Vec<i64> = self.rows.iter().flat_map(|r| r.tokens.iter().copied()).collect();
            let len = self.rows[0].tokens.len() as i64;
            let positions = Tensor::arange(len, (Kind::Int64, self.device)).unsqueeze(0).expand([n, len], false);
            (Tensor::from_slice(&flat).view([n, len]), positions)
        } else {
            let last: Vec<i64> = self.rows.iter().map(|r| *r.tokens.last().expect("prefix")).collect();
            let pos: Vec<i64> = self.rows.iter().map(|r| r.tokens.len() as i64 - 1).collect();
            (Tensor::from_slice(&last).view([n, 1]), Tensor::from_slice(&pos).view([n, 1]).upload(self.device))
        };
        let ids = ids.upload(self.device);
        let mask = (!first).then(|| self.step_mask()).flatten();
        let groups = self.rows_per_image();
        let hidden = self.decoder.forward_at(&ids, &positions, &mut self.cache, &self.cross, &groups, mask.as_ref());
        let scores = self.decoder.next_token_logits(&hidden).to_kind(Kind::Float);
        self.steps += 1;
        // Every row's chosen token (greedy and sampled rows) and every beam request's best
        // continuations are computed on the device first and come back in one read: a step waits
        // on the device once, whatever mix of strategies its rows follow.
        let all_beams = self.rows.iter().all(|r| self.beams.contains_key(&r.request));
        let choice = (!all_beams).then(|| self.choose_tokens(&scores));
        let beam_query = (!self.beams.is_empty()).then(|| self.beam_candidates(&scores));
        let mut parts: Vec<Tensor> = Vec::new();
        if let Some(c) = &choice {
            parts.push(c.read.to_kind(Kind::Double));
        }
        if let Some((spans, t)) = &beam_query {
            if !spans.is_empty() {
                parts.push(t.shallow_clone());
            }
        }
        let read = if parts.is_empty() { Vec::new() } else { transfer::read::<f64>(&Tensor::cat(&parts, 0)) };
        let (chosen, beam_read) = read.split_at(choice.as_ref().map_or(0, |c| c.read.size()[0] as usize));
        let mut next = match choice {
            Some(c) => c.tokens(chosen, &self.row_params),
            None => vec![0; self.rows.len()],
        };
        let mut done = Vec::new();
        let mut beam_finished: Vec<u64> = Vec::new();
        if let Some((spans, _)) = beam_query {
            let (src, tokens, finished) = self.advance_beams(spans, beam_read, scores.size()[1]);
            self.reorder_rows(&src);
            for (i, t) in tokens {
                next[i] = t;
            }
            for (id, mut hyps) in finished {
                let n =
                    self.rows.iter().find(|r| r.request == id).map_or(hyps.len(), |r| r.params.num_candidates as usize);
                hyps.truncate(n);
                done.push(Decoded { id, candidates: hyps });
                beam_finished.push(id);
            }
        }
        self.seen = self.seen.scatter_value(1, &Tensor::from_slice(&next).view([-1, 1]).upload(self.device), 1);

        let mut keep = Vec::with_capacity(self.rows.len());
        for (i, (row, &token)) in self.rows.iter_mut().zip(&next).enumerate() {
            row.tokens.push(token);
            if self.beams.contains_key(&row.request) {
                if !beam_finished.contains(&row.request) {
                    keep.push(i);
                }
                continue;
            }
            let finished = token == self.special.eos || row.tokens.len() as u32 >= row.params.max_length;
            if finished {
                if let Some(slots) = self.results.get_mut(&row.request) {
                    slots[row.candidate] = Some(std::mem::take(&mut row.tokens));
                }
            } else {
                keep.push(i);
            }
        }
        for id in &beam_finished {
            self.beams.remove(id);
        }
        if keep.len() < self.rows.len() {
            self.retain_rows(&keep);
        }
        done.extend(self.collect_completed());
        done
    }

    /// Each beam request's best `2k` continuations on the device: the requests' spans of rows
    /// (first row, id, beams) and their scores and flat indices as one `f64` tensor, `4k` values
    /// per request in span order, for the step's one read.
    fn beam_candidates(&self, scores: &Tensor) -> (Vec<(usize, u64, usize)>, Tensor) {
        let log_probs = scores.log_softmax(-1, Kind::Float);
        let log_probs = logits::repetition_penalty(&log_probs, &self.seen, &self.row_params.repetition_penalty);
        let too_short: Vec<bool> = self.rows.iter().map(|r| (r.tokens.len() as u32) < r.params.min_length).collect();
        let log_probs =
            logits::suppress_eos(&log_probs, &Tensor::from_slice(&too_short).upload(self.device), self.special.eos);
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
    fn advance_beams(
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

    /// Rebuilds row `i` from row `src[i]` (beams continuing another beam's history).
    fn reorder_rows(&mut self, src: &[usize]) {
        if src.iter().enumerate().all(|(i, &s)| i == s) {
            return;
        }
        let idx = Tensor::from_slice(&src.iter().map(|&i| i as i64).collect::<Vec<_>>()).upload(self.device);
        self.cache.select_rows(&idx);
        self.seen = self.seen.index_select(0, &idx);
        let histories: Vec<(Vec<i64>, i64)> =
            src.iter().map(|&s| (self.rows[s].tokens.clone(), self.rows[s].pad)).collect();
        for (row, (tokens, pad)) in self.rows.iter_mut().zip(histories) {
            row.tokens = tokens;
            row.pad = pad;
        }
    }

    /// Runs until every row has finished; returns every request's candidates in request order of
    /// completion, and the number of decoder steps taken.
    pub fn run_to_end(mut self) -> (Vec<Decoded>, u64) {
        let mut done = Vec::new();
        while !self.is_done() {
            done.extend(self.step());
        }
        (done, self.steps)
    }

    /// Moves every row of `other` into this batch. Both must have run at least one step: a
    /// batch's first step runs its whole prefix, later steps one token per row.
    pub fn join(&mut self, mut other: DecodeBatch<'m>) {
        if other.is_done() {
            return;
        }
        if self.is_done() {
            other.steps += self.steps;
            *self = other;
            return;
        }
        assert!(self.steps > 0 && other.steps > 0, "decode batches join only after their first step");
        let (a, b) = (self.cache.past_len(), other.cache.past_len());
        for row in &mut self.rows {
            row.pad += (b - a).max(0);
        }
        for row in &mut other.rows {
            row.pad += (a - b).max(0);
        }
        self.cache.append_rows(std::mem::take(&mut other.cache));
        let images = self.cross.images() as usize;
        self.cross.append_images(other.cross);
        self.row_image.extend(other.row_image.iter().map(|i| i + images));
        self.rows.append(&mut other.rows);
        self.seen = Tensor::cat(&[&self.seen, &other.seen], 0);
        self.row_params = self.row_params.concat(&other.row_params);
        self.results.extend(other.results);
        self.beams.extend(other.beams);
    }

    /// Drops every row of request `id` (its caller went away); true if it was decoding.
    pub fn cancel(&mut self, id: u64) -> bool {
        if self.results.remove(&id).is_none() && self.beams.remove(&id).is_none() {
            return false;
        }
        let keep: Vec<usize> = (0..self.rows.len()).filter(|&i| self.rows[i].request != id).collect();
        if keep.len() < self.rows.len() {
            self.retain_rows(&keep);
        }
        true
    }

    /// Additive self-attention mask for a one-token step, or `None` when no row is padded.
    fn step_mask(&self) -> Option<Tensor> {
        if self.rows.iter().all(|r| r.pad == 0) {
            return None;
        }
        let pads: Vec<i64> = self.rows.iter().map(|r| r.pad).collect();
        let n = pads.len() as i64;
        // The step attends to the history and its own new position.
        let width = self.cache.past_len() + 1;
        let blocked = Tensor::arange(width, (Kind::Int64, self.device))
            .unsqueeze(0)
            .lt_tensor(&Tensor::from_slice(&pads).view([n, 1]).upload(self.device));
        Some(
            Tensor::zeros([n, width], (self.decoder.kind(), self.device))
                .masked_fill(&blocked, f64::NEG_INFINITY)
                .view([n, 1, 1, width]),
        )
    }

    /// Every row's next token as greedy and sampled rows choose it, computed on the device (beam
    /// rows' entries are ignored); the step reads it back with whatever else it reads.
    fn choose_tokens(&mut self, scores: &Tensor) -> Choice {
        let scores = logits::repetition_penalty(scores, &self.seen, &self.row_params.repetition_penalty);
        let too_short: Vec<bool> = self.rows.iter().map(|r| (r.tokens.len() as u32) < r.params.min_length).collect();
        let scores =
            logits::suppress_eos(&scores, &Tensor::from_slice(&too_short).upload(self.device), self.special.eos);
        let greedy = scores.argmax(-1, false);
        if !self.rows.iter().any(|r| r.params.strategy == Strategy::Sample) {
            return Choice { read: greedy, fallback: None };
        }
        let u: Vec<f64> = self.rows.iter_mut().map(|r| 1.0 - r.rng.random::<f64>()).collect();
        let u = Tensor::from_slice(&u).view([-1, 1]).upload(self.device);
        let is_sample: Vec<bool> = self.rows.iter().map(|r| r.params.strategy == Strategy::Sample).collect();
        let is_sample = Tensor::from_slice(&is_sample).upload(self.device);
        let vocab = scores.size()[1];
        let max_k = self.rows.iter().map(|r| if r.params.top_k == 0 { vocab } else { i64::from(r.params.top_k) }).max();
        if let Some(max_k) = max_k.filter(|&k| k < vocab) {
            let (sampled, tie) = logits::sample_top_k(&scores, &self.row_params, max_k, &u);
            // Tokens and the tie flag come back in the step's one transfer.
            let read = Tensor::cat(&[sampled.where_self(&is_sample, &greedy), tie.to_kind(Kind::Int64).view([1])], 0);
            return Choice { read, fallback: Some(Fallback { scores, u, is_sample, greedy }) };
        }
        let probs = logits::warp(&scores, &self.row_params).softmax(-1, Kind::Float);
        Choice { read: logits::sample(&probs, &u).where_self(&is_sample, &greedy), fallback: None }
    }

    fn rows_per_image(&self) -> Vec<i64> {
        let mut groups: Vec<i64> = Vec::new();
        let mut last = usize::MAX;
        for &img in &self.row_image {
            if img == last {
                *groups.last_mut().expect("group") += 1;
            } else {
                groups.push(1);
                last = img;
            }
        }
        groups
    }

    fn retain_rows(&mut self, keep: &[usize]) {
        let idx = Tensor::from_slice(&keep.iter().map(|&i| i as i64).collect::<Vec<_>>()).upload(self.device);
        self.cache.select_rows(&idx);
        self.seen = self.seen.index_select(0, &idx);
        self.row_params = self.row_params.select(&idx);
        let mut old_rows: Vec<Option<Row>> = std::mem::take(&mut self.rows).into_iter().map(Some).collect();
        let old_images = std::mem::take(&mut self.row_image);
        // Images that still have rows, renumbered densely in their existing order.
        let mut kept_images: Vec<usize> = Vec::new();
        for &i in keep {
            let img = old_images[i];
            if kept_images.last() != Some(&img) {
                kept_images.push(img);
            }
            self.rows.push(old_rows[i].take().expect("each row kept once"));
            self.row_image.push(kept_images.len() - 1);
        }
        if (kept_images.len() as i64) < self.cross.images() {
            let idx =
                Tensor::from_slice(&kept_images.iter().map(|&i| i as i64).collect::<Vec<_>>()).upload(self.device);
            self.cross.select_images(&idx);
        }
        self.trim_padding();
    }

    /// Drops leading cache positions that are padding for every remaining row.
    fn trim_padding(&mut self) {
        let lead = self.rows.iter().map(|r| r.pad).min().unwrap_or(0);
        if lead > 0 {
            self.cache.drop_leading(lead);
            for row in &mut self.rows {
                row.pad -= lead;
            }
        }
    }

    fn collect_completed(&mut self) -> Vec<Decoded> {
        let complete: Vec<u64> =
            self.results.iter().filter(|(_, s)| s.iter().all(Option::is_some)).map(|(&id, _)| id).collect();
        complete
            .into_iter()
            .map(|id| {
                let slots = self.results.remove(&id).expect("listed");
                Decoded { id, candidates: slots.into_iter().map(|s| s.expect("checked")).collect() }
            })
            .collect()
    }
}

/// A step's chosen tokens on the device, before the step reads them.
struct Choice {
    /// `[rows]` tokens, followed by the top-k draw's tie flag when `fallback` is set.
    read: Tensor,
    fallback: Option<Fallback>,
}

/// What the whole-vocabulary draw needs when ties at some row's k-th score reach beyond the
/// top-k window: nothing of it is computed unless the flag says so.
struct Fallback {
    scores: Tensor,
    u: Tensor,
    is_sample: Tensor,
    greedy: Tensor,
}

impl Choice {
    /// The tokens from `read`, this choice's part of the step's read (`params`: the rows').
    fn tokens(self, read: &[f64], params: &RowParams) -> Vec<i64> {
        let mut tokens: Vec<i64> = read.iter().map(|&t| t as i64).collect();
        let Some(f) = self.fallback else { return tokens };
        if tokens.pop() == Some(0) {
            return tokens;
        }
        // Ties beyond the window are rare (it holds twice the largest k), and which rows they
        // hit is known only once the flag is read: drawing over the whole vocabulary on every
        // step instead would bring back the two full-vocabulary sorts the window avoids. So this
        // step, and only this one, waits on the device a second time.
        let sampled = logits::sample(&logits::warp(&f.scores, params).softmax(-1, Kind::Float), &f.u);
        transfer::read(&sampled.where_self(&f.is_sample, &f.greedy))
    }
}

/// Each candidate draws from its own stream, so its tokens do not depend on which other rows
/// share the batch or when they finish.
fn candidate_seed(seed: u64, candidate: usize) -> u64 {
    // splitmix64 of the pair: well-spread seeds even for consecutive inputs.
    let mut z = seed ^ (candidate as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn row_params(rows: &[Row], vocab: i64, device: Device) -> RowParams {
    let col = |f: &dyn Fn(&GenerationParams) -> f32| {
        Tensor::from_slice(&rows.iter().map(|r| f(&r.params)).collect::<Vec<f32>>()).view([-1, 1]).upload(device)
    };
    let sampling = |p: &GenerationParams| p.strategy == Strategy::Sample;
    RowParams {
        repetition_penalty: col(&|p| p.repetition_penalty),
        temperature: col(&|p| if sampling(p) { p.temperature } else { 1.0 }),
        top_p: col(&|p| if sampling(p) { p.top_p } else { 1.0 }),
        top_k: Tensor::from_slice(
            &rows
                .iter()
                .map(|r| match r.params.top_k {
                    0 => vocab,
                    k => i64::from(k).min(vocab),
                })
                .collect::<Vec<i64>>(),
        )
        .upload(device),
    }
}
