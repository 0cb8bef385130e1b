//! LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") in
//! PEFT's format.
//!
//! A target projection `W` (frozen) gains a trainable low-rank term:
//! `y = W·x + (alpha / rank) · B·A·dropout(x)`, with `A` (rank, in) initialised
//! Kaiming-uniform (a = √5, i.e. U(−1/√in, 1/√in), as PEFT and `nn.Linear` do) and `B`
//! (out, rank) zero, so training starts from the base model exactly. The base path keeps
//! the fused CPU kernels; the adapter's term is composed from candle ops (matmul, affine,
//! cast), which all record a backward.
//!
//! On disk an adapter is PEFT's directory: `adapter_config.json` (`peft_type: LORA`, `r`,
//! `lora_alpha`, `target_modules`, `base_model_name_or_path`, ...) and
//! `adapter_model.safetensors` with tensors named
//! `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, plus
//! `base_model.model.score.weight` for a reward model's head (`modules_to_save`). Loading a
//! directory like that anywhere a model is taken gives the base with the adapter merged in
//! ([`merged_weights`]); a LoRA training run builds the base frozen and the adapters as
//! trainable variables ([`load_trainable`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candor_core::rng::Rng;
use serde::{Deserialize, Serialize};

use crate::config::{Arch, ModelConfig};
use crate::error::{file_err, Error, Result};
use crate::io::{self, Weights};
use crate::model::Model;
use crate::Head;

/// The adapter's config file in a PEFT adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's weights in a PEFT adapter directory.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's prefix of every tensor name it saves (`PeftModel.base_model.model`).
const PEFT_PREFIX: &str = "base_model.model.";

/// Projections of the Llama family, as PEFT's `target_modules` name them.
pub const LLAMA_TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
/// GPT-2's projections (Conv1D): `c_attn` (fused q/k/v), `c_proj` (attention output and
/// MLP output), `c_fc`.
pub const GPT2_TARGETS: &[&str] = &["c_attn", "c_proj", "c_fc"];
/// PEFT's shorthand for every linear projection except the output head.
pub const ALL_LINEAR: &str = "all-linear";

/// `train.lora`: train low-rank adapters on a frozen base instead of every weight.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of each adapter, the inner size of B·A (PEFT `r`). Default 8.
    pub rank: usize,
    /// Scale numerator: the adapter's term is multiplied by `alpha / rank` (PEFT
    /// `lora_alpha`). Default 16.
    pub alpha: f64,
    /// Dropout on the adapter's input while training (PEFT `lora_dropout`). Default 0.
    pub dropout: f64,
    /// Projections to adapt, by PEFT's names: `q_proj`, `k_proj`, `v_proj`, `o_proj`,
    /// `gate_proj`, `up_proj`, `down_proj` (Llama family), `c_attn`, `c_proj`, `c_fc`
    /// (GPT-2), or `all-linear` (every projection but the head) (PEFT `target_modules`).
    /// Default: empty = PEFT's default for the architecture, `q_proj` and `v_proj` (Llama
    /// family) or `c_attn` (GPT-2).
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec![],
        }
    }
}

impl LoraConfig {
    /// Check ranges and names; `origin` prefixes errors (`configs/sft.yaml: train.lora`).
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::Msg(format!("{origin}.{key}: {msg}")));
        if self.rank == 0 {
            return bad("rank", "must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad("alpha", "must be a positive number".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", "must be in [0, 1)".into());
        }
        for name in &self.target_modules {
            let known = name == ALL_LINEAR
                || LLAMA_TARGETS.contains(&name.as_str())
                || GPT2_TARGETS.contains(&name.as_str());
            if !known {
                return bad(
                    "target_modules",
                    format!(
                        "unknown module `{name}`: expected {}, {} (GPT-2) or {ALL_LINEAR}",
                        LLAMA_TARGETS.join(", "),
                        GPT2_TARGETS.join(", ")
                    ),
                );
            }
        }
        Ok(())
    }

    /// The projection names this config adapts on an architecture (PEFT's spelling).
    pub fn resolved_targets(&self, arch: Arch) -> Result<Vec<&'static str>> {
        let family = match arch {
            Arch::Llama => LLAMA_TARGETS,
            Arch::Gpt2 => GPT2_TARGETS,
        };
        if self.target_modules.is_empty() {
            return Ok(match arch {
                Arch::Llama => vec!["q_proj", "v_proj"],
                Arch::Gpt2 => vec!["c_attn"],
            });
        }
        if self.target_modules.iter().any(|t| t == ALL_LINEAR) {
            return Ok(family.to_vec());
        }
        self.target_modules
            .iter()
            .map(|t| {
                family.iter().copied().find(|f| f == t).ok_or_else(|| {
                    Error::Msg(format!(
                        "lora.target_modules: `{t}` is not a projection of this {arch:?}-family model (it has {})",
                        family.join(", ")
                    ))
                })
            })
            .collect()
    }

    /// The factor of the adapter's term, `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// What all adapters of one model share: the on/off switch (the frozen reference is the
