//! CLIP: vision and text towers, their projections and the learned logit scale, built from a
//! Hugging Face checkpoint folder with the checkpoint's key names.

pub mod config;
mod encoder;

use std::path::Path;

use tch::{Device, Kind, Tensor};

pub use config::ClipConfig;
use encoder::{ClipEncoder, EncoderDims};

use super::{
    nn::{causal_blocked, Activation, Embedding, LayerNorm, Linear},
    read_config,
    weights::Weights,
    ModelError, Numerics,
};

#[derive(Debug)]
pub struct Clip {
    pub config: ClipConfig,
    vision: VisionTower,
    text: TextTower,
    visual_projection: Linear,
    text_projection: Linear,
    /// `exp(logit_scale)`, read once at load: a read per batch would wait on the device.
    logit_scale: f64,
}

#[derive(Debug)]
struct VisionTower {
    class_embedding: Tensor,
    patch_weight: Tensor,
    position_embedding: Embedding,
    pre_layrnorm: LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: LayerNorm,
    patch_size: i64,
}

#[derive(Debug)]
struct TextTower {
    token_embedding: Embedding,
    position_embedding: Embedding,
    encoder: ClipEncoder,
    final_layer_norm: LayerNorm,
    eos_token_id: i64,
    pool_at_argmax: bool,
}

impl Clip {
    pub fn new(config: ClipConfig, w: &Weights) -> Result<Self, ModelError> {
        let vc = &config.vision_config;
        let tc = &config.text_config;
        if vc.image_size % vc.patch_size != 0 {
            return Err(ModelError::Config(format!(
                "vision_config: image_size {} is not a multiple of patch_size {}",
                vc.image_size, vc.patch_size
            )));
        }
        let v = w.pp("vision_model");
        let d = vc.hidden_size;
        let positions = (vc.image_size / vc.patch_size).pow(2) + 1;
        let vision = VisionTower {
            class_embedding: v.pp("embeddings").get("class_embedding", &[d])?,
            patch_weight: v
                .pp("embeddings.patch_embedding")
                .get("weight", &[d, vc.num_channels, vc.patch_size, vc.patch_size])?,
            position_embedding: Embedding::new(&v.pp("embeddings.position_embedding"), positions, d)?,
            pre_layrnorm: LayerNorm::new(&v.pp("pre_layrnorm"), d, vc.layer_norm_eps)?,
            encoder: ClipEncoder::new(
                &EncoderDims {
                    hidden: d,
                    intermediate: vc.intermediate_size,
                    layers: vc.num_hidden_layers,
                    heads: vc.num_attention_heads,
                    eps: vc.layer_norm_eps,
                    act: Activation::from_name(&vc.hidden_act)?,
                },
                &v.pp("encoder"),
            )?,
            post_layernorm: LayerNorm::new(&v.pp("post_layernorm"), d, vc.layer_norm_eps)?,
            patch_size: vc.patch_size,
        };
        let t = w.pp("text_model");
        let h = tc.hidden_size;
        let text = TextTower {
            token_embedding: Embedding::new(&t.pp("embeddings.token_embedding"), tc.vocab_size, h)?,
            position_embedding: Embedding::new(&t.pp("embeddings.position_embedding"), tc.max_position_embeddings, h)?,
            encoder: ClipEncoder::new(
                &EncoderDims {
                    hidden: h,
                    intermediate: tc.intermediate_size,
                    layers: tc.num_hidden_layers,
                    heads: tc.num_attention_heads,
                    eps: tc.layer_norm_eps,
                    act: Activation::from_name(&tc.hidden_act)?,
                },
                &t.pp("encoder"),
            )?,
            final_layer_norm: LayerNorm::new(&t.pp("final_layer_norm"), h, tc.layer_norm_eps)?,
            eos_token_id: tc.eos_token_id,
            pool_at_argmax: tc.pools_at_argmax(),
        };
        let p = config.projection_dim;
        Ok(Self {
            visual_projection: Linear::no_bias(&w.pp("visual_projection"), d, p)?,
            text_projection: Linear::no_bias(&w.pp("text_projection"), h, p)?,
            logit_scale: w.get_exact("logit_scale", &[])?.exp().double_value(&[]),
            vision,
            text,
            config,
        })
    }

