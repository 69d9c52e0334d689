//! The text decoder's caches: the self-attention keys and values of the tokens decoded so far
//! (written in place, grown when full), and the cross-attention keys and values of each image.

use tch::Tensor;

/// Per-layer self-attention keys and values of the tokens decoded so far.
///
/// Each layer's keys and values live in buffers `[rows, heads, capacity, head_dim]` whose first
/// `len` positions are filled; a step writes its new positions in place. The buffers are made
/// with room for [`reserving`](Self::reserving)'s positions, and grow by
/// [`SelfAttnCache::GROWTH`] positions when full. Growing the history by concatenation instead
/// copied every layer's whole history on every step.
#[derive(Debug, Default)]
pub struct SelfAttnCache {
    pub(super) layers: Vec<(Tensor, Tensor)>,
    pub(super) len: i64,
    pub(super) reserve: i64,
}

impl SelfAttnCache {
    /// Positions of room added whenever a buffer is made or is full.
    const GROWTH: i64 = 16;

    /// A cache whose buffers are made with room for `positions` from the start, so they never
    /// grow while no history gets longer than that.
    pub fn reserving(positions: i64) -> Self {
        Self { reserve: positions, ..Self::default() }
    }

    pub fn past_len(&self) -> i64 {
        self.len
    }

    /// Positions the buffers have room for (0 before the first step).
    pub fn capacity(&self) -> i64 {
        self.layers.first().filter(|(k, _)| k.defined()).map_or(0, |(k, _)| k.size()[2])
    }

    /// The buffers, each `[rows, heads, capacity, head_dim]` with the first
    /// [`past_len`](Self::past_len) positions filled.
    pub(in crate::models::blip) fn into_layers(self) -> Vec<(Tensor, Tensor)> {
        self.layers
    }
}

/// Writes `new` `[rows, heads, n, head_dim]` at positions `past..past + n` of `buffer`, making
/// room first when needed, and returns the filled part `[rows, heads, past + n, head_dim]`.
pub(super) fn write_positions(buffer: &mut Tensor, past: i64, new: &Tensor, reserve: i64) -> Tensor {
    let n = new.size()[2];
    let capacity = if buffer.defined() { buffer.size()[2] } else { 0 };
    if capacity < past + n {
        let mut size = new.size();
        size[2] = (past + n + SelfAttnCache::GROWTH).max(reserve);
        // Zeros, not uninitialised memory: a slot-held batch reads positions past a short row's
        // history (masked), and a masked NaN would still poison the softmax.
        let grown = Tensor::zeros(size.as_slice(), (new.kind(), new.device()));
        if past > 0 {
            grown.narrow(2, 0, past).copy_(&buffer.narrow(2, 0, past));
        }
        *buffer = grown;
    }
    buffer.narrow(2, past, n).copy_(new);
    buffer.narrow(2, 0, past + n)
}

/// Per-layer cross-attention keys and values, one entry per image: `[images, heads, patches, head_dim]`.
#[derive(Debug)]
pub struct CrossAttnCache {
    pub(super) layers: Vec<(Tensor, Tensor)>,
}

impl CrossAttnCache {
    pub fn images(&self) -> i64 {
        self.layers.first().map_or(0, |(k, _)| k.size()[0])
    }

    /// Images `0..images` of slot buffers `[image slots, heads, patches, head_dim]`, without copying.
    pub(in crate::models::blip) fn from_layers(layers: &[(Tensor, Tensor)], images: i64) -> Self {
        Self { layers: layers.iter().map(|(k, v)| (k.narrow(0, 0, images), v.narrow(0, 0, images))).collect() }
    }

    pub(in crate::models::blip) fn into_layers(self) -> Vec<(Tensor, Tensor)> {
        self.layers
    }
}
