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

/// Most fixed-point weights held at once. Coefficients are built for a chunk of output samples
/// at a time, so an extreme downscale (a 1 × 60,000,000 image, whose every output sample reads
/// hundreds of thousands of inputs) costs bounded memory; the values are the same either way.
const MAX_CHUNK_TAPS: usize = 1 << 20;

/// The sampling geometry of one axis, as Pillow's `precompute_coeffs` derives it.
struct Axis {
    in_size: usize,
    scale: f64,
    support: f64,
    ksize: usize,
    inv_filterscale: f64,
}

impl Axis {
    fn new(in_size: usize, out_size: u64) -> Self {
        // Pillow receives the source box as C `float`s and subtracts them in
        // single precision before widening, so sizes above 2^24 round there.
        let scale = f64::from(in_size as f32) / out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        let support = BICUBIC_SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        Self { in_size, scale, support, ksize, inv_filterscale: 1.0 / filterscale }
    }

    fn center(&self, out_index: u64) -> f64 {
        (out_index as f64 + 0.5) * self.scale
    }

    /// `(first input index, number of taps)` of one output sample.
    fn bounds(&self, out_index: u64) -> (usize, usize) {
        let center = self.center(out_index);
        // `as` truncates toward zero like C's `(int)` cast; negative
        // starts are clamped afterwards, as Pillow does.
        let start = ((center - self.support + 0.5) as i64).clamp(0, self.in_size as i64) as usize;
        let end = ((center + self.support + 0.5) as i64).clamp(0, self.in_size as i64) as usize;
        (start, end.saturating_sub(start).min(self.ksize))
    }

    /// Input range `[first, last)` read by the output samples `outs`.
    fn input_span(&self, outs: &std::ops::Range<u64>) -> (usize, usize) {
        if outs.is_empty() {
            return (0, 0);
        }
        let first = self.bounds(outs.start).0;
        let (s, n) = self.bounds(outs.end - 1);
        (first, s + n)
    }

    /// Consecutive sub-ranges of `outs` whose coefficients fit [`MAX_CHUNK_TAPS`] (at least
    /// one output each).
    fn chunks(&self, outs: std::ops::Range<u64>) -> Vec<std::ops::Range<u64>> {
        let mut chunks = Vec::new();
        let (mut begin, mut taps) = (outs.start, 0usize);
        for o in outs.clone() {
            let n = self.bounds(o).1;
            if taps > 0 && taps + n > MAX_CHUNK_TAPS {
                chunks.push(begin..o);
                begin = o;
                taps = 0;
            }
            taps += n;
        }
        if begin < outs.end {
            chunks.push(begin..outs.end);
        }
        chunks
    }
}

/// Input windows and fixed-point weights of a run of output samples along one axis.
struct Coeffs {
    /// `(first input index, offset into weights, number of taps)` per output sample.
    taps: Vec<(usize, usize, usize)>,
    weights: Vec<i32>,
}

