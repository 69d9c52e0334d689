//! What the use cases need from the two models, behind one seam: each model's preprocessing, the
//! decoder's position limit, tokenizing prompts and captions (the checks that need a tokenizer)
//! and the model calls. The in-process implementation queues on the shared scheduler; tests put fakes behind it.
//!
//! Words by layer: the RPCs and use cases are `generate`/`rank`/`caption`; here the roles are
//! the generator and the ranker (`generate_candidates`, `score_captions`); the engine knows a
//! step-wise and a one-shot model; the backend names the models, BLIP and CLIP. The metric label
//! values stay `generate` and `rank`.

use std::{future::Future, sync::Arc};

use crate::{
    backend::{BlipRunner, ClipRunner, GenerateInput, GenerateOutput, Prompt, RankInput, RankOutput},
    engine::{Admission, EngineError, Scheduler},
    models::preprocess::ImageProcessor,
    validate::{InvalidParam, ValidParams},
};

pub trait Models: Send + Sync + 'static {
    /// BLIP's image preprocessing; `None` when this process runs no generator.
    fn generator_processor(&self) -> Option<&ImageProcessor>;
    /// CLIP's image preprocessing; `None` when this process runs no ranker.
    fn ranker_processor(&self) -> Option<&ImageProcessor>;
    /// The longest sequence the decoder can produce (no limit without a generator).
    fn max_positions(&self) -> u32;
    /// A request's prompt, tokenized and checked against its `max_length`.
    fn prompt(&self, params: &ValidParams) -> Result<Prompt, InvalidParam>;
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

/// The models this process runs (both, or one in a split deployment), on the shared scheduler.
pub struct LocalModels {
    pub scheduler: ModelScheduler,
    pub blip: Option<Arc<BlipRunner>>,
    pub clip: Option<Arc<ClipRunner>>,
}

impl Models for LocalModels {
    fn generator_processor(&self) -> Option<&ImageProcessor> {
        self.blip.as_deref().map(BlipRunner::processor)
    }

    fn ranker_processor(&self) -> Option<&ImageProcessor> {
        self.clip.as_deref().map(ClipRunner::processor)
    }

    fn max_positions(&self) -> u32 {
        self.blip.as_deref().map_or(u32::MAX, BlipRunner::max_positions)
    }

    fn prompt(&self, params: &ValidParams) -> Result<Prompt, InvalidParam> {
        match &self.blip {
            Some(blip) => blip.prompt(params.get()),
            None => Err(InvalidParam::new("params", "this server runs no generator")),
        }
    }

    fn tokenize(&self, captions: &[String]) -> Result<Vec<Vec<i64>>, InvalidParam> {
        match &self.clip {
            Some(clip) => clip.tokenize(captions),
            None => Err(InvalidParam::new("captions", "this server runs no ranker")),
        }
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