    pub fn load(folder: &Path, device: Device) -> Result<Self, ModelError> {
        Self::load_as(folder, device, Kind::Float)
    }

    /// Loads the checkpoint with its floating-point weights converted to `numerics.kind` (a
    /// [`Kind`] converts), and its linear layers quantized where `numerics` says.
    pub fn load_as(folder: &Path, device: Device, numerics: impl Into<Numerics>) -> Result<Self, ModelError> {
        let numerics = numerics.into();
        let weights = Weights::from_folder(folder, device, numerics.kind)?;
        Self::new(config(folder)?, &weights.with_int8_linears(numerics.int8_linears))
    }

    /// A model of the shapes `folder`'s config gives, with random weights, computing as
    /// [`Clip::load_as`] would (the benchmark's full-size models).
    pub fn random_as(folder: &Path, device: Device, numerics: impl Into<Numerics>) -> Result<Self, ModelError> {
        let numerics = numerics.into();
        let weights = Weights::random(device, numerics.kind);
        Self::new(config(folder)?, &weights.with_int8_linears(numerics.int8_linears))
    }

    /// The floating-point kind the model computes in.
    pub fn kind(&self) -> Kind {
        self.text.token_embedding.weight.kind()
    }

    /// Projected, unnormalised image embeddings `[images, projection_dim]`.
    pub fn image_features(&self, pixel_values: &Tensor) -> Tensor {
        let v = &self.vision;
        let p = v.patch_size;
        let b = pixel_values.size()[0];
        let patches = pixel_values
            .conv2d::<&Tensor>(&v.patch_weight, None, [p, p], [0, 0], [1, 1], 1)
            .flatten(2, -1)
            .transpose(1, 2);
        let d = patches.size()[2];
        let class = v.class_embedding.view([1, 1, d]).expand([b, 1, d], false);
        let x = Tensor::cat(&[class, patches], 1) + &v.position_embedding.weight;
        let x = v.encoder.forward(&v.pre_layrnorm.forward(&x), None);
        let pooled = v.post_layernorm.forward(&x.select(1, 0));
        self.visual_projection.forward(&pooled)
    }

    /// Projected, unnormalised text embeddings `[texts, projection_dim]` for token ids `[texts, len]`
    /// and their attention mask (1 = token, 0 = padding).
    pub fn text_features(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        let t = &self.text;
        let (n, len) = input_ids.size2().expect("ids are [texts, len]");
        let device = input_ids.device();
        let positions = Tensor::arange(len, (Kind::Int64, device));
        let x = t.token_embedding.forward(input_ids) + t.position_embedding.forward(&positions);
        let blocked = causal_blocked(len, 0, device)
            .view([1, 1, len, len]) // causal
            .logical_or(&attention_mask.eq(0).view([n, 1, 1, len])); // padding
        let mask = Tensor::zeros([n, 1, len, len], (x.kind(), device)).masked_fill(&blocked, lowest(x.kind()));
        let x = t.final_layer_norm.forward(&t.encoder.forward(&x, Some(&mask)));
        let eos_at = if t.pool_at_argmax {
            input_ids.argmax(-1, false)
        } else {
            // The first eos of each row.
            input_ids.eq(t.eos_token_id).to_kind(Kind::Int).argmax(-1, false)
        };
        let pooled = x.index(&[Some(Tensor::arange(n, (Kind::Int64, device))), Some(eos_at)]);
        self.text_projection.forward(&pooled)
    }

    /// `exp(logit_scale)`, the temperature CLIP multiplies cosines by.
    pub fn logit_scale(&self) -> f64 {
        self.logit_scale
    }
}

/// The most negative finite value of `kind`: the mask value the reference uses (`finfo.min`).
fn lowest(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        _ => f64::from(f32::MIN),
    }
}

fn config(folder: &Path) -> Result<ClipConfig, ModelError> {
    ClipConfig::from_json(&read_config(folder)?)
        .map_err(|e| ModelError::Config(format!("{}/config.json: {e}", folder.display())))
}