/// base with adapters off) and dropout's training flag and random stream.
pub struct LoraState {
    enabled: AtomicBool,
    training: AtomicBool,
    rng: Mutex<Rng>,
}

impl LoraState {
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(LoraState {
            enabled: AtomicBool::new(true),
            training: AtomicBool::new(false),
            rng: Mutex::new(Rng::derive(seed, "lora-dropout")),
        })
    }
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }
}

/// One projection's adapter: `A` (rank, in), `B` (out, rank), the scale `alpha / rank`.
#[derive(Clone)]
pub struct Adapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
    pub state: Arc<LoraState>,
}

impl Adapter {
    /// `y + scale · B·A·dropout(x)` for x (..., in), y (..., out); computed in the
    /// adapter's dtype (f32 beside a bf16 base) and cast back to y's.
    pub fn add_to(&self, y: Tensor, x: &Tensor) -> Result<Tensor> {
        if !self.state.enabled() {
            return Ok(y);
        }
        let dims = x.dims().to_vec();
        let (in_dim, rows) = (dims[dims.len() - 1], x.elem_count() / dims[dims.len() - 1]);
        let x2 = x.reshape((rows, in_dim))?.to_dtype(self.a.dtype())?;
        let x2 = if self.dropout > 0.0 && self.state.training.load(Ordering::Relaxed) {
            self.dropout(&x2)?
        } else {
            x2
        };
        // x·Aᵀ·Bᵀ: the fused CPU matmul (with its hand backward) for f32, else candle's
        let (h, d) = if crate::fused::enabled(&x2) {
            let h = crate::fused::linear(&x2, &self.a)?; // (rows, rank)
            let d = crate::fused::linear(&h, &self.b)?; // (rows, out)
            (h, d)
        } else {
            let h = x2.matmul(&self.a.t()?)?;
            let d = h.matmul(&self.b.t()?)?;
            (h, d)
        };
        drop(h);
        let d = (d * self.scale)?;
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = d.dim(1)?;
        // the sum in the adapter's dtype, rounded once to the base's (no-ops when both f32)
        let dtype = y.dtype();
        let d = d.reshape(out_dims)?;
        Ok((y.to_dtype(d.dtype())? + d)?.to_dtype(dtype)?)
    }

    /// Whether the base product `x · weightᵀ` and this adapter's term may run as one
    /// [`fused::lora_linear`](crate::fused::lora_linear): the adapter is on, everything is
    /// f32 on the CPU, the base weight is frozen (the op gives it no gradient), and no
    /// dropout applies (the op feeds the same x to both terms).
    pub fn fusable(&self, x: &Tensor, weight: &Tensor) -> bool {
        self.state.enabled()
            && crate::fused::enabled(x)
            && crate::fused::enabled(weight)
            && crate::fused::enabled(&self.a)
            && !weight.track_op()
            && !(self.dropout > 0.0 && self.state.training.load(Ordering::Relaxed))
    }

