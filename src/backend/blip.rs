//! BLIP runner: encodes a batch of images once, decodes every request's candidates in one shared
//! decode batch, and detokenizes the results.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use tch::{Device, Kind};

use super::stack_pixels;
use crate::{
    engine::{EngineError, RunningBatch, StepWise},
    models::{
        blip::{self, Blip, DecodeBatch, DecodeRequest, Decoded, SpecialTokens},
        generation::GenerationParams,
        graphs::{self, GraphMode},
        preprocess::{self, ImageProcessor, Pixels},
        tokenizer::CaptionTokenizer,
        ModelError, Numerics, Shared,
    },
    validate::{InvalidParam, ValidParams},
};

pub struct GenerateInput {
    pub pixels: Pixels,
    pub params: ValidParams,
    /// The decoder's input ids and what to strip, from [`BlipRunner::prompt`].
    pub prompt: Prompt,
}

/// A request's prompt, validated and tokenized before it is queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Decoder input ids: `[bos]`, or bos followed by the prompt's tokens.
    pub prefix: Vec<i64>,
    /// Text to remove from the front of every caption (`strip_prompt`).
    pub strip: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedCaption {
    pub text: String,
    pub token_ids: Vec<u32>,
}

#[derive(Debug)]
pub struct GenerateOutput {
    pub candidates: Vec<GeneratedCaption>,
}

pub struct BlipRunner {
    model: Shared<Blip>,
    tokenizer: CaptionTokenizer,
    processor: ImageProcessor,
    device: Device,
    images_encoded: AtomicU64,
}

impl BlipRunner {
    pub fn load(folder: &Path, device: Device) -> Result<Self, ModelError> {
        Self::load_as(folder, device, Kind::Float)
    }

    /// Loads the model to compute as `numerics` says (`--dtype`, `--quantize`).
    pub fn load_as(folder: &Path, device: Device, numerics: impl Into<Numerics>) -> Result<Self, ModelError> {
        let model = Blip::load_as(folder, device, numerics)?;
        Self::new(model, CaptionTokenizer::load(folder)?, preprocess::load(folder)?, device)
    }

    /// Random weights in the shapes of `shapes` (a config folder), with `tokenizer`'s tokenizer.
    pub fn random_as(shapes: &Path, tokenizer: &Path, device: Device, numerics: Numerics) -> Result<Self, ModelError> {
        let model = Blip::random_as(shapes, device, numerics)?;
        Self::new(model, CaptionTokenizer::load(tokenizer)?, preprocess::load(shapes)?, device)
    }

    pub fn new(
        model: Blip,
        tokenizer: CaptionTokenizer,
        processor: ImageProcessor,
        device: Device,
    ) -> Result<Self, ModelError> {
        super::device::settle(device);
        let vocab = model.config.text_config.vocab_size as usize;
        if tokenizer.vocab_size() > vocab {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer has {} tokens but text_config.vocab_size is {vocab}",
                tokenizer.vocab_size()
            )));
        }
        Ok(Self { model: Shared::new(model), tokenizer, processor, device, images_encoded: AtomicU64::new(0) })
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
    decode: Option<DecodeBatch<'a>>,
    /// Per request: the prompt text to strip from its captions.
    strip: HashMap<u64, String>,
}

impl BlipRunner {
    /// Validates and tokenizes a request's prompt, before it is queued. The decoder input is
    /// `[bos]`, or with a prompt the tokenizer's `[CLS] prompt [SEP]` with CLS replaced by bos and
    /// the trailing SEP dropped, as the reference does.
    pub fn prompt(&self, params: &GenerationParams) -> Result<Prompt, InvalidParam> {
        let prefix = self.prefix(params)?;
        let strip = (params.strip_prompt && prefix.len() > 1).then(|| {
            let ids: Vec<u32> = prefix[1..].iter().map(|&t| t as u32).collect();
            self.tokenizer.decode(&ids).unwrap_or_default()
        });
        Ok(Prompt { prefix, strip })
    }

    fn prefix(&self, params: &GenerationParams) -> Result<Vec<i64>, InvalidParam> {
        let bos = self.special_tokens().bos;
        let Some(prompt) = params.prompt.as_deref().filter(|p| !p.trim().is_empty()) else {
            return Ok(vec![bos]);
        };
        let invalid = |reason: String| InvalidParam { field: "prompt", reason };
        let ids = self.tokenizer.encode(prompt).map_err(|e| invalid(e.to_string()))?;
        let mut prefix: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
        if prefix.len() >= 2 {
            prefix.pop();
        }
        match prefix.first_mut() {
            Some(first) => *first = bos,
            None => prefix.push(bos),
        }
        if prefix.len() as u32 >= params.max_length {
            return Err(invalid(format!(
                "{} tokens leave no room under max_length {}",
                prefix.len(),
                params.max_length
            )));
        }
        Ok(prefix)
    }
}

