//! CLIP's `config.json`, with the defaults of the Hugging Face config classes for absent fields.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    #[serde(default)]
    pub text_config: ClipTextConfig,
    #[serde(default)]
    pub vision_config: ClipVisionConfig,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: i64,
}

fn default_projection_dim() -> i64 {
    512
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
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

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            num_channels: 3,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub bos_token_id: i64,
    pub eos_token_id: i64,
    pub pad_token_id: i64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            bos_token_id: 49406,
            eos_token_id: 49407,
            pad_token_id: 1,
        }
    }
}

impl ClipTextConfig {
    /// Checkpoints written before the eos id was fixed say 2 and pool at the largest token id,
    /// which is where their eos token sits.
    pub fn pools_at_argmax(&self) -> bool {
        self.eos_token_id == 2
    }
}

impl ClipConfig {
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_eos_selects_argmax_pooling() {
        let cfg = ClipConfig::from_json(r#"{"text_config": {"eos_token_id": 2}}"#).unwrap();
        assert!(cfg.text_config.pools_at_argmax());
        assert_eq!(cfg.projection_dim, 512);
        assert_eq!(cfg.vision_config.patch_size, 32);
        let cfg = ClipConfig::from_json(r#"{"text_config": {}}"#).unwrap();
        assert!(!cfg.text_config.pools_at_argmax());
    }
}