    /// Inverted dropout with the shared seeded stream (reproducible for a given seed).
    fn dropout(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.dropout;
        let keep = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = {
            let mut rng = self.state.rng.lock().unwrap();
            (0..x.elem_count())
                .map(|_| if rng.uniform() < p { 0.0 } else { keep })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }
}

/// The trainable side of a LoRA run: the adapters' variables under PEFT's tensor names
/// (and a new score head's, `base_model.model.score.weight`), what they adapt, and the
/// base they adapt, as `adapter_config.json` records it.
pub struct Adapters {
    pub config: LoraConfig,
    /// PEFT's `base_model_name_or_path`: a directory, or `ORG/NAME` in the HF cache.
    pub base_model_name_or_path: String,
    pub head: Head,
    pub arch: Arch,
    /// The trainable variables, keyed by PEFT's tensor names.
    pub varmap: VarMap,
}

/// PEFT's name of an adapter tensor of the module at `path` (`lora_A` / `lora_B`).
pub fn peft_name(path: &str, which: &str) -> String {
    format!("{PEFT_PREFIX}{path}.{which}.weight")
}

/// PEFT's name of the score head a LoRA reward model trains in full (`modules_to_save`).
pub fn peft_score_name() -> String {
    format!("{PEFT_PREFIX}score.weight")
}

/// How `base_model_name_or_path` names a base given as a `--init` spec: `ORG/NAME` for
/// `hf:ORG/NAME` (PEFT resolves it on the hub or in the cache), else the directory,
/// absolute.
pub fn base_name(spec: &Path, resolved: &Path) -> String {
    match spec
        .to_str()
        .and_then(|s| s.strip_prefix(crate::hf::HF_PREFIX))
    {
        Some(repo) => repo.split('@').next().unwrap_or(repo).to_string(),
        None => std::fs::canonicalize(resolved)
            .unwrap_or_else(|_| resolved.to_path_buf())
            .display()
            .to_string(),
    }
}

/// Build a LoRA model for training: the checkpoint at `base_dir` (a full checkpoint, or
/// an adapter directory, whose adapter is then merged into the base) frozen in `dtype`
/// (f32, or bf16 to halve its memory) — its weights plain tensors, not variables — with
/// new f32 adapters on the projections `cfg` names (or
/// those of the adapter directory `resume`, to continue a run), and, for a score head,
/// the head as a trainable variable (from the base when it has one, else new).
#[allow(clippy::too_many_arguments)]
pub fn load_trainable(
    base_dir: &Path,
    base_model_name_or_path: String,
    head: Head,
    cfg: &LoraConfig,
    resume: Option<&Path>,
    dtype: DType,
    rng: &mut Rng,
    device: &Device,
) -> Result<(Model, Adapters)> {
    let config = io::read_config(base_dir)?;
    let weights = io::open_weights(base_dir, device)?;
    let may_be_new = if config.head() == head {
        vec![]
    } else {
        io::head_var_names(head)
    };
    // plain tensors (no gradient, not optimised), each read once and cast to `dtype`
    let tensors = io::frozen_tensors(&config, head, &weights, &may_be_new, dtype, rng, device)?;
    drop(weights);
    let resumed = resume
        .map(|dir| read_adapter_tensors(dir, device))
        .transpose()?;
    let varmap = VarMap::new();
    let score = match head {
        Head::Score => {
            let init = match &resumed {
                Some((file, t)) => take(t, file, &peft_score_name())?,
                None => tensors["score.weight"].copy()?,
            };
            let var = Var::from_tensor(&init.to_dtype(DType::F32)?)?;
            varmap
                .data()
                .lock()
                .unwrap()
                .insert(peft_score_name(), var.clone());
            Some(var)
        }
        Head::Lm => None,
    };
    let mut model = Model::new(
        &config,
        head,
        VarBuilder::from_tensors(tensors, dtype, device),
    )?;
    if let Some(var) = score {
        // the head trains in f32 whatever the base's dtype (never a stale cast of it)
        model.set_score_head(var.as_tensor().clone())?;
    }
    attach(
        &mut model,
        cfg,
        &varmap,
        resumed.as_ref().map(|(f, t)| (f.as_path(), t)),
        rng,
    )?;
    Ok((
        model,
        Adapters {
            config: cfg.clone(),
            base_model_name_or_path,
            head,
            arch: config.arch(),
            varmap,
        },
    ))
}

fn take(tensors: &HashMap<String, Tensor>, file: &Path, name: &str) -> Result<Tensor> {
    tensors
        .get(name)
        .cloned()
        .ok_or_else(|| file_err(file, format!("tensor `{name}` is missing")))
}

/// Attach adapters to `model`'s target projections as variables in `varmap` (PEFT
/// names): new (A Kaiming-uniform from `rng`, B zero), or from `resume` (file, tensors).
pub fn attach(
    model: &mut Model,
    cfg: &LoraConfig,
    varmap: &VarMap,
    resume: Option<(&Path, &HashMap<String, Tensor>)>,
    rng: &mut Rng,
) -> Result<()> {
    let targets = cfg.resolved_targets(model.config.arch())?;
    let state = LoraState::new(rng.next_u64());
    let (r, scale) = (cfg.rank, cfg.scale());
    let device = model.device().clone();
    // f32 adapters (beside an f32 or bf16 base); f64 beside an f64 base (gradient checks)
    let dtype = if model.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mut attached = 0;
    for t in model.adapter_targets() {
        if !targets.contains(&t.name) {
            continue;
        }
        let (a_name, b_name) = (peft_name(&t.path, "lora_A"), peft_name(&t.path, "lora_B"));
        let (a, b) = match resume {
            Some((file, tensors)) => {
                let (a, b) = (take(tensors, file, &a_name)?, take(tensors, file, &b_name)?);
                for (name, x, want) in [(&a_name, &a, [r, t.in_dim]), (&b_name, &b, [t.out_dim, r])]
                {
                    if x.dims() != want {
                        return Err(file_err(
                            file,
                            format!(
                                "tensor `{name}` has shape {:?}, expected {want:?}",
                                x.dims()
                            ),
                        ));
                    }
                }
                (a.to_dtype(dtype)?, b.to_dtype(dtype)?)
            }
            None => {
                // kaiming_uniform_(a=√5): bound = gain·√(3/fan_in) = 1/√in
                let bound = 1.0 / (t.in_dim as f64).sqrt();
                let a: Vec<f32> = (0..r * t.in_dim)
                    .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                    .collect();
                (
                    Tensor::from_vec(a, (r, t.in_dim), &device)?.to_dtype(dtype)?,
                    Tensor::zeros((t.out_dim, r), dtype, &device)?,
                )
            }
        };
        let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        *t.slot = Some(Adapter {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale,
            dropout: cfg.dropout,
            state: state.clone(),
        });
        let mut map = varmap.data().lock().unwrap();
        map.insert(a_name, a);
        map.insert(b_name, b);
        attached += 1;
    }
    if attached == 0 {
        return Err(Error::Msg(format!(
            "lora.target_modules: no projection of this model matches {targets:?}"
        )));
    }
    Ok(())
}

/// Write `adapter_config.json` and `adapter_model.safetensors` (f32) into `dir`, as PEFT's
/// `save_pretrained` does, so `PeftModel.from_pretrained(base, dir)` loads them.
pub fn save_adapter(dir: &Path, adapters: &Adapters) -> Result<()> {
    let cfg = &adapters.config;
    let targets = cfg.resolved_targets(adapters.arch)?;
    let score = adapters.head == Head::Score;
    // an integral alpha is written as an integer, as PEFT's own configs have it
    let alpha = if cfg.alpha.fract() == 0.0 {
        serde_json::json!(cfg.alpha as i64)
    } else {
        serde_json::json!(cfg.alpha)
    };
    let json = serde_json::json!({
        "peft_type": "LORA",
        "task_type": if score { "SEQ_CLS" } else { "CAUSAL_LM" },
        "base_model_name_or_path": adapters.base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "modules_to_save": if score { serde_json::json!(["score"]) } else { serde_json::Value::Null },
        "fan_in_fan_out": adapters.arch == Arch::Gpt2,
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    });
    let path = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&json).expect("json serialises") + "\n";
    std::fs::write(&path, text).map_err(|e| file_err(&path, format!("cannot write: {e}")))?;
    io::save_varmap(&adapters.varmap, &dir.join(ADAPTER_WEIGHTS))
}