impl StepWise for BlipRunner {
    type Input = GenerateInput;
    type Output = GenerateOutput;
    type Batch<'a> = GenerateBatch<'a>;

    const NAME: &'static str = "generate";

    /// Encodes every image once and computes its cross-attention keys and values once; the
    /// request's candidates all read them. Prefixes of different lengths start as separate decode
    /// batches, each takes its first step, and they continue as one.
    fn prefill(
        &self,
        inputs: Vec<(u64, GenerateInput)>,
    ) -> (GenerateBatch<'_>, Vec<(u64, Result<GenerateOutput, EngineError>)>) {
        let _no_grad = tch::no_grad_guard();
        let mut finished = Vec::new();
        let mut strip = HashMap::new();
        let mut groups: BTreeMap<usize, Vec<(DecodeRequest, GenerateInput)>> = BTreeMap::new();
        for (id, mut input) in inputs {
            if let Some(text) = input.prompt.strip.take() {
                strip.insert(id, text);
            }
            let prefix = std::mem::take(&mut input.prompt.prefix);
            let req = DecodeRequest { id, params: input.params.get().clone(), prefix };
            groups.entry(req.prefix.len()).or_default().push((req, input));
        }
        let special = self.special_tokens();
        let mut decode: Option<DecodeBatch<'_>> = None;
        for (_, group) in groups {
            let pixels = stack_pixels(group.iter().map(|(_, i)| &i.pixels), self.device, self.model.kind());
            let image_embeds = self.model.encode_image(&pixels);
            self.images_encoded.fetch_add(group.len() as u64, Ordering::Relaxed);
            let requests: Vec<DecodeRequest> = group.into_iter().map(|(r, _)| r).collect();
            let mut batch = DecodeBatch::new(&self.model.text_decoder, special, &image_embeds, &requests);
            let done = batch.step();
            finished.extend(done.into_iter().map(|d| (d.id, self.finish(d, &mut strip))));
            match decode.as_mut() {
                None => decode = Some(batch),
                Some(running) => running.join(batch),
            }
        }
        (GenerateBatch { runner: self, decode, strip }, finished)
    }

    /// On CUDA every graph bucket is captured here, before the executor serves: a capture in
    /// the middle of serving stalls that step for the capture, and captures spread over hours
    /// grow the shared graph pool at random times. The CPU's emulated graphs cost nothing to
    /// make, so they stay lazy.
    fn start_executor(&self) {
        if self.model.text_decoder.graph_mode() != GraphMode::Cuda {
            return;
        }
        let started = Instant::now();
        let buckets = self.model.text_decoder.capture_graphs();
        let whole = blip::decode::capture_whole_steps(&self.model.text_decoder, self.special_tokens().eos);
        let (graphs, off) = graphs::on_this_executor();
        if off {
            tracing::warn!(buckets, "decode-step graphs could not be captured; this executor runs eagerly");
        } else {
            tracing::info!(
                buckets,
                whole,
                graphs,
                ms = started.elapsed().as_millis() as u64,
                "captured the decode-step graphs of every row bucket"
            );
        }
    }
}

impl BlipRunner {
    /// Detokenizes a finished request, removing its prompt when it asked; its entry in `strip`
    /// goes with it, so a batch that keeps taking joiners does not keep every prompt it saw.
    fn finish(&self, d: Decoded, strip: &mut HashMap<u64, String>) -> Result<GenerateOutput, EngineError> {
        let prompt = strip.remove(&d.id);
        let candidates = d
            .candidates
            .into_iter()
            .map(|ids| {
                let mut c = self.detokenize(ids)?;
                if let Some(p) = &prompt {
                    if let Some(rest) = c.text.strip_prefix(p.as_str()) {
                        c.text = rest.trim_start().to_string();
                    }
                }
                Ok(c)
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(GenerateOutput { candidates })
    }
}

impl RunningBatch for GenerateBatch<'_> {
    type Output = GenerateOutput;

    fn decode(&mut self) -> Vec<(u64, Result<GenerateOutput, EngineError>)> {
        let Some(decode) = self.decode.as_mut().filter(|d| !d.is_done()) else { return Vec::new() };
        let _no_grad = tch::no_grad_guard();
        let done = decode.step();
        done.into_iter().map(|d| (d.id, self.runner.finish(d, &mut self.strip))).collect()
    }

    fn concatenate(&mut self, other: Self) {
        self.strip.extend(other.strip);
        match (self.decode.as_mut(), other.decode) {
            (Some(d), Some(o)) => d.join(o),
            (None, o) => self.decode = o,
            (_, None) => {}
        }
    }

    fn filter(&mut self, id: u64) {
        self.strip.remove(&id);
        if let Some(d) = self.decode.as_mut() {
            d.cancel(id);
        }
    }

    fn requests(&self) -> usize {
        self.decode.as_ref().map_or(0, DecodeBatch::active_requests)
    }
}
