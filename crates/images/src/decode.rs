//! Decoding encoded bytes into an upright RGB image, as the reference's `load_image` +
//! `convert("RGB")` does: EXIF orientation applied, alpha dropped (not composited), grey
//! expanded, 16-bit samples reduced the way Pillow reduces them. JPEG goes through libjpeg-turbo
//! (the decoder Pillow bundles); the rest through the `image` crate. The dimensions are checked
//! against the limits before any pixel is decoded.

use std::io::Cursor;

use image::{metadata::Orientation, DynamicImage, ImageDecoder, ImageReader, Limits};

use crate::{jpeg, limits::DecodeLimits, orient::orient, DecodeError, RgbImage};

/// Width and height as the file's header declares them, without decoding any pixel: what a
/// caller needs to decide how to schedule the decode. The same checks guard it as the decode.
pub fn dimensions(bytes: &[u8], limits: &DecodeLimits) -> Result<(u32, u32), DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if jpeg::is_jpeg(bytes) {
        return jpeg::dimensions(bytes);
    }
    reader(bytes, limits)?.into_dimensions().map_err(corrupt)
}

pub fn decode_image(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if jpeg::is_jpeg(bytes) {
        return jpeg::decode(bytes, limits);
    }
    let mut decoder = reader(bytes, limits)?.into_decoder().map_err(corrupt)?;
    let (w, h) = decoder.dimensions();
    limits.check(w, h, bytes.len())?;
    // A broken EXIF block should not reject an otherwise good image: fall back to no rotation.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let img = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    // To RGB first, then rotate: the rotation copies the image, and an RGB copy is the smallest
    // (the memory bound counts the decoded form plus one RGB image). The two steps commute.
    Ok(orient(to_rgb_as_pillow(img), orientation))
}

/// The `image` crate's reader for a file that is not a JPEG, with its memory limit set, once the
/// bytes passed the checks that some of its decoders need before they may see them (their
/// constructors already allocate what a header declares).
fn reader<'a>(bytes: &'a [u8], limits: &DecodeLimits) -> Result<ImageReader<Cursor<&'a [u8]>>, DecodeError> {
    let mut reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    match reader.format() {
        None => return Err(DecodeError::UnknownFormat),
        Some(image::ImageFormat::WebP) => check_webp(bytes, limits)?,
        Some(image::ImageFormat::Tiff) => check_tiff(bytes)?,
        Some(_) => {}
    }
    let mut decoder_limits = Limits::default();
    // The widest decoded form is 16-bit RGBA: 8 bytes per pixel.
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8));
    reader.limits(decoder_limits);
    Ok(reader)
}

/// Checks a WebP file's chunks before the decoder sees them: a chunk may not claim more bytes
/// than the file holds, and every VP8/VP8L frame (animation frames included) must fit the
/// limits as the canvas does. The WebP decoder allocates a metadata chunk's declared size before
/// reading it, and a frame's buffers from the frame's own header, outside the decoder's memory
/// limits: a 2 KB file could otherwise ask for a gigabyte.
fn check_webp(bytes: &[u8], limits: &DecodeLimits) -> Result<(), DecodeError> {
    // "RIFF", file size, "WEBP", then chunks.
    check_riff_chunks(bytes.get(12..).unwrap_or_default(), bytes.len(), limits)
}

