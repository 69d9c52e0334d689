//! What a decode batch is asked and answers: one image's request, its finished candidates, and
//! the decoder's special tokens.

use crate::models::generation::GenerationParams;

/// The decoder's special token ids, read from the checkpoint's config.
#[derive(Debug, Clone, Copy)]
pub struct SpecialTokens {
    pub bos: i64,
    /// Generation stops at this id (BLIP's sep token).
    pub eos: i64,
}

/// One image's request to decode.
#[derive(Debug, Clone)]
pub struct DecodeRequest {
    /// Caller's identifier, returned with the result.
    pub id: u64,
    pub params: GenerationParams,
    /// Decoder input before the first generated token: `[bos]`, or `[bos, prompt…]`.
    pub prefix: Vec<i64>,
}

/// A request's finished candidates, in candidate order.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub id: u64,
    pub candidates: Vec<Vec<i64>>,
}
