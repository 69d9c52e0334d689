//! Decoding parameters of one request, their defaults and their validation.

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
    /// The origin notebook's BLIP call (`sample=True, top_p=0.9, max_length=80, min_length=10`,
    /// repetition penalty 1.1, top_k 50, 10 candidates), with `max_length` capped at `max_positions`.
    pub fn notebook(max_positions: u32) -> Self {
        Self {
            num_candidates: 10,
            max_length: 80.min(max_positions),
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

/// Longest accepted prompt; its tokens must also leave room under `max_length`.
pub const MAX_PROMPT_BYTES: usize = 512;

/// Upper bounds the server enforces on requests.
#[derive(Debug, Clone, Copy)]
pub struct GenerationLimits {
    pub max_candidates: u32,
    pub max_length: u32,
}

/// Most beams one request may use.
pub const MAX_BEAMS: u32 = 16;

/// A rejected parameter, naming the request field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidParam {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidParam {
    InvalidParam { field, reason: reason.into() }
}

impl GenerationParams {
    pub fn validate(&self, limits: &GenerationLimits) -> Result<(), InvalidParam> {
        if self.num_candidates == 0 || self.num_candidates > limits.max_candidates {
            return Err(invalid(
                "num_candidates",
                format!("must be in 1..={}, got {}", limits.max_candidates, self.num_candidates),
            ));
        }
        if self.max_length < 2 || self.max_length > limits.max_length {
            return Err(invalid(
                "max_length",
                format!("must be in 2..={}, got {}", limits.max_length, self.max_length),
            ));
        }
        if self.min_length > self.max_length {
            return Err(invalid(
                "min_length",
                format!("must not exceed max_length {}, got {}", self.max_length, self.min_length),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(invalid("temperature", format!("must be a finite number > 0, got {}", self.temperature)));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid("top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        if self.prompt.as_ref().is_some_and(|p| p.len() > MAX_PROMPT_BYTES) {
            return Err(invalid("prompt", format!("must be at most {MAX_PROMPT_BYTES} bytes")));
        }
        if self.strategy == Strategy::Beam {
            if self.num_beams == 0 || self.num_beams > MAX_BEAMS {
                return Err(invalid("num_beams", format!("must be in 1..={MAX_BEAMS}, got {}", self.num_beams)));
            }
            if self.num_candidates > self.num_beams {
                return Err(invalid(
                    "num_candidates",
                    format!(
                        "beam search returns at most num_beams ({}) candidates, got {}",
                        self.num_beams, self.num_candidates
                    ),
                ));
            }
            if !self.length_penalty.is_finite() {
                return Err(invalid("length_penalty", format!("must be finite, got {}", self.length_penalty)));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(invalid(
                "repetition_penalty",
                format!("must be a finite number > 0, got {}", self.repetition_penalty),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: GenerationLimits = GenerationLimits { max_candidates: 16, max_length: 40 };

    #[test]
    fn defaults_are_valid_and_each_bad_field_is_named() {
        assert_eq!(GenerationParams::default().validate(&LIMITS), Ok(()));
        type Breaker = fn(&mut GenerationParams);
        let cases: [(&str, Breaker); 10] = [
            ("num_beams", |p| {
                p.strategy = Strategy::Beam;
                p.num_beams = 0
            }),
            ("num_candidates", |p| {
                p.strategy = Strategy::Beam;
                p.num_beams = 2
            }),
            ("num_candidates", |p| p.num_candidates = 0),
            ("num_candidates", |p| p.num_candidates = 17),
            ("max_length", |p| p.max_length = 41),
            ("min_length", |p| p.min_length = 41),
            ("temperature", |p| p.temperature = f32::NAN),
            ("top_p", |p| p.top_p = 0.0),
            ("top_p", |p| p.top_p = 1.5),
            ("repetition_penalty", |p| p.repetition_penalty = -1.0),
        ];
        for (field, break_it) in cases {
            let mut p = GenerationParams::default();
            break_it(&mut p);
            assert_eq!(p.validate(&LIMITS).unwrap_err().field, field);
        }
    }
}