fn check_riff_chunks(chunks: &[u8], file_len: usize, limits: &DecodeLimits) -> Result<(), DecodeError> {
    let mut at = 0;
    while at + 8 <= chunks.len() {
        let name = &chunks[at..at + 4];
        let size = u32::from_le_bytes([chunks[at + 4], chunks[at + 5], chunks[at + 6], chunks[at + 7]]) as usize;
        let left = chunks.len() - at - 8;
        if size > left {
            let name = String::from_utf8_lossy(name);
            return Err(DecodeError::Corrupt(format!("WebP chunk {name:?} claims {size} bytes, only {left} follow")));
        }
        let data = &chunks[at + 8..at + 8 + size];
        let u16le = |i: usize| u32::from(u16::from_le_bytes([data[i], data[i + 1]]));
        match name {
            // Frame tag (3 bytes), start code 9d 01 2a, then 14-bit width and height.
            b"VP8 " if data.len() >= 10 && data[3..6] == [0x9d, 0x01, 0x2a] => {
                limits.check(u16le(6) & 0x3fff, u16le(8) & 0x3fff, file_len)?;
            }
            // Signature 0x2f, then width - 1 and height - 1 in 14 bits each.
            b"VP8L" if data.len() >= 5 && data[0] == 0x2f => {
                let bits = u32::from_le_bytes([data[1], data[2], data[3], data[4]]);
                limits.check((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1, file_len)?;
            }
            // An animation frame: a 16-byte header, then the frame's own chunks.
            b"ANMF" if data.len() >= 16 => check_riff_chunks(&data[16..], file_len, limits)?,
            _ => {}
        }
        at += 8 + size + (size & 1);
    }
    Ok(())
}

/// Refuses a TIFF file any of whose directory entries claims more bytes than the file holds: the
/// TIFF decoder reserves an entry's declared size before reading it, so a few hundred bytes could
/// otherwise ask for hundreds of megabytes. Walks every directory of the chain (classic and
/// BigTIFF), at most 64 of them.
fn check_tiff(bytes: &[u8]) -> Result<(), DecodeError> {
    let big_endian = bytes.starts_with(b"MM");
    let read = |at: usize, n: usize| -> Option<u64> {
        let b = bytes.get(at..at.checked_add(n)?)?;
        Some(if big_endian {
            b.iter().fold(0u64, |v, &x| v << 8 | u64::from(x))
        } else {
            b.iter().rev().fold(0u64, |v, &x| v << 8 | u64::from(x))
        })
    };
    let bad = |what: String| DecodeError::Corrupt(format!("TIFF {what}"));
    let big = read(2, 2) == Some(43);
    // Offsets and counts are 4 bytes in classic TIFF, 8 in BigTIFF.
    let (word, entry_len, count_len) = if big { (8, 20, 8) } else { (4, 12, 2) };
    let mut ifd = read(if big { 8 } else { 4 }, word).ok_or_else(|| bad("header is cut short".into()))?;
    for _ in 0..64 {
        if ifd == 0 {
            return Ok(());
        }
        let at = usize::try_from(ifd).map_err(|_| bad(format!("directory offset {ifd} is out of range")))?;
        let entries = read(at, count_len).ok_or_else(|| bad(format!("directory at {ifd} is past the end")))?;
        for e in 0..entries as usize {
            let entry = at + count_len + e * entry_len;
            let (Some(kind), Some(count)) = (read(entry + 2, 2), read(entry + 4, word)) else {
                return Err(bad(format!("directory at {ifd} is cut short")));
            };
            let size = match kind {
                1 | 2 | 6 | 7 => 1,
                3 | 8 => 2,
                4 | 9 | 11 | 13 => 4,
                _ => 8,
            };
            if count.saturating_mul(size) > bytes.len() as u64 {
                return Err(bad(format!("entry claims {count} values, more than the file holds")));
            }
        }
        ifd = read(at + count_len + entries as usize * entry_len, word).unwrap_or(0);
    }
    Ok(())
}

fn corrupt(e: image::ImageError) -> DecodeError {
    match e {
        image::ImageError::Limits(_) => DecodeError::Corrupt(format!("decoding needs too much memory ({e})")),
        e => DecodeError::Corrupt(e.to_string()),
    }
}

/// `convert("RGB")` of what Pillow opens. Pillow reads a 16-bit greyscale PNG as mode `I;16`,
/// whose conversion clips each value to 255; every other 16-bit layout it reads as 8 bits per
/// sample by keeping the high byte. The `image` crate would scale both (`v / 257`).
fn to_rgb_as_pillow(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width(), img.height());
    let pixels = match img {
        DynamicImage::ImageLuma16(grey) => grey.into_raw().into_iter().flat_map(|v| [v.min(255) as u8; 3]).collect(),
        DynamicImage::ImageLumaA16(la) => la.into_raw().chunks_exact(2).flat_map(|p| [(p[0] >> 8) as u8; 3]).collect(),
        DynamicImage::ImageRgb16(rgb) => rgb.into_raw().into_iter().map(|v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(rgba) => rgba
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        DynamicImage::ImageRgb8(rgb) => rgb.into_raw(),
        other => other.to_rgb8().into_raw(),
    };
    RgbImage { width, height, pixels }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(img: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn decode(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
        decode_image(bytes, &DecodeLimits::default())
    }

    #[test]
    fn rgba_drops_alpha_and_grey_expands() {
        let rgba = image::RgbaImage::from_pixel(3, 2, image::Rgba([10, 20, 30, 0]));
        let img = decode(&png(rgba.into())).unwrap();
        assert_eq!((img.width, img.height), (3, 2));
        assert_eq!(&img.pixels[..3], &[10, 20, 30]);
        let grey = image::GrayImage::from_pixel(2, 2, image::Luma([77]));
        assert_eq!(&decode(&png(grey.into())).unwrap().pixels[..3], &[77, 77, 77]);
    }

    #[test]
    fn sixteen_bit_pngs_reduce_as_pillow() {
        let grey = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(3, 1, vec![7u16, 255, 40000]).unwrap();
        assert_eq!(
            decode(&png(DynamicImage::ImageLuma16(grey))).unwrap().pixels,
            [7, 7, 7, 255, 255, 255, 255, 255, 255]
        );
        let rgb = image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(1, 1, vec![0x12ff, 0x0080, 0xfe01]).unwrap();
        assert_eq!(decode(&png(DynamicImage::ImageRgb16(rgb))).unwrap().pixels, [0x12, 0x00, 0xfe]);
    }

    #[test]
    fn garbage_and_empty_are_errors_not_panics() {
        assert_eq!(decode(b""), Err(DecodeError::Empty));
        assert_eq!(decode(b"not an image at all"), Err(DecodeError::UnknownFormat));
        // A valid PNG signature with a truncated body.
        let mut bytes = png(image::GrayImage::new(8, 8).into());
        bytes.truncate(30);
        assert!(matches!(decode(&bytes), Err(DecodeError::Corrupt(_))));
    }

    #[test]
    fn a_webp_chunk_longer_than_the_file_is_refused_before_allocating() {
        // An extended WebP whose EXIF chunk claims 1 GB in a 60-byte file.
        let mut riff = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\x08\0\0\0\x0f\0\0\x0f\0\0".to_vec();
        riff.extend_from_slice(b"EXIF");
        riff.extend_from_slice(&1_000_000_000u32.to_le_bytes());
        riff.extend_from_slice(b"MM\0*\0\0\0\x08");
        let len = (riff.len() - 8) as u32;
        riff[4..8].copy_from_slice(&len.to_le_bytes());
        let err = decode(&riff).unwrap_err();
        assert!(matches!(&err, DecodeError::Corrupt(m) if m.contains("EXIF")), "{err}");
    }

    #[test]
    fn a_webp_frame_larger_than_the_limits_is_refused_whatever_the_canvas_says() {
        // A 16 x 16 canvas whose VP8 frame header claims 16383 x 16383.
        let mut riff = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0\x0f\0\0\x0f\0\0".to_vec();
        riff.extend_from_slice(b"VP8 \x0a\0\0\0\x50\x02\0\x9d\x01\x2a\xff\x3f\xff\x3f");
        let len = (riff.len() - 8) as u32;
        riff[4..8].copy_from_slice(&len.to_le_bytes());
        let limits = DecodeLimits { max_pixels: 1 << 22, ..DecodeLimits::default() };
        let err = decode_image(&riff, &limits).unwrap_err();
        assert!(matches!(err, DecodeError::TooManyPixels { width: 16383, height: 16383, .. }), "{err}");
    }

    #[test]
    fn a_tiff_entry_longer_than_the_file_is_refused_before_allocating() {
        // Little-endian TIFF, one directory with one entry: 60 million LONGs.
        let mut tiff = b"II*\0\x08\0\0\0\x01\0".to_vec();
        tiff.extend_from_slice(&[0x11, 0x01, 4, 0]);
        tiff.extend_from_slice(&60_000_000u32.to_le_bytes());
        tiff.extend_from_slice(&[0; 8]);
        let err = decode(&tiff).unwrap_err();
        assert!(matches!(&err, DecodeError::Corrupt(m) if m.contains("TIFF entry")), "{err}");
        // Reading the header alone goes through the same check (the decoder's constructor is
        // what reserves the entry).
        let err = dimensions(&tiff, &DecodeLimits::default()).unwrap_err();
        assert!(matches!(&err, DecodeError::Corrupt(m) if m.contains("TIFF entry")), "{err}");
        // A valid TIFF still decodes.
        let mut ok = Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(image::RgbImage::new(5, 4)).write_to(&mut ok, image::ImageFormat::Tiff).unwrap();
        assert_eq!(decode(ok.get_ref()).map(|i| (i.width, i.height)), Ok((5, 4)));
    }

    #[test]
    fn dimensions_come_from_the_header() {
        let limits = DecodeLimits::default();
        let bytes = png(image::RgbImage::new(7, 3).into());
        assert_eq!(dimensions(&bytes, &limits), Ok((7, 3)));
        assert_eq!(dimensions(b"", &limits), Err(DecodeError::Empty));
        assert_eq!(dimensions(b"nothing", &limits), Err(DecodeError::UnknownFormat));
    }

    #[test]
    fn limits_apply_before_decoding() {
        let limits = DecodeLimits { max_pixels: 100, max_pixels_per_byte: 1024, dense_floor: 0 };
        assert!(matches!(limits.check(11, 10, 1 << 20), Err(DecodeError::TooManyPixels { limit: 100, .. })));
        assert!(limits.check(10, 10, 1).is_ok());
        let dense = DecodeLimits { max_pixels: 1 << 40, max_pixels_per_byte: 10, dense_floor: 50 };
        assert!(matches!(dense.check(100, 100, 999), Err(DecodeError::TooDense { .. })));
        assert!(dense.check(100, 100, 1000).is_ok());
        assert!(dense.check(5, 10, 1).is_ok(), "under the floor");
        assert!(matches!(dense.check(0, 10, 1), Err(DecodeError::ZeroSized { .. })));
        // A GIF whose logical screen is 0 x 0.
        let gif = b"GIF89a\x00\x00\x00\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";
        assert!(decode(gif).is_err());
    }
}
