//! BLIP's vision transformer (`vision_model.*`): patch embedding with bias, class token, learned
//! positions, pre-LN layers with a fused qkv projection, and a final LayerNorm over the sequence.

use tch::Tensor;

use super::config::BlipVisionConfig;
use crate::models::{
    nn::{attention, merge_heads, Activation, LayerNorm, Linear},
    weights::Weights,
    ModelError,
};

#[derive(Debug)]
pub struct BlipVisionModel {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
}

#[derive(Debug)]
struct Embeddings {
    class_embedding: Tensor,
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    patch_size: i64,
}

#[derive(Debug)]
struct EncoderLayer {
    qkv: Linear,
    projection: Linear,
    layer_norm1: LayerNorm,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    heads: i64,
    scale: f64,
}

impl BlipVisionModel {
    pub fn new(cfg: &BlipVisionConfig, w: &Weights) -> Result<Self, ModelError> {
        let d = cfg.hidden_size;
        if cfg.image_size % cfg.patch_size != 0 || d % cfg.num_attention_heads != 0 {
            return Err(ModelError::Config(format!(
                "vision_config: image_size {} must be a multiple of patch_size {} and hidden_size {d} of num_attention_heads {}",
                cfg.image_size, cfg.patch_size, cfg.num_attention_heads
            )));
        }
        let patches = (cfg.image_size / cfg.patch_size).pow(2);
        let e = w.pp("embeddings");
        let embeddings = Embeddings {
            class_embedding: e.get("class_embedding", &[1, 1, d])?,
            patch_weight: e
                .pp("patch_embedding")
                .get("weight", &[d, cfg.num_channels, cfg.patch_size, cfg.patch_size])?,
            patch_bias: e.pp("patch_embedding").get("bias", &[d])?,
            position_embedding: e.get("position_embedding", &[1, patches + 1, d])?,
            patch_size: cfg.patch_size,
        };
        let act = Activation::from_name(&cfg.hidden_act)?;
        let head_dim = d / cfg.num_attention_heads;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = w.pp("encoder.layers").pp(i);
                Ok(EncoderLayer {
                    qkv: Linear::new(&l.pp("self_attn.qkv"), d, 3 * d)?,
                    projection: Linear::new(&l.pp("self_attn.projection"), d, d)?,
                    layer_norm1: LayerNorm::new(&l.pp("layer_norm1"), d, cfg.layer_norm_eps)?,
                    layer_norm2: LayerNorm::new(&l.pp("layer_norm2"), d, cfg.layer_norm_eps)?,
                    fc1: Linear::new(&l.pp("mlp.fc1"), d, cfg.intermediate_size)?,
                    fc2: Linear::new(&l.pp("mlp.fc2"), cfg.intermediate_size, d)?,
                    act,
                    heads: cfg.num_attention_heads,
                    scale: (head_dim as f64).powf(-0.5),
                })
            })
            .collect::<Result<_, ModelError>>()?;
        let post_layernorm = LayerNorm::new(&w.pp("post_layernorm"), d, cfg.layer_norm_eps)?;
        Ok(Self { embeddings, layers, post_layernorm })
    }

    /// `[batch, 3, S, S]` normalised pixels → image embeddings `[batch, 1 + patches, hidden]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Tensor {
        let mut x = self.embeddings.forward(pixel_values);
        for layer in &self.layers {
            x = layer.forward(&x);
        }
        self.post_layernorm.forward(&x)
    }
}

impl Embeddings {
    fn forward(&self, pixels: &Tensor) -> Tensor {
        let b = pixels.size()[0];
        let p = self.patch_size;
        let patches = pixels
            .conv2d(&self.patch_weight, Some(&self.patch_bias), [p, p], [0, 0], [1, 1], 1)
            .flatten(2, -1)
            .transpose(1, 2);
        let d = patches.size()[2];
        let class = self.class_embedding.expand([b, 1, d], false);
        Tensor::cat(&[class, patches], 1) + &self.position_embedding
    }
}

impl EncoderLayer {
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, l, d) = x.size3().expect("3-d hidden states");
        let hd = d / self.heads;
        let qkv =
            self.qkv.forward(&self.layer_norm1.forward(x)).view([b, l, 3, self.heads, hd]).permute([2, 0, 3, 1, 4]);
        let ctx = attention(&qkv.get(0), &qkv.get(1), &qkv.get(2), None, self.scale);
        let x = x + self.projection.forward(&merge_heads(&ctx));
        let h = self.fc2.forward(&self.act.forward(&self.fc1.forward(&self.layer_norm2.forward(&x))));
        x + h
    }
}
