//! The model side of the engine: runners that own BLIP and CLIP (plus tokenizers and
//! preprocessing) and turn a batch of requests into tensors, results and back.

pub mod device;
pub mod generate;
pub mod rank;

pub use device::DeviceChoice;
pub use generate::{BlipRunner, GenerateInput, GenerateOutput, GeneratedCaption, Prompt};
pub use rank::{ClipRunner, RankInput, RankOutput, RankScore};

use tch::{Device, Kind, Tensor};

use crate::models::preprocess::Pixels;

/// Stacks preprocessed images into a `[batch, 3, H, W]` tensor on `device`.
fn stack_pixels<'a>(images: impl Iterator<Item = &'a Pixels>, device: Device) -> Tensor {
    let tensors: Vec<Tensor> =
        images.map(|p| Tensor::from_slice(&p.data).view([3, i64::from(p.height), i64::from(p.width)])).collect();
    Tensor::stack(&tensors, 0).to_device(device).to_kind(Kind::Float)
}
