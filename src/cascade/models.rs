//! What the use cases need from the two models, behind one seam: each model's preprocessing, the
//! decoder's position limit, request validation (prompts, captions) and the model calls. The
//! in-process implementation queues on the shared scheduler; tests put fakes behind it.
//!
//! Words by layer: the RPCs and use cases are `generate`/`rank`/`caption`; here the roles are
//! the generator and the ranker (`generate_candidates`, `score_captions`); the engine knows a
//! step-wise and a one-shot model; the backend names the models, BLIP and CLIP. The metric label
//! values stay `generate` and `rank`.

use std::{future::Future, sync::Arc};

use crate::{
    backend::{BlipRunner, ClipRunner, GenerateInput, GenerateOutput, Prompt, RankInput, RankOutput},
    engine::{Admission, EngineError, Scheduler},
    models::{
        generation::{GenerationParams, InvalidParam},
        preprocess::ImageProcessor,
    },
};

pub trait Models: Send + Sync + 'static {
    /// BLIP's image preprocessing.
    fn generator_processor(&self) -> &ImageProcessor;
    /// CLIP's image preprocessing.
    fn ranker_processor(&self) -> &ImageProcessor;
    /// The longest sequence the decoder can produce.
    fn max_positions(&self) -> u32;
    /// A request's prompt, validated and tokenized.
    fn prompt(&self, params: &GenerationParams) -> Result<Prompt, InvalidParam>;
    /// Captions, validated and tokenized for ranking.
    fn tokenize(&self, captions: &[String]) -> Result<Vec<Vec<i64>>, InvalidParam>;
    /// Candidate captions for one image (the generator's call).
    fn generate_candidates(
        &self,
        input: GenerateInput,
        admission: Admission,
    ) -> impl Future<Output = Result<GenerateOutput, EngineError>> + Send;
    /// Each caption's score against one image (the ranker's call).
    fn score_captions(
        &self,
        input: RankInput,
        admission: Admission,
    ) -> impl Future<Output = Result<RankOutput, EngineError>> + Send;
}

pub type ModelScheduler = Scheduler<BlipRunner, ClipRunner>;

/// Both models in this process, on the shared scheduler.
pub struct LocalModels {
    pub scheduler: ModelScheduler,
    pub blip: Arc<BlipRunner>,
    pub clip: Arc<ClipRunner>,
}

impl Models for LocalModels {
    fn generator_processor(&self) -> &ImageProcessor {
        self.blip.processor()
    }

    fn ranker_processor(&self) -> &ImageProcessor {
        self.clip.processor()
    }

    fn max_positions(&self) -> u32 {
        self.blip.max_positions()
    }

    fn prompt(&self, params: &GenerationParams) -> Result<Prompt, InvalidParam> {
        self.blip.prompt(params)
    }

    fn tokenize(&self, captions: &[String]) -> Result<Vec<Vec<i64>>, InvalidParam> {
        self.clip.tokenize(captions)
    }

    fn generate_candidates(
        &self,
        input: GenerateInput,
        admission: Admission,
    ) -> impl Future<Output = Result<GenerateOutput, EngineError>> + Send {
        self.scheduler.submit_step_wise(input, admission)
    }

    fn score_captions(
        &self,
        input: RankInput,
        admission: Admission,
    ) -> impl Future<Output = Result<RankOutput, EngineError>> + Send {
        self.scheduler.submit_one_shot(input, admission)
    }
}
