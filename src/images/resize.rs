//! Bicubic resampling of packed RGB8 images, bit-identical to Pillow 12's
//! `Image.resize((w, h), resample=BICUBIC)`.
//!
//! The vision towers were trained and evaluated on pixels produced by the
//! Python image processors, which resize uint8 RGB images through Pillow.
//! A "close enough" resize shifts individual pixel values by one or two
//! levels, which is enough to move logits and occasionally flip a beam-search
//! choice, so reference parity tests would become tolerance games. This module
//! therefore reproduces Pillow's arithmetic step by step: the same `f64`
//! coefficient computation, the same 22-bit fixed-point rounding, the same pass
//! order (including the vertical-first special case for very tall images) and
//! the same intermediate `u8` rounding between passes.

/// Fixed-point fraction bits: 8 bits for the sample, 2 bits of headroom for
/// kernels whose partial sums exceed 1.0 or drop below 0.0, 1 sign bit.
const PRECISION_BITS: u32 = 32 - 8 - 2;
const HALF: i32 = 1 << (PRECISION_BITS - 1);
const BICUBIC_SUPPORT: f64 = 2.0;
const CHANNELS: usize = 3;

/// Keys cubic convolution kernel with `a = -0.5`. The expression shapes follow
/// Pillow's exactly: different (mathematically equal) forms round differently
/// in `f64` and would change a fixed-point coefficient now and then.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per-output-sample input windows and fixed-point weights along one axis.
struct AxisCoeffs {
    /// Row stride of `weights`; every window is at most this long.
    ksize: usize,
    /// `(first input index, number of taps)` for each output sample.
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

impl AxisCoeffs {
    fn new(in_size: usize, out_size: usize) -> Self {
        // Pillow receives the source box as C `float`s and subtracts them in
        // single precision before widening, so sizes above 2^24 round there.
        let scale = f64::from(in_size as f32) / out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        let support = BICUBIC_SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;

        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut taps = vec![0f64; ksize];
        for (xx, row) in weights.chunks_exact_mut(ksize).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // `as` truncates toward zero like C's `(int)` cast; negative
            // starts are clamped afterwards, as Pillow does.
            let start = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let len = end.saturating_sub(start).min(ksize);

            let mut total = 0.0;
            for (x, tap) in taps[..len].iter_mut().enumerate() {
                let w = bicubic_filter(((x + start) as f64 - center + 0.5) * inv_filterscale);
                *tap = w;
                total += w;
            }
            for (tap, fixed) in taps[..len].iter().zip(row.iter_mut()) {
                let w = if total != 0.0 { tap / total } else { *tap };
                *fixed = to_fixed(w);
            }
            bounds.push((start, len));
        }
        Self { ksize, bounds, weights }
    }

    fn taps(&self, out_index: usize) -> (usize, &[i32]) {
        let (start, len) = self.bounds[out_index];
        let offset = out_index * self.ksize;
        (start, &self.weights[offset..offset + len])
    }

    /// Input range `[first, last)` touched by any output sample.
    fn input_span(&self) -> (usize, usize) {
        let first = self.bounds.first().map_or(0, |b| b.0);
        let last = self.bounds.last().map_or(0, |b| b.0 + b.1);
        (first, last)
    }
}

