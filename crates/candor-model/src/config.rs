//! `config.json`: the model architecture in Hugging Face's keys, so `transformers` reads it.
//!
//! Two families go through the same model code as switches ([`Arch`]): the Llama family
//! (`llama`, `mistral`, `qwen2`, SmolLM's `llama`) and GPT-2 (`gpt2`). A GPT-2 config's own
//! keys (`n_embd`, `n_layer`, `n_head`, `n_positions`, `n_inner`, `layer_norm_epsilon`,
//! `activation_function`) are mapped onto the Llama-style fields when read and written back
//! under their GPT-2 names, so `GPT2LMHeadModel` reads what candor writes.

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

/// The block family a config describes; everything else is a per-key switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// RMSNorm, rotary positions, separate q/k/v/o projections, SwiGLU MLP.
    Llama,
    /// LayerNorm with bias, learned positions, fused `c_attn` (Conv1D: weights stored
    /// (in, out)), GELU MLP, biases everywhere, tied LM head by default.
    Gpt2,
}

/// GPT-2 key → the Llama-style field it fills.
const GPT2_KEYS: [(&str, &str); 7] = [
    ("n_embd", "hidden_size"),
    ("n_layer", "num_hidden_layers"),
    ("n_head", "num_attention_heads"),
    ("n_positions", "max_position_embeddings"),
    ("n_inner", "intermediate_size"),
    ("layer_norm_epsilon", "rms_norm_eps"),
    ("activation_function", "hidden_act"),
];

