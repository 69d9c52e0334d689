//! What caption generation means whatever the model: request parameters, logits processing and
//! beam bookkeeping. The decode loop that drives a model with them is the model's own
//! (`models::blip::decode`).

pub mod beam;
pub mod logits;
pub mod params;

pub use params::{GenerationParams, Strategy};
