//! The decode state of a batch of BLIP requests: token histories, the self-attention cache, the
//! per-image cross-attention cache, and each row's parameters and random stream. The model stays
//! stateless; this struct owns everything that changes from step to step.
//!
//! Each request brings one image and asks for N candidates, which become N rows sharing that
//! image's cross-attention keys and values. Rows leave as soon as they finish, an image leaves
//! with its last row, and a batch started later can [`join`](DecodeBatch::join) a running one at
//! a step boundary. Rows and images live in fixed [`slots`](super::slots): a joiner writes its
//! state into free slots, a finished row leaves a dead slot that attention masks and sampling
//! never sees, and every row keeps its own history length and positions, so every row computes
//! what it would compute alone and the rows that stay are never copied.

use std::collections::HashMap;

use rand::{rngs::StdRng, Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use super::{
    request::{DecodeRequest, Decoded, SpecialTokens},
    slots::{self, LiveRow, Occupancy, SlotBuffers, StepSlots},
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
    /// The row's index among its image's rows (its candidate, or its beam).
    candidate: usize,
    tokens: Vec<i64>,
    rng: StdRng,
    params: GenerationParams,
    /// Its slot in the self-attention cache, `seen` and the row parameters.
    slot: usize,
    /// Its image's slot in the cross-attention cache.
    image: usize,
}

pub struct DecodeBatch<'m> {
    decoder: &'m BlipTextDecoder,
    special: SpecialTokens,
    /// Per layer, `[image slots, heads, patches, head_dim]`.
    cross: SlotBuffers,
    /// Per layer, `[row slots, heads, positions, head_dim]`: each row's history from position 0.
    cache: SlotBuffers,
    row_slots: Occupancy,
    image_slots: Occupancy,
    /// Live rows, in the order they joined; a beam request's rows are consecutive, in beam order.
    rows: Vec<Row>,
    /// Per row slot.
    row_params: RowParams,
    /// `[row slots, vocab]`: which tokens each row already contains (repetition penalty).
    seen: Tensor,
    /// Finished candidates of requests still in flight (greedy and sampled requests).
    results: HashMap<u64, Vec<Option<Vec<i64>>>>,
    /// Beam search state of beam requests; their rows are their running beams.
    beams: HashMap<u64, BeamState>,
    steps: u64,
    /// Positions each row's history is given room for when the cache is made.
    reserve: i64,
    compactions: u64,
    device: Device,
}

