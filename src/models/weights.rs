//! Checkpoint tensors addressed by their Hugging Face key names.
//!
//! A [`Weights`] is a view with a key prefix, so model structs can be built with the same nesting
//! as the checkpoint (`weights.pp("vision_model").pp("encoder")`), and a missing or misshapen key
//! fails with the full key in the message instead of a libtorch error later.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    rc::Rc,
};

use tch::{Device, Kind, Tensor};

use super::ModelError;

/// Weight file names, in order of preference, as published in Hugging Face checkpoint folders.
const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

#[derive(Clone)]
pub struct Weights {
    tensors: Rc<HashMap<String, Tensor>>,
    prefix: String,
    source: Rc<PathBuf>,
    random: Option<Device>,
    /// What floating-point tensors are converted to when read; `None` keeps the file's kind.
    kind: Option<Kind>,
    /// Whether linear layers built from this view quantize their weights to int8.
    int8_linears: bool,
}

impl Weights {
    /// Loads every tensor of the checkpoint folder's weight file onto `device`; floating-point
    /// tensors are read as `kind` (as the file has them for [`get_exact`](Self::get_exact)).
    pub fn from_folder(folder: &Path, device: Device, kind: Kind) -> Result<Self, ModelError> {
        let file = WEIGHT_FILES.iter().map(|name| folder.join(name)).find(|path| path.is_file()).ok_or_else(|| {
            ModelError::Checkpoint(format!("{} holds neither {}", folder.display(), WEIGHT_FILES.join(" nor ")))
        })?;
        let named = if file.extension().is_some_and(|e| e == "safetensors") {
            Tensor::read_safetensors(&file)
        } else {
            Tensor::loadz_multi(&file)
        }
        .map_err(|e| ModelError::Checkpoint(format!("reading {}: {e}", file.display())))?;
        let tensors = named.into_iter().map(|(name, t)| (name, t.to_device(device))).collect();
        Ok(Self {
            tensors: Rc::new(tensors),
            prefix: String::new(),
            source: Rc::new(file),
            random: None,
            kind: Some(kind),
            int8_linears: false,
        })
    }

    /// Freshly initialised weights of whatever shape the model asks for (benchmarks of full-size
    /// configurations without their checkpoints): normal(0, 0.02), LayerNorm weights 1, biases 0.
    /// No key is reported present, so tied weights stay tied. Values are drawn in fp32 and then
    /// converted to `kind`, so two models built after the same seed differ only by that rounding.
    pub fn random(device: Device, kind: Kind) -> Self {
        Self {
            tensors: Rc::new(HashMap::new()),
            prefix: String::new(),
            source: Rc::new(PathBuf::from("<random>")),
            random: Some(device),
            kind: Some(kind),
            int8_linears: false,
        }
    }

    /// Builds a view over tensors already in memory (tests, fixtures).
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> Self {
        Self {
            tensors: Rc::new(tensors),
            prefix: String::new(),
            source: Rc::new(PathBuf::new()),
            random: None,
            kind: None,
            int8_linears: false,
        }
    }

    /// A view one level down: `pp("encoder")` then `get("weight")` reads `<prefix>.encoder.weight`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self {
            tensors: self.tensors.clone(),
            prefix,
            source: self.source.clone(),
            random: self.random,
            kind: self.kind,
            int8_linears: self.int8_linears,
        }
    }

    /// This view with linear layers quantized to int8 (`--quantize int8`) or not.
    pub fn with_int8_linears(mut self, on: bool) -> Self {
        self.int8_linears = on;
        self
    }

    pub fn int8_linears(&self) -> bool {
        self.int8_linears
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(&self.key(name))
    }

    /// The tensor at `name`, which must have exactly `shape`, in the kind the model computes in.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor, ModelError> {
        let t = self.get_exact(name, shape)?;
        Ok(match self.kind {
            Some(kind) if t.is_floating_point() && t.kind() != kind => t.to_kind(kind),
            _ => t,
        })
    }

    /// As [`get`](Self::get), with floating-point values at fp32 or the file's precision, whichever
    /// is wider: for scalars that scale whole outputs (CLIP's temperature), where bf16's 8-bit
    /// mantissa would move every probability.
    pub fn get_exact(&self, name: &str, shape: &[i64]) -> Result<Tensor, ModelError> {
        let key = self.key(name);
        if let Some(device) = self.random {
            let lower = key.to_lowercase();
            let t = if name == "bias" {
                Tensor::zeros(shape, (Kind::Float, device))
            } else if name == "weight" && (lower.contains("norm") || lower.contains("layrnorm")) {
                Tensor::ones(shape, (Kind::Float, device))
            } else if name == "logit_scale" {
                Tensor::full(shape, 2.6592, (Kind::Float, device))
            } else {
                Tensor::randn(shape, (Kind::Float, device)) * 0.02
            };
            return Ok(t);
        }
        let t = self
            .tensors
            .get(&key)
            .ok_or_else(|| ModelError::Checkpoint(format!("{} has no tensor {key}", self.source.display())))?;
        if t.size() != shape {
            return Err(ModelError::Checkpoint(format!(
                "{}: tensor {key} has shape {:?}, the config implies {shape:?}",
                self.source.display(),
                t.size()
            )));
        }
        Ok(match t.kind() {
            Kind::Half | Kind::BFloat16 => t.to_kind(Kind::Float),
            _ => t.shallow_clone(),
        })
    }
}
