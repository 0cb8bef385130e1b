//! Weights in and out of checkpoint directories, by Hugging Face tensor name.
//!
//! candle's `VarMap::load` fails on any variable missing from a file and on dtype
//! mismatches, and cannot start a score head from an `lm` checkpoint. So: read the file(s)
//! into a name → tensor map (any float dtype, converted), build the model's variables, copy
//! each tensor into its variable with its shape checked, and initialise only the variables
//! the caller allows to be new (a fresh head).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candor_core::rng::Rng;

use crate::config::ModelConfig;
use crate::error::{file_err, Error, Result};
use crate::model::Model;
use crate::Head;

/// Tensors read from a checkpoint, and the file each came from (for error messages).
pub struct Weights {
    pub tensors: HashMap<String, Tensor>,
    pub source: HashMap<String, PathBuf>,
    pub dir: PathBuf,
}

/// Read `model.safetensors`, or the shards named by `model.safetensors.index.json`; for a
/// PEFT adapter directory, its base's weights with the adapter merged in.
pub fn read_weights(dir: &Path, device: &Device) -> Result<Weights> {
    if crate::lora::is_adapter_dir(dir) {
        return crate::lora::merged_weights(dir, device);
    }
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| file_err(&index, format!("cannot read: {e}")))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| file_err(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| file_err(&index, "`weight_map` is missing or not an object"))?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        shards.sort();
        shards.dedup();
        let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(file_err(
                &index,
                format!("names shard `{}`, which is missing", missing.display()),
            ));
        }
        files
    } else if [
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "model.bin",
    ]
    .iter()
    .any(|f| dir.join(f).is_file())
    {
        return Err(file_err(
            dir,
            "has PyTorch pickle weights (pytorch_model.bin) but no model.safetensors: candor reads safetensors only; \
             convert with transformers (`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`)",
        ));
    } else {
        return Err(file_err(
            dir,
            "no model.safetensors (or model.safetensors.index.json) in this directory",
        ));
    };
    let mut tensors = HashMap::new();
    let mut source = HashMap::new();
    for file in &files {
        // SAFETY: the file is mapped read-only and only read while mapped.
        let st = unsafe { MmapedSafetensors::new(file) }
            .map_err(|e| file_err(file, format!("not a valid safetensors file: {e}")))?;
        for (name, _) in st.tensors() {
            let t = st
                .load(&name, device)
                .map_err(|e| file_err(file, format!("tensor `{name}`: {e}")))?;
            if !t.dtype().is_float() {
                return Err(file_err(
                    file,
                    format!(
                        "tensor `{name}` has dtype {:?}, expected a float type",
                        t.dtype()
                    ),
                ));
            }
            source.insert(name.clone(), file.clone());
            tensors.insert(name, t);
        }
    }
    Ok(Weights {
        tensors,
        source,
        dir: dir.to_path_buf(),
    })
}

/// Tensors a checkpoint may carry that this model does not use: rotary frequency buffers,
/// GPT-2's causal-mask buffers (`attn.bias`, `attn.masked_bias`), the other head.
fn ignorable(name: &str, head: Head) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
        || (head == Head::Score && name == "lm_head.weight")
        || (head == Head::Lm && name == "score.weight")
}

