//! Plain result types of the use cases.

use std::time::Duration;

use crate::{
    backend::GeneratedCaption,
    images::{cache::Weighed, RgbImage},
};

/// What each model this process runs sees of one image: its processor's resized and cropped
/// uint8 pixels. This, not the full-resolution decode, is what the image cache keeps.
#[derive(Debug)]
pub struct PreparedImage {
    pub generator: Option<RgbImage>,
    pub ranker: Option<RgbImage>,
}

impl Weighed for PreparedImage {
    fn bytes(&self) -> usize {
        let len = |i: &Option<RgbImage>| i.as_ref().map_or(0, |i| i.pixels.len());
        len(&self.generator) + len(&self.ranker) + std::mem::size_of::<Self>()
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub fetch: Duration,
    pub preprocess: Duration,
    pub generate: Duration,
    pub rank: Duration,
    pub total: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RankedCaption {
    pub text: String,
    pub probability: f32,
    pub cosine: f32,
    pub logit: f32,
    pub index: u32,
    /// How many generated candidates were this caption (0 for Rank).
    pub count: u32,
}

#[derive(Debug)]
pub struct Generated {
    pub key: String,
    pub candidates: Vec<GeneratedCaption>,
    pub timings: Timings,
}

#[derive(Debug)]
pub struct Ranked {
    pub key: String,
    pub captions: Vec<RankedCaption>,
    pub timings: Timings,
}

#[derive(Debug)]
pub struct Captioned {
    pub key: String,
    pub captions: Vec<RankedCaption>,
    pub candidates: Vec<String>,
    pub timings: Timings,
}
