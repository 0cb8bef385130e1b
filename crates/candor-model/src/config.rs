//! `config.json`: the model architecture in Hugging Face's keys, so `transformers` reads it.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{file_err, Result};
use crate::Head;

fn default_model_type() -> String {
    "llama".into()
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_eps() -> f64 {
    1e-5
}
fn default_dtype() -> String {
    "float32".into()
}
fn default_act() -> String {
    "silu".into()
}

/// Model architecture. Field names and meanings are Hugging Face's (`LlamaConfig`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: heads of keys/values (defaults to `num_attention_heads`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_dtype")]
    pub torch_dtype: String,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Llama's switch: biases on q, k, v and o projections.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    /// `LlamaForSequenceClassification`: 1 for a reward model or critic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// Keys candor does not interpret, kept so a re-saved config loses nothing.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl ModelConfig {
    /// A llama-style config for a model trained from scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn llama(
        vocab_size: usize,
        hidden_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        intermediate_size: usize,
        max_position_embeddings: usize,
        rope_theta: f64,
        tie_word_embeddings: bool,
    ) -> Self {
        ModelConfig {
            architectures: vec!["LlamaForCausalLM".into()],
            model_type: "llama".into(),
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: Some(num_key_value_heads),
            intermediate_size,
            vocab_size,
            max_position_embeddings,
            rope_theta,
            rms_norm_eps: 1e-5,
            tie_word_embeddings,
            torch_dtype: "float32".into(),
            hidden_act: "silu".into(),
            attention_bias: false,
            mlp_bias: false,
            head_dim: None,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            num_labels: None,
            rope_scaling: None,
            extra: Default::default(),
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Whether q/k/v carry biases (Llama's `attention_bias`, or always for Qwen2).
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    /// Whether o_proj carries a bias (Llama's `attention_bias`; Qwen2 has none there).
    pub fn o_bias(&self) -> bool {
        self.attention_bias && self.model_type != "qwen2"
    }

    /// Set the head-dependent keys the way `transformers` expects them.
    pub fn set_head(&mut self, head: Head) {
        let prefix = match self.model_type.as_str() {
            "qwen2" => "Qwen2",
            "mistral" => "Mistral",
            _ => "Llama",
        };
        match head {
            Head::Lm => {
                self.architectures = vec![format!("{prefix}ForCausalLM")];
                self.num_labels = None;
            }
            Head::Score => {
                self.architectures = vec![format!("{prefix}ForSequenceClassification")];
                self.num_labels = Some(1);
                // transformers' sequence classification needs a pad id to find the last token
                // of each row; candor reads the last real token from its own mask.
                if self.pad_token_id.is_none() {
                    self.pad_token_id = self.eos_token_id.as_ref().and_then(first_id);
                }
            }
        }
    }

    /// Reject what candor cannot compute faithfully, naming the key (`origin` names the file).
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |key: &str, msg: String| Err(file_err(origin, format!("`{key}`: {msg}")));
        if !matches!(self.model_type.as_str(), "llama" | "mistral" | "qwen2" | "smollm" | "smollm2") {
            return bad("model_type", format!("`{}` is not supported (expected llama, mistral or qwen2)", self.model_type));
        }
        for (key, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(key, "must be positive".into());
            }
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return bad(
                "num_attention_heads",
                format!("{} does not divide hidden_size {}", self.num_attention_heads, self.hidden_size),
            );
        }
        if self.head_dim() % 2 != 0 {
            return bad("head_dim", format!("rotary embeddings need an even head dimension, got {}", self.head_dim()));
        }
        let kv = self.kv_heads();
        if kv == 0 || self.num_attention_heads % kv != 0 {
            return bad("num_key_value_heads", format!("{kv} does not divide num_attention_heads {}", self.num_attention_heads));
        }
        if !matches!(self.hidden_act.as_str(), "silu" | "swish") {
            return bad("hidden_act", format!("`{}` is not supported (expected silu)", self.hidden_act));
        }
        if let Some(rs) = &self.rope_scaling {
            if !rs.is_null() {
                return bad("rope_scaling", format!("{rs} is not implemented; only plain rotary embeddings are"));
            }
        }
        if let Some(Value::Number(w)) = self.extra.get("sliding_window") {
            let use_sw = self.extra.get("use_sliding_window").and_then(Value::as_bool).unwrap_or(self.model_type == "mistral");
            if use_sw && w.as_u64().is_some_and(|w| (w as usize) < self.max_position_embeddings) {
                return bad("sliding_window", "sliding-window attention shorter than max_position_embeddings is not implemented".into());
            }
        }
        if self.num_labels.is_some_and(|n| n != 1) {
            return bad("num_labels", format!("{} labels: candor's score head has exactly 1", self.num_labels.unwrap()));
        }
        Ok(())
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
        let cfg: ModelConfig =
            serde_json::from_str(&text).map_err(|e| file_err(path, format!("not a valid model config: {e}")))?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("config serialises");
        std::fs::write(path, text + "\n").map_err(|e| file_err(path, format!("cannot write: {e}")))
    }

    /// The head a checkpoint's config describes.
    pub fn head(&self) -> Head {
        if self.architectures.iter().any(|a| a.ends_with("ForSequenceClassification")) {
            Head::Score
        } else {
            Head::Lm
        }
    }

    /// Parameters of the backbone plus the given head.
    pub fn param_count(&self, head: Head) -> usize {
        let (c, i, v, l) = (self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers);
        let d = self.head_dim();
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        let attn = c * h * d + 2 * c * kv * d + h * d * c;
        let qkv_b = if self.qkv_bias() { h * d + 2 * kv * d } else { 0 } + if self.o_bias() { c } else { 0 };
        let mlp = 3 * c * i + if self.mlp_bias { 2 * i + c } else { 0 };
        let per_layer = attn + qkv_b + mlp + 2 * c;
        let head_params = match head {
            Head::Lm if self.tie_word_embeddings => 0,
            Head::Lm => v * c,
            Head::Score => c,
        };
        v * c + l * per_layer + c + head_params
    }
}

