//! Decoding off the async runtime, in two lanes: images up to [`SMALL_IMAGE_PIXELS`] and larger
//! ones, each with its own bound on decodes at once, so a few huge images cannot hold up normal
//! traffic and the full-resolution images alive at once stay bounded.

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::{decode_image, dimensions, DecodeError, DecodeLimits, ImageError, RgbImage};

/// Images up to this many pixels (a 2560 × 1600 photo) decode in their own lane.
pub const SMALL_IMAGE_PIXELS: u64 = 4 * 1024 * 1024;

pub struct DecodeLanes {
    limits: DecodeLimits,
    small: Semaphore,
    large: Semaphore,
}

impl DecodeLanes {
    /// Lanes of `per_lane` decodes at once each (at least one), under `limits`.
    pub fn new(limits: DecodeLimits, per_lane: usize) -> Self {
        let per_lane = per_lane.max(1);
        Self { limits, small: Semaphore::new(per_lane), large: Semaphore::new(per_lane) }
    }

    /// Decodes `bytes` on the blocking pool and hands the full-resolution image to `prepare`
    /// there; only what `prepare` returns outlives the call.
    pub async fn decode<T, F>(&self, bytes: Arc<Vec<u8>>, prepare: F) -> Result<T, ImageError>
    where
        T: Send + 'static,
        F: FnOnce(RgbImage) -> Result<T, ImageError> + Send + 'static,
    {
        // Reading the header costs microseconds.
        let small =
            dimensions(&bytes, &self.limits).is_ok_and(|(w, h)| u64::from(w) * u64::from(h) <= SMALL_IMAGE_PIXELS);
        let lane = if small { &self.small } else { &self.large };
        let _slot = lane.acquire().await.expect("semaphore never closed");
        let limits = self.limits;
        tokio::task::spawn_blocking(move || {
            let decoded = decode_image(bytes.as_slice(), &limits)?;
            drop(bytes);
            prepare(decoded)
        })
        .await
        // Only the input can have made the decoder fail this way.
        .map_err(|e| ImageError::Decode(DecodeError::Corrupt(format!("the decoder failed: {e}"))))?
    }
}