/// Model architecture. Field names and meanings are Hugging Face's (`LlamaConfig`); for
/// GPT-2, `rms_norm_eps` holds `layer_norm_epsilon` and `hidden_act` `activation_function`.
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
    /// transformers ≥ 5 writes `rope_theta` (and any scaling) here: `{"rope_type": "default",
    /// "rope_theta": ...}`. Read into `rope_theta`; written back beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
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
            rope_parameters: None,
            extra: Default::default(),
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn arch(&self) -> Arch {
        if self.model_type == "gpt2" {
            Arch::Gpt2
        } else {
            Arch::Llama
        }
    }

    /// Epsilon of the norms (RMSNorm's `rms_norm_eps`, GPT-2's `layer_norm_epsilon`).
    pub fn norm_eps(&self) -> f64 {
        self.rms_norm_eps
    }

    /// Whether q/k/v carry biases (Llama's `attention_bias`, always for Qwen2 and GPT-2).
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2" || self.arch() == Arch::Gpt2
    }

    /// Whether o_proj carries a bias (Llama's `attention_bias`; Qwen2 has none there).
    pub fn o_bias(&self) -> bool {
        (self.attention_bias && self.model_type != "qwen2") || self.arch() == Arch::Gpt2
    }

    /// Whether the MLP's projections carry biases (Llama's `mlp_bias`; always for GPT-2).
    pub fn mlp_has_bias(&self) -> bool {
        self.mlp_bias || self.arch() == Arch::Gpt2
    }

    /// Set the head-dependent keys the way `transformers` expects them.
    pub fn set_head(&mut self, head: Head) {
        let prefix = match self.model_type.as_str() {
            "qwen2" => "Qwen2",
            "mistral" => "Mistral",
            "gpt2" => "GPT2",
            _ => "Llama",
        };
        match head {
            Head::Lm => {
                let arch = if prefix == "GPT2" {
                    "GPT2LMHeadModel".into()
                } else {
                    format!("{prefix}ForCausalLM")
                };
                self.architectures = vec![arch];
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
        if !matches!(
            self.model_type.as_str(),
            "llama" | "mistral" | "qwen2" | "smollm" | "smollm2" | "gpt2"
        ) {
            return bad(
                "model_type",
                format!(
                    "`{}` is not supported (expected llama, mistral, qwen2 or gpt2)",
                    self.model_type
                ),
            );
        }
        for a in &self.architectures {
            let known = [
                "ForCausalLM",
                "LMHeadModel",
                "ForSequenceClassification",
                "Model",
            ];
            let family = ["Llama", "Mistral", "Qwen2", "GPT2", "SmolLM", "SmolLM2"];
            let ok = known
                .iter()
                .any(|k| a.strip_suffix(k).is_some_and(|f| family.contains(&f)));
            if !ok {
                return bad(
                    "architectures",
                    format!("`{a}` is not supported (expected a Llama, Mistral, Qwen2 or GPT2 causal LM or sequence classifier)"),
                );
            }
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
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{kv} does not divide num_attention_heads {}",
                    self.num_attention_heads
                ),
            );
        }
        match self.arch() {
            Arch::Llama => {
                if !self.head_dim().is_multiple_of(2) {
                    return bad(
                        "head_dim",
                        format!(
                            "rotary embeddings need an even head dimension, got {}",
                            self.head_dim()
                        ),
                    );
                }
                if !matches!(self.hidden_act.as_str(), "silu" | "swish") {
                    return bad(
                        "hidden_act",
                        format!("`{}` is not supported (expected silu)", self.hidden_act),
                    );
                }
            }
            Arch::Gpt2 => {
                if !matches!(
                    self.hidden_act.as_str(),
                    "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu"
                ) {
                    return bad(
                        "activation_function",
                        format!("`{}` is not supported (expected gelu_new, gelu_pytorch_tanh, gelu_fast or gelu)", self.hidden_act),
                    );
                }
                if kv != self.num_attention_heads
                    || self.head_dim() * self.num_attention_heads != self.hidden_size
                {
                    return bad("n_head", "GPT-2 attention has one key/value head per query head and n_embd = n_head × head size".into());
                }
                for (key, honoured) in [
                    ("scale_attn_weights", true),
                    ("scale_attn_by_inverse_layer_idx", false),
                    ("add_cross_attention", false),
                ] {
                    if let Some(v) = self.extra.get(key).and_then(Value::as_bool) {
                        if v != honoured {
                            return bad(key, format!("{v} is not implemented (candor computes GPT-2 attention with {key} = {honoured})"));
                        }
                    }
                }
            }
        }
        if let Some(rs) = &self.rope_scaling {
            if !rs.is_null() && !is_default_rope(rs) {
                return bad(
                    "rope_scaling",
                    format!("{rs} is not implemented; only plain rotary embeddings are"),
                );
            }
        }
        if let Some(rp) = &self.rope_parameters {
            if !is_default_rope(rp) {
                return bad("rope_parameters", format!("{rp} is not implemented; only plain rotary embeddings (rope_type default) are"));
            }
        }
        if let Some(f) = self
            .extra
            .get("partial_rotary_factor")
            .and_then(Value::as_f64)
        {
            if f != 1.0 {
                return bad(
                    "partial_rotary_factor",
                    format!("{f} is not implemented; rotary embeddings cover the whole head"),
                );
            }
        }
        if let Some(w) = self.sliding_window() {
            if w < self.max_position_embeddings {
                return bad(
                    "sliding_window",
                    format!("{w} is shorter than max_position_embeddings {}: sliding-window attention is not implemented", self.max_position_embeddings),
                );
            }
        }
        if self.num_labels.is_some_and(|n| n != 1) {
            return bad(
                "num_labels",
                format!(
                    "{} labels: candor's score head has exactly 1",
                    self.num_labels.unwrap()
                ),
            );
        }
        Ok(())
    }

    /// The attention window when sliding-window attention is switched on (Mistral's
    /// `sliding_window`; Qwen2's with `use_sliding_window`), else `None`.
    pub fn sliding_window(&self) -> Option<usize> {
        let w = self.extra.get("sliding_window").and_then(Value::as_u64)? as usize;
        let default_on = self.model_type == "mistral";
        let on = self
            .extra
            .get("use_sliding_window")
            .and_then(Value::as_bool)
            .unwrap_or(default_on);
        let layer_types = self.extra.get("layer_types").and_then(Value::as_array);
        let any_sliding =
            layer_types.is_some_and(|l| l.iter().any(|t| t.as_str() == Some("sliding_attention")));
        (on || any_sliding).then_some(w)
    }

    /// Parse a `config.json` text: map GPT-2 keys, read `rope_parameters`/`dtype` (the
    /// transformers ≥ 5 spellings), then validate. Errors name `path` and the key.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| file_err(path, format!("not valid JSON: {e}")))?;
        let Value::Object(mut map) = value else {
            return Err(file_err(path, "not a model config: expected a JSON object"));
        };
        let model_type = map
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if model_type.is_empty() {
            return Err(file_err(
                path,
                "`model_type`: missing (expected llama, mistral, qwen2 or gpt2)",
            ));
        }
        if model_type == "gpt2" {
            let n_embd = map.get("n_embd").and_then(Value::as_u64);
            map.entry("layer_norm_epsilon")
                .or_insert(serde_json::json!(1e-5));
            map.entry("activation_function")
                .or_insert(serde_json::json!("gelu_new"));
            map.entry("tie_word_embeddings")
                .or_insert(Value::Bool(true));
            if map.get("n_inner").is_none_or(Value::is_null) {
                if let Some(c) = n_embd {
                    map.insert("n_inner".into(), serde_json::json!(4 * c));
                }
            }
            for (gpt2, ours) in GPT2_KEYS {
                match map.remove(gpt2) {
                    Some(v) => {
                        map.insert(ours.into(), v);
                    }
                    None if !map.contains_key(ours) => {
                        return Err(file_err(
                            path,
                            format!("`{gpt2}`: missing (a GPT-2 config needs it)"),
                        ));
                    }
                    None => {}
                }
            }
        }
        if let Some(Value::String(d)) = map.remove("dtype") {
            map.insert("torch_dtype".into(), Value::String(d));
        }
        if let Some(theta) = map
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
        {
            map.insert("rope_theta".into(), serde_json::json!(theta));
        }
        let mut cfg: ModelConfig =
            serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
                let key = e.path().to_string();
                file_err(path, format!("`{key}`: {}", e.into_inner()))
            })?;
        // Sliding-window attention over a window W is full causal attention on sequences of
        // at most W tokens: honour it exactly by limiting the context to the window.
        if let Some(w) = cfg.sliding_window() {
            cfg.max_position_embeddings = cfg.max_position_embeddings.min(w);
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The `config.json` object in the architecture's own keys (GPT-2's for `gpt2`), with
    /// both spellings transformers has used for the rotary base and the dtype.
    pub fn to_json(&self) -> Value {
        let mut map = match serde_json::to_value(self).expect("config serialises") {
            Value::Object(m) => m,
            _ => unreachable!("a struct serialises to an object"),
        };
        map.insert("dtype".into(), Value::String(self.torch_dtype.clone()));
        match self.arch() {
            Arch::Llama => {
                if self.rope_parameters.as_ref().is_none_or(is_default_rope) {
                    map.insert(
                        "rope_parameters".into(),
                        serde_json::json!({"rope_type": "default", "rope_theta": self.rope_theta}),
                    );
                }
            }
            Arch::Gpt2 => {
                for key in [
                    "rope_theta",
                    "rope_parameters",
                    "rope_scaling",
                    "num_key_value_heads",
                    "attention_bias",
                    "mlp_bias",
                    "head_dim",
                ] {
                    map.remove(key);
                }
                for (gpt2, ours) in GPT2_KEYS {
                    if let Some(v) = map.remove(ours) {
                        map.insert(gpt2.into(), v);
                    }
                }
            }
        }
        map.sort_keys();
        Value::Object(map)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| file_err(path, format!("cannot read: {e}")))?;
        Self::from_json(&text, path)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.to_json()).expect("config serialises");
        std::fs::write(path, text + "\n").map_err(|e| file_err(path, format!("cannot write: {e}")))
    }

    /// The head a checkpoint's config describes.
    pub fn head(&self) -> Head {
        if self
            .architectures
            .iter()
            .any(|a| a.ends_with("ForSequenceClassification"))
        {
            Head::Score
        } else {
            Head::Lm
        }
    }

    /// Parameters of the backbone plus the given head.
    pub fn param_count(&self, head: Head) -> usize {
        let (c, i, v, l) = (
            self.hidden_size,
            self.intermediate_size,
            self.vocab_size,
            self.num_hidden_layers,
        );
        let d = self.head_dim();
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        let attn = c * h * d + 2 * c * kv * d + h * d * c;
        let qkv_b = if self.qkv_bias() {
            h * d + 2 * kv * d
        } else {
            0
        } + if self.o_bias() { c } else { 0 };
        let (mlp, norm, positions) = match self.arch() {
            Arch::Llama => (3 * c * i + if self.mlp_bias { 2 * i + c } else { 0 }, c, 0),
            Arch::Gpt2 => (2 * c * i + i + c, 2 * c, self.max_position_embeddings * c),
        };
        let per_layer = attn + qkv_b + mlp + 2 * norm;
        let head_params = match head {
            Head::Lm if self.tie_word_embeddings => 0,
            Head::Lm => v * c,
            Head::Score => c,
        };
        v * c + positions + l * per_layer + norm + head_params
    }
}

