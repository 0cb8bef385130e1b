//! Import a llama.cpp GGUF file (`general.architecture = llama`: Llama, SmolLM, Mistral-
//! style models) as Hugging Face-named, dequantized tensors plus a [`ModelConfig`].
//!
//! llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows
//! of `q_proj` and `k_proj` from Hugging Face's rotate-half rotary layout to GGML's
//! interleaved one: per head, `w.reshape(2, D/2, C).swapaxes(0, 1)`. [`unpermute`] undoes
//! it, so the imported weights run through candor's (Hugging Face convention) rotary code.
//! The vocabulary (tokens, merges, token types, special ids, chat template) is returned as
//! read, for `candor_data::convert` to rebuild `tokenizer.json`.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{file_err, Result};

/// The vocabulary a GGUF file carries (`tokenizer.ggml.*`, `tokenizer.chat_template`).
#[derive(Clone, Debug, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` for byte-level BPE.
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer's name (`smollm`, `gpt2`, `llama-bpe`, ...).
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub chat_template: Option<String>,
}

impl GgufVocab {
    /// Ids of control and user-defined tokens (the special tokens).
    pub fn special_ids(&self) -> Vec<u32> {
        self.token_types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(i, _)| i as u32)
            .collect()
    }
}

/// A GGUF model read into candor's terms.
pub struct GgufModel {
    pub config: ModelConfig,
    /// Dequantized f32 tensors on the CPU, by Hugging Face name.
    pub tensors: HashMap<String, Tensor>,
    pub vocab: GgufVocab,
    /// `general.name`, when present.
    pub name: Option<String>,
    /// GGML type of each tensor as stored (e.g. `Q4_1`), for the record.
    pub stored_types: HashMap<String, String>,
}

/// Undo llama.cpp's rotary permutation of a q or k projection (rows `heads × head_dim`):
/// GGUF row `h·D + 2i + j` holds Hugging Face row `h·D + j·D/2 + i`.
pub fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let d = rows / heads;
    Ok(w.reshape((heads, d / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// llama.cpp's permutation (Hugging Face → GGUF), the inverse of [`unpermute`].
pub fn permute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let d = rows / heads;
    Ok(w.reshape((heads, 2, d / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(key)
    }
    fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x as u64))
                .map(|x| Some(x as usize))
                .map_err(|_| {
                    file_err(
                        self.path,
                        format!("`{key}`: expected an integer, got {v:?}"),
                    )
                }),
        }
    }
    fn required(&self, key: &str) -> Result<usize> {
        self.usize(key)?.ok_or_else(|| {
            file_err(
                self.path,
                format!("`{key}`: missing (a llama GGUF needs it)"),
            )
        })
    }
    fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_f32()
                .map(f64::from)
                .or_else(|_| v.to_f64())
                .map(Some)
                .map_err(|_| file_err(self.path, format!("`{key}`: expected a number, got {v:?}"))),
        }
    }
    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .map(|s| Some(s.clone()))
                .map_err(|_| file_err(self.path, format!("`{key}`: expected a string"))),
        }
    }
    /// An array value, each item converted by `item` (`None`: not `what`).
    fn array<T>(
        &self,
        key: &str,
        what: &str,
        item: impl Fn(&Value) -> Option<T>,
    ) -> Result<Vec<T>> {
        let Some(v) = self.get(key) else {
            return Ok(vec![]);
        };
        let items = v
            .to_vec()
            .map_err(|_| file_err(self.path, format!("`{key}`: expected an array")))?;
        items
            .iter()
            .map(|x| {
                item(x).ok_or_else(|| file_err(self.path, format!("`{key}`: expected {what}")))
            })
            .collect()
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key, "strings", |x| x.to_string().ok().cloned())
    }
    fn ints(&self, key: &str) -> Result<Vec<i32>> {
        self.array(key, "integers", |x| {
            x.to_i32().or_else(|_| x.to_u32().map(|u| u as i32)).ok()
        })
    }
}

/// The Hugging Face name of a GGUF tensor of a llama model, and whether it is a q or k
/// projection (to un-permute, with that many heads).
fn hf_name(name: &str, heads: usize, kv_heads: usize) -> Option<(String, Option<usize>)> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some((f.to_string(), None));
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?; // kind: weight | bias
    let (hf, perm) = match part {
        "attn_norm" => ("input_layernorm", None),
        "attn_q" => ("self_attn.q_proj", Some(heads)),
        "attn_k" => ("self_attn.k_proj", Some(kv_heads)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}.{kind}"), perm))
}

