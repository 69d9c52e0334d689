//! Greedy and sampled one-token steps run whole (`--cuda-graphs=whole`): the batch settles into
//! the executor's [arena](crate::models::blip::arena), and a step is two graph launches, one for
//! the model and logits processing, one for the token choice, with the step's inputs and its
//! random draws uploaded once each and its tokens read back once. Beam steps, and batches the
//! arena cannot hold, take the layered path.

use tch::{Kind, Tensor};

use super::{choose::whole_vocabulary, DecodeBatch, Row};
use crate::models::{
    blip::{
        arena::{self, Arena, Capacity},
        slots::{Occupancy, SlotBuffers},
        text::{column, COLUMNS},
        BlipTextDecoder,
    },
    generation::{
        logits::{self, RowParams},
        params::GenerationParams,
    },
    graphs::{self, GraphMode, Owner},
    transfer::{self, Upload},
};

/// A batch's hold on the executor's arena: its buffers are the batch's slots meanwhile.
pub(super) struct Lease {
    arena: Owner,
    capacity: Capacity,
    /// `[rows, vocab]`: where the step graph leaves its scores for the choice graph.
    scores: Tensor,
    /// Where the arena's buffers live: a batch whose buffers moved grew past the arena.
    fingerprint: [usize; 4],
}

/// Graph pieces of an arena: the step per positions bucket, the choice per top-k window.
const STEP: u32 = 0;
const CHOOSE_TOP_K: u32 = 1 << 20;
const CHOOSE_VOCABULARY: u32 = 1 << 21;

/// What a step's sampled rows draw from.
#[derive(Debug, Clone, Copy)]
enum Window {
    /// The best `k` tokens of each row (twice that looked at), `k` ≥ every row's top-k.
    TopK(i64),
    /// The whole vocabulary (some row's top-k is off).
    Vocabulary,
}

impl Window {
    /// The window of rows whose largest top-k is `max_k`: rounded up to a power of two, so a
    /// few graphs cover every mix of requests.
    fn for_max_k(max_k: i64, vocab: i64) -> Self {
        if max_k >= vocab {
            Window::Vocabulary
        } else {
            Window::TopK(((max_k.max(1) as u64).next_power_of_two() as i64).min(vocab - 1))
        }
    }
}

/// The arena's buffers as a step's graphs read and write them.
struct StepGraph<'a> {
    decoder: &'a BlipTextDecoder,
    mode: GraphMode,
    owner: Owner,
    eos: i64,
    per_image: i64,
    cache: &'a SlotBuffers,
    cross: &'a SlotBuffers,
    seen: &'a Tensor,
    params: &'a RowParams,
    scores: &'a Tensor,
}

impl StepGraph<'_> {
    /// Runs slot rows `0..rows` (`inputs` `[rows, COLUMNS]`, `rows` a bucket) reading `positions`
    /// positions: leaves their processed scores in the arena and returns their greedy tokens.
    fn scores(&self, inputs: &Tensor, positions: i64) -> Tensor {
        graphs::run(self.mode, self.owner, STEP + positions as u32, &[inputs], &|t| {
            let rows = t[0].size()[0];
            let logits = self.decoder.whole_step_logits(self.cache, self.cross, self.per_image, t[0], positions);
            let params = self.params.narrow(rows);
            let scores = logits::repetition_penalty(
                &logits.to_kind(Kind::Float),
                &self.seen.narrow(0, 0, rows),
                &params.repetition_penalty,
            );
            let scores = logits::suppress_eos(&scores, &t[0].select(1, column::TOO_SHORT).ne(0), self.eos);
            self.scores.narrow(0, 0, rows).copy_(&scores);
            vec![scores.argmax(-1, false)]
        })
        .remove(0)
    }

    /// Each slot row's token and whether its ties reach beyond the window (`[rows, 2]`), from
    /// `draws` `[rows, 3]`: the row's uniform draw, 1 where it samples, 1 where it is live.
    fn choose(&self, draws: &Tensor, window: Window) -> Tensor {
        let piece = match window {
            Window::TopK(k) => CHOOSE_TOP_K + k as u32,
            Window::Vocabulary => CHOOSE_VOCABULARY,
        };
        graphs::run(self.mode, self.owner, piece, &[draws], &|t| {
            let rows = t[0].size()[0];
            let (scores, params) = (self.scores.narrow(0, 0, rows), self.params.narrow(rows));
            let greedy = scores.argmax(-1, false);
            let (u, is_sample, live) = (t[0].narrow(1, 0, 1), t[0].select(1, 1).ne(0.0), t[0].select(1, 2).ne(0.0));
            let (tokens, tie) = match window {
                Window::TopK(k) => {
                    let (sampled, tie) = logits::sample_top_k(&scores, &params, k, &u);
                    (sampled.where_self(&is_sample, &greedy), tie.logical_and(&live))
                }
                Window::Vocabulary => (whole_vocabulary(&scores, &params, &u, &is_sample, &greedy), live.zeros_like()),
            };
            vec![Tensor::stack(&[tokens, tie.to_kind(Kind::Int64)], 1)]
        })
        .remove(0)
    }
}

