//! Image preprocessing as the checkpoint's `preprocessor_config.json` prescribes, in two steps:
//! `prepare` (Pillow-exact bicubic resize, exact size for BLIP, shortest edge then centre crop
//! for CLIP, computing only the pixels the crop keeps) gives the uint8 image the model sees, and
//! `normalize` (rescale and normalise) turns it into CHW float32 pixels.

use serde::Deserialize;
use serde_json::Value;

use crate::{resize::resize_window_rgb8, DecodeError, RgbImage};

/// Largest image any processor may produce. Checkpoints ask for a few hundred pixels a side; a
/// config without a crop would otherwise let an extreme aspect ratio ask for billions.
pub const MAX_OUTPUT_PIXELS: u64 = 4096 * 4096;

/// PIL's resample code for bicubic, the one both processors use.
const PIL_BICUBIC: u32 = 3;

/// Preprocessed pixels of one image, CHW float32 with 3 channels.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub data: Vec<f32>,
    pub height: u32,
    pub width: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ResizeTo {
    /// Resize to exactly this height and width.
    Exact { height: u32, width: u32 },
    /// Resize so the shorter side has this length, keeping the aspect ratio.
    ShortestEdge(u32),
}

#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub resize: Option<ResizeTo>,
    pub center_crop: Option<(u32, u32)>,
    pub rescale: Option<f64>,
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default = "yes")]
    do_resize: bool,
    size: Option<Value>,
    #[serde(default)]
    do_center_crop: bool,
    crop_size: Option<Value>,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "default_rescale")]
    rescale_factor: f64,
    #[serde(default = "yes")]
    do_normalize: bool,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
    resample: Option<u32>,
}

fn yes() -> bool {
    true
}

fn default_rescale() -> f64 {
    1.0 / 255.0
}

impl ImageProcessor {
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if let Some(r) = raw.resample.filter(|&r| r != PIL_BICUBIC) {
            return Err(format!("resample {r} is not supported (only 3, bicubic)"));
        }
        let resize = if raw.do_resize {
            let size = raw.size.ok_or("do_resize is set but size is missing")?;
            Some(parse_resize(&size)?)
        } else {
            None
        };
        let center_crop = if raw.do_center_crop {
            let crop = raw.crop_size.ok_or("do_center_crop is set but crop_size is missing")?;
            match parse_resize(&crop)? {
                ResizeTo::Exact { height, width } => Some((height, width)),
                ResizeTo::ShortestEdge(s) => Some((s, s)),
            }
        } else {
            None
        };
        let normalize = if raw.do_normalize {
            let three = |v: Option<Vec<f32>>, name: &str| -> Result<[f32; 3], String> {
                let v = v.ok_or(format!("do_normalize is set but {name} is missing"))?;
                <[f32; 3]>::try_from(v.as_slice()).map_err(|_| format!("{name} must have 3 values"))
            };
            Some((three(raw.image_mean, "image_mean")?, three(raw.image_std, "image_std")?))
        } else {
            None
        };
        Ok(Self { resize, center_crop, rescale: raw.do_rescale.then_some(raw.rescale_factor), normalize })
    }

    /// Height and width of the output.
    pub fn output_size(&self, height: u32, width: u32) -> (u64, u64) {
        self.center_crop.map_or_else(|| self.resized_size(height, width), |(h, w)| (h.into(), w.into()))
    }

    fn resized_size(&self, height: u32, width: u32) -> (u64, u64) {
        match self.resize {
            None => (height.into(), width.into()),
            Some(ResizeTo::Exact { height, width }) => (height.into(), width.into()),
            Some(ResizeTo::ShortestEdge(s)) => {
                // The reference truncates the long side: int(s * long / short). In u64 the
                // product cannot overflow (both factors are u32) and the result is not cut.
                let (short, long) = (u64::from(height.min(width)), u64::from(height.max(width)));
                let long = u64::from(s) * long / short.max(1);
                if height <= width {
                    (s.into(), long)
                } else {
                    (long, s.into())
                }
            }
        }
    }

    /// The uint8 RGB image the model sees: resized and centre-cropped, computing only the
    /// pixels the crop keeps, so the work and memory follow the output size whatever the
    /// input's shape. A crop larger than the resized image pads with zeros, as the reference.
    pub fn prepare(&self, img: &RgbImage) -> Result<RgbImage, DecodeError> {
        if img.width == 0 || img.height == 0 {
            return Err(DecodeError::ZeroSized { width: img.width, height: img.height });
        }
        let (rh, rw) = self.resized_size(img.height, img.width);
        let (out_h, out_w) = self.output_size(img.height, img.width);
        if out_h.saturating_mul(out_w) > MAX_OUTPUT_PIXELS || out_h == 0 || out_w == 0 {
            return Err(DecodeError::OutputTooLarge { width: out_w, height: out_h, limit: MAX_OUTPUT_PIXELS });
        }
        let (top, left) = (crop_offset(rh, out_h), crop_offset(rw, out_w));
        // The part of the output that lies inside the resized image.
        let clamp = |v: i128, size: u64| v.clamp(0, i128::from(size)) as u64;
        let rows = clamp(top, rh)..clamp(top + i128::from(out_h), rh);
        let cols = clamp(left, rw)..clamp(left + i128::from(out_w), rw);
        let window = resize_window_rgb8(&img.pixels, img.width, img.height, (rw, rh), rows.clone(), cols.clone());
        let (out_h, out_w) = (out_h as usize, out_w as usize);
        if rows.start as i128 == top
            && cols.start as i128 == left
            && rows.end - rows.start == out_h as u64
            && cols.end - cols.start == out_w as u64
        {
            return Ok(RgbImage { width: out_w as u32, height: out_h as u32, pixels: window });
        }
        let mut pixels = vec![0u8; out_h * out_w * 3];
        let win_w = (cols.end - cols.start) as usize;
        let (dy, dx) = ((rows.start as i128 - top) as usize, (cols.start as i128 - left) as usize);
        for (y, src_row) in window.chunks_exact(win_w * 3).enumerate() {
            let at = ((dy + y) * out_w + dx) * 3;
            pixels[at..at + win_w * 3].copy_from_slice(src_row);
        }
        Ok(RgbImage { width: out_w as u32, height: out_h as u32, pixels })
    }

    /// CHW float pixels of a prepared image.
    pub fn normalize(&self, prepared: &RgbImage) -> Pixels {
        let plane = prepared.width as usize * prepared.height as usize;
        let mut data = vec![0f32; 3 * plane];
        for (i, px) in prepared.pixels.chunks_exact(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                data[c * plane + i] = self.normalize_value(v, c);
            }
        }
        Pixels { data, height: prepared.height, width: prepared.width }
    }

    /// [`prepare`](Self::prepare) then [`normalize`](Self::normalize).
    pub fn pixels(&self, img: &RgbImage) -> Result<Pixels, DecodeError> {
        Ok(self.normalize(&self.prepare(img)?))
    }

    /// Mirrors the reference's arithmetic: rescale in float64, cast to float32, then normalise in float32.
    fn normalize_value(&self, v: u8, channel: usize) -> f32 {
        let x = match self.rescale {
            Some(s) => (f64::from(v) * s) as f32,
            None => f32::from(v),
        };
        match self.normalize {
            Some((mean, std)) => (x - mean[channel]) / std[channel],
            None => x,
        }
    }
}