/// A tensor's name as the model spells it: base-model checkpoints (`LlamaModel`,
/// `GPT2Model`, the original GPT-2 files) store the backbone without the `model.` /
/// `transformer.` prefix.
pub(crate) fn canonical_name(name: &str, config: &ModelConfig) -> String {
    let prefix = crate::layers::names(config.arch()).prefix;
    let head =
        head_var_names(Head::Lm).contains(&name) || head_var_names(Head::Score).contains(&name);
    if head || name.starts_with(&format!("{prefix}.")) {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Names of the variables that make up a head (allowed to be new when starting a
/// reward model or critic from an `lm` checkpoint).
pub fn head_var_names(head: Head) -> Vec<&'static str> {
    match head {
        Head::Lm => vec!["lm_head.weight"],
        Head::Score => vec!["score.weight"],
    }
}

/// Deterministic initialisation (GPT-2 / Llama style): N(0, 0.02) for matrices, scaled by
/// 1/√(2·layers) on the projections that write into the residual stream; norms 1; biases 0.
fn init_tensor(
    name: &str,
    shape: &[usize],
    n_layers: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let is_norm = name.ends_with("norm.weight") || name.contains(".ln_");
    let data: Vec<f32> = if is_norm && name.ends_with(".weight") {
        vec![1.0; n]
    } else if name.ends_with(".bias") {
        vec![0.0; n]
    } else {
        let residual = ["o_proj.weight", "down_proj.weight", "c_proj.weight"];
        let std = if residual.iter().any(|r| name.ends_with(r)) {
            0.02 / (2.0 * n_layers as f64).sqrt()
        } else {
            0.02
        };
        (0..n).map(|_| (rng.normal() * std) as f32).collect()
    };
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Build a model whose parameters are trainable `Var`s.
///
/// With `weights`, every variable is copied from them except those in `may_be_new`, which
/// are initialised when absent. Without, everything is initialised from `rng`.
pub fn build_trainable(
    config: &ModelConfig,
    head: Head,
    weights: Option<&Weights>,
    may_be_new: &[&str],
    rng: &mut Rng,
    device: &Device,
) -> Result<(Model, VarMap)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = Model::new(config, head, vb)?;
    let vars: BTreeMap<String, Var> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // canonical name -> name in the file
    let file_names: HashMap<String, &String> = weights
        .map(|w| {
            w.tensors
                .keys()
                .map(|k| (canonical_name(k, config), k))
                .collect()
        })
        .unwrap_or_default();
    let lookup = |name: &str| {
        weights
            .zip(file_names.get(name))
            .and_then(|(w, k)| w.tensors.get(*k))
    };
    let mut missing = vec![];
    for (name, var) in &vars {
        let shape = var.shape().dims().to_vec();
        match lookup(name) {
            Some(t) => {
                if t.dims() != shape.as_slice() {
                    let w = weights.unwrap();
                    let stored = file_names[name.as_str()];
                    let file = w
                        .source
                        .get(stored)
                        .cloned()
                        .unwrap_or_else(|| w.dir.clone());
                    return Err(file_err(
                        &file,
                        format!(
                            "tensor `{stored}` has shape {:?}, expected {:?} from config.json",
                            t.dims(),
                            shape
                        ),
                    ));
                }
                var.set(&t.to_dtype(DType::F32)?.to_device(device)?)?;
            }
            None if weights.is_some() && !may_be_new.contains(&name.as_str()) => {
                missing.push(name.clone())
            }
            None => var.set(&init_tensor(
                name,
                &shape,
                config.num_hidden_layers,
                rng,
                device,
            )?)?,
        }
    }
    if let Some(w) = weights {
        if !missing.is_empty() {
            let more = if missing.len() > 3 {
                format!(" and {} more", missing.len() - 3)
            } else {
                String::new()
            };
            return Err(file_err(
                &w.dir,
                format!(
                    "weights are missing tensor(s) {}{more} that config.json requires",
                    quote_list(&missing[..missing.len().min(3)])
                ),
            ));
        }
        let mut unused: Vec<&String> = w
            .tensors
            .keys()
            .filter(|k| !vars.contains_key(&canonical_name(k, config)) && !ignorable(k, head))
            .collect();
        unused.sort();
        if let Some(first) = unused.first() {
            let file = w
                .source
                .get(*first)
                .cloned()
                .unwrap_or_else(|| w.dir.clone());
            return Err(file_err(
                &file,
                format!("unexpected tensor `{first}` ({} unused in all): the weights do not match config.json", unused.len()),
            ));
        }
    }
    Ok((model, varmap))
}

fn quote_list(xs: &[String]) -> String {
    xs.iter()
        .map(|x| format!("`{x}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Build a model from plain tensors (no gradients tracked): reference and reward models.
pub fn build_frozen(
    config: &ModelConfig,
    head: Head,
    weights: &Weights,
    device: &Device,
) -> Result<Model> {
    let mut rng = Rng::new(0);
    let (_, varmap) = build_trainable(config, head, Some(weights), &[], &mut rng, device)?;
    frozen_copy(config, head, &varmap, device)
}

/// A gradient-free model sharing nothing with `varmap` (its values at this moment).
pub fn frozen_copy(
    config: &ModelConfig,
    head: Head,
    varmap: &VarMap,
    device: &Device,
) -> Result<Model> {
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
        .collect::<Result<_>>()?;
    Model::new(
        config,
        head,
        VarBuilder::from_tensors(tensors, DType::F32, device),
    )
}

/// Write `config.json` (with the head's architecture keys) and `model.safetensors`.
pub fn save_model(dir: &Path, config: &ModelConfig, head: Head, varmap: &VarMap) -> Result<()> {
    let mut config = config.clone();
    config.set_head(head);
    config.torch_dtype = "float32".into();
    config.write(&dir.join("config.json"))?;
    save_varmap(varmap, &dir.join("model.safetensors"))
}

pub fn save_varmap(varmap: &VarMap, path: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            Ok((
                k.clone(),
                v.as_tensor()
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?,
            ))
        })
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&tensors, path)
        .map_err(|e| file_err(path, format!("cannot write: {e}")))?;
    // safetensors writes through a private temporary (mode 0600); give the weights the mode
    // every other file of the checkpoint has (0666 less the umask)
    candor_core::output::set_default_mode(path)?;
    Ok(())
}

/// Read a checkpoint's `config.json` (a PEFT adapter directory's: its base's).
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    if crate::lora::is_adapter_dir(dir) {
        return crate::lora::read_config(dir);
    }
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(file_err(dir, "not a checkpoint: config.json is missing"));
    }
    ModelConfig::read(&path)
}

/// Load a checkpoint for training with the given head. Starting a `score` head from an
/// `lm` checkpoint initialises the new head from `rng`.
pub fn load_trainable(
    dir: &Path,
    head: Head,
    rng: &mut Rng,
    device: &Device,
) -> Result<(Model, VarMap)> {
    let config = read_config(dir)?;
    let weights = read_weights(dir, device)?;
    let may_be_new = if config.head() == head {
        vec![]
    } else {
        head_var_names(head)
    };
    build_trainable(&config, head, Some(&weights), &may_be_new, rng, device)
}

/// Load a checkpoint frozen, with the head its config names.
pub fn load_frozen(dir: &Path, device: &Device) -> Result<Model> {
    let config = read_config(dir)?;
    let weights = read_weights(dir, device)?;
    build_frozen(&config, config.head(), &weights, device)
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Msg(e.to_string())
    }
}