fn first_id(v: &Value) -> Option<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(first_id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_keeps_unknown_keys() {
        let text = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":128,
            "vocab_size":100,"max_position_embeddings":32,"rope_theta":10000.0,"rms_norm_eps":1e-6,
            "tie_word_embeddings":true,"torch_dtype":"float32","initializer_range":0.02}"#;
        let cfg: ModelConfig = serde_json::from_str(text).unwrap();
        cfg.validate(Path::new("config.json")).unwrap();
        assert_eq!(cfg.kv_heads(), 2);
        assert_eq!(cfg.extra["initializer_range"], 0.02);
        let again: ModelConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(cfg, again);
    }

    #[test]
    fn rejects_what_it_cannot_honour() {
        let mut cfg = ModelConfig::llama(100, 64, 2, 4, 2, 128, 32, 1e4, true);
        cfg.rope_scaling = Some(serde_json::json!({"type": "linear", "factor": 2.0}));
        let e = cfg.validate(Path::new("m/config.json")).unwrap_err().to_string();
        assert!(e.starts_with("m/config.json: `rope_scaling`"), "{e}");
        let mut cfg = ModelConfig::llama(100, 64, 2, 4, 3, 128, 32, 1e4, true);
        assert!(cfg.validate(Path::new("c")).unwrap_err().to_string().contains("num_key_value_heads"));
        cfg.num_key_value_heads = Some(4);
        cfg.model_type = "gpt_neox".into();
        assert!(cfg.validate(Path::new("c")).unwrap_err().to_string().contains("model_type"));
    }

    #[test]
    fn param_count_of_tied_llama() {
        // embed 100*64, per layer: attn 64*64 + 2*64*32 + 64*64 = 12288, mlp 3*64*128 = 24576,
        // norms 128 -> 36992; 2 layers + final norm 64
        let cfg = ModelConfig::llama(100, 64, 2, 4, 2, 128, 32, 1e4, true);
        assert_eq!(cfg.param_count(Head::Lm), 6400 + 2 * 36992 + 64);
        assert_eq!(cfg.param_count(Head::Score), 6400 + 2 * 36992 + 64 + 64);
    }
}