/// Round half away from zero, as Pillow's `normalize_coeffs_8bpc`.
fn to_fixed(w: f64) -> i32 {
    let scaled = w * f64::from(1u32 << PRECISION_BITS);
    if w < 0.0 {
        (-0.5 + scaled) as i32
    } else {
        (0.5 + scaled) as i32
    }
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Horizontal pass over source rows `rows`; returns `rows.len()` rows of
/// `coeffs.bounds.len()` pixels.
fn resample_horizontal(src: &[u8], width: usize, rows: std::ops::Range<usize>, coeffs: &AxisCoeffs) -> Vec<u8> {
    let in_stride = width * CHANNELS;
    let out_width = coeffs.bounds.len();
    let out_stride = out_width * CHANNELS;
    let mut out = vec![0u8; rows.len() * out_stride];
    for (y, out_row) in rows.zip(out.chunks_exact_mut(out_stride)) {
        let in_row = &src[y * in_stride..(y + 1) * in_stride];
        for (xx, px) in out_row.chunks_exact_mut(CHANNELS).enumerate() {
            let (start, k) = coeffs.taps(xx);
            let window = &in_row[start * CHANNELS..(start + k.len()) * CHANNELS];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            // Wrapping matches the C int arithmetic; the two headroom bits
            // mean it never actually wraps for bicubic weights.
            for (p, &kv) in window.chunks_exact(CHANNELS).zip(k) {
                r = r.wrapping_add(i32::from(p[0]).wrapping_mul(kv));
                g = g.wrapping_add(i32::from(p[1]).wrapping_mul(kv));
                b = b.wrapping_add(i32::from(p[2]).wrapping_mul(kv));
            }
            px[0] = clip8(r);
            px[1] = clip8(g);
            px[2] = clip8(b);
        }
    }
    out
}

/// Vertical pass. `src` holds rows starting at input row `row_offset`.
///
/// Pillow walks each output pixel down its column; here whole rows are
/// accumulated instead, which streams memory linearly and vectorises. Integer
/// (wrapping) addition is associative, so the result is identical.
fn resample_vertical(src: &[u8], width: usize, row_offset: usize, coeffs: &AxisCoeffs) -> Vec<u8> {
    let stride = width * CHANNELS;
    let out_height = coeffs.bounds.len();
    let mut out = vec![0u8; out_height * stride];
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (start, k) = coeffs.taps(yy);
        acc.fill(HALF);
        for (j, &kv) in k.iter().enumerate() {
            let row_start = (start + j - row_offset) * stride;
            let in_row = &src[row_start..row_start + stride];
            for (a, &p) in acc.iter_mut().zip(in_row) {
                *a = a.wrapping_add(i32::from(p).wrapping_mul(kv));
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Resize a packed RGB8 image (row-major, 3 bytes per pixel) exactly as
/// Pillow 12's `Image.resize((new_width, new_height), BICUBIC)`.
///
/// Returns `new_width * new_height * 3` bytes, or an empty `Vec` when any
/// dimension is zero. Resizing to the same size returns a copy of the input.
///
/// `src.len()` must equal `width * height * 3` (checked in debug builds);
/// a shorter buffer panics on indexing, extra trailing bytes are ignored.
pub fn resize_bicubic_rgb8(src: &[u8], width: u32, height: u32, new_width: u32, new_height: u32) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    let (nw, nh) = (new_width as usize, new_height as usize);
    debug_assert_eq!(src.len(), w * h * CHANNELS, "src is not width*height*3 bytes");
    if w == 0 || h == 0 || nw == 0 || nh == 0 {
        return Vec::new();
    }
    let src = &src[..w * h * CHANNELS];
    if (w, h) == (nw, nh) {
        return src.to_vec();
    }

    // Pillow's `Image.resize` reduces very tall images vertically first (two
    // separate single-axis resizes). The pass order changes the intermediate
    // rounding, so it has to be mirrored.
    if u64::from(height) > u64::from(width) * 100 && nh < h {
        let tmp = resample_vertical(src, w, 0, &AxisCoeffs::new(h, nh));
        if nw == w {
            return tmp;
        }
        return resample_horizontal(&tmp, w, 0..nh, &AxisCoeffs::new(w, nw));
    }

    let vertical = AxisCoeffs::new(h, nh);
    if nw == w {
        return resample_vertical(src, w, 0, &vertical);
    }
    // Only the rows the vertical pass will read are resampled horizontally;
    // with an unchanged height the span is the whole image.
    let (first, last) = if nh == h { (0, h) } else { vertical.input_span() };
    let tmp = resample_horizontal(src, w, first..last, &AxisCoeffs::new(w, nw));
    if nh == h {
        return tmp;
    }
    resample_vertical(&tmp, nw, first, &vertical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    const HEADER_LEN: usize = 24;

    struct Fixture {
        name: String,
        width: u32,
        height: u32,
        new_width: u32,
        new_height: u32,
        src: Vec<u8>,
        expected: Vec<u8>,
    }

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resize")
    }

    fn read_u32(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    /// Mirror of `mix32` in make_resize_fixtures.py.
    fn mix32(mut v: u32) -> u32 {
        v ^= v >> 16;
        v = v.wrapping_mul(0x7feb_352d);
        v ^= v >> 15;
        v = v.wrapping_mul(0x846c_a68b);
        v ^= v >> 16;
        v
    }

    /// Mirror of `pattern_source` in make_resize_fixtures.py.
    fn pattern_source(w: usize, h: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let region = (x / 41 + y / 37) % 3;
                for c in 0..3 {
                    let v = match region {
                        0 => mix32((((y * w + x) * 3 + c) as u32) ^ 0x9e37_79b9) & 0xff,
                        1 => [x * 255 / (w - 1), y * 255 / (h - 1), (x + y) * 255 / (w + h - 2)][c] as u32,
                        _ => {
                            if (x / 5 + y / 3 + c) & 1 == 1 {
                                255
                            } else {
                                0
                            }
                        }
                    };
                    out.push(v as u8);
                }
            }
        }
        out
    }

    fn load(path: &Path) -> Fixture {
        let bytes = std::fs::read(path).unwrap();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        assert_eq!(&bytes[..4], b"PRSZ", "{name}: bad magic");
        assert_eq!(bytes[4], 1, "{name}: unknown format version");
        let (width, height) = (read_u32(&bytes, 8), read_u32(&bytes, 12));
        let (new_width, new_height) = (read_u32(&bytes, 16), read_u32(&bytes, 20));
        let src_len = width as usize * height as usize * 3;
        let dst_len = new_width as usize * new_height as usize * 3;
        let (src, rest) = match bytes[5] {
            0 => (bytes[HEADER_LEN..HEADER_LEN + src_len].to_vec(), &bytes[HEADER_LEN + src_len..]),
            1 => (pattern_source(width as usize, height as usize), &bytes[HEADER_LEN..]),
            kind => panic!("{name}: unknown source kind {kind}"),
        };
        assert_eq!(rest.len(), dst_len, "{name}: truncated fixture");
        Fixture { name, width, height, new_width, new_height, src, expected: rest.to_vec() }
    }

    fn fixtures() -> Vec<Fixture> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "bin"))
            .collect();
        paths.sort();
        paths.iter().map(|p| load(p)).collect()
    }

    #[test]
    fn matches_pillow_bit_for_bit() {
        let fixtures = fixtures();
        // Guards against a missing or emptied fixture folder passing vacuously.
        assert!(fixtures.len() >= 20, "only {} fixtures found", fixtures.len());
        let mut failures = Vec::new();
        for f in &fixtures {
            let got = resize_bicubic_rgb8(&f.src, f.width, f.height, f.new_width, f.new_height);
            assert_eq!(got.len(), f.expected.len(), "{}: output length", f.name);
            let mismatches = got.iter().zip(&f.expected).filter(|(a, b)| a != b).count();
            if mismatches > 0 {
                let first = got.iter().zip(&f.expected).position(|(a, b)| a != b).unwrap();
                failures.push(format!(
                    "{}: {mismatches} bytes differ, first at byte {first} (got {}, want {})",
                    f.name, got[first], f.expected[first]
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn identity_returns_input() {
        let src: Vec<u8> = (0..7 * 5 * 3).map(|i| (i * 37 % 251) as u8).collect();
        assert_eq!(resize_bicubic_rgb8(&src, 7, 5, 7, 5), src);
    }

    #[test]
    fn zero_sizes_give_empty_output() {
        assert!(resize_bicubic_rgb8(&[], 0, 4, 3, 3).is_empty());
        assert!(resize_bicubic_rgb8(&[1, 2, 3], 1, 1, 0, 3).is_empty());
        assert!(resize_bicubic_rgb8(&[1, 2, 3], 1, 1, 3, 0).is_empty());
    }

    #[test]
    fn extreme_ratios_do_not_panic() {
        let src = vec![200u8; 3];
        assert_eq!(resize_bicubic_rgb8(&src, 1, 1, 1000, 1), vec![200u8; 3000]);
        let tall = vec![17u8; 3 * 5000];
        assert_eq!(resize_bicubic_rgb8(&tall, 1, 5000, 1, 1), vec![17u8; 3]);
        let wide = vec![250u8; 3 * 5000];
        assert_eq!(resize_bicubic_rgb8(&wide, 5000, 1, 2, 3), vec![250u8; 18]);
    }
}
