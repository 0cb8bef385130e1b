//! The decoder: llama-style blocks, `lm` / `score` heads, KV cache.
//!
//! Module paths mirror Hugging Face tensor names (`model.layers.0.self_attn.q_proj.weight`),
//! so the `VarBuilder` calls below are the whole naming map for loading and saving.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::fused::{self, attention::CacheBuf, AttnMask};
use crate::mask::causal_bias;
use crate::ops::{apply_rope, reduce_dtype, repeat_kv, rms_norm, rope_tables, softmax};
use crate::Head;

/// `Linear::forward`, through the fused kernel for f32 on the CPU.
fn lin(l: &Linear, x: &Tensor) -> Result<Tensor> {
    if !fused::enabled(x) {
        return Ok(l.forward(x)?);
    }
    let y = fused::linear(x, l.weight())?;
    Ok(match l.bias() {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// How attention hides keys: candor's additive bias on the composed path, or the fused
/// kernel's mask.
enum Mask<'a> {
    Composed(Tensor),
    Fused(AttnMask<'a>),
}

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
    Ok(Linear::new(w, b))
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(RmsNorm { weight: vb.get(dim, "weight")?, eps })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused::enabled(x) {
            return Ok(fused::rms_norm(x, &self.weight, self.eps)?);
        }
        rms_norm(x, &self.weight, self.eps)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (c, h, kv, d) = (cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        Ok(Attention {
            q_proj: linear(c, h * d, cfg.qkv_bias(), vb.pp("q_proj"))?,
            k_proj: linear(c, kv * d, cfg.qkv_bias(), vb.pp("k_proj"))?,
            v_proj: linear(c, kv * d, cfg.qkv_bias(), vb.pp("v_proj"))?,
            o_proj: linear(h * d, c, cfg.o_bias(), vb.pp("o_proj"))?,
            n_heads: h,
            n_kv: kv,
            head_dim: d,
        })
    }

    /// x (B, T, C); cos/sin broadcastable to (B, 1, T, D/2); bias (B|1, 1, T, Tk).
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Mask, cache: Option<&mut LayerKv>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kv, d) = (self.n_heads, self.n_kv, self.head_dim);
        let bias = match mask {
            Mask::Composed(bias) => bias,
            Mask::Fused(mask) => {
                // (B, T, heads, D) throughout: no transposes
                let q = lin(&self.q_proj, x)?.reshape((b, t, h, d))?;
                let k = lin(&self.k_proj, x)?.reshape((b, t, kv, d))?;
                let v = lin(&self.v_proj, x)?.reshape((b, t, kv, d))?;
                let (cos, sin) = (cos.squeeze(1)?, sin.squeeze(1)?); // (B|1, T, D/2)
                let q = fused::rope(&q, &cos, &sin)?;
                let k = fused::rope(&k, &cos, &sin)?;
                let y = fused::attention(&q, &k, &v, *mask, cache.map(|c| &mut c.fused))?; // (B, T, H, D)
                return lin(&self.o_proj, &y.reshape((b, t, h * d))?);
            }
        };
        let cache = cache.map(|c| &mut c.composed);
        let q = self.q_proj.forward(x)?.reshape((b, t, h, d))?.transpose(1, 2)?; // (B, H, T, D)
        let k = self.k_proj.forward(x)?.reshape((b, t, kv, d))?.transpose(1, 2)?; // (B, KV, T, D)
        let v = self.v_proj.forward(x)?.reshape((b, t, kv, d))?.transpose(1, 2)?.contiguous()?;
        let q = apply_rope(&q.contiguous()?, cos, sin)?;
        let k = apply_rope(&k.contiguous()?, cos, sin)?;
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let k = repeat_kv(&k, h / kv)?; // (B, H, Tk, D)
        let v = repeat_kv(&v, h / kv)?;
        let scale = 1.0 / (d as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?; // (B, H, T, Tk)
        let att = softmax(&att.to_dtype(reduce_dtype(att.dtype()))?)?.to_dtype(v.dtype())?; // f32 under bf16
        let y = att.matmul(&v)?; // (B, H, T, D)
        let y = y.transpose(1, 2)?.reshape((b, t, h * d))?; // (B, T, C)
        Ok(self.o_proj.forward(&y)?)
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (c, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Mlp {
            gate_proj: linear(c, i, bias, vb.pp("gate_proj"))?,
            up_proj: linear(c, i, bias, vb.pp("up_proj"))?,
            down_proj: linear(i, c, bias, vb.pp("down_proj"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused::enabled(x) {
            let gated = fused::swiglu(&lin(&self.gate_proj, x)?, &lin(&self.up_proj, x)?)?; // (B, T, I)
            return lin(&self.down_proj, &gated);
        }
        let gated = (self.gate_proj.forward(x)?.silu()? * self.up_proj.forward(x)?)?; // (B, T, I)
        Ok(self.down_proj.forward(&gated)?)
    }
}

struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Block {
            input_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }
}

/// One layer's keys and values: (B, KV, T, D) tensors grown by concatenation on the
/// composed path, preallocated (B, capacity, KV, D) buffers on the fused one.
#[derive(Clone, Default)]
struct LayerKv {
    composed: Option<(Tensor, Tensor)>,
    fused: Option<CacheBuf>,
}

/// Per-layer keys and values of the tokens seen so far.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache { layers: vec![LayerKv::default(); n_layers] }
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        let Some(l) = self.layers.first() else { return 0 };
        match (&l.composed, &l.fused) {
            (Some((k, _)), _) => k.dim(2).unwrap_or(0),
            (None, Some(c)) => c.len(),
            (None, None) => 0,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Keep only the given batch rows (drop finished sequences).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for layer in &mut self.layers {
            if let Some((k, v)) = &mut layer.composed {
                *k = k.index_select(rows, 0)?;
                *v = v.index_select(rows, 0)?;
            }
            if let Some(c) = &mut layer.fused {
                c.select_rows(rows)?;
            }
        }
        Ok(())
    }
}

/// The decoder with its head.
pub struct Model {
    pub config: ModelConfig,
    pub head: Head,
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// (V, C) untied LM head, or (1, C) score head; `None` for a tied LM head.
    head_weight: Option<Tensor>,
    rope_cos: Tensor,
    rope_sin: Tensor,
    dtype: DType,
}

impl Model {
    /// Build from a `VarBuilder` whose paths are Hugging Face names.
    pub fn new(config: &ModelConfig, head: Head, vb: VarBuilder) -> Result<Self> {
        let (c, v) = (config.hidden_size, config.vocab_size);
        let m = vb.pp("model");
        let embed = m.pp("embed_tokens").get((v, c), "weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Block::new(config, m.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(c, config.rms_norm_eps, m.pp("norm"))?;
        let head_weight = match head {
            Head::Lm if config.tie_word_embeddings => None,
            Head::Lm => Some(vb.pp("lm_head").get((v, c), "weight")?),
            Head::Score => Some(vb.pp("score").get((1, c), "weight")?),
        };
        let (rope_cos, rope_sin) =
            rope_tables(config.head_dim(), config.max_position_embeddings, config.rope_theta, vb.device())?;
        Ok(Model {
            config: config.clone(),
            head,
            embed_tokens: Embedding::new(embed, c),
            layers,
            norm,
            head_weight,
            rope_cos,
            rope_sin,
            dtype: vb.dtype(),
        })
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.embeddings().device()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Final hidden states (B, T, C) for token ids (B, T).
    ///
    /// `positions` (B, T) u32 defaults to `past..past+T`; `bias` (B|1, 1, T, past+T) defaults
    /// to causal. With a `cache`, keys/values of these tokens are appended to it.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: Option<&Tensor>,
        bias: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        let max_pos = self.config.max_position_embeddings;
        let (cos, sin) = match positions {
            Some(p) => {
                let flat = p.flatten_all()?;
                let half = self.config.head_dim() / 2;
                let cos = self.rope_cos.index_select(&flat, 0)?.reshape((b, 1, t, half))?;
                let sin = self.rope_sin.index_select(&flat, 0)?.reshape((b, 1, t, half))?;
                (cos, sin)
            }
            None => {
                if past + t > max_pos {
                    return Err(crate::Error::Msg(format!(
                        "sequence of {} tokens is longer than the model's max_position_embeddings {max_pos}",
                        past + t
                    )));
                }
                let half = self.config.head_dim() / 2;
                let cos = self.rope_cos.narrow(0, past, t)?.reshape((1, 1, t, half))?;
                let sin = self.rope_sin.narrow(0, past, t)?.reshape((1, 1, t, half))?;
                (cos, sin)
            }
        };
        let mask = match (bias, fused::enabled(self.embed_tokens.embeddings())) {
            (None, true) => Mask::Fused(AttnMask::Causal),
            (Some(b), true) => Mask::Fused(AttnMask::Bias { bias: b, causal: fused::attention::bias_is_causal(b)? }),
            (Some(b), false) => Mask::Composed(b.to_dtype(self.dtype)?),
            (None, false) => Mask::Composed(causal_bias(t, past, ids.device())?.to_dtype(self.dtype)?),
        };
        let mut x = self.embed_tokens.forward(ids)?; // (B, T, C)
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let h = layer.self_attn.forward(&layer.input_layernorm.forward(&x)?, &cos, &sin, &mask, slot)?;
            x = (x + h)?;
            let h = layer.mlp.forward(&layer.post_attention_layernorm.forward(&x)?)?;
            x = (x + h)?;
        }
        self.norm.forward(&x)
    }

    /// Logits over the vocabulary (B, T, V) from hidden states (B, T, C).
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = match (&self.head_weight, self.head) {
            (None, Head::Lm) => self.embed_tokens.embeddings(),
            (Some(w), Head::Lm) => w,
            (_, Head::Score) => return Err(crate::Error::Msg("a score-head model has no LM logits".into())),
        };
        if fused::enabled(hidden) {
            return Ok(fused::linear(hidden, w)?);
        }
        Ok(hidden.broadcast_matmul(&w.t()?)?)
    }

    /// The LM head's (V, C) weight (the embedding when tied); an error for a score head.
    pub fn lm_head_weight(&self) -> Result<&Tensor> {
        match (&self.head_weight, self.head) {
            (None, Head::Lm) => Ok(self.embed_tokens.embeddings()),
            (Some(w), Head::Lm) => Ok(w),
            (_, Head::Score) => Err(crate::Error::Msg("a score-head model has no LM logits".into())),
        }
    }

    /// One scalar per position (B, T) from hidden states (B, T, C).
    pub fn scores(&self, hidden: &Tensor) -> Result<Tensor> {
        match (&self.head_weight, self.head) {
            (Some(w), Head::Score) => Ok(hidden.broadcast_matmul(&w.t()?)?.squeeze(D::Minus1)?),
            _ => Err(crate::Error::Msg("an lm-head model has no score head".into())),
        }
    }

    /// Convenience: `lm_logits(forward_hidden(ids))` with the default causal mask.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        self.lm_logits(&self.forward_hidden(ids, None, None, None)?)
    }
}