fn crop_offset(size: u64, crop: u64) -> i128 {
    (i128::from(size) - i128::from(crop)).div_euclid(2)
}

fn parse_resize(v: &Value) -> Result<ResizeTo, String> {
    let get = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as u32);
    if let Some(n) = v.as_u64() {
        return Ok(ResizeTo::ShortestEdge(n as u32));
    }
    if let (Some(height), Some(width)) = (get("height"), get("width")) {
        return Ok(ResizeTo::Exact { height, width });
    }
    if let Some(s) = get("shortest_edge") {
        return Ok(ResizeTo::ShortestEdge(s));
    }
    Err(format!("unsupported size {v}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIP: &str = r#"{"crop_size": {"height": 224, "width": 224}, "do_center_crop": true,
        "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}}"#;
    const BLIP: &str = r#"{"do_normalize": true, "do_resize": true, "do_rescale": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": {"height": 384, "width": 384}}"#;

    fn image(width: u32, height: u32, f: impl Fn(u32, u32, usize) -> u8) -> RgbImage {
        let mut pixels = Vec::new();
        for y in 0..height {
            for x in 0..width {
                for c in 0..3 {
                    pixels.push(f(x, y, c));
                }
            }
        }
        RgbImage { width, height, pixels }
    }

    #[test]
    fn reads_both_size_forms() {
        let clip = ImageProcessor::from_json(CLIP).unwrap();
        assert_eq!(clip.resize, Some(ResizeTo::ShortestEdge(224)));
        assert_eq!(clip.center_crop, Some((224, 224)));
        let blip = ImageProcessor::from_json(BLIP).unwrap();
        assert_eq!(blip.resize, Some(ResizeTo::Exact { height: 384, width: 384 }));
        assert_eq!(blip.center_crop, None);
        let legacy = ImageProcessor::from_json(
            r#"{"size": 224, "crop_size": 224, "do_center_crop": true,
            "image_mean": [0.5,0.5,0.5], "image_std": [0.5,0.5,0.5]}"#,
        )
        .unwrap();
        assert_eq!(legacy.resize, Some(ResizeTo::ShortestEdge(224)));
        assert_eq!(legacy.center_crop, Some((224, 224)));
    }

    #[test]
    fn rejects_what_it_cannot_reproduce() {
        assert!(ImageProcessor::from_json(
            r#"{"size": {"height": 4, "width": 4}, "resample": 2,
            "image_mean": [0,0,0], "image_std": [1,1,1]}"#
        )
        .unwrap_err()
        .contains("resample 2"));
        assert!(ImageProcessor::from_json(
            r#"{"size": {"height": 4, "width": 4},
            "image_mean": [0,0], "image_std": [1,1,1]}"#
        )
        .unwrap_err()
        .contains("image_mean"));
    }

    #[test]
    fn shortest_edge_truncates_long_side_and_crops_centre() {
        let clip = ImageProcessor::from_json(CLIP).unwrap();
        assert_eq!(clip.resized_size(333, 500), (224, 336));
        assert_eq!(clip.resized_size(500, 333), (336, 224));
        assert_eq!(clip.resized_size(300, 301), (224, 224));
        assert_eq!(clip.output_size(333, 500), (224, 224));
        // A left half black, right half white image: the crop of a 448x224 image keeps x in 112..336.
        let img = image(448, 224, |x, _, _| if x < 224 { 0 } else { 255 });
        let out = ImageProcessor { resize: None, center_crop: Some((224, 224)), rescale: None, normalize: None }
            .pixels(&img)
            .unwrap()
            .data;
        assert_eq!(out.len(), 3 * 224 * 224);
        assert_eq!(out[111], 0.0);
        assert_eq!(out[112], 255.0);
    }

    #[test]
    #[allow(clippy::excessive_precision)] // the values as checkpoints write them
    fn normalises_per_channel_in_chw_order() {
        let blip = ImageProcessor::from_json(BLIP).unwrap();
        let img = image(384, 384, |_, _, c| [255, 0, 128][c]);
        let out = blip.pixels(&img).unwrap().data;
        let plane = 384 * 384;
        let expect = |v: f64, m: f32, s: f32| ((v / 255.0) as f32 - m) / s;
        assert_eq!(out[0], expect(255.0, 0.48145466, 0.26862954));
        assert_eq!(out[plane], expect(0.0, 0.4578275, 0.26130258));
        assert_eq!(out[2 * plane + 5], expect(128.0, 0.40821073, 0.27577711));
    }

    #[test]
    fn prepare_equals_full_resize_then_crop() {
        let clip = ImageProcessor::from_json(CLIP).unwrap();
        let clip = ImageProcessor { resize: Some(ResizeTo::ShortestEdge(24)), center_crop: Some((20, 20)), ..clip };
        for (w, h) in [(61, 37), (37, 61), (24, 90), (5, 3), (300, 2)] {
            let img = image(w, h, |x, y, c| ((x * 7 + y * 13 + c as u32 * 29) % 256) as u8);
            let (rh, rw) = clip.resized_size(h, w);
            let full = crate::resize::resize_bicubic_rgb8(&img.pixels, w, h, rw as u32, rh as u32);
            let (top, left) = (crop_offset(rh, 20), crop_offset(rw, 20));
            let mut want = vec![0u8; 20 * 20 * 3];
            for y in 0..20i128 {
                for x in 0..20i128 {
                    let (sy, sx) = (y + top, x + left);
                    if sy >= 0 && sx >= 0 && (sy as u64) < rh && (sx as u64) < rw {
                        let from = ((sy as usize) * rw as usize + sx as usize) * 3;
                        let to = ((y * 20 + x) * 3) as usize;
                        want[to..to + 3].copy_from_slice(&full[from..from + 3]);
                    }
                }
            }
            assert_eq!(clip.prepare(&img).unwrap().pixels, want, "{w}x{h}");
        }
    }

    #[test]
    fn extreme_shapes_cost_the_output_and_never_overflow() {
        let clip = ImageProcessor::from_json(CLIP).unwrap();
        // The long side would be 224 * 4,000,000 (over u32) before the crop.
        let thin = RgbImage { width: 1, height: 4_000_000, pixels: vec![9u8; 12_000_000] };
        let out = clip.prepare(&thin).unwrap();
        assert_eq!((out.width, out.height), (224, 224));
        assert!(out.pixels.iter().all(|&v| v == 9));
        // Without a crop the output itself would be huge: refused, not allocated.
        let uncropped = ImageProcessor { center_crop: None, ..clip };
        assert!(matches!(uncropped.prepare(&thin), Err(DecodeError::OutputTooLarge { .. })));
        let empty = RgbImage { width: 0, height: 0, pixels: vec![] };
        assert!(matches!(uncropped.prepare(&empty), Err(DecodeError::ZeroSized { .. })));
    }
}
