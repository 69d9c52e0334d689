//! Cross-attention of candidate rows to their images: rows of one image attend to one copy of its
//! keys and values, groups of different sizes padded into one call.

use tch::Tensor;

use crate::models::{nn::attention, transfer};

/// How a forward pass's rows fall into image groups, worked out once per pass rather than per
/// layer: the widest group, and for groups of different sizes (some candidates finished) each
/// row's slot in the groups padded to the widest, uploaded once without blocking.
pub(super) struct ImageGroups {
    pub(super) images: i64,
    pub(super) widest: i64,
    pub(super) slots: Option<Tensor>,
}

impl ImageGroups {
    pub(super) fn new(rows_per_image: &[i64], device: tch::Device) -> Self {
        let widest = rows_per_image.iter().copied().max().unwrap_or(0);
        let slots = rows_per_image.iter().any(|&r| r != widest).then(|| {
            let slots: Vec<i64> = rows_per_image
                .iter()
                .enumerate()
                .flat_map(|(i, &n)| (0..n).map(move |j| i as i64 * widest + j))
                .collect();
            transfer::upload(&Tensor::from_slice(&slots), device)
        });
        Self { images: rows_per_image.len() as i64, widest, slots }
    }
}

/// Attention of row queries `[rows, heads, len, hd]` to per-image keys/values `[images, heads, patches, hd]`,
/// where consecutive rows share an image. The group's queries are folded into one longer query
/// sequence so each image's keys and values are read once, never copied per row.
pub(super) fn grouped_cross_attention(q: &Tensor, k: &Tensor, v: &Tensor, groups: &ImageGroups, scale: f64) -> Tensor {
    let (images, widest) = (groups.images, groups.widest);
    let Some(slots) = &groups.slots else {
        return attend_grid(q, k, v, images, widest, scale);
    };
    // Groups of different sizes: every group is padded to the widest with zero queries, attended
    // in one call, and the padding dropped; one kernel per layer instead of one per image.
    let (_, heads, len, hd) = q.size4().expect("4-d queries");
    let padded = q.new_zeros([images * widest, heads, len, hd], (q.kind(), q.device())).index_copy(0, slots, q);
    attend_grid(&padded, k, v, images, widest, scale).index_select(0, slots)
}

/// Attention of a grid of queries `[images × per_image, heads, len, hd]` (query slot
/// `image × per_image + i`) to per-image keys/values `[images, heads, patches, hd]`: each image's
/// queries are folded into one longer query sequence, so its keys and values are read once.
pub(super) fn attend_grid(q: &Tensor, k: &Tensor, v: &Tensor, images: i64, per_image: i64, scale: f64) -> Tensor {
    let (_, heads, len, hd) = q.size4().expect("4-d queries");
    let q = q.view([images, per_image, heads, len, hd]).permute([0, 2, 1, 3, 4]).reshape([
        images,
        heads,
        per_image * len,
        hd,
    ]);
    attention(&q, k, v, None, scale).view([images, heads, per_image, len, hd]).permute([0, 2, 1, 3, 4]).reshape([
        images * per_image,
        heads,
        len,
        hd,
    ])
}
