//! The pre-LN transformer encoder shared by CLIP's two towers (`*.encoder.layers.N.*`).

use tch::Tensor;

use crate::models::{
    nn::{attention, merge_heads, split_heads, Activation, LayerNorm, Linear},
    weights::Weights,
    ModelError,
};

/// Sizes of one tower's encoder, taken from its config section.
pub struct EncoderDims {
    pub hidden: i64,
    pub intermediate: i64,
    pub layers: i64,
    pub heads: i64,
    pub eps: f64,
    pub act: Activation,
}

#[derive(Debug)]
pub struct ClipEncoder {
    layers: Vec<EncoderLayer>,
}

#[derive(Debug)]
struct EncoderLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    heads: i64,
    scale: f64,
}

impl ClipEncoder {
    pub fn new(dims: &EncoderDims, w: &Weights) -> Result<Self, ModelError> {
        let d = dims.hidden;
        if d % dims.heads != 0 {
            return Err(ModelError::Config(format!(
                "hidden_size {d} is not a multiple of num_attention_heads {}",
                dims.heads
            )));
        }
        let layers = (0..dims.layers)
            .map(|i| {
                let l = w.pp("layers").pp(i);
                Ok(EncoderLayer {
                    q_proj: Linear::new(&l.pp("self_attn.q_proj"), d, d)?,
                    k_proj: Linear::new(&l.pp("self_attn.k_proj"), d, d)?,
                    v_proj: Linear::new(&l.pp("self_attn.v_proj"), d, d)?,
                    out_proj: Linear::new(&l.pp("self_attn.out_proj"), d, d)?,
                    layer_norm1: LayerNorm::new(&l.pp("layer_norm1"), d, dims.eps)?,
                    layer_norm2: LayerNorm::new(&l.pp("layer_norm2"), d, dims.eps)?,
                    fc1: Linear::new(&l.pp("mlp.fc1"), d, dims.intermediate)?,
                    fc2: Linear::new(&l.pp("mlp.fc2"), dims.intermediate, d)?,
                    act: dims.act,
                    heads: dims.heads,
                    scale: ((d / dims.heads) as f64).powf(-0.5),
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Self { layers })
    }

    /// `mask` is an additive attention mask broadcastable to `[batch, heads, len, len]`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let mut x = x.shallow_clone();
        for l in &self.layers {
            let h = l.layer_norm1.forward(&x);
            let q = split_heads(&l.q_proj.forward(&h), l.heads);
            let k = split_heads(&l.k_proj.forward(&h), l.heads);
            let v = split_heads(&l.v_proj.forward(&h), l.heads);
            let ctx = attention(&q, &k, &v, mask, l.scale);
            x = &x + l.out_proj.forward(&merge_heads(&ctx));
            let h = l.fc2.forward(&l.act.forward(&l.fc1.forward(&l.layer_norm2.forward(&x))));
            x = &x + h;
        }
        x
    }
}
