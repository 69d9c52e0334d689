//! JPEG through libjpeg-turbo 3, with the settings Pillow uses (accurate integer IDCT, fancy
//! upsampling), so the pixels are Pillow's to the bit. CMYK and YCCK files follow Pillow too:
//! decoded to CMYK, taken as Adobe-inverted, then converted by Pillow's CMYK → RGB formula.

use std::ffi::CStr;

use image::metadata::Orientation;
use turbojpeg_sys as tj;

use crate::{limits::DecodeLimits, orient::orient, DecodeError, RgbImage};

/// Progressive scans after which a file is refused; real encoders write about ten. libjpeg-turbo
/// advises a limit against files that make the decoder repeat its work per scan.
const MAX_SCANS: i32 = 500;

pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// A TurboJPEG decompressor, destroyed on drop.
struct Decompressor(tj::tjhandle);

impl Decompressor {
    fn new() -> Result<Self, DecodeError> {
        // SAFETY: tj3Init has no preconditions; a null result is checked.
        let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as i32) };
        if handle.is_null() {
            return Err(DecodeError::Corrupt("cannot start the JPEG decoder".into()));
        }
        Ok(Self(handle))
    }

    fn set(&self, param: tj::TJPARAM, value: i32) -> Result<(), DecodeError> {
        // SAFETY: the handle is live for `self`'s lifetime.
        if unsafe { tj::tj3Set(self.0, param as i32, value) } != 0 {
            return Err(self.error());
        }
        Ok(())
    }

    fn get(&self, param: tj::TJPARAM) -> i32 {
        // SAFETY: as above.
        unsafe { tj::tj3Get(self.0, param as i32) }
    }

    fn message(&self) -> String {
        // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the handle.
        unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) }.to_string_lossy().into_owned()
    }

    fn is_fatal(&self) -> bool {
        // SAFETY: as above.
        let code = unsafe { tj::tj3GetErrorCode(self.0) };
        code == tj::TJERR_TJERR_FATAL as i32
    }

    fn error(&self) -> DecodeError {
        DecodeError::Corrupt(self.message())
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

/// A decompressor that has read the file's header.
fn open(bytes: &[u8]) -> Result<Decompressor, DecodeError> {
    let d = Decompressor::new()?;
    // Warnings (extraneous bytes, a bad restart marker) do not stop Pillow; a truncated file does,
    // and is caught below.
    d.set(tj::TJPARAM_TJPARAM_STOPONWARNING, 0)?;
    d.set(tj::TJPARAM_TJPARAM_SCANLIMIT, MAX_SCANS)?;
    // SAFETY: the pointer and length describe `bytes`, which outlives the call.
    if unsafe { tj::tj3DecompressHeader(d.0, bytes.as_ptr(), bytes.len() as _) } != 0 {
        return Err(d.error());
    }
    Ok(d)
}

fn size(d: &Decompressor) -> Result<(u32, u32), DecodeError> {
    let (width, height) = (d.get(tj::TJPARAM_TJPARAM_JPEGWIDTH), d.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT));
    let (width, height) = (u32::try_from(width).unwrap_or(0), u32::try_from(height).unwrap_or(0));
    if width == 0 || height == 0 {
        // libjpeg-turbo accepts a header cut off before its frame and reports no size.
        return Err(DecodeError::Corrupt("the JPEG ends before its frame header".into()));
    }
    Ok((width, height))
}

pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
    size(&open(bytes)?)
}

pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, DecodeError> {
    let d = open(bytes)?;
    let (width, height) = size(&d)?;
    limits.check(width, height, bytes.len())?;
    // Pillow refuses anything but 8-bit samples ("cannot handle N-bit layers").
    let precision = d.get(tj::TJPARAM_TJPARAM_PRECISION);
    if precision != 8 {
        return Err(DecodeError::Corrupt(format!("{precision}-bit JPEG samples are not supported")));
    }
    let colorspace = d.get(tj::TJPARAM_TJPARAM_COLORSPACE);
    let cmyk = colorspace == tj::TJCS_TJCS_CMYK as i32 || colorspace == tj::TJCS_TJCS_YCCK as i32;
    let (format, channels) = if cmyk { (tj::TJPF_TJPF_CMYK, 4) } else { (tj::TJPF_TJPF_RGB, 3) };
    let row = width as usize * channels;
    let mut out = vec![0u8; row * height as usize];
    // SAFETY: `out` holds height rows of `row` bytes, the size tj3Decompress8 writes for this
    // pixel format and pitch at the header's dimensions (no scaling or cropping is set).
    let rc = unsafe { tj::tj3Decompress8(d.0, bytes.as_ptr(), bytes.len() as _, out.as_mut_ptr(), row as i32, format) };
    if rc != 0 {
        let message = d.message();
        // libjpeg-turbo pads a file that ends early with grey and warns; Pillow refuses it.
        if d.is_fatal() || message.contains("Premature end") {
            return Err(DecodeError::Corrupt(message));
        }
    }
    let pixels = if cmyk { cmyk_to_rgb(&out) } else { out };
    let img = RgbImage { width, height, pixels };
    Ok(orient(img, exif_orientation(bytes).unwrap_or(Orientation::NoTransforms)))
}

/// Pillow's `cmyk2rgb` applied to Adobe-inverted samples (Pillow reads every CMYK JPEG with
/// raw mode `CMYK;I`).
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    fn muldiv255(a: i32, b: i32) -> i32 {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    }
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for p in cmyk.chunks_exact(4) {
        // Un-inverting k and taking 255 - k cancel out: the stored byte is `nk`.
        let nk = i32::from(p[3]);
        for &v in &p[..3] {
            let c = 255 - i32::from(v);
            rgb.push((nk - muldiv255(c, nk)).clamp(0, 255) as u8);
        }
    }
    rgb
}

/// The orientation in the first `Exif` APP1 segment, as Pillow reads it.
fn exif_orientation(bytes: &[u8]) -> Option<Orientation> {
    let mut at = 2;
    while at + 4 <= bytes.len() {
        if bytes[at] != 0xFF {
            return None;
        }
        let marker = bytes[at + 1];
        // Fill bytes before a marker.
        if marker == 0xFF {
            at += 1;
            continue;
        }
        // Start of scan or end of image: no more metadata segments.
        if marker == 0xDA || marker == 0xD9 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
        let body = bytes.get(at + 4..at + 2 + len.max(2))?;
        if marker == 0xE1 {
            if let Some(tiff) = body.strip_prefix(b"Exif\0\0") {
                return Orientation::from_exif_chunk(tiff);
            }
        }
        at += 2 + len.max(2);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_formula_is_pillows_on_inverted_samples() {
        // Inverted storage: 255 means no ink. No ink at all is white; full black ink is black.
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 0]), [0, 0, 0]);
        // Full cyan only.
        assert_eq!(cmyk_to_rgb(&[0, 255, 255, 255]), [0, 255, 255]);
    }

    #[test]
    fn truncated_and_garbage_jpegs_are_errors() {
        let limits = DecodeLimits::default();
        assert!(decode(&[0xFF, 0xD8, 0xFF], &limits).is_err());
        assert!(decode(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x02, 0x00], &limits).is_err());
        let mut junk = vec![0xFF, 0xD8, 0xFF, 0xDB];
        junk.extend(std::iter::repeat_n(0x41, 200));
        assert!(decode(&junk, &limits).is_err());
    }
}
