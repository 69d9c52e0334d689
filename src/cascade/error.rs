//! What a use case fails with: one error per cause below (an upstream's broken answer among
//! them), and the failed call's correlation key.

use crate::{engine::EngineError, images::ImageError, validate::InvalidParam};

#[derive(Debug, thiserror::Error)]
pub enum CascadeError {
    #[error(transparent)]
    Invalid(#[from] InvalidParam),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// What a call to another process serving a model came to: its gRPC status code, message and
    /// details (an encoded `google.rpc.Status`, empty when it sent none).
    #[error("{message}")]
    Upstream { code: i32, message: String, details: Vec<u8> },
    /// An upstream answered, but not as the contract says: the answer is not used.
    #[error(transparent)]
    BrokenAnswer(#[from] BrokenAnswer),
}

/// An upstream's answer that breaks the contract of its service (too large, too many candidates,
/// a score that is not a number, a caption scored twice or not at all...).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the {service} upstream's answer is invalid: {detail}")]
pub struct BrokenAnswer {
    /// The upstream's method as the upstream metrics name it: `Generate` or `Rank`.
    pub service: &'static str,
    /// What was wrong, as a metric label (`too_large`, `too_many_candidates`...).
    pub reason: &'static str,
    pub detail: String,
}

impl BrokenAnswer {
    pub fn new(service: &'static str, reason: &'static str, detail: impl Into<String>) -> Self {
        Self { service, reason, detail: detail.into() }
    }
}

/// A failed call, with its image's correlation key when the call got as far as naming the image,
/// so the layers above report it without working it out again.
#[derive(Debug)]
pub struct Failed {
    pub key: Option<String>,
    pub error: CascadeError,
}

impl Failed {
    /// `error`, which befell the call about the image known by `key`.
    pub fn keyed(key: &str, error: impl Into<CascadeError>) -> Self {
        Self { key: Some(key.to_string()), error: error.into() }
    }
}

impl From<CascadeError> for Failed {
    fn from(error: CascadeError) -> Self {
        Self { key: None, error }
    }
}
