//! Images from the outside world: fetching by URL (with limits), decoding with EXIF orientation,
//! the per-key cache that lets concurrent calls share one fetch, and Pillow-exact resizing.

pub mod cache;
pub mod decode;
pub mod fetch;
pub mod resize;

pub use cache::ImageCache;
pub use decode::decode_image;
pub use fetch::{FetchLimits, Fetcher};

/// A decoded, upright 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("image url {url:?} is not valid: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("image url {0:?}: file:// urls are not enabled on this server (see --allow-file-dir)")]
    FileNotAllowed(String),
    #[error("image url {url:?}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("image is larger than the server's limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("image data is empty")]
    Empty,
    #[error("image data cannot be decoded: {0}")]
    Decode(String),
}
