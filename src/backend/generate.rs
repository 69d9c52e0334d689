//! BLIP runner: encodes a batch of images once, decodes every request's candidates in one shared
//! decode batch, and detokenizes the results.

use std::{
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tch::Device;

use super::stack_pixels;
use crate::{
    engine::{EngineError, Runner},
    models::{
        blip::Blip,
        generation::{DecodeBatch, DecodeRequest, GenerationParams, SpecialTokens},
        preprocess::{ImageProcessor, Pixels},
        tokenizer::CaptionTokenizer,
        ModelError, Shared,
    },
};

pub struct GenerateInput {
    pub pixels: Pixels,
    pub params: GenerationParams,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedCaption {
    pub text: String,
    pub token_ids: Vec<u32>,
}

#[derive(Debug)]
pub struct GenerateOutput {
    pub candidates: Vec<GeneratedCaption>,
    /// Wall time of the batch this request ran in.
    pub compute: Duration,
}

pub struct BlipRunner {
    model: Shared<Blip>,
    tokenizer: CaptionTokenizer,
    processor: ImageProcessor,
    device: Device,
    intra_op_threads: Option<i32>,
    images_encoded: AtomicU64,
    decode_steps: AtomicU64,
}

impl BlipRunner {
    pub fn load(
        folder: &Path,
        device: Device,
        intra_op_threads: Option<i32>,
    ) -> Result<Self, ModelError> {
        let model = Blip::load(folder, device)?;
        let tokenizer = CaptionTokenizer::load(folder)?;
        let processor = ImageProcessor::load(folder)?;
        let vocab = model.config.text_config.vocab_size as usize;
        if tokenizer.vocab_size() > vocab {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer has {} tokens but text_config.vocab_size is {vocab}",
                tokenizer.vocab_size()
            )));
        }
        Ok(Self {
            model: Shared::new(model),
            tokenizer,
            processor,
            device,
            intra_op_threads,
            images_encoded: AtomicU64::new(0),
            decode_steps: AtomicU64::new(0),
        })
    }

    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// Positions the text decoder has: the largest `max_length` it can serve.
    pub fn max_positions(&self) -> u32 {
        self.model.text_decoder.max_positions() as u32
    }

    /// Images run through the vision encoder since start.
    pub fn images_encoded(&self) -> u64 {
        self.images_encoded.load(Ordering::Relaxed)
    }

    /// Decoder forward passes since start.
    pub fn decode_steps(&self) -> u64 {
        self.decode_steps.load(Ordering::Relaxed)
    }

    fn special_tokens(&self) -> SpecialTokens {
        let t = &self.model.config.text_config;
        SpecialTokens {
            bos: t.bos_token_id,
            eos: t.sep_token_id,
        }
    }

    fn run_batch(
        &self,
        inputs: &[GenerateInput],
    ) -> Result<Vec<Vec<GeneratedCaption>>, EngineError> {
        let pixels = stack_pixels(inputs.iter().map(|i| &i.pixels), self.device);
        let image_embeds = self.model.encode_image(&pixels);
        self.images_encoded
            .fetch_add(inputs.len() as u64, Ordering::Relaxed);
        let special = self.special_tokens();
        let requests: Vec<DecodeRequest> = inputs
            .iter()
            .map(|i| DecodeRequest {
                params: i.params.clone(),
                prefix: vec![special.bos],
            })
            .collect();
        let batch = DecodeBatch::new(&self.model.text_decoder, special, &image_embeds, &requests);
        let (decoded, steps) = batch.run_to_end();
        self.decode_steps.fetch_add(steps, Ordering::Relaxed);
        decoded
            .into_iter()
            .map(|d| {
                d.candidates
                    .into_iter()
                    .map(|ids| {
                        let token_ids: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
                        let text = self
                            .tokenizer
                            .decode(&token_ids)
                            .map_err(|e| EngineError::Internal(e.to_string()))?;
                        Ok(GeneratedCaption { text, token_ids })
                    })
                    .collect()
            })
            .collect()
    }
}

impl Runner for BlipRunner {
    type Input = GenerateInput;
    type Output = GenerateOutput;

    fn init_thread(&self) {
        if let Some(n) = self.intra_op_threads {
            tch::set_num_threads(n);
        }
    }

    fn run(&self, inputs: Vec<GenerateInput>) -> Vec<Result<GenerateOutput, EngineError>> {
        let start = Instant::now();
        let _no_grad = tch::no_grad_guard();
        match self.run_batch(&inputs) {
            Ok(all) => {
                let compute = start.elapsed();
                all.into_iter()
                    .map(|candidates| {
                        Ok(GenerateOutput {
                            candidates,
                            compute,
                        })
                    })
                    .collect()
            }
            Err(e) => (0..inputs.len()).map(|_| Err(e.clone())).collect(),
        }
    }
}
