//! The fixed slots a running decode batch keeps its per-row and per-image state in: buffers sized
//! for a capacity, a row or image taking a free slot when it joins and leaving a dead slot when it
//! ends, so joins and departures move no state of the rows that stay. Capacity grows
//! geometrically to the batch's high-water mark; [`StepSlots`] says which slots a one-token step
//! reads and writes.

use tch::{Device, Kind, Tensor};

use crate::models::transfer;

/// Per-layer buffers `[slots, ...]`, grown geometrically and otherwise written in place.
#[derive(Debug, Default)]
pub struct SlotBuffers {
    layers: Vec<(Tensor, Tensor)>,
    /// Times the buffers were made anew (first use or growth): a join or departure that fits the
    /// capacity adds none.
    reallocations: u64,
}

impl SlotBuffers {
    /// Adopts `layers` (each `[n, ...]`) as slots `0..n`, without copying them.
    pub fn adopt(layers: Vec<(Tensor, Tensor)>) -> Self {
        Self { layers, reallocations: 0 }
    }

    pub fn layers(&self) -> &[(Tensor, Tensor)] {
        &self.layers
    }

    pub fn layers_mut(&mut self) -> &mut [(Tensor, Tensor)] {
        &mut self.layers
    }

    /// Slots the buffers have (0 before the first use).
    pub fn slots(&self) -> i64 {
        self.layers.first().map_or(0, |(k, _)| k.size()[0])
    }

    /// Size of dimension `dim` of the buffers.
    pub fn size(&self, dim: usize) -> i64 {
        self.layers.first().map_or(0, |(k, _)| k.size()[dim])
    }

    pub fn reallocations(&self) -> u64 {
        self.reallocations
    }

    /// Where the first layer's keys live: unchanged as long as the buffers are not made anew.
    pub fn data_ptr(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.data_ptr() as usize)
    }

    /// Makes room for `slots` slots and `cols` entries along dimension `dim` (the positions of
    /// a self-attention cache), keeping what the buffers held; callers grow geometrically.
    pub fn reserve(&mut self, slots: i64, dim: usize, cols: i64) {
        let (have_slots, have_cols) = (self.slots(), self.size(dim));
        if self.layers.is_empty() || (slots <= have_slots && cols <= have_cols) {
            return;
        }
        let (new_slots, new_cols) = (slots.max(have_slots), cols.max(have_cols));
        for (k, v) in &mut self.layers {
            for t in [k, v] {
                let mut size = t.size();
                size[0] = new_slots;
                size[dim] = new_cols;
                let grown = Tensor::zeros(size.as_slice(), (t.kind(), t.device()));
                grown.narrow(0, 0, have_slots).narrow(dim as i64, 0, have_cols).copy_(t);
                *t = grown;
            }
        }
        self.reallocations += 1;
    }

    /// Writes slots `from` of `src` (positions `0..cols` of dimension `dim` where `cols` is
    /// given) into this buffer's slots `to`.
    pub fn put(&mut self, to: &Tensor, src: &SlotBuffers, from: &Tensor, dim: usize, cols: Option<i64>) {
        for ((k, v), (sk, sv)) in self.layers.iter_mut().zip(&src.layers) {
            for (t, s) in [(k, sk), (v, sv)] {
                let (t, s) = match cols {
                    Some(c) => (t.narrow(dim as i64, 0, c), s.narrow(dim as i64, 0, c)),
                    None => (t.shallow_clone(), s.shallow_clone()),
                };
                let _ = t.shallow_clone().index_copy_(0, to, &s.index_select(0, from));
            }
        }
    }

    /// Copies slots `from` onto slots `to` (gathered first, so the two may overlap).
    pub fn copy_within(&mut self, to: &Tensor, from: &Tensor) {
        for (k, v) in &mut self.layers {
            for t in [k, v] {
                let moved = t.index_select(0, from);
                let _ = t.index_copy_(0, to, &moved);
            }
        }
    }
}

/// The slot bookkeeping of one kind of state (rows or images): which slots are taken.
#[derive(Debug, Clone, Default)]
pub struct Occupancy {
    taken: Vec<bool>,
}

impl Occupancy {
    pub fn with_taken(n: usize) -> Self {
        Self { taken: vec![true; n] }
    }

    /// One past the highest taken slot: the slots a step reads.
    pub fn used(&self) -> usize {
        self.taken.iter().rposition(|&t| t).map_or(0, |i| i + 1)
    }

    pub fn live(&self) -> usize {
        self.taken.iter().filter(|&&t| t).count()
    }

    pub fn capacity(&self) -> usize {
        self.taken.len()
    }

    /// Takes `n` free slots, lowest first (filling holes keeps the range a step reads short),
    /// growing the capacity to at least `capacity`; returns them.
    pub fn take(&mut self, n: usize, capacity: usize) -> Vec<usize> {
        if self.taken.len() < capacity {
            self.taken.resize(capacity, false);
        }
        let free: Vec<usize> = (0..self.taken.len()).filter(|&i| !self.taken[i]).take(n).collect();
        assert_eq!(free.len(), n, "room was made for the slots taken");
        for &i in &free {
            self.taken[i] = true;
        }
        free
    }

