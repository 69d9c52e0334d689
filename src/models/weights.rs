//! Checkpoint tensors addressed by their Hugging Face key names.
//!
//! A [`Weights`] is a view with a key prefix, so model structs can be built with the same nesting
//! as the checkpoint (`weights.pp("vision_model").pp("encoder")`), and a missing or misshapen key
//! fails with the full key in the message instead of a libtorch error later.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use tch::{Device, Kind, Tensor};

use super::ModelError;

/// Weight file names, in order of preference, as published in Hugging Face checkpoint folders.
const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

#[derive(Clone)]
pub struct Weights {
    tensors: Arc<HashMap<String, Tensor>>,
    prefix: String,
    source: Arc<PathBuf>,
}

impl Weights {
    /// Loads every tensor of the checkpoint folder's weight file onto `device` as `kind`.
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
        let tensors = named
            .into_iter()
            .map(|(name, t)| {
                let t = if t.is_floating_point() { t.to_kind(kind) } else { t };
                (name, t.to_device(device))
            })
            .collect();
        Ok(Self { tensors: Arc::new(tensors), prefix: String::new(), source: Arc::new(file) })
    }

    /// Builds a view over tensors already in memory (tests, fixtures).
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> Self {
        Self { tensors: Arc::new(tensors), prefix: String::new(), source: Arc::new(PathBuf::new()) }
    }

    /// A view one level down: `pp("encoder")` then `get("weight")` reads `<prefix>.encoder.weight`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { tensors: self.tensors.clone(), prefix, source: self.source.clone() }
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

    /// The tensor at `name`, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor, ModelError> {
        let key = self.key(name);
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
        Ok(t.shallow_clone())
    }
}