impl<'m> DecodeBatch<'m> {
    /// Every row's next token (in row order) from a whole step, or `None` when this step takes
    /// the layered path.
    pub(super) fn whole_step(&mut self) -> Option<Vec<i64>> {
        let capacity = self.decoder.whole_step()?;
        if self.steps == 0 || !self.beams.is_empty() || graphs::off_here() || !self.settle(capacity) {
            return None;
        }
        let rows = graphs::bucket(self.row_slots.used() as i64).filter(|&r| r <= capacity.rows)?;
        let width = self.rows.iter().map(|r| r.tokens.len() as i64).max()?;
        if width > capacity.positions || self.rows.iter().any(|r| r.candidate as i64 >= capacity.per_image) {
            return None;
        }
        let positions = arena::positions_bucket(width, capacity.positions);
        let mut inputs = dead_rows(rows, capacity);
        for r in &self.rows {
            let at = r.slot * COLUMNS as usize;
            let len = r.tokens.len() as i64 - 1;
            inputs[at + column::TOKEN as usize] = *r.tokens.last().expect("prefix");
            inputs[at + column::POSITION as usize] = len;
            inputs[at + column::READS as usize] = len + 1;
            inputs[at + column::QUERY as usize] = r.image as i64 * capacity.per_image + r.candidate as i64;
            inputs[at + column::TOO_SHORT as usize] = i64::from(r.too_short());
        }
        let device = self.device;
        let inputs = Tensor::from_slice(&inputs).view([rows, COLUMNS]).upload(device);
        let lease = self.lease.as_ref().expect("settled");
        let graph = StepGraph {
            decoder: self.decoder,
            mode: self.decoder.graph_mode(),
            owner: lease.arena,
            eos: self.special.eos,
            per_image: capacity.per_image,
            cache: &self.cache,
            cross: &self.cross,
            seen: &self.seen,
            params: &self.row_params,
            scores: &lease.scores,
        };
        let greedy = graph.scores(&inputs, positions);
        if !self.rows.iter().any(Row::samples) {
            let read = transfer::read::<i64>(&greedy);
            return Some(self.rows.iter().map(|r| read[r.slot]).collect());
        }
        // Every row draws when any row samples, as the layered path does: a row's stream does
        // not depend on the path its steps take.
        let mut draws = [1.0f64, 0.0, 0.0].repeat(rows as usize);
        for r in &mut self.rows {
            draws[3 * r.slot..3 * r.slot + 3].copy_from_slice(&[r.draw(), f64::from(u8::from(r.samples())), 1.0]);
        }
        let vocab = self.decoder.vocab_size();
        let max_k = self.rows.iter().map(|r| r.params.top_k_within(vocab)).max().expect("rows");
        let draws = Tensor::from_slice(&draws).view([rows, 3]).upload(device);
        let chosen = graph.choose(&draws, Window::for_max_k(max_k, vocab));
        let read = transfer::read::<i64>(&chosen);
        let mut tokens: Vec<i64> = read.chunks(2).map(|c| c[0]).collect();
        if read.chunks(2).any(|c| c[1] != 0) {
            // As on the layered path: ties beyond the window are rare, and only this step waits
            // on the device a second time.
            let scores = lease.scores.narrow(0, 0, rows);
            tokens = transfer::read(&whole_vocabulary(
                &scores,
                &self.row_params.narrow(rows),
                &draws.narrow(1, 0, 1),
                &draws.select(1, 1).ne(0.0),
                &scores.argmax(-1, false),
            ));
        }
        Some(self.rows.iter().map(|r| tokens[r.slot]).collect())
    }

    /// Whether the batch holds the executor's arena, moving into it first when it fits and the
    /// arena is free; a batch that grew a buffer past the arena lets it go.
    fn settle(&mut self, capacity: Capacity) -> bool {
        if let Some(lease) = &self.lease {
            if lease.fingerprint == self.fingerprint() {
                return true;
            }
            arena::lost(self.decoder.owner(), lease.arena);
            self.lease = None;
            return false;
        }
        let history = self.rows.iter().map(|r| r.tokens.len() as i64).max().unwrap_or(0);
        let fits = self.rows.len() as i64 <= capacity.rows
            && self.image_slots.live() as i64 <= capacity.images
            && history < capacity.positions
            && self.rows.iter().all(|r| (r.candidate as i64) < capacity.per_image);
        if !fits {
            return false;
        }
        let decoder = self.decoder;
        let Some(arena) = arena::lend(decoder.owner(), || decoder.new_arena(capacity)) else { return false };
        let holder = self.holding(arena);
        let own = std::mem::replace(self, holder);
        self.join(own);
        true
    }

