//! Where the Llama family and GPT-2 differ, each piece a switch on the config ([`Arch`]):
//!
//! | piece            | Llama family                           | GPT-2                                  |
//! |------------------|----------------------------------------|----------------------------------------|
//! | norm             | RMSNorm (`weight`)                     | LayerNorm (`weight`, `bias`)           |
//! | positions        | rotary, in attention                   | learned `wpe`, added to the embedding  |
//! | q/k/v            | `q_proj`, `k_proj`, `v_proj` (Linear)  | fused `c_attn` (Conv1D)                |
//! | attention output | `o_proj` (Linear)                      | `c_proj` (Conv1D)                      |
//! | MLP              | SwiGLU: `gate_proj`, `up_proj`, `down_proj` | GELU: `c_fc`, `c_proj` (Conv1D)   |
//!
//! Linear stores its weight (out, in); GPT-2's Conv1D stores it (in, out) and computes
//! `x·W + b`. Keeping each layout as stored means the `VarBuilder` paths below are the
//! Hugging Face tensor names of each family, for loading and saving alike.
//!
//! For f32 on the CPU ([`fused::enabled`]) the Llama pieces run as fused kernels with
//! hand-written backward (Linear, RMSNorm, SwiGLU); GPT-2's LayerNorm, Conv1D and GELU stay
//! composed from candle ops with a backward.

use candle_core::{Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use crate::config::{Arch, ModelConfig};
use crate::error::Result;
use crate::fused;
use crate::lora::Adapter;
use crate::ops::{layer_norm, rms_norm};

/// Tensor-name segments of one family (`{prefix}.{layers}.{i}.{attn}.…`).
pub struct Names {
    /// `model` | `transformer`
    pub prefix: &'static str,
    /// `embed_tokens` | `wte`
    pub embed: &'static str,
    /// learned positions: `None` | `wpe`
    pub positions: Option<&'static str>,
    /// `layers` | `h`
    pub layers: &'static str,
    /// `input_layernorm` | `ln_1`
    pub ln1: &'static str,
    /// `self_attn` | `attn`
    pub attn: &'static str,
    /// `post_attention_layernorm` | `ln_2`
    pub ln2: &'static str,
    /// `norm` | `ln_f`
    pub final_norm: &'static str,
}

pub fn names(arch: Arch) -> Names {
    match arch {
        Arch::Llama => Names {
            prefix: "model",
            embed: "embed_tokens",
            positions: None,
            layers: "layers",
            ln1: "input_layernorm",
            attn: "self_attn",
            ln2: "post_attention_layernorm",
            final_norm: "norm",
        },
        Arch::Gpt2 => Names {
            prefix: "transformer",
            embed: "wte",
            positions: Some("wpe"),
            layers: "h",
            ln1: "ln_1",
            attn: "attn",
            ln2: "ln_2",
            final_norm: "ln_f",
        },
    }
}

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Lin> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Lin {
        base: Linear::new(w, b),
        adapter: None,
    })
}

/// A Linear layer (weight stored (out, in)), with an optional LoRA adapter beside it.
#[derive(Clone)]
pub struct Lin {
    pub base: Linear,
    pub adapter: Option<Adapter>,
}

impl Lin {
    /// `Linear::forward` (the fused kernel for f32 on the CPU), plus the adapter's term: one
    /// fused op for both when [`Adapter::fusable`] says so.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(a) = self
            .adapter
            .as_ref()
            .filter(|a| a.fusable(x, self.base.weight()))
        {
            let y = fused::lora_linear(x, self.base.weight(), &a.a, &a.b, a.scale)?;
            return match self.base.bias() {
                Some(b) => Ok(y.broadcast_add(b)?),
                None => Ok(y),
            };
        }
        let y = if fused::enabled(x) {
            let y = fused::linear(x, self.base.weight())?;
            match self.base.bias() {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        } else {
            self.base.forward(x)?
        };
        match &self.adapter {
            Some(a) => a.add_to(y, x),
            None => Ok(y),
        }
    }
}

/// `Lin::forward` as a free function (the call sites read `lin(q_proj, x)`).
fn lin(l: &Lin, x: &Tensor) -> Result<Tensor> {
    l.forward(x)
}

/// RMSNorm (a fused kernel for f32 on the CPU) or LayerNorm; otherwise composed from ops
/// with a backward.
#[derive(Clone)]
pub enum Norm {
    Rms {
        weight: Tensor,
        eps: f64,
    },
    Layer {
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    },
}