/// The state of a batch's slots, for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotStats {
    /// Row slots the buffers have, and the range a step reads (`0..rows_used`).
    pub row_slots: usize,
    pub rows_used: usize,
    pub image_slots: usize,
    pub images_used: usize,
    /// Positions each row slot has room for.
    pub positions: i64,
    /// Where the first layer's cross-attention keys and self-attention keys live.
    pub cross_ptr: usize,
    pub cache_ptr: usize,
    /// Times the buffers were made anew (growth).
    pub cross_reallocations: u64,
    pub cache_reallocations: u64,
    pub compactions: u64,
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
        let cross = SlotBuffers::adopt(decoder.cross_attn_cache(image_embeds).into_layers());
        let mut rows = Vec::new();
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
                    slot: rows.len(),
                    image: i,
                });
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
            cache: SlotBuffers::default(),
            row_slots: Occupancy::with_taken(rows.len()),
            image_slots: Occupancy::with_taken(requests.len()),
            rows,
            row_params,
            seen,
            results,
            beams,
            steps: 0,
            reserve: reserve.min(decoder.max_positions()),
            compactions: 0,
            device,
        }
    }

    /// Where the batch's slots stand.
    pub fn slot_stats(&self) -> SlotStats {
        SlotStats {
            row_slots: self.row_slots.capacity(),
            rows_used: self.row_slots.used(),
            image_slots: self.image_slots.capacity(),
            images_used: self.image_slots.used(),
            positions: self.cache.size(2),
            cross_ptr: self.cross.data_ptr(),
            cache_ptr: self.cache.data_ptr(),
            cross_reallocations: self.cross.reallocations(),
            cache_reallocations: self.cache.reallocations(),
            compactions: self.compactions,
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
        // The live rows' slots, when they are not simply slots `0..n` in order.
        let live: Option<Tensor>;
        if self.steps == 0 && self.rows.iter().enumerate().any(|(i, r)| r.slot != i) {
            // Rows cancelled before the first step: it runs on slots in order.
            self.compact_rows();
            self.compact_images();
        }
        let hidden = if self.steps == 0 {
            // The first step runs each row's whole prefix; rows are slots `0..n` and images
            // `0..images` in order, and the cache it fills becomes the batch's slots as is.
            let flat: Vec<i64> = self.rows.iter().flat_map(|r| r.tokens.iter().copied()).collect();
            let len = self.rows[0].tokens.len() as i64;
            let ids = Tensor::from_slice(&flat).view([n, len]).upload(self.device);
            let positions = Tensor::arange(len, (Kind::Int64, self.device)).unsqueeze(0).expand([n, len], false);
            let mut cache = SelfAttnCache::reserving(self.reserve);
            let groups = self.rows_per_image();
            let cross = CrossAttnCache::from_layers(self.cross.layers(), groups.len() as i64);
            let hidden = self.decoder.forward_at(&ids, &positions, &mut cache, &cross, &groups, None);
            self.cache = SlotBuffers::adopt(cache.into_layers());
            live = None;
            hidden
        } else {
            let rows: Vec<LiveRow> = self
                .rows
                .iter()
                .map(|r| LiveRow { slot: r.slot, len: r.tokens.len() as i64 - 1, image: r.image, index: r.candidate })
                .collect();
            let width = rows.iter().map(|r| r.len + 1).max().unwrap_or(1);
            let room = self.cache.size(2);
            if width > room {
                // Geometric growth: a history that outgrows its room copies the cache
                // O(log(max_length)) times, not once every few steps.
                self.cache.reserve(self.cache.slots(), 2, width.max(room + room / 2));
            }
            let slots =
                StepSlots::new(&rows, self.row_slots.used(), self.image_slots.used(), self.decoder.kind(), self.device);
            let last: Vec<i64> = self.rows.iter().map(|r| *r.tokens.last().expect("prefix")).collect();
            let pos: Vec<i64> = rows.iter().map(|r| r.len).collect();
            let ids = Tensor::from_slice(&last).view([n, 1]).upload(self.device);
            let positions = Tensor::from_slice(&pos).view([n, 1]).upload(self.device);
            let hidden = self.decoder.forward_slots(&ids, &positions, &mut self.cache, &self.cross, &slots);
            live = slots.row_slots;
            hidden
        };
        let scores = self.decoder.next_token_logits(&hidden).to_kind(Kind::Float);
        let (seen, params) = match &live {
            None => (self.seen.narrow(0, 0, n), self.row_params.narrow(n)),
            Some(idx) => (self.seen.index_select(0, idx), self.row_params.select(idx)),
        };
        self.steps += 1;
        // Every row's chosen token (greedy and sampled rows) and every beam request's best
        // continuations are computed on the device first and come back in one read: a step waits
        // on the device once, whatever mix of strategies its rows follow.
        let all_beams = self.rows.iter().all(|r| self.beams.contains_key(&r.request));
        let choice = (!all_beams).then(|| self.choose_tokens(&scores, &seen, &params));
        let beam_query = (!self.beams.is_empty()).then(|| self.beam_candidates(&scores, &seen, &params));
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
            Some(c) => c.tokens(chosen, &params),
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
        let slot_ids: Vec<i64> = self.rows.iter().map(|r| r.slot as i64).collect();
        let marked = Tensor::ones([n], (Kind::Bool, self.device));
        let _ = self.seen.index_put_(
            &[
                Some(Tensor::from_slice(&slot_ids).upload(self.device)),
                Some(Tensor::from_slice(&next).upload(self.device)),
            ],
            &marked,
            false,
        );

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
    fn beam_candidates(
        &self,
        scores: &Tensor,
        seen: &Tensor,
        params: &RowParams,
    ) -> (Vec<(usize, u64, usize)>, Tensor) {
        let log_probs = scores.log_softmax(-1, Kind::Float);
        let log_probs = logits::repetition_penalty(&log_probs, seen, &params.repetition_penalty);
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

    /// Rebuilds row `i` from row `src[i]` (beams continuing another beam's history): only the
    /// slots of rows that change are written.
    fn reorder_rows(&mut self, src: &[usize]) {
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
    /// batch's first step runs its whole prefix, later steps one token per row. The joiners'
    /// state is written into free slots; the rows already here stay where they are, and the
    /// buffers are made anew only when there are not enough free slots (growing geometrically).
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
        let n = other.rows.len();
        let row_capacity = grown(&self.row_slots, n);
        let history = other.rows.iter().map(|r| r.tokens.len() as i64 - 1).max().unwrap_or(0);
        // Room for the joiners' histories, and the room they had (a GPU's reserve).
        let positions = self.cache.size(2).max(other.cache.size(2));
        self.cache.reserve(row_capacity as i64, 2, positions);
        self.grow_rows(row_capacity);
        let to = self.row_slots.take(n, row_capacity);
        let from: Vec<usize> = other.rows.iter().map(|r| r.slot).collect();
        let (to_t, from_t) = (slot_tensor(&to, self.device), slot_tensor(&from, self.device));
        self.cache.put(&to_t, &other.cache, &from_t, 2, Some(history));
        let seen = other.seen.index_select(0, &from_t);
        let _ = self.seen.index_copy_(0, &to_t, &seen);
        self.row_params.put(&to_t, &other.row_params.select(&from_t));

        let mut images: Vec<usize> = Vec::new();
        for r in &other.rows {
            if !images.contains(&r.image) {
                images.push(r.image);
            }
        }
        let image_capacity = grown(&self.image_slots, images.len());
        self.cross.reserve(image_capacity as i64, 2, self.cross.size(2));
        let image_to = self.image_slots.take(images.len(), image_capacity);
        let image_to_t = slot_tensor(&image_to, self.device);
        self.cross.put(&image_to_t, &other.cross, &slot_tensor(&images, self.device), 2, None);
        for (mut row, slot) in std::mem::take(&mut other.rows).into_iter().zip(to) {
            row.slot = slot;
            row.image = image_to[images.iter().position(|&i| i == row.image).expect("listed")];
            self.rows.push(row);
        }
        self.results.extend(std::mem::take(&mut other.results));
        self.beams.extend(std::mem::take(&mut other.beams));
    }

    /// Makes the per-row tensors (`seen`, the row parameters) `capacity` slots long.
    fn grow_rows(&mut self, capacity: usize) {
        let have = self.seen.size()[0];
        let capacity = capacity as i64;
        if capacity <= have {
            return;
        }
        let seen = Tensor::zeros([capacity, self.seen.size()[1]], (Kind::Bool, self.device));
        seen.narrow(0, 0, have).copy_(&self.seen);
        self.seen = seen;
        self.row_params = self.row_params.grown(capacity);
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

    /// Every row's next token as greedy and sampled rows choose it, computed on the device (beam
    /// rows' entries are ignored); the step reads it back with whatever else it reads.
    fn choose_tokens(&mut self, scores: &Tensor, seen: &Tensor, params: &RowParams) -> Choice {
        let scores = logits::repetition_penalty(scores, seen, &params.repetition_penalty);
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
            let (sampled, tie) = logits::sample_top_k(&scores, params, max_k, &u);
            // Tokens and the tie flag come back in the step's one transfer.
            let read = Tensor::cat(&[sampled.where_self(&is_sample, &greedy), tie.to_kind(Kind::Int64).view([1])], 0);
            return Choice { read, fallback: Some(Fallback { scores, u, is_sample, greedy }) };
        }
        let probs = logits::warp(&scores, params).softmax(-1, Kind::Float);
        Choice { read: logits::sample(&probs, &u).where_self(&is_sample, &greedy), fallback: None }
    }

    /// Rows per image, for a first step (rows in image order).
    fn rows_per_image(&self) -> Vec<i64> {
        let mut groups: Vec<i64> = Vec::new();
        let mut last = usize::MAX;
        for r in &self.rows {
            if r.image == last {
                *groups.last_mut().expect("group") += 1;
            } else {
                groups.push(1);
                last = r.image;
            }
        }
        groups
    }

    /// Keeps the rows at `keep`: the others' slots (and the slots of images left without rows)
    /// become dead, nothing moves, unless occupancy falls below the compaction threshold.
    fn retain_rows(&mut self, keep: &[usize]) {
        let mut old: Vec<Option<Row>> = std::mem::take(&mut self.rows).into_iter().map(Some).collect();
        for &i in keep {
            self.rows.push(old[i].take().expect("each row kept once"));
        }
        for row in old.into_iter().flatten() {
            self.row_slots.release(row.slot);
        }
        for image in 0..self.image_slots.capacity() {
            if self.image_slots.is_taken(image) && !self.rows.iter().any(|r| r.image == image) {
                self.image_slots.release(image);
            }
        }
        if slots::wants_compaction(&self.row_slots) {
            self.compact_rows();
        }
        if slots::wants_compaction(&self.image_slots) {
            self.compact_images();
        }
    }

    /// Moves the live rows to slots `0..rows`, in row order.
    fn compact_rows(&mut self) {
        let from: Vec<usize> = self.rows.iter().map(|r| r.slot).collect();
        let to: Vec<usize> = (0..from.len()).collect();
        let (to_t, from_t) = (slot_tensor(&to, self.device), slot_tensor(&from, self.device));
        self.cache.copy_within(&to_t, &from_t);
        let seen = self.seen.index_select(0, &from_t);
        let _ = self.seen.index_copy_(0, &to_t, &seen);
        let params = self.row_params.select(&from_t);
        self.row_params.put(&to_t, &params);
        for (row, slot) in self.rows.iter_mut().zip(to) {
            row.slot = slot;
        }
        self.row_slots.reset(from.len());
        self.compactions += 1;
    }

    /// Moves the live images to slots `0..images`, in the order of their first rows.
    fn compact_images(&mut self) {
        let mut from: Vec<usize> = Vec::new();
        for r in &self.rows {
            if !from.contains(&r.image) {
                from.push(r.image);
            }
        }
        let to: Vec<usize> = (0..from.len()).collect();
        self.cross.copy_within(&slot_tensor(&to, self.device), &slot_tensor(&from, self.device));
        for row in &mut self.rows {
            row.image = from.iter().position(|&i| i == row.image).expect("listed");
        }
        self.image_slots.reset(from.len());
        self.compactions += 1;
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

/// Slots as indices on `device`.
fn slot_tensor(slots: &[usize], device: Device) -> Tensor {
    Tensor::from_slice(&slots.iter().map(|&s| s as i64).collect::<Vec<_>>()).upload(device)
}

/// The capacity `occupancy` needs for `more` slots: as it is when enough are free, else grown
/// by at least half, so a batch reaches its high-water mark in a few reallocations.
fn grown(occupancy: &Occupancy, more: usize) -> usize {
    let (capacity, free) = (occupancy.capacity(), occupancy.free());
    if more <= free {
        capacity
    } else {
        (capacity + more - free).max(capacity + capacity / 2)
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
