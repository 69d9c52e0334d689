//! What the fuzz target does with one input, shared with the test that replays the seeds:
//! caller bytes through everything that reads them, decode (every format, EXIF, CMYK) then both
//! checkpoints' kinds of preprocessing (exact-size resize, shortest edge plus centre crop).
//! Any panic, or an allocation above what the limits allow, is a finding.

use caption_images::{decode_image, dimensions, DecodeLimits, ImageProcessor, ResizeTo};

/// Small limits, so that libFuzzer's -malloc_limit_mb (see `make fuzz`) catches any allocation
/// that does not follow from them.
pub const LIMITS: DecodeLimits = DecodeLimits { max_pixels: 1 << 22, max_pixels_per_byte: 1024, dense_floor: 1 << 20 };

/// Reads the header, decodes and preprocesses `data`; returns whether it decoded.
pub fn exercise(data: &[u8]) -> bool {
    // The header alone, as the server reads it to choose a decode lane.
    let declared = dimensions(data, &LIMITS);
    let Ok(img) = decode_image(data, &LIMITS) else { return false };
    // What decodes has a header that reads; EXIF may swap the sides.
    let (w, h) = declared.expect("a decodable image has readable dimensions");
    assert!((img.width, img.height) == (w, h) || (img.width, img.height) == (h, w));
    assert_eq!(img.pixels.len(), img.width as usize * img.height as usize * 3);
    assert!(u64::from(img.width) * u64::from(img.height) <= LIMITS.max_pixels);
    let blip = ImageProcessor {
        resize: Some(ResizeTo::Exact { height: 384, width: 384 }),
        center_crop: None,
        rescale: Some(1.0 / 255.0),
        normalize: Some(([0.5; 3], [0.5; 3])),
    };
    let clip =
        ImageProcessor { resize: Some(ResizeTo::ShortestEdge(224)), center_crop: Some((224, 224)), ..blip.clone() };
    for p in [blip, clip] {
        let prepared = p.prepare(&img).expect("a decoded image always prepares");
        assert_eq!(prepared.pixels.len(), prepared.width as usize * prepared.height as usize * 3);
        assert_eq!(p.normalize(&prepared).data.len(), prepared.pixels.len());
    }
    true
}
