//! Caption generation: request parameters, logits processing and the batched decode loop.

pub mod beam;
pub mod decode;
pub mod logits;
pub mod params;

pub use decode::{DecodeBatch, DecodeRequest, Decoded, SpecialTokens};
pub use params::{GenerationLimits, GenerationParams, InvalidParam, Strategy};
