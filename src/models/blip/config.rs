//! BLIP's `config.json`, with the defaults of the Hugging Face config classes for absent fields.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct BlipConfig {
    #[serde(default)]
    pub text_config: BlipTextConfig,
    #[serde(default)]
    pub vision_config: BlipVisionConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BlipVisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub num_channels: i64,
}

impl Default for BlipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 384,
            patch_size: 16,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
            num_channels: 3,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BlipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    /// Always replaced by the vision width when the full config is loaded, as the reference does.
    pub encoder_hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub bos_token_id: i64,
    pub eos_token_id: i64,
    pub pad_token_id: i64,
    pub sep_token_id: i64,
}

impl Default for BlipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30524,
            hidden_size: 768,
            encoder_hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 512,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            bos_token_id: 30522,
            eos_token_id: 2,
            pad_token_id: 0,
            sep_token_id: 102,
        }
    }
}

impl BlipConfig {
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        let mut cfg: Self = serde_json::from_str(text)?;
        cfg.text_config.encoder_hidden_size = cfg.vision_config.hidden_size;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_fields_take_reference_defaults_and_encoder_width_follows_vision() {
        let cfg =
            BlipConfig::from_json(r#"{"text_config": {"hidden_size": 64}, "vision_config": {"hidden_size": 96}}"#)
                .unwrap();
        assert_eq!(cfg.text_config.num_attention_heads, 8);
        assert_eq!(cfg.text_config.sep_token_id, 102);
        assert_eq!(cfg.text_config.bos_token_id, 30522);
        assert_eq!(cfg.text_config.layer_norm_eps, 1e-12);
        assert_eq!(cfg.text_config.encoder_hidden_size, 96);
        assert_eq!(cfg.vision_config.image_size, 384);
        assert_eq!(cfg.vision_config.layer_norm_eps, 1e-5);
    }
}
