//! What a use case fails with: one error per cause below, and the failed call's correlation key.

use crate::{engine::EngineError, images::ImageError, validate::InvalidParam};

#[derive(Debug, thiserror::Error)]
pub enum CascadeError {
    #[error(transparent)]
    Invalid(#[from] InvalidParam),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// What another process serving a model answered (its gRPC status code and message).
    #[error("{message}")]
    Upstream { code: i32, message: String },
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
