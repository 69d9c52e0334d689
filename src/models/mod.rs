//! BLIP and CLIP over libtorch, and everything needed to feed them: checkpoint and config loading,
//! image preprocessing, tokenizers and caption generation. Nothing here knows about gRPC, queues
//! or async runtimes.

pub mod blip;
pub mod clip;
pub mod generation;
pub mod graphs;
pub mod int8;
mod mkl;
pub mod nn;
pub mod preprocess;
pub mod timing;
pub mod tokenizer;
pub mod transfer;
pub mod weights;

use std::path::Path;

use tch::Kind;

/// How a model holds and computes its numbers: the floating-point kind (`--dtype`), whether its
/// linear layers hold int8 weights (`--quantize int8`, fp32 CPU only), and how BLIP's decode steps
/// launch their work (`--cuda-graphs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numerics {
    pub kind: Kind,
    pub int8_linears: bool,
    pub graphs: graphs::GraphMode,
    /// The most rows a decode step may hold: graphs are captured for every bucket up to it.
    pub graph_rows: i64,
    /// Whether a greedy or sampled one-token step is captured whole, and what it must hold.
    pub whole_step: Option<graphs::WholeStep>,
}

impl From<Kind> for Numerics {
    fn from(kind: Kind) -> Self {
        Self {
            kind,
            int8_linears: false,
            graphs: graphs::GraphMode::Off,
            graph_rows: graphs::MAX_ROWS,
            whole_step: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model folder {0}: {1}")]
    Folder(String, String),
    #[error("config: {0}")]
    Config(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// A model shared by executor threads.
///
/// libtorch tensors are safe to read from several threads at once; after construction the models
/// only ever read their weights, so sharing them is sound even though `tch::Tensor` is not `Sync`.
/// Only types that promise this ([`ReadOnly`]) become `Sync` inside it: `Shared<Cell<_>>` builds
/// but cannot be shared.
pub struct Shared<T>(T);

/// A model whose state after construction is tensors that are only ever read.
///
/// # Safety
/// No method reachable through `&self` may write to the value, through interior mutability or
/// through a tensor's in-place operations.
pub unsafe trait ReadOnly {}

// SAFETY: both models hold weights and configuration only; their forward passes allocate new
// tensors and never modify a weight.
unsafe impl ReadOnly for blip::Blip {}
// SAFETY: as above.
unsafe impl ReadOnly for clip::Clip {}

// SAFETY: `Shared` only hands out shared references, and `ReadOnly` types are never written
// through them.
unsafe impl<T: ReadOnly + Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub fn new(inner: T) -> Self {
        Self(inner)
    }
}

impl<T> std::ops::Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Reads `config.json` of a checkpoint folder, with an error that names what is missing.
pub(crate) fn read_config(folder: &Path) -> Result<String, ModelError> {
    read_folder_file(folder, "config.json")
}

pub(crate) fn read_folder_file(folder: &Path, name: &str) -> Result<String, ModelError> {
    if !folder.is_dir() {
        return Err(ModelError::Folder(folder.display().to_string(), "is not a directory".into()));
    }
    std::fs::read_to_string(folder.join(name))
        .map_err(|e| ModelError::Folder(folder.display().to_string(), format!("cannot read {name}: {e}")))
}
