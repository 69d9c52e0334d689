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
//! what it would compute alone and the rows that stay are never copied. A greedy or sampled step
//! runs whole (`whole`) where `--cuda-graphs=whole` is on and the executor's arena holds the
//! batch; every other step runs through the layers (`layered`).

mod beams;
mod choose;
mod joins;
mod layered;
mod whole;

pub use whole::capture_whole_steps;

use std::collections::HashMap;

use rand::{rngs::StdRng, Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use super::{
    request::{DecodeRequest, Decoded, SpecialTokens},
    slots::{Occupancy, SlotBuffers},
    BlipTextDecoder,
};
use crate::models::{
    generation::{
        beam::{BeamParams, BeamState},
        logits::RowParams,
        params::{GenerationParams, Strategy},
    },
    timing,
    transfer::Upload,
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

impl Row {
    fn samples(&self) -> bool {
        self.params.strategy == Strategy::Sample
    }

    /// Whether the row is still short of its `min_length` (its end token suppressed).
    fn too_short(&self) -> bool {
        (self.tokens.len() as u32) < self.params.min_length
    }

    /// The row's next uniform draw, in (0, 1].
    fn draw(&mut self) -> f64 {
        1.0 - self.rng.random::<f64>()
    }
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
    /// Set while the batch's slots are the executor's whole-step arena.
    lease: Option<whole::Lease>,
    /// Each step's processed scores, when asked for (tests compare paths with them).
    recorded: Option<Vec<StepScores>>,
}

impl Drop for DecodeBatch<'_> {
    fn drop(&mut self) {
        self.release_arena();
    }
}

/// One step's processed scores (repetition penalty and `min_length` applied), in row order:
/// `rows[i]` is row `i`'s request and candidate.
#[derive(Debug)]
pub struct StepScores {
    pub rows: Vec<(u64, usize)>,
    /// `[rows, vocab]` float.
    pub scores: Tensor,
    /// Whether the step ran whole.
    pub whole: bool,
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
    /// Whether the slots are the executor's whole-step arena.
    pub whole_step_arena: bool,
}

/// What a step's token choice and beam search read of its live rows, in row order, gathered once.
struct LiveRows {
    /// `[rows, vocab]`: the tokens each row already contains.
    seen: Tensor,
    params: RowParams,
    /// `[rows]`: rows still short of their `min_length`, whose end token is suppressed.
    too_short: Tensor,
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
            lease: None,
            recorded: None,
        }
    }

    /// Keeps each step's processed scores from now on (see [`StepScores`]); for tests.
    pub fn record_scores(&mut self) {
        self.recorded.get_or_insert_with(Vec::new);
    }

    /// The scores kept since [`record_scores`](Self::record_scores), taken.
    pub fn take_recorded(&mut self) -> Vec<StepScores> {
        self.recorded.as_mut().map(std::mem::take).unwrap_or_default()
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
            whole_step_arena: self.holds_arena(),
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
        if self.steps == 0 && self.rows.iter().enumerate().any(|(i, r)| r.slot != i) {
            // Rows cancelled before the first step: it runs on slots in order.
            self.compact_rows();
            self.compact_images();
        }
        let (next, mut done, beam_finished) = match self.whole_step() {
            Some(next) => {
                timing::ran_whole();
                if self.recorded.is_some() {
                    let scores = self.whole_step_scores().expect("a whole step holds the arena");
                    self.record(scores, true);
                }
                (next, Vec::new(), Vec::new())
            }
            None => self.layered_step(),
        };
        self.steps += 1;
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

    pub(super) fn record(&mut self, scores: Tensor, whole: bool) {
        let rows = self.rows.iter().map(|r| (r.request, r.candidate)).collect();
        if let Some(recorded) = self.recorded.as_mut() {
            recorded.push(StepScores { rows, scores, whole });
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
        top_k: Tensor::from_slice(&rows.iter().map(|r| r.params.top_k_within(vocab)).collect::<Vec<i64>>())
            .upload(device),
    }
}
