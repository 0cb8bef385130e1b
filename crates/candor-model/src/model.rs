//! The decoder: llama-style blocks (GPT-2's as config switches), `lm` / `score` heads,
//! KV cache.
//!
//! Module paths mirror Hugging Face tensor names (`model.layers.0.self_attn.q_proj.weight`,
//! `transformer.h.0.attn.c_attn.weight`), so the `VarBuilder` calls here and in
//! [`crate::layers`] are the whole naming map for loading and saving.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

use crate::checkpoint::{self, Tape};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::fused::{self, attention::CacheBuf, AttnMask};
use crate::layers::{attention_projections, names, Mlp, Norm, Proj, QkvProj, Target};
use crate::lora::Adapter;
use crate::mask::causal_bias;
use crate::ops::{apply_rope, reduce_dtype, repeat_kv, rope_tables, softmax};
use crate::Head;

/// How attention hides keys: candor's additive bias on the composed path, or the fused
/// kernel's mask.
pub(crate) enum Mask<'a> {
    Composed(Tensor),
    Fused(AttnMask<'a>),
}

/// What the blocks of one forward pass share ([`Model::context`]).
pub(crate) struct Context<'a> {
    /// Position ids, flattened: (B·T) given, or (T) counting on from the cache.
    pos: Tensor,
    /// Rows of `pos` (B, or 1 for the default positions).
    rows: usize,
    /// Rotary (cos, sin) at the positions, (B|1, 1, T, D/2); `None` with learned positions.
    rope: Option<(Tensor, Tensor)>,
    mask: Mask<'a>,
}

#[derive(Clone)]
struct Attention {
    qkv: QkvProj,
    o_proj: Proj,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (qkv, o_proj) = attention_projections(cfg, &vb)?;
        Ok(Attention {
            qkv,
            o_proj,
            n_heads: cfg.num_attention_heads,
            n_kv: cfg.kv_heads(),
            head_dim: cfg.head_dim(),
        })
    }

    /// x (B, T, C); rope: cos/sin broadcastable to (B, 1, T, D/2), `None` with learned
    /// positions; mask: bias (B|1, 1, T, Tk) on the composed path, or the fused kernel's.
    fn forward(
        &self,
        x: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
        mask: &Mask,
        cache: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kv, d) = (self.n_heads, self.n_kv, self.head_dim);
        let (q, k, v) = self.qkv.forward(x)?;
        let bias = match mask {
            Mask::Composed(bias) => bias,
            Mask::Fused(mask) => {
                // (B, T, heads, D) throughout: no transposes
                let q = q.reshape((b, t, h, d))?;
                let k = k.reshape((b, t, kv, d))?;
                let v = v.reshape((b, t, kv, d))?;
                let (q, k) = match rope {
                    Some((cos, sin)) => {
                        let (cos, sin) = (cos.squeeze(1)?, sin.squeeze(1)?); // (B|1, T, D/2)
                        (fused::rope(&q, &cos, &sin)?, fused::rope(&k, &cos, &sin)?)
                    }
                    None => (q, k),
                };
                let y = fused::attention(&q, &k, &v, *mask, cache.map(|c| &mut c.fused))?; // (B, T, H, D)
                return self.o_proj.forward(&y.reshape((b, t, h * d))?);
            }
        };
        let cache = cache.map(|c| &mut c.composed);
        let q = q.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?; // (B, H, T, D)
        let k = k.reshape((b, t, kv, d))?.transpose(1, 2)?.contiguous()?; // (B, KV, T, D)
        let v = v.reshape((b, t, kv, d))?.transpose(1, 2)?.contiguous()?;
        let (q, k) = match rope {
            Some((cos, sin)) => (apply_rope(&q, cos, sin)?, apply_rope(&k, cos, sin)?),
            None => (q, k),
        };
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
        self.o_proj.forward(&y)
    }
}