impl Norm {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (c, eps) = (cfg.hidden_size, cfg.norm_eps());
        Ok(match cfg.arch() {
            Arch::Llama => Norm::Rms {
                weight: vb.get(c, "weight")?,
                eps,
            },
            Arch::Gpt2 => Norm::Layer {
                weight: vb.get(c, "weight")?,
                bias: vb.get(c, "bias")?,
                eps,
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms { weight, eps } if fused::enabled(x) => Ok(fused::rms_norm(x, weight, *eps)?),
            Norm::Rms { weight, eps } => rms_norm(x, weight, *eps),
            Norm::Layer { weight, bias, eps } => layer_norm(x, weight, bias, *eps),
        }
    }
}

/// GPT-2's Conv1D: `x·W + b` with W stored (in, out), with an optional LoRA adapter.
#[derive(Clone)]
pub struct Conv1D {
    weight: Tensor,
    bias: Tensor,
    pub adapter: Option<Adapter>,
}

impl Conv1D {
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Conv1D {
            weight: vb.get((in_dim, out_dim), "weight")?,
            bias: vb.get(out_dim, "bias")?,
            adapter: None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x
            .broadcast_matmul(&self.weight)?
            .broadcast_add(&self.bias)?;
        match &self.adapter {
            Some(a) => a.add_to(y, x),
            None => Ok(y),
        }
    }
}

/// A projection in its family's storage layout.
#[derive(Clone)]
pub enum Proj {
    Linear(Lin),
    Conv1D(Conv1D),
}

impl Proj {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Linear(l) => lin(l, x),
            Proj::Conv1D(c) => c.forward(x),
        }
    }
}

/// The attention's input projections: separate q/k/v, or GPT-2's fused `c_attn`.
#[derive(Clone)]
pub enum QkvProj {
    Split {
        q_proj: Lin,
        k_proj: Lin,
        v_proj: Lin,
    },
    Fused {
        c_attn: Conv1D,
        q_dim: usize,
        kv_dim: usize,
    },
}

/// Input and output projections of one attention layer, built from its `VarBuilder`.
pub fn attention_projections(cfg: &ModelConfig, vb: &VarBuilder) -> Result<(QkvProj, Proj)> {
    let (c, h, kv, d) = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.kv_heads(),
        cfg.head_dim(),
    );
    Ok(match cfg.arch() {
        Arch::Llama => (
            QkvProj::Split {
                q_proj: linear(c, h * d, cfg.qkv_bias(), vb.pp("q_proj"))?,
                k_proj: linear(c, kv * d, cfg.qkv_bias(), vb.pp("k_proj"))?,
                v_proj: linear(c, kv * d, cfg.qkv_bias(), vb.pp("v_proj"))?,
            },
            Proj::Linear(linear(h * d, c, cfg.o_bias(), vb.pp("o_proj"))?),
        ),
        Arch::Gpt2 => (
            QkvProj::Fused {
                c_attn: Conv1D::new(c, h * d + 2 * kv * d, vb.pp("c_attn"))?,
                q_dim: h * d,
                kv_dim: kv * d,
            },
            Proj::Conv1D(Conv1D::new(h * d, c, vb.pp("c_proj"))?),
        ),
    })
}

impl QkvProj {
    /// x (B, T, C) → q (B, T, H·D), k and v (B, T, KV·D).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            QkvProj::Split {
                q_proj,
                k_proj,
                v_proj,
            } => Ok((lin(q_proj, x)?, lin(k_proj, x)?, lin(v_proj, x)?)),
            QkvProj::Fused {
                c_attn,
                q_dim,
                kv_dim,
            } => {
                let qkv = c_attn.forward(x)?; // (B, T, H·D + 2·KV·D)
                Ok((
                    qkv.narrow(D::Minus1, 0, *q_dim)?,
                    qkv.narrow(D::Minus1, *q_dim, *kv_dim)?,
                    qkv.narrow(D::Minus1, q_dim + kv_dim, *kv_dim)?,
                ))
            }
        }
    }
}

/// SwiGLU (Llama) or GELU (GPT-2) MLP.
#[derive(Clone)]
pub enum Mlp {
    SwiGlu {
        gate_proj: Lin,
        up_proj: Lin,
        down_proj: Lin,
    },
    Gelu {
        c_fc: Conv1D,
        c_proj: Conv1D,
        erf: bool,
    },
}

