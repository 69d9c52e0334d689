//! Images from the outside world: fetching by URL (with limits, and an egress policy for what
//! the server may reach) and the byte-bounded cache of model-ready pixels that lets concurrent
//! calls share one fetch and decode. Decoding and preprocessing live in the `caption-images`
//! crate.

pub mod cache;
pub mod conditional;
pub mod egress;
pub mod fetch;
pub mod lanes;

pub use cache::{CacheKey, ImageCache};
pub use caption_images::{decode_image, dimensions, resize, DecodeError, DecodeLimits, RgbImage};
pub use conditional::{Conditional, Fetched, Validators};
pub use egress::EgressPolicy;
pub use fetch::{CheckedUrl, FetchLimits, Fetcher};
pub use lanes::{DecodeLanes, SMALL_IMAGE_PIXELS};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("image url {url:?} is not valid: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("image url {0:?}: file:// urls are not enabled on this server (see --allow-file-dir)")]
    FileNotAllowed(String),
    #[error("image url {url:?}: {reason}")]
    Fetch { url: String, reason: String },
    /// The egress policy refused where the URL (or a redirect) leads. Says neither the address
    /// nor the rule: either would map the server's network for the caller.
    #[error("image url {url:?}: destination not allowed")]
    DestinationDenied { url: String },
    #[error("image is larger than the server's limit of {limit} bytes (--max-image-bytes)")]
    TooLarge { limit: u64 },
    #[error("{}", with_flag(.0))]
    Decode(#[from] DecodeError),
}

/// The decode error's text, naming the server flag that sets the limit it hit.
fn with_flag(e: &DecodeError) -> String {
    match e {
        DecodeError::TooManyPixels { .. } => format!("{e} (--max-image-pixels)"),
        DecodeError::TooDense { .. } => format!("{e} (--max-image-pixels-per-byte)"),
        _ => e.to_string(),
    }
}