/// Whether `dir` is a PEFT adapter directory.
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file()
}

/// The parts of `adapter_config.json` candor reads.
#[derive(Debug, Clone)]
pub struct AdapterFile {
    pub base_model_name_or_path: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub task_type: Option<String>,
    pub target_modules: Vec<String>,
}

impl AdapterFile {
    /// The factor of the adapter's term: `lora_alpha / r`, or `/ √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// Read and check `adapter_config.json`: a LoRA adapter candor can apply (no DoRA, no
/// per-module rank or alpha patterns, no trained biases).
pub fn read_adapter_config(dir: &Path) -> Result<AdapterFile> {
    use serde_json::Value;
    let path = dir.join(ADAPTER_CONFIG);
    let text =
        std::fs::read_to_string(&path).map_err(|e| file_err(&path, format!("cannot read: {e}")))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| file_err(&path, format!("not valid JSON: {e}")))?;
    let bad = |msg: String| Err(file_err(&path, msg));
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
    if peft_type != "LORA" {
        return bad(format!(
            "`peft_type` is `{peft_type}`: candor reads LoRA adapters only (LORA)"
        ));
    }
    let Some(base) = v.get("base_model_name_or_path").and_then(Value::as_str) else {
        return bad("`base_model_name_or_path` is missing: the adapter must name its base model (a directory or ORG/NAME)".into());
    };
    let Some(r) = v.get("r").and_then(Value::as_u64).filter(|&r| r > 0) else {
        return bad("`r` is missing or not a positive integer".into());
    };
    let lora_alpha = v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
    let truthy = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    if truthy("use_dora") {
        return bad("`use_dora` is true: candor applies plain LoRA, not DoRA".into());
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if v.get(key)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return bad(format!(
                "`{key}` is not empty: candor applies one rank and alpha to every module"
            ));
        }
    }
    if truthy("lora_bias") {
        return bad("`lora_bias` is true: candor applies adapters without a bias on B".into());
    }
    let bias = v.get("bias").and_then(Value::as_str).unwrap_or("none");
    if bias != "none" {
        return bad(format!(
            "`bias` is `{bias}`: candor applies adapters without trained biases (none)"
        ));
    }
    let target_modules = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => vec![],
    };
    Ok(AdapterFile {
        base_model_name_or_path: base.to_string(),
        r: r as usize,
        lora_alpha,
        use_rslora: truthy("use_rslora"),
        task_type: v.get("task_type").and_then(Value::as_str).map(String::from),
        target_modules,
    })
}