/// A rope spec that means plain rotary embeddings: `{"rope_type": "default", ...}` (or the
/// legacy `type`) with no other scaling keys.
fn is_default_rope(v: &Value) -> bool {
    let Some(m) = v.as_object() else {
        return v.is_null();
    };
    let kind = m
        .get("rope_type")
        .or_else(|| m.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    kind == "default"
        && m.keys().all(|k| {
            matches!(
                k.as_str(),
                "rope_type" | "type" | "rope_theta" | "partial_rotary_factor"
            )
        })
        && m.get("partial_rotary_factor")
            .and_then(Value::as_f64)
            .is_none_or(|f| f == 1.0)
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
        let again: ModelConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(cfg, again);
    }

    #[test]
    fn rejects_what_it_cannot_honour() {
        let mut cfg = ModelConfig::llama(100, 64, 2, 4, 2, 128, 32, 1e4, true);
        cfg.rope_scaling = Some(serde_json::json!({"type": "linear", "factor": 2.0}));
        let e = cfg
            .validate(Path::new("m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("m/config.json: `rope_scaling`"), "{e}");
        let mut cfg = ModelConfig::llama(100, 64, 2, 4, 3, 128, 32, 1e4, true);
        assert!(cfg
            .validate(Path::new("c"))
            .unwrap_err()
            .to_string()
            .contains("num_key_value_heads"));
        cfg.num_key_value_heads = Some(4);
        cfg.model_type = "gpt_neox".into();
        assert!(cfg
            .validate(Path::new("c"))
            .unwrap_err()
            .to_string()
            .contains("model_type"));
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
