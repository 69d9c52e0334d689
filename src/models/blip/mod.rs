//! BLIP for conditional generation: the vision transformer and the text decoder, built from a
//! Hugging Face checkpoint folder (`config.json` + weights) with the checkpoint's key names.

pub mod arena;
pub mod config;
pub mod decode;
pub mod request;
pub mod slots;
pub mod text;
pub mod vision;

use std::path::Path;

use tch::{Device, Kind, Tensor};

pub use config::BlipConfig;
pub use decode::{DecodeBatch, SlotStats};
pub use request::{DecodeRequest, Decoded, SpecialTokens};
pub use text::{BlipTextDecoder, CrossAttnCache, SelfAttnCache};
pub use vision::BlipVisionModel;

use super::{read_config, weights::Weights, ModelError, Numerics};

#[derive(Debug)]
pub struct Blip {
    pub config: BlipConfig,
    pub vision_model: BlipVisionModel,
    pub text_decoder: BlipTextDecoder,
}

impl Blip {
    pub fn new(config: BlipConfig, w: &Weights) -> Result<Self, ModelError> {
        let vision_model = BlipVisionModel::new(&config.vision_config, &w.pp("vision_model"))?;
        let text_decoder = BlipTextDecoder::new(&config.text_config, &w.pp("text_decoder"))?;
        Ok(Self { config, vision_model, text_decoder })
    }

    pub fn load(folder: &Path, device: Device) -> Result<Self, ModelError> {
        Self::load_as(folder, device, Kind::Float)
    }

    /// Loads the checkpoint with its floating-point weights converted to `numerics.kind` (a
    /// [`Kind`] converts), and its linear layers quantized where `numerics` says.
    pub fn load_as(folder: &Path, device: Device, numerics: impl Into<Numerics>) -> Result<Self, ModelError> {
        let numerics = numerics.into();
        Self::with_numerics(config(folder)?, Weights::from_folder(folder, device, numerics.kind)?, numerics)
    }

    /// A model of the shapes `folder`'s config gives, with random weights, computing as
    /// [`Blip::load_as`] would (the benchmark's full-size models).
    pub fn random_as(folder: &Path, device: Device, numerics: impl Into<Numerics>) -> Result<Self, ModelError> {
        let numerics = numerics.into();
        Self::with_numerics(config(folder)?, Weights::random(device, numerics.kind), numerics)
    }

    /// The one place a model's numerics are applied: weights quantized where they say, decode
    /// steps graphed where they say.
    fn with_numerics(config: BlipConfig, weights: Weights, numerics: Numerics) -> Result<Self, ModelError> {
        let mut blip = Self::new(config, &weights.with_int8_linears(numerics.int8_linears))?;
        blip.text_decoder.set_graph_mode(numerics.graphs);
        blip.text_decoder.set_graph_rows(numerics.graph_rows);
        let v = &blip.config.vision_config;
        blip.text_decoder.set_whole_step(numerics.whole_step, (v.image_size / v.patch_size).pow(2) + 1);
        Ok(blip)
    }

    /// The floating-point kind the model computes in.
    pub fn kind(&self) -> Kind {
        self.text_decoder.kind()
    }

    /// Image embeddings `[images, 1 + patches, vision width]` for preprocessed pixels.
    pub fn encode_image(&self, pixel_values: &Tensor) -> Tensor {
        self.vision_model.forward(pixel_values)
    }
}

fn config(folder: &Path) -> Result<BlipConfig, ModelError> {
    BlipConfig::from_json(&read_config(folder)?)
        .map_err(|e| ModelError::Config(format!("{}/config.json: {e}", folder.display())))
}