/// The directory of an adapter's base model: `base_model_name_or_path` as a directory
/// (as given, or relative to the adapter), else `ORG/NAME` in the local Hugging Face cache.
pub fn base_dir(dir: &Path) -> Result<PathBuf> {
    let file = read_adapter_config(dir)?;
    let name = &file.base_model_name_or_path;
    for candidate in [PathBuf::from(name), dir.join(name)] {
        if candidate.is_dir() && candidate != dir {
            return crate::hf::resolve_model_dir(&candidate);
        }
    }
    let looks_like_repo = name.split('/').count() == 2 && !name.starts_with('.');
    if looks_like_repo {
        return crate::hf::resolve_model_dir(format!("{}{name}", crate::hf::HF_PREFIX)).map_err(
            |e| {
                file_err(
                    &dir.join(ADAPTER_CONFIG),
                    format!("base model `{name}`: {e}"),
                )
            },
        );
    }
    Err(file_err(
        &dir.join(ADAPTER_CONFIG),
        format!("base model `{name}` (base_model_name_or_path) is neither a directory nor ORG/NAME in the Hugging Face cache"),
    ))
}

/// The adapter directory's tensors, and the file they came from.
pub fn read_adapter_tensors(
    dir: &Path,
    device: &Device,
) -> Result<(PathBuf, HashMap<String, Tensor>)> {
    let file = dir.join(ADAPTER_WEIGHTS);
    if !file.is_file() {
        let msg = if dir.join("adapter_model.bin").is_file() {
            "missing: the adapter has PyTorch pickle weights (adapter_model.bin) only; candor reads safetensors (save with `safe_serialization=True`)"
        } else {
            "missing: an adapter directory holds adapter_config.json and adapter_model.safetensors"
        };
        return Err(file_err(&file, msg));
    }
    let tensors = candle_core::safetensors::load(&file, device)
        .map_err(|e| file_err(&file, format!("not a valid safetensors file: {e}")))?;
    Ok((file, tensors))
}

