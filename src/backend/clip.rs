//! CLIP runner: embeds a batch of images and all their captions in two forward passes, then
//! scores each request's captions against its own image.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::stack_pixels;
use crate::{
    engine::{EngineError, OneShot},
    models::{
        clip::Clip,
        preprocess::{self, ImageProcessor, Pixels},
        tokenizer::{pad_batch, RankTokenizer},
        transfer, ModelError, Numerics, Shared,
    },
    validate::InvalidParam,
};

pub struct RankInput {
    pub pixels: Pixels,
    /// Each caption's token ids, from [`ClipRunner::tokenize`].
    pub captions: Vec<Vec<i64>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankScore {
    /// Softmax of the logits over this request's captions.
    pub probability: f32,
    pub cosine: f32,
    pub logit: f32,
}

#[derive(Debug)]
pub struct RankOutput {
    /// One score per caption, in request order.
    pub scores: Vec<RankScore>,
}

pub struct ClipRunner {
    model: Shared<Clip>,
    tokenizer: RankTokenizer,
    processor: ImageProcessor,
    device: Device,
}

impl ClipRunner {
    pub fn load(folder: &Path, device: Device) -> Result<Self, ModelError> {
        Self::load_as(folder, device, Kind::Float)
    }

    /// Loads the model to compute as `numerics` says (`--dtype`, `--quantize`).
    pub fn load_as(folder: &Path, device: Device, numerics: impl Into<Numerics>) -> Result<Self, ModelError> {
        Self::with_tokenizer(Clip::load_as(folder, device, numerics)?, folder, folder, device)
    }

    /// Random weights in the shapes of `shapes` (a config folder), with `tokenizer`'s tokenizer.
    pub fn random_as(shapes: &Path, tokenizer: &Path, device: Device, numerics: Numerics) -> Result<Self, ModelError> {
        Self::with_tokenizer(Clip::random_as(shapes, device, numerics)?, shapes, tokenizer, device)
    }

    fn with_tokenizer(model: Clip, shapes: &Path, tokenizer: &Path, device: Device) -> Result<Self, ModelError> {
        let tokenizer = RankTokenizer::load(tokenizer, model.config.text_config.max_position_embeddings as usize)?;
        Ok(Self::new(model, tokenizer, preprocess::load(shapes)?, device))
    }

    pub fn new(model: Clip, tokenizer: RankTokenizer, processor: ImageProcessor, device: Device) -> Self {
        super::device::settle(device);
        Self { model: Shared::new(model), tokenizer, processor, device }
    }

    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// Validates and tokenizes a request's captions, before it is queued.
    pub fn tokenize(&self, captions: &[String]) -> Result<Vec<Vec<i64>>, InvalidParam> {
        self.tokenizer.encode_each(captions).map_err(|e| InvalidParam { field: "captions", reason: e.to_string() })
    }

    fn run_batch(&self, inputs: &[RankInput]) -> Result<Vec<Vec<RankScore>>, EngineError> {
        let pixels = stack_pixels(inputs.iter().map(|i| &i.pixels), self.device, self.model.kind());
        // Normalised and compared in fp32 whatever the towers computed in.
        let images = l2_normalize(&self.model.image_features(&pixels).to_kind(Kind::Float));
        let rows: Vec<&[i64]> = inputs.iter().flat_map(|i| i.captions.iter().map(Vec::as_slice)).collect();
        let enc = pad_batch(&rows, self.model.config.text_config.pad_token_id);
        let shape = [enc.rows as i64, enc.len as i64];
        let ids = transfer::upload(&Tensor::from_slice(&enc.ids).view(shape), self.device);
        let mask = transfer::upload(&Tensor::from_slice(&enc.mask).view(shape), self.device);
        let texts = l2_normalize(&self.model.text_features(&ids, &mask).to_kind(Kind::Float));
        let scale = self.model.logit_scale();
        // Every request's cosines, logits and probabilities come back in one read.
        let mut start = 0i64;
        let mut parts = Vec::with_capacity(3 * inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            let n = input.captions.len() as i64;
            let cosine = texts.narrow(0, start, n).matmul(&images.get(i as i64));
            start += n;
            let logits = &cosine * scale;
            let probs = logits.softmax(-1, Kind::Float);
            parts.extend([cosine, logits, probs]);
        }
        let all = if parts.is_empty() { Vec::new() } else { transfer::read::<f32>(&Tensor::cat(&parts, 0)) };
        let mut at = 0;
        let mut out = Vec::with_capacity(inputs.len());
        for input in inputs {
            let n = input.captions.len();
            let (cosine, rest) = all[at..at + 3 * n].split_at(n);
            let (logits, probs) = rest.split_at(n);
            at += 3 * n;
            out.push(
                (0..n).map(|j| RankScore { probability: probs[j], cosine: cosine[j], logit: logits[j] }).collect(),
            );
        }
        Ok(out)
    }
}

fn l2_normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true)
}

/// Ranking requests run together in one pass of each tower.
impl OneShot for ClipRunner {
    type Input = RankInput;
    type Output = RankOutput;

    const NAME: &'static str = "rank";

    fn run(&self, inputs: Vec<(u64, RankInput)>) -> Vec<(u64, Result<RankOutput, EngineError>)> {
        let _no_grad = tch::no_grad_guard();
        let (ids, inputs): (Vec<u64>, Vec<RankInput>) = inputs.into_iter().unzip();
        match self.run_batch(&inputs) {
            Ok(all) => ids.into_iter().zip(all).map(|(id, scores)| (id, Ok(RankOutput { scores }))).collect(),
            Err(e) => ids.into_iter().map(|id| (id, Err(e.clone()))).collect(),
        }
    }
}