impl Coeffs {
    fn new(axis: &Axis, outs: std::ops::Range<u64>) -> Self {
        let mut taps = Vec::with_capacity((outs.end - outs.start) as usize);
        let mut weights = Vec::new();
        let mut scratch: Vec<f64> = Vec::new();
        for o in outs {
            let center = axis.center(o);
            let (start, len) = axis.bounds(o);
            scratch.clear();
            let mut total = 0.0;
            for x in 0..len {
                let w = bicubic_filter(((x + start) as f64 - center + 0.5) * axis.inv_filterscale);
                scratch.push(w);
                total += w;
            }
            taps.push((start, weights.len(), len));
            weights.extend(scratch.iter().map(|tap| to_fixed(if total != 0.0 { tap / total } else { *tap })));
        }
        Self { taps, weights }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (start, offset, len) = self.taps[i];
        (start, &self.weights[offset..offset + len])
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

/// Horizontal pass over source rows `rows`, computing the output columns `cols` only; returns
/// `rows.len()` rows of `cols.len()` pixels.
fn resample_horizontal(
    src: &[u8],
    width: usize,
    rows: std::ops::Range<usize>,
    axis: &Axis,
    cols: std::ops::Range<u64>,
) -> Vec<u8> {
    let in_stride = width * CHANNELS;
    let out_stride = (cols.end - cols.start) as usize * CHANNELS;
    let mut out = vec![0u8; rows.len() * out_stride];
    for chunk in axis.chunks(cols.clone()) {
        let coeffs = Coeffs::new(axis, chunk.clone());
        let first = (chunk.start - cols.start) as usize * CHANNELS;
        for (y, out_row) in rows.clone().zip(out.chunks_exact_mut(out_stride)) {
            let in_row = &src[y * in_stride..(y + 1) * in_stride];
            let out_px = &mut out_row[first..first + coeffs.taps.len() * CHANNELS];
            for (i, px) in out_px.chunks_exact_mut(CHANNELS).enumerate() {
                let (start, k) = coeffs.taps(i);
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
    }
    out
}

/// Vertical pass computing the output rows `rows` only. `src` holds rows of `width` pixels
/// starting at input row `row_offset`.
///
/// Pillow walks each output pixel down its column; here whole rows are
/// accumulated instead, which streams memory linearly and vectorises. Integer
/// (wrapping) addition is associative, so the result is identical.
fn resample_vertical(src: &[u8], width: usize, row_offset: usize, axis: &Axis, rows: std::ops::Range<u64>) -> Vec<u8> {
    let stride = width * CHANNELS;
    let mut out = vec![0u8; (rows.end - rows.start) as usize * stride];
    let mut acc = vec![0i32; stride];
    let mut out_rows = out.chunks_exact_mut(stride);
    for chunk in axis.chunks(rows) {
        let coeffs = Coeffs::new(axis, chunk);
        for (i, out_row) in (0..coeffs.taps.len()).zip(&mut out_rows) {
            let (start, k) = coeffs.taps(i);
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
    }
    out
}

/// The columns `cols` of every row of a packed image `width` pixels wide.
fn crop_columns(src: &[u8], width: usize, cols: std::ops::Range<usize>) -> Vec<u8> {
    let stride = width * CHANNELS;
    src.chunks_exact(stride).flat_map(|row| &row[cols.start * CHANNELS..cols.end * CHANNELS]).copied().collect()
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
    let (nw, nh) = (u64::from(new_width), u64::from(new_height));
    resize_window_rgb8(src, width, height, (nw, nh), 0..nh, 0..nw)
}

/// The pixels in rows `rows` and columns `cols` of what [`resize_bicubic_rgb8`] would return
/// for a `new_size = (width, height)` output, computed without the rest: a separable
/// resample's output pixel depends only on the input under its support, so this is exactly a
/// crop of the full resize, at the cost of the window alone. Returns `rows.len() * cols.len()`
/// pixels; empty when a size is zero or the window is empty. The window must lie inside the
/// output size.
pub fn resize_window_rgb8(
    src: &[u8],
    width: u32,
    height: u32,
    new_size: (u64, u64),
    rows: std::ops::Range<u64>,
    cols: std::ops::Range<u64>,
) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    let (nw, nh) = new_size;
    debug_assert_eq!(src.len(), w * h * CHANNELS, "src is not width*height*3 bytes");
    assert!(rows.end <= nh && cols.end <= nw, "window outside the output");
    if w == 0 || h == 0 || rows.is_empty() || cols.is_empty() {
        return Vec::new();
    }
    let src = &src[..w * h * CHANNELS];
    let same_width = nw == w as u64;
    let same_height = nh == h as u64;
    let col_range = || cols.start as usize..cols.end as usize;
    let row_range = || rows.start as usize..rows.end as usize;
    if same_width && same_height {
        let band = &src[row_range().start * w * CHANNELS..row_range().end * w * CHANNELS];
        return crop_columns(band, w, col_range());
    }
    let vertical = Axis::new(h, nh);
    let horizontal = Axis::new(w, nw);

    // Pillow's `Image.resize` reduces very tall images vertically first (two
    // separate single-axis resizes). The pass order changes the intermediate
    // rounding, so it has to be mirrored.
    if u64::from(height) > u64::from(width) * 100 && nh < h as u64 {
        let tmp = resample_vertical(src, w, 0, &vertical, rows.clone());
        if same_width {
            return crop_columns(&tmp, w, col_range());
        }
        return resample_horizontal(&tmp, w, 0..(rows.end - rows.start) as usize, &horizontal, cols);
    }
    if same_width {
        let tmp = resample_vertical(src, w, 0, &vertical, rows);
        return crop_columns(&tmp, w, col_range());
    }
    if same_height {
        return resample_horizontal(src, w, row_range(), &horizontal, cols);
    }
    // Only the rows the vertical pass will read are resampled horizontally.
    let (first, last) = vertical.input_span(&rows);
    let tmp = resample_horizontal(src, w, first..last, &horizontal, cols.clone());
    resample_vertical(&tmp, (cols.end - cols.start) as usize, first, &vertical, rows)
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
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures-resize")
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

    #[test]
    fn a_window_is_exactly_the_crop_of_the_full_resize() {
        let src_of =
            |w: usize, h: usize| -> Vec<u8> { (0..w * h * 3).map(|i| (mix32(i as u32) & 0xff) as u8).collect() };
        // Down, up, mixed, one axis unchanged, and the tall vertical-first case.
        for &(w, h, nw, nh) in
            &[(40, 30, 17, 11), (9, 7, 31, 23), (50, 12, 20, 40), (24, 60, 24, 13), (3, 420, 5, 40), (3, 420, 3, 40)]
        {
            let src = src_of(w, h);
            let full = resize_bicubic_rgb8(&src, w as u32, h as u32, nw as u32, nh as u32);
            for &(r0, r1, c0, c1) in &[(0, nh, 0, nw), (1, nh - 1, 2, nw - 1), (nh / 2, nh / 2 + 1, nw / 3, nw / 3 + 2)]
            {
                let got = resize_window_rgb8(
                    &src,
                    w as u32,
                    h as u32,
                    (nw as u64, nh as u64),
                    r0 as u64..r1 as u64,
                    c0 as u64..c1 as u64,
                );
                let want: Vec<u8> =
                    (r0..r1).flat_map(|y| full[(y * nw + c0) * 3..(y * nw + c1) * 3].iter().copied()).collect();
                assert_eq!(got, want, "{w}x{h} -> {nw}x{nh}, rows {r0}..{r1}, cols {c0}..{c1}");
            }
        }
    }

    #[test]
    fn chunked_coefficients_equal_one_chunk() {
        // 1 x 5000 down to 1 x 3 reads every input thrice over; a tiny chunk budget would split
        // it, so compare against coefficients built in one go.
        let axis = Axis::new(5_000_000, 7);
        let whole = Coeffs::new(&axis, 0..7);
        let chunks = axis.chunks(0..7);
        assert!(chunks.len() > 1, "expected the budget to split 7 outputs of ~2.9M taps");
        let mut joined = Vec::new();
        for c in chunks {
            let part = Coeffs::new(&axis, c);
            joined.extend((0..part.taps.len()).map(|i| (part.taps(i).0, part.taps(i).1.to_vec())));
        }
        let want: Vec<_> = (0..whole.taps.len()).map(|i| (whole.taps(i).0, whole.taps(i).1.to_vec())).collect();
        assert_eq!(joined, want);
    }

    #[test]
    fn an_absurd_upscale_window_costs_the_window() {
        // 1 x 60,000,000 to 224 wide: the full output would be 13.4 billion rows tall.
        let (w, h) = (1u32, 60_000u32);
        let src: Vec<u8> = (0..h as usize * 3).map(|i| (i % 251) as u8).collect();
        let nh = 224u64 * u64::from(h);
        let top = (nh - 224) / 2;
        let out = resize_window_rgb8(&src, w, h, (224, nh), top..top + 224, 0..224);
        assert_eq!(out.len(), 224 * 224 * 3);
    }
}
