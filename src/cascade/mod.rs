//! The captioning use cases behind the three services, usable in-process by the CLI too. The
//! folder reads as its jobs: [`local`] (the models in this process), [`remote`] (the split tier's
//! chain over other processes' models), [`answer`] (what the chain accepts of an upstream's
//! answer), [`image`] (how a request's image becomes its key and
//! bytes), [`listing`] (how candidates become the ranked list), [`result_cache`] (answers of
//! deterministic Caption requests), and [`models`] (the seam to the models). Requests arrive
//! validated ([`crate::validate`]).

mod answer;
mod error;
pub mod image;
mod listing;
mod local;
mod models;
mod remote;
mod result_cache;
mod types;

pub use answer::{IndexedScore, GENERATE, RANK};
pub use error::{BrokenAnswer, CascadeError, Failed};
pub use image::ImageSource;
pub use local::{Captioner, RequestLimits};
pub use models::{LocalModels, ModelScheduler, Models};
pub use remote::{Chain, UpstreamCall, Upstreams};
pub use result_cache::{Content, Field, Identity, ImageInput, ResultCache, ResultCacheConfig};
pub use types::*;