/// Read and dequantize a GGUF file.
pub fn read_gguf(path: &Path) -> Result<GgufModel> {
    let mut file = File::open(path).map_err(|e| file_err(path, format!("cannot open: {e}")))?;
    let content = Content::read(&mut file)
        .map_err(|e| file_err(path, format!("not a valid GGUF file: {e}")))?;
    let meta = Meta {
        path,
        md: &content.metadata,
    };
    let arch = meta.string("general.architecture")?.unwrap_or_default();
    if arch != "llama" {
        return Err(file_err(
            path,
            format!("`general.architecture`: `{arch}` is not supported (expected llama: Llama, SmolLM, Mistral-style models)"),
        ));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = meta.required(&k("embedding_length"))?;
    let layers = meta.required(&k("block_count"))?;
    let inter = meta.required(&k("feed_forward_length"))?;
    let heads = meta.required(&k("attention.head_count"))?;
    let kv_heads = meta.usize(&k("attention.head_count_kv"))?.unwrap_or(heads);
    let ctx = meta.required(&k("context_length"))?;
    let theta = meta.f64(&k("rope.freq_base"))?.unwrap_or(10000.0);
    let eps = meta
        .f64(&k("attention.layer_norm_rms_epsilon"))?
        .unwrap_or(1e-5);
    if heads == 0 || hidden % heads != 0 {
        return Err(file_err(
            path,
            format!(
                "`{}`: {heads} does not divide embedding_length {hidden}",
                k("attention.head_count")
            ),
        ));
    }
    let head_dim = meta
        .usize(&k("attention.key_length"))?
        .unwrap_or(hidden / heads);
    if let Some(rot) = meta.usize(&k("rope.dimension_count"))? {
        if rot != head_dim {
            return Err(file_err(
                path,
                format!(
                    "`{}`: partial rotary embeddings ({rot} of {head_dim}) are not implemented",
                    k("rope.dimension_count")
                ),
            ));
        }
    }
    if let Some(kind) = meta.string(&k("rope.scaling.type"))? {
        if kind != "none" {
            return Err(file_err(
                path,
                format!(
                    "`{}`: `{kind}` rope scaling is not implemented",
                    k("rope.scaling.type")
                ),
            ));
        }
    }
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(file_err(
            path,
            "tensor `rope_freqs.weight`: scaled rotary frequencies (Llama 3.1) are not implemented",
        ));
    }

    let vocab = GgufVocab {
        model: meta.string("tokenizer.ggml.model")?.unwrap_or_default(),
        pre: meta.string("tokenizer.ggml.pre")?,
        tokens: meta.strings("tokenizer.ggml.tokens")?,
        token_types: meta.ints("tokenizer.ggml.token_type")?,
        merges: meta.strings("tokenizer.ggml.merges")?,
        bos_id: meta.usize("tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
        eos_id: meta.usize("tokenizer.ggml.eos_token_id")?.map(|x| x as u32),
        unk_id: meta
            .usize("tokenizer.ggml.unknown_token_id")?
            .map(|x| x as u32),
        pad_id: meta
            .usize("tokenizer.ggml.padding_token_id")?
            .map(|x| x as u32),
        chat_template: meta.string("tokenizer.chat_template")?,
    };
    let vocab_size = meta.usize(&k("vocab_size"))?.unwrap_or(vocab.tokens.len());

    // tensors: dequantize, rename, un-permute q/k
    let mut tensors = HashMap::new();
    let mut stored_types = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    // candle multiplies the dims unchecked (a debug-build panic, or a wrapped size in
    // release); a header whose shape cannot even be counted is refused here, by name
    for name in &names {
        let dims = content.tensor_infos[*name].shape.dims();
        if dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .is_none()
        {
            return Err(file_err(
                path,
                format!("tensor `{name}`: shape {dims:?} has more elements than can be counted"),
            ));
        }
    }
    for name in names {
        let Some((hf, perm)) = hf_name(name, heads, kv_heads) else {
            return Err(file_err(
                path,
                format!("tensor `{name}` is not part of a llama model candor can import"),
            ));
        };
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| file_err(path, format!("tensor `{name}`: {e}")))?;
        stored_types.insert(hf.clone(), format!("{:?}", q.dtype()));
        let mut t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| file_err(path, format!("tensor `{name}`: cannot dequantize: {e}")))?;
        if let Some(h) = perm {
            t = if t.rank() == 2 {
                unpermute(&t, h)?
            } else {
                unpermute(&t.unsqueeze(1)?, h)?.squeeze(1)?
            };
        }
        tensors.insert(hf, t);
    }
    let tied = !tensors.contains_key("lm_head.weight");
    let mut config = ModelConfig::llama(
        vocab_size, hidden, layers, heads, kv_heads, inter, ctx, theta, tied,
    );
    config.rms_norm_eps = eps;
    if head_dim != hidden / heads {
        config.head_dim = Some(head_dim);
    }
    config.attention_bias = tensors.contains_key("model.layers.0.self_attn.q_proj.bias");
    config.bos_token_id = vocab.bos_id;
    config.eos_token_id = vocab.eos_id.map(serde_json::Value::from);
    config.pad_token_id = vocab.pad_id;
    config.validate(path)?;
    Ok(GgufModel {
        config,
        tensors,
        vocab,
        name: meta.string("general.name")?,
        stored_types,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // 2 heads of dimension 4, 3 input columns; row r holds value r
        let w = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap()
            .repeat((1, 3))
            .unwrap();
        let p = permute(&w, 2).unwrap();
        // per head: HF rows [0 1 | 2 3] (first half, second half) interleave to [0 2 1 3]
        let col: Vec<f32> = p
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(col, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        let back: Vec<Vec<f32>> = unpermute(&p, 2).unwrap().to_vec2().unwrap();
        assert_eq!(back, w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn tensor_names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.3.attn_k.weight", 9, 3),
            Some(("model.layers.3.self_attn.k_proj.weight".into(), Some(3)))
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight", 9, 3),
            Some(("model.layers.0.mlp.down_proj.weight".into(), None))
        );
        assert_eq!(
            hf_name("token_embd.weight", 9, 3),
            Some(("model.embed_tokens.weight".into(), None))
        );
        assert_eq!(
            hf_name("blk.0.attn_q.bias", 9, 3),
            Some(("model.layers.0.self_attn.q_proj.bias".into(), Some(9)))
        );
        assert_eq!(hf_name("blk.x.attn_q.weight", 9, 3), None);
        assert_eq!(hf_name("rope_freqs.weight", 9, 3), None);
    }
}
