//! Tokenizers loaded from a checkpoint's `tokenizer.json`, with the few ids the models need
//! looked up from the file, never assumed.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationParams};

use super::ModelError;

/// BLIP's BERT WordPiece tokenizer: encodes prompts and decodes generated ids.
pub struct CaptionTokenizer {
    inner: Tokenizer,
}

impl CaptionTokenizer {
    pub fn load(folder: &Path) -> Result<Self, ModelError> {
        let inner = load(folder)?;
        Ok(Self { inner })
    }

    /// Decodes generated ids as the reference does with `skip_special_tokens=True`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, true).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Ids of `text` with the tokenizer's own special tokens (`[CLS] text [SEP]`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self.inner.encode(text, true).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// CLIP's byte-level BPE tokenizer, truncating to the text tower's positions.
pub struct RankTokenizer {
    inner: Tokenizer,
}

/// Token ids of a batch of texts, right-padded to the longest.
pub struct EncodedBatch {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub rows: usize,
    pub len: usize,
}

impl RankTokenizer {
    pub fn load(folder: &Path, max_positions: usize) -> Result<Self, ModelError> {
        let mut inner = load(folder)?;
        inner
            .with_truncation(Some(TruncationParams { max_length: max_positions, ..Default::default() }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        Ok(Self { inner })
    }

    /// Each text's ids, truncated to the text tower's positions.
    pub fn encode_each(&self, texts: &[String]) -> Result<Vec<Vec<i64>>, ModelError> {
        let encs = self.inner.encode_batch(texts.to_vec(), true).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encs.iter().map(|e| e.get_ids().iter().map(|&id| i64::from(id)).collect()).collect())
    }

    /// The texts' ids as one right-padded batch.
    pub fn encode_batch(&self, texts: &[String], pad_id: i64) -> Result<EncodedBatch, ModelError> {
        let rows = self.encode_each(texts)?;
        Ok(pad_batch(&rows.iter().map(Vec::as_slice).collect::<Vec<_>>(), pad_id))
    }
}

/// Token id rows right-padded with `pad_id` to the longest, with their attention mask.
pub fn pad_batch(rows: &[&[i64]], pad_id: i64) -> EncodedBatch {
    let len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = vec![pad_id; rows.len() * len];
    let mut mask = vec![0; rows.len() * len];
    for (row, r) in rows.iter().enumerate() {
        ids[row * len..row * len + r.len()].copy_from_slice(r);
        mask[row * len..row * len + r.len()].fill(1);
    }
    EncodedBatch { ids, mask, rows: rows.len(), len }
}

fn load(folder: &Path) -> Result<Tokenizer, ModelError> {
    let path = folder.join("tokenizer.json");
    Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))
}