/// The model config of an adapter directory: its base's, with a score head when the
/// adapter is a sequence classifier's (`task_type: SEQ_CLS`).
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let file = read_adapter_config(dir)?;
    let mut config = io::read_config(&base_dir(dir)?)?;
    if file.task_type.as_deref() == Some("SEQ_CLS") {
        config.set_head(Head::Score);
    }
    Ok(config)
}

/// The weights of an adapter directory's model: its base's (read as any checkpoint, so a
/// base may itself be an adapter directory), each adapted weight `W` replaced by
/// `W + scale·B·A` (transposed for a weight stored (in, out)), and the modules PEFT saved
/// whole (`modules_to_save`: a score head) replacing the base's.
pub fn merged_weights(dir: &Path, device: &Device) -> Result<Weights> {
    let cfg = read_adapter_config(dir)?;
    let base = base_dir(dir)?;
    let config = io::read_config(&base)?;
    let mut weights = io::read_weights(&base, device)?;
    let (file, adapter) = read_adapter_tensors(dir, device)?;
    // canonical name -> name in the base's files
    let stored: HashMap<String, String> = weights
        .tensors
        .keys()
        .map(|k| (io::canonical_name(k, &config), k.clone()))
        .collect();
    let scale = cfg.scale();
    let mut names: Vec<&String> = adapter.keys().collect();
    names.sort();
    for name in names {
        let Some(rest) = name.strip_prefix(PEFT_PREFIX) else {
            return Err(file_err(
                &file,
                format!(
                    "unexpected tensor `{name}`: PEFT's tensor names start with `{PEFT_PREFIX}`"
                ),
            ));
        };
        if let Some(module) = rest.strip_suffix(".lora_B.weight") {
            if !adapter.contains_key(&peft_name(module, "lora_A")) {
                return Err(file_err(
                    &file,
                    format!("tensor `{name}` has no `lora_A` beside it"),
                ));
            }
            continue;
        }
        if let Some(module) = rest.strip_suffix(".lora_A.weight") {
            let b_name = peft_name(module, "lora_B");
            let b = take(&adapter, &file, &b_name)?;
            let a = &adapter[name];
            let target = format!("{module}.weight");
            let Some(key) = stored.get(&io::canonical_name(&target, &config)) else {
                return Err(file_err(
                    &file,
                    format!(
                        "tensor `{name}` adapts `{target}`, which the base model has no weight for"
                    ),
                ));
            };
            let w = weights.tensors[key].to_dtype(DType::F32)?;
            let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
            let delta = (b.matmul(&a).map_err(|e| {
                file_err(
                    &file,
                    format!("tensors `{b_name}` and `{name}` do not multiply: {e}"),
                )
            })? * scale)?;
            // GPT-2's Conv1D stores its weight (in, out): PEFT's fan_in_fan_out
            let delta = if config.arch() == Arch::Gpt2 {
                delta.t()?
            } else {
                delta
            };
            let merged = if w.dims() == delta.dims() {
                (w + delta)?
            } else {
                return Err(file_err(
                    &file,
                    format!(
                        "tensors `{b_name}`·`{name}` make shape {:?}, but `{target}` is {:?}",
                        delta.dims(),
                        w.dims()
                    ),
                ));
            };
            weights.tensors.insert(key.clone(), merged);
            continue;
        }
        if rest.contains(".lora_") || rest.contains("lora_magnitude_vector") {
            return Err(file_err(
                &file,
                format!("tensor `{name}`: candor applies LoRA adapters on linear projections only (lora_A / lora_B)"),
            ));
        }
        // a module saved whole (modules_to_save): replaces the base's, or adds a new head
        let canon = io::canonical_name(rest, &config);
        let key = stored.get(&canon).cloned().unwrap_or(canon);
        weights.tensors.insert(key.clone(), adapter[name].clone());
        weights.source.insert(key, file.clone());
    }
    weights.dir = dir.to_path_buf();
    Ok(weights)
}