    /// How many slots are free.
    pub fn free(&self) -> usize {
        self.taken.len() - self.live()
    }

    pub fn is_taken(&self, slot: usize) -> bool {
        self.taken[slot]
    }

    pub fn release(&mut self, slot: usize) {
        self.taken[slot] = false;
    }

    /// After compaction: slots `0..n` taken, the rest free.
    pub fn reset(&mut self, n: usize) {
        for (i, t) in self.taken.iter_mut().enumerate() {
            *t = i < n;
        }
    }
}

/// Below this fraction of the read range live, slots are compacted. A dead slot inside the range
/// costs a step only its attention (the row-wise pieces, the LM head and sampling run on live
/// rows alone), and joiners fill the lowest holes first, so holes persist only while arrivals
/// slow down. At half occupancy the dead slots' attention equals the live rows' own, and one
/// compaction (a copy of the live rows' state, about one step's attention reads) pays for itself
/// within a step or two; above it, holes are cheaper to keep than to close, and a busy batch,
/// whose rows come and go every few steps, would otherwise copy all the time.
pub const COMPACT_BELOW: f64 = 0.5;

/// Whether `occupancy`'s live slots fill less than [`COMPACT_BELOW`] of the range a step reads.
pub fn wants_compaction(occupancy: &Occupancy) -> bool {
    let (live, used) = (occupancy.live(), occupancy.used());
    live > 0 && (live as f64) < COMPACT_BELOW * used as f64
}

/// Which slots a one-token step reads and writes, worked out once per step on the host and
/// uploaded once.
pub struct StepSlots {
    /// Row slots `0..rows_used` are read by self-attention (dead ones masked).
    pub rows_used: i64,
    /// The slot of each live row (in the batch's row order), on the device; `None` when the live
    /// rows are exactly slots `0..rows_used` in order.
    pub row_slots: Option<Tensor>,
    /// The slot of each live row and its position, for writing the step's keys and values.
    pub write_slots: Tensor,
    pub write_positions: Tensor,
    /// Positions self-attention reads: the longest live history and the new position.
    pub width: i64,
    /// Additive mask `[rows_used, 1, 1, width]`: each live slot reads its own history and new
    /// position, a dead slot its first position only (a finite, unused result); `None` when
    /// every slot reads all `width` positions.
    pub mask: Option<Tensor>,
    /// Image slots `0..images_used` are read by cross-attention, each by `widest` query slots.
    pub images_used: i64,
    pub widest: i64,
    /// Each live row's query slot `image * widest + index in its image`; `None` when the live
    /// rows fill every query slot in order.
    pub cross_slots: Option<Tensor>,
}

/// A live row of a step: its row slot, history length (its new position), image slot and index
/// among its image's rows.
#[derive(Debug, Clone, Copy)]
pub struct LiveRow {
    pub slot: usize,
    pub len: i64,
    pub image: usize,
    pub index: usize,
}

impl StepSlots {
    pub fn new(rows: &[LiveRow], rows_used: usize, images_used: usize, kind: Kind, device: Device) -> Self {
        let n = rows.len();
        let width = rows.iter().map(|r| r.len + 1).max().unwrap_or(1);
        let in_order = n == rows_used && rows.iter().enumerate().all(|(i, r)| r.slot == i);
        let up = |v: Vec<i64>| transfer::upload(&Tensor::from_slice(&v), device);
        let row_slots = (!in_order).then(|| up(rows.iter().map(|r| r.slot as i64).collect()));
        let write_slots =
            row_slots.as_ref().map_or_else(|| up(rows.iter().map(|r| r.slot as i64).collect()), Tensor::shallow_clone);
        let write_positions = up(rows.iter().map(|r| r.len).collect());
        let mask = (!in_order || rows.iter().any(|r| r.len + 1 != width)).then(|| {
            // Dead slots read position 0 only; live ones their history.
            let mut reads = vec![1i64; rows_used];
            for r in rows {
                reads[r.slot] = r.len + 1;
            }
            history_mask(&up(reads), width, kind)
        });
        let widest = rows.iter().map(|r| r.index as i64 + 1).max().unwrap_or(1);
        let cross: Vec<i64> = rows.iter().map(|r| r.image as i64 * widest + r.index as i64).collect();
        let filled = n as i64 == images_used as i64 * widest && cross.iter().enumerate().all(|(i, &c)| c == i as i64);
        Self {
            rows_used: rows_used as i64,
            row_slots,
            write_slots,
            write_positions,
            width,
            mask,
            images_used: images_used as i64,
            widest,
            cross_slots: (!filled).then(|| up(cross)),
        }
    }
}

/// Additive self-attention mask `[slots, 1, 1, width]` of slots that each read their first
/// `reads[slot]` positions (`reads` `[slots]`; a dead slot reads 1, a finite and unused result).
pub fn history_mask(reads: &Tensor, width: i64, kind: Kind) -> Tensor {
    let slots = reads.size()[0];
    let blocked = Tensor::arange(width, (Kind::Int64, reads.device())).unsqueeze(0).ge_tensor(&reads.view([slots, 1]));
    Tensor::zeros([slots, width], (kind, reads.device()))
        .masked_fill(&blocked, f64::NEG_INFINITY)
        .view([slots, 1, 1, width])
}
