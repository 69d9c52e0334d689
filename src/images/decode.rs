//! Decoding encoded bytes into an upright RGB image, as the reference's `load_image` +
//! `convert("RGB")` does: EXIF orientation applied, alpha dropped (not composited), grey expanded.

use std::io::Cursor;

use image::{ImageDecoder, ImageReader, Limits};

use super::{ImageError, RgbImage};

/// Decoded images may not exceed this many pixels, so a tiny compressed file cannot make the
/// server allocate gigabytes.
pub const MAX_PIXELS: u64 = 64 * 1024 * 1024;

pub fn decode_image(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let mut reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| ImageError::Decode(e.to_string()))?;
    if reader.format().is_none() {
        return Err(ImageError::Decode("unrecognised image format".into()));
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 8);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| ImageError::Decode(e.to_string()))?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(ImageError::Decode(format!("{w}x{h} exceeds the limit of {MAX_PIXELS} pixels")));
    }
    // A broken EXIF block should not reject an otherwise good image: fall back to no rotation.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(|e| ImageError::Decode(e.to_string()))?;
    img.apply_orientation(orientation);
    let rgb = img.to_rgb8();
    Ok(RgbImage { width: rgb.width(), height: rgb.height(), pixels: rgb.into_raw() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(img: image::DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn rgba_drops_alpha_and_grey_expands() {
        let rgba = image::RgbaImage::from_pixel(3, 2, image::Rgba([10, 20, 30, 0]));
        let img = decode_image(&png(rgba.into())).unwrap();
        assert_eq!((img.width, img.height), (3, 2));
        assert_eq!(&img.pixels[..3], &[10, 20, 30]);
        let grey = image::GrayImage::from_pixel(2, 2, image::Luma([77]));
        assert_eq!(&decode_image(&png(grey.into())).unwrap().pixels[..3], &[77, 77, 77]);
    }

    #[test]
    fn garbage_and_empty_are_errors_not_panics() {
        assert_eq!(decode_image(b""), Err(ImageError::Empty));
        assert!(matches!(decode_image(b"not an image at all"), Err(ImageError::Decode(_))));
        // A valid PNG signature with a truncated body.
        let mut bytes = png(image::GrayImage::new(8, 8).into());
        bytes.truncate(30);
        assert!(matches!(decode_image(&bytes), Err(ImageError::Decode(_))));
    }
}
