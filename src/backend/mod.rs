//! The model side of the engine: one runner per model (`blip`: step-wise generation, `clip`:
//! one-shot ranking) that owns it (plus tokenizers and preprocessing) and turns a batch of
//! requests into tensors, results and back.

pub mod blip;
pub mod clip;
pub mod device;

pub use blip::{BlipRunner, GenerateInput, GenerateOutput, GeneratedCaption, Prompt};
pub use clip::{ClipRunner, RankInput, RankOutput, RankScore};
pub use device::{graph_mode, CudaGraphs, DeviceChoice, Precision, Quantize};

use tch::{Device, Kind, Tensor};

use crate::models::preprocess::Pixels;

/// Stacks preprocessed images into a `[batch, 3, H, W]` tensor of `kind` on `device`.
fn stack_pixels<'a>(images: impl Iterator<Item = &'a Pixels>, device: Device, kind: Kind) -> Tensor {
    let tensors: Vec<Tensor> =
        images.map(|p| Tensor::from_slice(&p.data).view([3, i64::from(p.height), i64::from(p.width)])).collect();
    crate::models::transfer::upload(&Tensor::stack(&tensors, 0), device).to_kind(kind)
}