#[derive(Clone)]
struct Block {
    input_layernorm: Norm,
    self_attn: Attention,
    post_attention_layernorm: Norm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let n = names(cfg.arch());
        Ok(Block {
            input_layernorm: Norm::new(cfg, vb.pp(n.ln1))?,
            self_attn: Attention::new(cfg, vb.pp(n.attn))?,
            post_attention_layernorm: Norm::new(cfg, vb.pp(n.ln2))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }
}

/// One layer's keys and values: (B, KV, T, D) tensors grown by concatenation on the
/// composed path, preallocated (B, capacity, KV, D) buffers on the fused one.
#[derive(Clone, Default)]
pub(crate) struct LayerKv {
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
        KvCache {
            layers: vec![LayerKv::default(); n_layers],
        }
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        let Some(l) = self.layers.first() else {
            return 0;
        };
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

/// The decoder with its head. Cloning shares every weight (candle tensors are
/// reference-counted): no copy of the parameters is made.
#[derive(Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub head: Head,
    embed_tokens: Embedding,
    /// GPT-2's learned positions (P, C); `None` with rotary embeddings.
    position_embeddings: Option<Tensor>,
    layers: Vec<Block>,
    norm: Norm,
    /// (V, C) untied LM head, or (1, C) score head; `None` for a tied LM head.
    head_weight: Option<Tensor>,
    /// Rotary tables (cos, sin), each (P, D/2); `None` with learned positions.
    rope: Option<(Tensor, Tensor)>,
    dtype: DType,
    /// Gradient checkpointing's saved block inputs while a
    /// [`Recording`](crate::checkpoint::Recording) is open.
    pub(crate) tape: Tape,
}

impl Model {
    /// Build from a `VarBuilder` whose paths are Hugging Face names.
    pub fn new(config: &ModelConfig, head: Head, vb: VarBuilder) -> Result<Self> {
        let (c, v, p) = (
            config.hidden_size,
            config.vocab_size,
            config.max_position_embeddings,
        );
        let n = names(config.arch());
        let m = vb.pp(n.prefix);
        let embed = m.pp(n.embed).get((v, c), "weight")?;
        let position_embeddings = n
            .positions
            .map(|wpe| m.pp(wpe).get((p, c), "weight"))
            .transpose()?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Block::new(config, m.pp(n.layers).pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = Norm::new(config, m.pp(n.final_norm))?;
        let head_weight = match head {
            Head::Lm if config.tie_word_embeddings => None,
            Head::Lm => Some(vb.pp("lm_head").get((v, c), "weight")?),
            Head::Score => Some(vb.pp("score").get((1, c), "weight")?),
        };
        let rope = match position_embeddings {
            Some(_) => None,
            None => Some(rope_tables(
                config.head_dim(),
                p,
                config.rope_theta,
                vb.device(),
            )?),
        };
        Ok(Model {
            config: config.clone(),
            head,
            embed_tokens: Embedding::new(embed, c),
            position_embeddings,
            layers,
            norm,
            head_weight,
            rope,
            dtype: vb.dtype(),
            tape: Tape::default(),
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
    /// to causal. With a `cache`, keys/values of these tokens are appended to it. Without
    /// one, while a [`Recording`](crate::checkpoint::Recording) is open, only the blocks'
    /// inputs are kept (gradient checkpointing).
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: Option<&Tensor>,
        bias: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let t = ids.dims2()?.1;
        let past = cache.as_ref().map_or(0, |c| c.len());
        let max_pos = self.config.max_position_embeddings;
        if positions.is_none() && past + t > max_pos {
            return Err(crate::Error::Msg(format!(
                "sequence of {} tokens is longer than the model's max_position_embeddings {max_pos}",
                past + t
            )));
        }
        let ctx = self.context(ids, positions, bias, past)?;
        let x = self.embed(ids, &ctx)?; // (B, T, C)
        if cache.is_none() && self.tape.is_recording() {
            // gradient checkpointing: keep the blocks' inputs only; `Recording::backward`
            // recomputes each block's activations from them
            let hidden = checkpoint::record(self, ids, positions, bias, &x, &ctx)?;
            return self.norm.forward(hidden.as_tensor());
        }
        let mut x = x;
        for i in 0..self.layers.len() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = self.block(i, &x, &ctx, slot)?;
        }
        self.norm.forward(&x)
    }

    /// What every block of one forward pass shares: rotary tables at the positions, the
    /// attention mask, the flattened position ids.
    pub(crate) fn context<'a>(
        &self,
        ids: &Tensor,
        positions: Option<&Tensor>,
        bias: Option<&'a Tensor>,
        past: usize,
    ) -> Result<Context<'a>> {
        let t = ids.dim(1)?;
        // position ids, flattened: (B·T) given, or (T) counting on from the cache
        let (pos, rows) = match positions {
            Some(p) => (p.flatten_all()?, ids.dim(0)?),
            None => (
                Tensor::arange(past as u32, (past + t) as u32, ids.device())?,
                1,
            ),
        };
        let rope = match &self.rope {
            Some((cos, sin)) => {
                let half = self.config.head_dim() / 2;
                let cos = cos.index_select(&pos, 0)?.reshape((rows, 1, t, half))?;
                let sin = sin.index_select(&pos, 0)?.reshape((rows, 1, t, half))?;
                Some((cos, sin))
            }
            None => None,
        };
        let mask = match (bias, fused::enabled(self.embed_tokens.embeddings())) {
            (None, true) => Mask::Fused(AttnMask::Causal),
            (Some(b), true) => Mask::Fused(AttnMask::Bias {
                bias: b,
                causal: fused::attention::bias_is_causal(b)?,
            }),
            (Some(b), false) => Mask::Composed(b.to_dtype(self.dtype)?),
            (None, false) => {
                Mask::Composed(causal_bias(t, past, ids.device())?.to_dtype(self.dtype)?)
            }
        };
        Ok(Context {
            pos,
            rows,
            rope,
            mask,
        })
    }

