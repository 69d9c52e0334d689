//! Bytes from callers to the pixels a model consumes: decoding (libjpeg-turbo for JPEG, the
//! `image` crate for the rest) with Pillow's conventions, Pillow-exact bicubic resizing, and each
//! checkpoint's preprocessing. Every entry point bounds its memory and work by explicit limits
//! and returns an error, never panics, on any input. Free of libtorch so it can be fuzzed alone.

pub mod decode;
mod jpeg;
pub mod limits;
mod orient;
pub mod preprocess;
pub mod resize;

pub use decode::{decode_image, dimensions};
pub use limits::DecodeLimits;
pub use preprocess::{ImageProcessor, Pixels, ResizeTo};

/// A decoded, upright 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Why bytes could not become an image. The limit variants carry what was asked and the bound,
/// so the caller can name the setting that raises it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("image data is empty")]
    Empty,
    #[error("image data cannot be decoded: unrecognised image format")]
    UnknownFormat,
    #[error("image has zero width or height ({width}x{height})")]
    ZeroSized { width: u32, height: u32 },
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels", pixels = u64::from(*width) * u64::from(*height))]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("image declares {width}x{height} pixels in only {bytes} bytes, over the limit of {per_byte} pixels per encoded byte (above {floor} pixels)")]
    TooDense { width: u32, height: u32, bytes: usize, per_byte: u64, floor: u64 },
    #[error("image data cannot be decoded: {0}")]
    Corrupt(String),
    #[error("preprocessing would make a {width}x{height} image from it, over the limit of {limit} pixels")]
    OutputTooLarge { width: u64, height: u64, limit: u64 },
}
