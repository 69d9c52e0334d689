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
    engine::{Batch, EngineError, Runner},
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
    /// Time from the start of this request's decode batch to its completion.
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
    pub fn load(folder: &Path, device: Device, intra_op_threads: Option<i32>) -> Result<Self, ModelError> {
        let model = Blip::load(folder, device)?;
        Self::new(model, CaptionTokenizer::load(folder)?, ImageProcessor::load(folder)?, device, intra_op_threads)
    }

    pub fn new(
        model: Blip,
        tokenizer: CaptionTokenizer,
        processor: ImageProcessor,
        device: Device,
        intra_op_threads: Option<i32>,
    ) -> Result<Self, ModelError> {
        super::device::settle(device);
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
        SpecialTokens { bos: t.bos_token_id, eos: t.sep_token_id }
    }

    fn detokenize(&self, ids: Vec<i64>) -> Result<GeneratedCaption, EngineError> {
        let token_ids: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
        let text = self.tokenizer.decode(&token_ids).map_err(|e| EngineError::Internal(e.to_string()))?;
        Ok(GeneratedCaption { text, token_ids })
    }
}

/// Requests being decoded together on one executor.
pub struct GenerateBatch<'a> {
    runner: &'a BlipRunner,
    decode: DecodeBatch<'a>,
    started: Instant,
}

impl Runner for BlipRunner {
    type Input = GenerateInput;
    type Output = GenerateOutput;
    type Batch<'a> = GenerateBatch<'a>;

    const NAME: &'static str = "generate";

    /// Sets this executor's libtorch threads and, on CUDA, its own stream. The rank runner shares
    /// the device, so this is the one place per executor that binds the stream.
    fn init_thread(&self) {
        if let Some(n) = self.intra_op_threads {
            tch::set_num_threads(n);
        }
        if super::device::use_own_stream(self.device) {
            tracing::debug!(thread = ?std::thread::current().name(), "executor runs on its own CUDA stream");
        }
    }

    /// Encodes every image once and computes its cross-attention keys and values once; the
    /// request's candidates all read them.
    fn start(&self, inputs: Vec<(u64, GenerateInput)>) -> GenerateBatch<'_> {
        let _no_grad = tch::no_grad_guard();
        let pixels = stack_pixels(inputs.iter().map(|(_, i)| &i.pixels), self.device);
        let image_embeds = self.model.encode_image(&pixels);
        self.images_encoded.fetch_add(inputs.len() as u64, Ordering::Relaxed);
        let special = self.special_tokens();
        let requests: Vec<DecodeRequest> = inputs
            .into_iter()
            .map(|(id, i)| DecodeRequest { id, params: i.params, prefix: vec![special.bos] })
            .collect();
        let decode = DecodeBatch::new(&self.model.text_decoder, special, &image_embeds, &requests);
        GenerateBatch { runner: self, decode, started: Instant::now() }
    }
}

impl Batch for GenerateBatch<'_> {
    type Output = GenerateOutput;

    fn step(&mut self) -> Vec<(u64, Result<GenerateOutput, EngineError>)> {
        let _no_grad = tch::no_grad_guard();
        let done = self.decode.step();
        self.runner.decode_steps.fetch_add(1, Ordering::Relaxed);
        let compute = self.started.elapsed();
        done.into_iter()
            .map(|d| {
                let out = d
                    .candidates
                    .into_iter()
                    .map(|ids| self.runner.detokenize(ids))
                    .collect::<Result<Vec<_>, _>>()
                    .map(|candidates| GenerateOutput { candidates, compute });
                (d.id, out)
            })
            .collect()
    }

    fn join(&mut self, other: Self) {
        self.decode.join(other.decode);
    }

    fn cancel(&mut self, id: u64) {
        self.decode.cancel(id);
    }

    fn is_done(&self) -> bool {
        self.decode.is_done()
    }

    fn joinable(&self) -> bool {
        true
    }

    fn requests(&self) -> usize {
        self.decode.active_requests()
    }
}