    /// Token (and GPT-2's learned position) embeddings (B, T, C): the first block's input.
    pub(crate) fn embed(&self, ids: &Tensor, ctx: &Context) -> Result<Tensor> {
        let x = self.embed_tokens.forward(ids)?; // (B, T, C)
        match &self.position_embeddings {
            Some(wpe) => {
                let (c, t) = (self.config.hidden_size, ids.dim(1)?);
                let p = wpe.index_select(&ctx.pos, 0)?.reshape((ctx.rows, t, c))?;
                Ok(x.broadcast_add(&p)?)
            }
            None => Ok(x),
        }
    }

    pub(crate) fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Block `i` on its input x (B, T, C): x + attn(ln1(x)), then + mlp(ln2(·)).
    pub(crate) fn block(
        &self,
        i: usize,
        x: &Tensor,
        ctx: &Context,
        slot: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let layer = &self.layers[i];
        let rope = ctx.rope.as_ref().map(|(c, s)| (c, s));
        let h =
            layer
                .self_attn
                .forward(&layer.input_layernorm.forward(x)?, rope, &ctx.mask, slot)?;
        let x = (x + h)?;
        let h = layer
            .mlp
            .forward(&layer.post_attention_layernorm.forward(&x)?)?;
        Ok((x + h)?)
    }

    /// Logits over the vocabulary (B, T, V) from hidden states (B, T, C).
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = self.lm_head_weight()?;
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
            (_, Head::Score) => Err(crate::Error::Msg(
                "a score-head model has no LM logits".into(),
            )),
        }
    }

    /// One scalar per position (B, T) from hidden states (B, T, C).
    pub fn scores(&self, hidden: &Tensor) -> Result<Tensor> {
        match (&self.head_weight, self.head) {
            (Some(w), Head::Score) => {
                // an f32 head beside a bf16 base (LoRA) reads the hidden states in f32
                let s = hidden.to_dtype(w.dtype())?.broadcast_matmul(&w.t()?)?;
                Ok(s.squeeze(D::Minus1)?.to_dtype(hidden.dtype())?)
            }
            _ => Err(crate::Error::Msg(
                "an lm-head model has no score head".into(),
            )),
        }
    }

    /// Convenience: `lm_logits(forward_hidden(ids))` with the default causal mask.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        self.lm_logits(&self.forward_hidden(ids, None, None, None)?)
    }
}

/// LoRA: where adapters attach, and switching them off (see [`crate::lora`]).
impl Model {
    /// Every projection an adapter can attach to, layer by layer, with its Hugging Face
    /// module path.
    pub fn adapter_targets(&mut self) -> Vec<Target<'_>> {
        let n = names(self.config.arch());
        let mut out = vec![];
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let block = format!("{}.{}.{i}", n.prefix, n.layers);
            let attn = format!("{block}.{}", n.attn);
            layer.self_attn.qkv.targets(&attn, &mut out);
            layer.self_attn.o_proj.targets(&attn, &mut out);
            layer.mlp.targets(&format!("{block}.mlp"), &mut out);
        }
        out
    }

    /// The adapters attached to this model (none for a plain model).
    pub fn adapters(&self) -> Vec<Adapter> {
        let mut model = self.clone();
        model
            .adapter_targets()
            .into_iter()
            .filter_map(|t| t.slot.clone())
            .collect()
    }

    /// The same model without its adapters: the frozen base, sharing its weights with
    /// `self` (no copy). PPO, GRPO and DPO's reference in a LoRA run.
    pub fn without_adapters(&self) -> Model {
        let mut model = self.clone();
        for t in model.adapter_targets() {
            *t.slot = None;
        }
        model
    }

    /// Switch the adapters' term on or off for the forward passes that follow (PEFT's
    /// `disable_adapter()`); on by default. No effect on a model without adapters.
    pub fn set_adapters_enabled(&self, on: bool) {
        if let Some(a) = self.adapters().first() {
            a.state.set_enabled(on);
        }
    }

    /// Replace the score head's (1, C) weight: a LoRA run's trainable head, an f32 variable
    /// even beside a bf16 base. An error for an lm head.
    pub fn set_score_head(&mut self, weight: Tensor) -> Result<()> {
        match self.head {
            Head::Score => {
                self.head_weight = Some(weight);
                Ok(())
            }
            Head::Lm => Err(crate::Error::Msg(
                "an lm-head model has no score head".into(),
            )),
        }
    }

    /// Apply the adapters' dropout (`lora.dropout`) in the forward passes that follow:
    /// on while training, off for evaluation and sampling (the default).
    pub fn set_adapter_training(&self, on: bool) {
        if let Some(a) = self.adapters().first() {
            a.state.set_training(on);
        }
    }
}
