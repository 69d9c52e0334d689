//! The fixed-capacity decode state a whole-step graph is captured over: slot buffers made once
//! per executor and model for the most a step may hold, lent to the executor's running decode
//! batch and taken back when it ends. A CUDA graph replays on the addresses it was captured
//! with, so the buffers must outlive every batch; batches come and go with the load, the arena
//! stays (as a serving engine's preallocated KV blocks do).

use std::{cell::RefCell, collections::HashMap};

use tch::{Device, Kind, Tensor};

use super::slots::SlotBuffers;
use crate::models::{
    generation::logits::RowParams,
    graphs::{self, Owner, WholeStep},
};

/// What an arena holds room for: the whole-step limits, and the patches each image's
/// cross-attention keys and values span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Row slots: the largest row bucket, so every bucket's rows are slots of the arena.
    pub rows: i64,
    pub images: i64,
    /// Query slots per image in cross-attention: a row's candidate (or beam) index is below it.
    pub per_image: i64,
    /// Positions each row slot has room for: its longest history.
    pub positions: i64,
    pub patches: i64,
}

impl Capacity {
    /// Room for steps of up to `rows` rows within `limits`, `patches` per image, and at most
    /// `max_positions` positions (the model's).
    pub fn new(rows: i64, limits: WholeStep, patches: i64, max_positions: i64) -> Self {
        let rows = graphs::bucket(rows.clamp(1, graphs::MAX_ROWS)).expect("within the buckets");
        Self {
            rows,
            images: limits.images.max(1),
            per_image: limits.per_image.max(1),
            positions: limits.positions.clamp(1, max_positions),
            patches,
        }
    }

    /// Query slots of cross-attention: `images × per_image`; a dead row's query goes to a slot
    /// past them.
    pub fn query_slots(&self) -> i64 {
        self.images * self.per_image
    }
}

/// Positions a step reads, given the longest history it reads (`width`): powers of two from 16,
/// and the capacity itself last, so a few graphs per row bucket cover every history.
pub fn positions_bucket(width: i64, capacity: i64) -> i64 {
    ((width.max(16) as u64).next_power_of_two() as i64).min(capacity)
}

/// Every positions bucket up to `capacity`, smallest first.
pub fn positions_buckets(capacity: i64) -> Vec<i64> {
    let mut buckets: Vec<i64> = (1..=capacity).map(|w| positions_bucket(w, capacity)).collect();
    buckets.dedup();
    buckets
}

/// The buffers, whole. A batch that holds them keeps them in its own fields (they are its
/// slots) and hands them back as one.
pub struct Arena {
    /// Its whole-step graphs are this owner's: buffers made anew never meet old graphs.
    pub owner: Owner,
    pub capacity: Capacity,
    /// Per layer, `[rows, heads, positions, head_dim]`.
    pub cache: SlotBuffers,
    /// Per layer, `[images, heads, patches, head_dim]`.
    pub cross: SlotBuffers,
    /// `[rows, vocab]`
    pub seen: Tensor,
    pub params: RowParams,
    /// `[rows, vocab]` float: a step's processed scores, where the step graph leaves them for the
    /// token choice.
    pub scores: Tensor,
}

/// The text decoder's dimensions an arena's buffers take.
#[derive(Debug, Clone, Copy)]
pub struct DecoderShape {
    pub layers: usize,
    pub heads: i64,
    pub head_dim: i64,
    pub vocab: i64,
    pub kind: Kind,
    pub device: Device,
}

