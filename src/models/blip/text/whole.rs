//! A one-token step whose every shape follows from its row bucket and positions bucket alone, so
//! it can be captured as one CUDA graph: it runs on slot rows `0..rows` of fixed-capacity
//! buffers (dead slots included, their results unused), self-attention reads a fixed span of
//! positions under a mask built from each slot's history length, and cross-attention places
//! each query at its image's slot in a fixed grid. What changes from step to step travels as
//! one `[rows, COLUMNS]` integer input.

use tch::Tensor;

use super::{cross::attend_grid, BlipTextDecoder};
use crate::models::{
    blip::slots::{history_mask, SlotBuffers},
    graphs::Body,
    nn::attention,
};

/// The columns of a whole step's input, one row per slot.
pub mod column {
    /// The slot's last token.
    pub const TOKEN: i64 = 0;
    /// Its position: the length of its history, where the step writes its keys and values.
    pub const POSITION: i64 = 1;
    /// Positions its self-attention reads (history and new token; 1 for a dead slot).
    pub const READS: i64 = 2;
    /// Its cross-attention query slot: `image × per_image + index`, or past the grid when dead.
    pub const QUERY: i64 = 3;
    /// 1 while the row is short of its `min_length` (its end token is suppressed).
    pub const TOO_SHORT: i64 = 4;
}

pub const COLUMNS: i64 = 5;

impl BlipTextDecoder {
    /// Logits `[rows, vocab]` of slot rows `0..rows` for `inputs` `[rows, COLUMNS]`, writing each
    /// slot's keys and values at its position in `cache` (`[slots, heads, capacity, head_dim]`
    /// per layer) and reading its first `positions` positions; cross-attention reads every image
    /// slot of `cross`, `per_image` query slots each. No piece of it is graphed on its own: the
    /// caller captures it whole.
    pub fn whole_step_logits(
        &self,
        cache: &SlotBuffers,
        cross: &SlotBuffers,
        per_image: i64,
        inputs: &Tensor,
        positions: i64,
    ) -> Tensor {
        let rows = inputs.size()[0];
        let col = |c: i64| inputs.select(1, c);
        let mut x = self.embed(&col(column::TOKEN).view([rows, 1]), &col(column::POSITION).view([rows, 1]));
        let mask = history_mask(&col(column::READS), positions, x.kind());
        let heads = self.layers[0].self_attn.heads;
        let head_dim = x.size()[2] / heads;
        let write_at = col(column::POSITION).view([rows, 1, 1, 1]).expand([rows, heads, 1, head_dim], false);
        let images = cross.slots();
        let grid = images * per_image;
        let query = col(column::QUERY);
        let direct = |_: u32, inputs: &[&Tensor], f: Body| f(inputs);
        for (i, layer) in self.layers.iter().enumerate() {
            let (k_buf, v_buf) = &cache.layers()[i];
            let (ck, cv) = &cross.layers()[i];
            let mut self_attend = |q: &Tensor, k: &Tensor, v: &Tensor, scale: f64| {
                let (mut k_rows, mut v_rows) = (k_buf.narrow(0, 0, rows), v_buf.narrow(0, 0, rows));
                let _ = k_rows.scatter_(2, &write_at, k);
                let _ = v_rows.scatter_(2, &write_at, v);
                attention(q, &k_rows.narrow(2, 0, positions), &v_rows.narrow(2, 0, positions), Some(&mask), scale)
            };
            let cross_attend = |q: &Tensor, scale: f64| {
                // Dead slots' queries land past the grid, each in a place of its own, so no live
                // query is ever overwritten; they read zeros back.
                let mut size = q.size();
                size[0] = grid + rows;
                let placed = q.new_zeros(size.as_slice(), (q.kind(), q.device())).index_copy(0, &query, q);
                let attended = attend_grid(&placed.narrow(0, 0, grid), ck, cv, images, per_image, scale);
                Tensor::cat(&[attended, placed.narrow(0, grid, rows)], 0).index_select(0, &query)
            };
            x = layer.forward(&x, &mut self_attend, &cross_attend, &direct);
        }
        self.lm_head(&x.select(1, 0))
    }
}