impl Mlp {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(match cfg.arch() {
            Arch::Llama => {
                let bias = cfg.mlp_has_bias();
                Mlp::SwiGlu {
                    gate_proj: linear(c, i, bias, vb.pp("gate_proj"))?,
                    up_proj: linear(c, i, bias, vb.pp("up_proj"))?,
                    down_proj: linear(i, c, bias, vb.pp("down_proj"))?,
                }
            }
            Arch::Gpt2 => Mlp::Gelu {
                c_fc: Conv1D::new(c, i, vb.pp("c_fc"))?,
                c_proj: Conv1D::new(i, c, vb.pp("c_proj"))?,
                // `gelu` is the exact erf form; gelu_new / gelu_pytorch_tanh / gelu_fast the tanh one
                erf: cfg.hidden_act == "gelu",
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::SwiGlu {
                gate_proj,
                up_proj,
                down_proj,
            } if fused::enabled(x) => {
                let gated = fused::swiglu(&lin(gate_proj, x)?, &lin(up_proj, x)?)?; // (B, T, I)
                lin(down_proj, &gated)
            }
            Mlp::SwiGlu {
                gate_proj,
                up_proj,
                down_proj,
            } => {
                let gated = (gate_proj.forward(x)?.silu()? * up_proj.forward(x)?)?; // (B, T, I)
                Ok(down_proj.forward(&gated)?)
            }
            Mlp::Gelu { c_fc, c_proj, erf } => {
                let h = c_fc.forward(x)?; // (B, T, I)
                let h = if *erf { h.gelu_erf()? } else { h.gelu()? }; // both record a backward
                c_proj.forward(&h)
            }
        }
    }
}

/// A projection a LoRA adapter can be attached to: its Hugging Face module path
/// (`model.layers.0.self_attn.q_proj`), its name as PEFT's `target_modules` spell it
/// (`q_proj`), its input and output sizes, whether its weight is stored (in, out) (GPT-2's
/// Conv1D, PEFT's `fan_in_fan_out`), and the adapter slot itself.
pub struct Target<'a> {
    pub path: String,
    pub name: &'static str,
    pub in_dim: usize,
    pub out_dim: usize,
    pub fan_in_fan_out: bool,
    pub slot: &'a mut Option<Adapter>,
}

impl Lin {
    fn target<'a>(&'a mut self, prefix: &str, name: &'static str) -> Target<'a> {
        let (out_dim, in_dim) = self.base.weight().dims2().unwrap_or((0, 0));
        Target {
            path: format!("{prefix}.{name}"),
            name,
            in_dim,
            out_dim,
            fan_in_fan_out: false,
            slot: &mut self.adapter,
        }
    }
}

impl Conv1D {
    fn target<'a>(&'a mut self, prefix: &str, name: &'static str) -> Target<'a> {
        let (in_dim, out_dim) = self.weight.dims2().unwrap_or((0, 0));
        Target {
            path: format!("{prefix}.{name}"),
            name,
            in_dim,
            out_dim,
            fan_in_fan_out: true,
            slot: &mut self.adapter,
        }
    }
}

impl QkvProj {
    /// The input projections as adapter targets; `prefix` is the attention's module path.
    pub fn targets<'a>(&'a mut self, prefix: &str, out: &mut Vec<Target<'a>>) {
        match self {
            QkvProj::Split {
                q_proj,
                k_proj,
                v_proj,
            } => {
                out.push(q_proj.target(prefix, "q_proj"));
                out.push(k_proj.target(prefix, "k_proj"));
                out.push(v_proj.target(prefix, "v_proj"));
            }
            QkvProj::Fused { c_attn, .. } => out.push(c_attn.target(prefix, "c_attn")),
        }
    }
}

impl Proj {
    /// The attention's output projection as an adapter target.
    pub fn targets<'a>(&'a mut self, prefix: &str, out: &mut Vec<Target<'a>>) {
        match self {
            Proj::Linear(l) => out.push(l.target(prefix, "o_proj")),
            Proj::Conv1D(c) => out.push(c.target(prefix, "c_proj")),
        }
    }
}

impl Mlp {
    /// The MLP's projections as adapter targets; `prefix` is the MLP's module path.
    pub fn targets<'a>(&'a mut self, prefix: &str, out: &mut Vec<Target<'a>>) {
        match self {
            Mlp::SwiGlu {
                gate_proj,
                up_proj,
                down_proj,
            } => {
                out.push(gate_proj.target(prefix, "gate_proj"));
                out.push(up_proj.target(prefix, "up_proj"));
                out.push(down_proj.target(prefix, "down_proj"));
            }
            Mlp::Gelu { c_fc, c_proj, .. } => {
                out.push(c_fc.target(prefix, "c_fc"));
                out.push(c_proj.target(prefix, "c_proj"));
            }
        }
    }
}
