//! Decoding parameters of one request and their defaults; their rules are checked before a
//! request is queued.

/// How candidate tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Greedy,
    Sample,
    /// Beam search with `num_beams` beams; the candidates are the best finished beams.
    Beam,
}

/// Everything that controls how one request's candidates are decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub num_candidates: u32,
    /// Limit of the whole sequence: start token + prompt + generated tokens.
    pub max_length: u32,
    /// The end token is suppressed while the whole sequence is shorter than this.
    pub min_length: u32,
    pub strategy: Strategy,
    pub temperature: f32,
    /// 0 disables top-k filtering.
    pub top_k: u32,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Text the caption continues from.
    pub prompt: Option<String>,
    /// Remove the prompt from the returned text.
    pub strip_prompt: bool,
    /// Beams of beam search (`Strategy::Beam`).
    pub num_beams: u32,
    /// Exponent of the generated length that divides a finished beam's score.
    pub length_penalty: f32,
    /// Stop beam search as soon as `num_beams` hypotheses are finished.
    pub early_stopping: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            num_candidates: 10,
            max_length: 40,
            min_length: 0,
            strategy: Strategy::Sample,
            temperature: 1.0,
            top_k: 50,
            top_p: 0.9,
            repetition_penalty: 1.0,
            seed: 0,
            prompt: None,
            strip_prompt: false,
            num_beams: 3,
            length_penalty: 1.0,
            early_stopping: false,
        }
    }
}

impl GenerationParams {
    /// The tokens top-k keeps of a vocabulary of `vocab`: all of them where top-k is off.
    pub fn top_k_within(&self, vocab: i64) -> i64 {
        match self.top_k {
            0 => vocab,
            k => i64::from(k).min(vocab),
        }
    }

    /// The origin notebook's BLIP call (`sample=True, top_p=0.9, max_length=80, min_length=10`,
    /// repetition penalty 1.1, top_k 50, 10 candidates), with `max_length` capped at `limit`.
    pub fn notebook(limit: u32) -> Self {
        Self {
            num_candidates: 10,
            max_length: 80.min(limit),
            min_length: 10,
            strategy: Strategy::Sample,
            temperature: 1.0,
            top_k: 50,
            top_p: 0.9,
            repetition_penalty: 1.1,
            ..Self::default()
        }
    }
}