    /// An empty batch whose slots are `arena`'s buffers, to take this batch's place (its record
    /// goes with it).
    fn holding(&mut self, arena: Arena) -> DecodeBatch<'m> {
        let fingerprint = Arena::fingerprint(&arena.cache, &arena.cross, &arena.seen, &arena.params);
        DecodeBatch {
            decoder: self.decoder,
            special: self.special,
            cross: arena.cross,
            cache: arena.cache,
            row_slots: Occupancy::default(),
            image_slots: Occupancy::default(),
            rows: Vec::new(),
            row_params: arena.params,
            seen: arena.seen,
            results: Default::default(),
            beams: Default::default(),
            steps: self.steps,
            reserve: self.reserve,
            compactions: self.compactions,
            device: self.device,
            lease: Some(Lease { arena: arena.owner, capacity: arena.capacity, scores: arena.scores, fingerprint }),
            recorded: self.recorded.take(),
        }
    }

    fn fingerprint(&self) -> [usize; 4] {
        Arena::fingerprint(&self.cache, &self.cross, &self.seen, &self.row_params)
    }

    pub(super) fn holds_arena(&self) -> bool {
        self.lease.is_some()
    }

    /// Hands the arena back when the batch ends (or lets it go if a buffer grew past it).
    pub(super) fn release_arena(&mut self) {
        let Some(lease) = self.lease.take() else { return };
        let model = self.decoder.owner();
        if lease.fingerprint != self.fingerprint() {
            arena::lost(model, lease.arena);
            return;
        }
        let arena = Arena {
            owner: lease.arena,
            capacity: lease.capacity,
            cache: std::mem::take(&mut self.cache),
            cross: std::mem::take(&mut self.cross),
            seen: std::mem::replace(&mut self.seen, Tensor::new()),
            params: std::mem::take(&mut self.row_params),
            scores: lease.scores,
        };
        arena::give_back(model, arena);
    }

    /// The processed scores of this whole step's rows, in row order (for the record).
    pub(super) fn whole_step_scores(&self) -> Option<Tensor> {
        let lease = self.lease.as_ref()?;
        let slots: Vec<i64> = self.rows.iter().map(|r| r.slot as i64).collect();
        Some(lease.scores.index_select(0, &Tensor::from_slice(&slots).upload(self.device)))
    }
}

/// Inputs of `rows` dead slot rows: they read one position and query past the grid, each in a
/// place of its own.
fn dead_rows(rows: i64, capacity: Capacity) -> Vec<i64> {
    let mut inputs = vec![0i64; (rows * COLUMNS) as usize];
    for (s, row) in inputs.chunks_mut(COLUMNS as usize).enumerate() {
        row[column::READS as usize] = 1;
        row[column::QUERY as usize] = capacity.query_slots() + s as i64;
    }
    inputs
}

/// Captures, into this executor's arena, the step graph of every row bucket and positions
/// bucket and the choice graph of every row bucket for the default top-k's window, so serving
/// captures only for windows of other top-k values; returns the graphs made. It runs steps of
/// dead rows: a graph depends only on its shapes.
pub fn capture_whole_steps(decoder: &BlipTextDecoder, eos: i64) -> usize {
    let Some(capacity) = decoder.whole_step() else { return 0 };
    let Some(arena) = arena::lend(decoder.owner(), || decoder.new_arena(capacity)) else { return 0 };
    let _no_grad = tch::no_grad_guard();
    let graph = StepGraph {
        decoder,
        mode: decoder.graph_mode(),
        owner: arena.owner,
        eos,
        per_image: capacity.per_image,
        cache: &arena.cache,
        cross: &arena.cross,
        seen: &arena.seen,
        params: &arena.params,
        scores: &arena.scores,
    };
    let device = arena.seen.device();
    let vocab = decoder.vocab_size();
    let window = Window::for_max_k(GenerationParams::default().top_k_within(vocab), vocab);
    let mut made = 0;
    for rows in graphs::buckets_up_to(capacity.rows) {
        let inputs = Tensor::from_slice(&dead_rows(rows, capacity)).view([rows, COLUMNS]).upload(device);
        for positions in arena::positions_buckets(capacity.positions) {
            let _ = graph.scores(&inputs, positions);
            made += 1;
        }
        let draws = Tensor::zeros([rows, 3], (Kind::Double, device));
        let _ = draws.narrow(1, 0, 1).fill_(1.0);
        let _ = graph.choose(&draws, window);
        made += 1;
    }
    arena::give_back(decoder.owner(), arena);
    made
}
