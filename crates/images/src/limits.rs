//! The bounds on the work and memory one decode may take, checked before any pixel is decoded.

use crate::DecodeError;

/// Bounds on the work and memory one decode may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most pixels a decoded image may have.
    pub max_pixels: u64,
    /// Most pixels per encoded byte above `dense_floor` pixels: a few kilobytes that declare
    /// millions of pixels cost seconds of CPU to decode (a timer cannot stop a decode part-way),
    /// so the size of the input bounds the work it may cause. Blank 4000 × 3000 images use 64
    /// (JPEG), 284 (RGB PNG) and 1024 (greyscale PNG); only blank palette PNGs and GIFs go beyond.
    pub max_pixels_per_byte: u64,
    /// Images up to this many pixels are never refused for their density.
    pub dense_floor: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_pixels: 64 * 1024 * 1024, max_pixels_per_byte: 1024, dense_floor: 4 * 1024 * 1024 }
    }
}

impl DecodeLimits {
    /// Whether `width` × `height` may be decoded from `bytes` encoded bytes.
    pub fn check(&self, width: u32, height: u32, bytes: usize) -> Result<(), DecodeError> {
        if width == 0 || height == 0 {
            return Err(DecodeError::ZeroSized { width, height });
        }
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_pixels {
            return Err(DecodeError::TooManyPixels { width, height, limit: self.max_pixels });
        }
        if pixels > self.dense_floor && pixels > (bytes as u64).saturating_mul(self.max_pixels_per_byte) {
            return Err(DecodeError::TooDense {
                width,
                height,
                bytes,
                per_byte: self.max_pixels_per_byte,
                floor: self.dense_floor,
            });
        }
        Ok(())
    }
}
