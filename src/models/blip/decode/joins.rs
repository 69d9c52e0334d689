//! Rows and images coming and going: a batch that joins writes its state into free slots (grown
//! geometrically when too few are free), rows that leave become dead slots, and slots are
//! compacted only when occupancy falls below the threshold.

use tch::{Device, Kind, Tensor};

use super::{DecodeBatch, Row};
use crate::models::{
    blip::slots::{self, Occupancy},
    transfer::Upload,
};

impl<'m> DecodeBatch<'m> {
    /// Moves every row of `other` into this batch. Both must have run at least one step: a
    /// batch's first step runs its whole prefix, later steps one token per row. The joiners'
    /// state is written into free slots; the rows already here stay where they are, and the
    /// buffers are made anew only when there are not enough free slots (growing geometrically).
    pub fn join(&mut self, mut other: DecodeBatch<'m>) {
        if other.is_done() {
            return;
        }
        if self.is_done() && !self.holds_arena() {
            other.steps += self.steps;
            *self = other;
            return;
        }
        assert!(self.steps > 0 && other.steps > 0, "decode batches join only after their first step");
        let n = other.rows.len();
        let row_capacity = grown(&self.row_slots, n, self.cache.slots() as usize);
        let history = other.rows.iter().map(|r| r.tokens.len() as i64 - 1).max().unwrap_or(0);
        // Room for the joiners' histories, and the room they had (a GPU's reserve); an arena's
        // room is fixed, and its limits keep every history within it.
        let positions = match self.holds_arena() {
            true => self.cache.size(2).max(history),
            false => self.cache.size(2).max(other.cache.size(2)),
        };
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
        let image_capacity = grown(&self.image_slots, images.len(), self.cross.slots() as usize);
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
    pub(super) fn grow_rows(&mut self, capacity: usize) {
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

    /// Keeps the rows at `keep`: the others' slots (and the slots of images left without rows)
    /// become dead, nothing moves, unless occupancy falls below the compaction threshold.
    pub(super) fn retain_rows(&mut self, keep: &[usize]) {
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
    pub(super) fn compact_rows(&mut self) {
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
    pub(super) fn compact_images(&mut self) {
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
}

/// Slots as indices on `device`.
pub(super) fn slot_tensor(slots: &[usize], device: Device) -> Tensor {
    Tensor::from_slice(&slots.iter().map(|&s| s as i64).collect::<Vec<_>>()).upload(device)
}

/// The capacity `occupancy` needs for `more` slots: as it is when enough are free, else grown
/// by at least half, so a batch reaches its high-water mark in a few reallocations; never
/// beyond the `room` its buffers already have when that is enough (an arena's).
fn grown(occupancy: &Occupancy, more: usize, room: usize) -> usize {
    let (capacity, free) = (occupancy.capacity(), occupancy.free());
    if more <= free {
        return capacity;
    }
    let needed = capacity + more - free;
    let geometric = needed.max(capacity + capacity / 2);
    if needed <= room {
        geometric.min(room)
    } else {
        geometric
    }
}