impl Arena {
    /// Empty buffers for `capacity`, for a decoder of `shape`.
    pub fn new(capacity: Capacity, shape: DecoderShape) -> Self {
        let DecoderShape { layers, heads, head_dim, vocab, kind, device } = shape;
        // Zeros, not uninitialised memory: a step reads dead slots (masked), and a NaN there would
        // still poison the softmax.
        let buffers = |slots: i64, len: i64| {
            let make = || Tensor::zeros([slots, heads, len, head_dim], (kind, device));
            SlotBuffers::adopt((0..layers).map(|_| (make(), make())).collect())
        };
        let col = |v: f64| Tensor::full([capacity.rows, 1], v, (Kind::Float, device));
        Self {
            owner: Owner::new(),
            capacity,
            cache: buffers(capacity.rows, capacity.positions),
            cross: buffers(capacity.images, capacity.patches),
            seen: Tensor::zeros([capacity.rows, vocab], (Kind::Bool, device)),
            // Neutral parameters: a dead slot's scores stay finite whatever it computes.
            params: RowParams {
                repetition_penalty: col(1.0),
                temperature: col(1.0),
                top_k: Tensor::full([capacity.rows], vocab, (Kind::Int64, device)),
                top_p: col(1.0),
            },
            scores: Tensor::zeros([capacity.rows, vocab], (Kind::Float, device)),
        }
    }

    /// Where each buffer lives: a batch that grew any of them no longer holds the arena.
    pub fn fingerprint(cache: &SlotBuffers, cross: &SlotBuffers, seen: &Tensor, params: &RowParams) -> [usize; 4] {
        [cache.data_ptr(), cross.data_ptr(), seen.data_ptr() as usize, params.temperature.data_ptr() as usize]
    }
}

enum Place {
    Here(Arena),
    Lent,
}

thread_local! {
    /// Per model (its decoder's owner), this executor's arena.
    static ARENAS: RefCell<HashMap<Owner, Place>> = RefCell::new(HashMap::new());
}

/// This executor's arena for `model`, made by `make` the first time; `None` while it is lent.
pub fn lend(model: Owner, make: impl FnOnce() -> Arena) -> Option<Arena> {
    ARENAS.with(|arenas| {
        let mut arenas = arenas.borrow_mut();
        match arenas.insert(model, Place::Lent) {
            Some(Place::Here(arena)) => Some(arena),
            Some(Place::Lent) => None,
            None => Some(make()),
        }
    })
}

/// Takes the lent arena back.
pub fn give_back(model: Owner, arena: Arena) {
    ARENAS.with(|arenas| arenas.borrow_mut().insert(model, Place::Here(arena)));
}

/// The lent arena is gone (its borrower grew a buffer past it): its graphs go, and the next
/// borrower gets a new one.
pub fn lost(model: Owner, arena_owner: Owner) {
    tracing::warn!(
        "a decode batch outgrew the whole-step buffers (a request beyond the limits they were made \
         for); a new set is made, and its graphs are captured as steps need them"
    );
    graphs::forget(arena_owner);
    ARENAS.with(|arenas| arenas.borrow_mut().remove(&model));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_buckets_double_from_sixteen_up_to_the_capacity() {
        assert_eq!(positions_buckets(80), [16, 32, 64, 80]);
        assert_eq!(positions_buckets(10), [10]);
        assert_eq!(positions_bucket(17, 80), 32);
        assert_eq!(positions_bucket(70, 80), 80);
        for w in 1..=80 {
            assert!(positions_bucket(w, 80) >= w);
        }
    }

    #[test]
    fn an_arena_is_lent_once_and_made_anew_only_when_lost() {
        let model = Owner::new();
        let cap = Capacity::new(3, WholeStep { images: 2, per_image: 2, positions: 8 }, 5, 512);
        assert_eq!(cap.rows, 4, "the row bucket of 3");
        let shape =
            DecoderShape { layers: 1, heads: 2, head_dim: 4, vocab: 10, kind: Kind::Float, device: Device::Cpu };
        let make = || Arena::new(cap, shape);
        let first = lend(model, make).expect("made");
        let owner = first.owner;
        assert!(lend(model, make).is_none(), "lent out");
        give_back(model, first);
        assert_eq!(lend(model, make).map(|a| a.owner), Some(owner), "the same buffers again");
        lost(model, owner);
        assert_ne!(lend(model, make).map(|a| a.owner), Some(owner));
    }
}
