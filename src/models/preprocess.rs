//! Image preprocessing as the checkpoint's `preprocessor_config.json` prescribes: Pillow-exact
//! bicubic resize (exact size for BLIP, shortest edge then centre crop for CLIP), rescale and
//! normalise, producing CHW float32 pixels.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::{read_folder_file, ModelError};
use crate::images::{resize::resize_bicubic_rgb8, RgbImage};

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
    pub fn load(folder: &Path) -> Result<Self, ModelError> {
        let name = "preprocessor_config.json";
        Self::from_json(&read_folder_file(folder, name)?)
            .map_err(|e| ModelError::Config(format!("{}/{name}: {e}", folder.display())))
    }

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
    pub fn output_size(&self, height: u32, width: u32) -> (u32, u32) {
        let (h, w) = self.resized_size(height, width);
        self.center_crop.unwrap_or((h, w))
    }

    fn resized_size(&self, height: u32, width: u32) -> (u32, u32) {
        match self.resize {
            None => (height, width),
            Some(ResizeTo::Exact { height, width }) => (height, width),
            Some(ResizeTo::ShortestEdge(s)) => {
                // The reference truncates the long side: int(s * long / short).
                let (short, long) = (height.min(width) as u64, height.max(width) as u64);
                let long = (s as u64 * long / short) as u32;
                if height <= width {
                    (s, long)
                } else {
                    (long, s)
                }
            }
        }
    }

    pub fn pixels(&self, img: &RgbImage) -> Pixels {
        let (height, width) = self.output_size(img.height, img.width);
        Pixels { data: self.apply(img), height, width }
    }

    /// CHW float pixels for one RGB image.
    pub fn apply(&self, img: &RgbImage) -> Vec<f32> {
        let (h, w) = self.resized_size(img.height, img.width);
        let resized;
        let (pixels, h, w) = if (h, w) == (img.height, img.width) {
            (&img.pixels[..], h, w)
        } else {
            resized = resize_bicubic_rgb8(&img.pixels, img.width, img.height, w, h);
            (&resized[..], h, w)
        };
        let (top, left, out_h, out_w) = match self.center_crop {
            Some((ch, cw)) => (crop_offset(h, ch), crop_offset(w, cw), ch, cw),
            None => (0, 0, h, w),
        };
        let plane = (out_h * out_w) as usize;
        let mut out = vec![0f32; 3 * plane];
        for y in 0..out_h {
            let sy = y as i64 + top;
            for x in 0..out_w {
                let sx = x as i64 + left;
                let inside = sy >= 0 && sx >= 0 && (sy as u32) < h && (sx as u32) < w;
                for c in 0..3 {
                    // A crop larger than the image pads with zeros, as the reference does.
                    let v = if inside { pixels[((sy as usize * w as usize) + sx as usize) * 3 + c] } else { 0 };
                    out[c * plane + (y * out_w + x) as usize] = self.normalize_value(v, c);
                }
            }
        }
        out
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

fn crop_offset(size: u32, crop: u32) -> i64 {
    (i64::from(size) - i64::from(crop)).div_euclid(2)
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
        let out =
            ImageProcessor { resize: None, center_crop: Some((224, 224)), rescale: None, normalize: None }.apply(&img);
        assert_eq!(out.len(), 3 * 224 * 224);
        assert_eq!(out[111], 0.0);
        assert_eq!(out[112], 255.0);
    }

    #[test]
    #[allow(clippy::excessive_precision)] // the values as checkpoints write them
    fn normalises_per_channel_in_chw_order() {
        let blip = ImageProcessor::from_json(BLIP).unwrap();
        let img = image(384, 384, |_, _, c| [255, 0, 128][c]);
        let out = blip.apply(&img);
        let plane = 384 * 384;
        let expect = |v: f64, m: f32, s: f32| ((v / 255.0) as f32 - m) / s;
        assert_eq!(out[0], expect(255.0, 0.48145466, 0.26862954));
        assert_eq!(out[plane], expect(0.0, 0.4578275, 0.26130258));
        assert_eq!(out[2 * plane + 5], expect(128.0, 0.40821073, 0.27577711));
    }
}
