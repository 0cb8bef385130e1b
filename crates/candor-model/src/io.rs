//! Weights in and out of checkpoint directories, by Hugging Face tensor name.
//!
//! candle's `VarMap::load` fails on any variable missing from a file and on dtype
//! mismatches, and cannot start a score head from an `lm` checkpoint. So: index the
//! file(s) (each tensor's name, dtype, shape and byte range), build the model, and as it
//! asks for each variable read that one tensor from its file into the variable's own
//! buffer (converted to f32), its shape checked, initialising only the variables the
//! caller allows to be new (a fresh head). The files are read with plain reads, not
//! memory-mapped, and no tensor is read twice, so loading holds the weights once: the
//! peak of a load is the model's own size, not twice it (mapped file pages count as
//! resident memory while the copies are made).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use candor_core::rng::Rng;

use crate::config::ModelConfig;
use crate::error::{file_err, Error, Result};
use crate::model::Model;
use crate::Head;

/// A checkpoint's tensors, by the name in its file(s), and the file each came from (for
/// error messages): held in memory (`tensors`: [`read_weights`], an adapter merged into
/// its base), or left in their files (`open_weights`) until a model takes them.
pub struct Weights {
    pub tensors: HashMap<String, Tensor>,
    pub source: HashMap<String, PathBuf>,
    pub dir: PathBuf,
    /// Tensors still in their files, read when a model takes them.
    stored: HashMap<String, Stored>,
}

/// Where a tensor lies in a safetensors file.
struct Stored {
    file: Arc<File>,
    path: PathBuf,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte offset in the file, and length.
    offset: u64,
    len: usize,
}

impl Weights {
    /// Every tensor's name as its file spells it.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys().chain(self.stored.keys())
    }

    /// A tensor's shape, without reading it.
    pub fn dims(&self, name: &str) -> Option<&[usize]> {
        match self.tensors.get(name) {
            Some(t) => Some(t.dims()),
            None => self.stored.get(name).map(|s| s.shape.as_slice()),
        }
    }

    /// The file a tensor came from (the directory when unknown).
    fn file_of(&self, name: &str) -> PathBuf {
        self.source
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.dir.clone())
    }

    /// Tensor `name` as f32 on `device` (converted exactly as `to_dtype` does), then in
    /// `dtype`; a variable when `var` (f32). A stored f32 tensor is read straight into the
    /// buffer the returned tensor owns.
    fn load(&self, name: &str, dtype: DType, var: bool, device: &Device) -> Result<Tensor> {
        let t = match (self.tensors.get(name), self.stored.get(name)) {
            (Some(t), _) => {
                let t = t.to_dtype(DType::F32)?.to_device(device)?;
                if var {
                    // a copy: the in-memory tensor stays the caller's
                    return Ok(Var::from_tensor(&t)?.into_inner());
                }
                t
            }
            (None, Some(s)) if s.dtype == DType::F32 => {
                let n = s.len / 4;
                let mut v = vec![0f32; n];
                // SAFETY: the bytes of an f32 vector of n elements; every bit pattern is a
                // valid f32, and `read_at` fills all of them or fails
                let bytes =
                    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), s.len) };
                s.read_at(bytes)?;
                if cfg!(target_endian = "big") {
                    // safetensors stores little-endian
                    v.iter_mut()
                        .for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits())));
                }
                if var {
                    return Ok(Var::from_vec(v, s.shape.as_slice(), device)?.into_inner());
                }
                Tensor::from_vec(v, s.shape.as_slice(), device)?
            }
            (None, Some(s)) => {
                let mut bytes = vec![0u8; s.len];
                s.read_at(&mut bytes)?;
                let t = Tensor::from_raw_buffer(&bytes, s.dtype, &s.shape, &Device::Cpu)?;
                drop(bytes);
                let t = t.to_dtype(DType::F32)?.to_device(device)?;
                if var {
                    return Ok(Var::from_tensor(&t)?.into_inner());
                }
                t
            }
            (None, None) => return Err(Error::Msg(format!("no tensor `{name}`"))),
        };
        Ok(t.to_dtype(dtype)?)
    }
}

impl Stored {
    /// Read the tensor's bytes into `buf` (`len` bytes).
    fn read_at(&self, buf: &mut [u8]) -> Result<()> {
        let mut f: &File = &self.file;
        f.seek(SeekFrom::Start(self.offset))
            .and_then(|_| f.read_exact(buf))
            .map_err(|e| file_err(&self.path, format!("cannot read: {e}")))
    }
}

/// The safetensors file(s) of a checkpoint directory: `model.safetensors`, or the shards
/// `model.safetensors.index.json` names.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() {
        Ok(vec![single])
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
        Ok(files)
    } else if [
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "model.bin",
    ]
    .iter()
    .any(|f| dir.join(f).is_file())
    {
        Err(file_err(
            dir,
            "has PyTorch pickle weights (pytorch_model.bin) but no model.safetensors: candor reads safetensors only; \
             convert with transformers (`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`)",
        ))
    } else {
        Err(file_err(
            dir,
            "no model.safetensors (or model.safetensors.index.json) in this directory",
        ))
    }
}

/// The tensors of one safetensors file, from its header (an 8-byte little-endian length,
/// then a JSON object `name → {dtype, shape, data_offsets}` and the data), without reading
/// the data: the `safetensors` crate's [`Metadata`](safetensors::tensor::Metadata) parses
/// and checks the header (offsets in order, without gaps, each tensor's length its
/// shape's); the data must end at the file's end and every tensor be a float one.
fn index_file(path: &Path) -> Result<Vec<(String, Stored)>> {
    use safetensors::Dtype;
    let bad = |msg: String| file_err(path, format!("not a valid safetensors file: {msg}"));
    let mut f = File::open(path).map_err(|e| file_err(path, format!("cannot open: {e}")))?;
    let size = f
        .metadata()
        .map_err(|e| file_err(path, format!("cannot read: {e}")))?
        .len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > size {
        return Err(bad(format!(
            "header length {n} does not fit the file ({size} bytes)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| bad(format!("header: {e}")))?;
    let metadata: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let data_start = 8 + n;
    let data_len = size - data_start;
    if metadata.data_len() as u64 != data_len {
        return Err(bad(format!(
            "the header describes {} bytes of data, the file holds {data_len}",
            metadata.data_len()
        )));
    }
    let file = Arc::new(f);
    let mut out = vec![];
    // in offset order: the data is the tensors back to back
    for name in metadata.offset_keys() {
        let info = metadata.info(&name).expect("a name offset_keys gave");
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(file_err(
                    path,
                    format!("tensor `{name}` has dtype {other:?}, expected a float type (F32, BF16, F16 or F64)"),
                ))
            }
        };
        let (begin, end) = info.data_offsets;
        out.push((
            name,
            Stored {
                file: file.clone(),
                path: path.to_path_buf(),
                dtype,
                shape: info.shape.clone(),
                offset: data_start + begin as u64,
                len: end - begin,
            },
        ));
    }
    Ok(out)
}

/// Index `model.safetensors` (or the shards `model.safetensors.index.json` names) without
/// reading the tensors: a model built from the result reads each from its file as it takes
/// it. For a PEFT adapter directory, its base's weights with the adapter merged in (in
/// memory).
pub fn open_weights(dir: &Path, device: &Device) -> Result<Weights> {
    if crate::lora::is_adapter_dir(dir) {
        return crate::lora::merged_weights(dir, device);
    }
    let mut stored = HashMap::new();
    let mut source = HashMap::new();
    for file in weight_files(dir)? {
        for (name, s) in index_file(&file)? {
            source.insert(name.clone(), file.clone());
            stored.insert(name, s);
        }
    }
    Ok(Weights {
        tensors: HashMap::new(),
        source,
        dir: dir.to_path_buf(),
        stored,
    })
}

/// Read `model.safetensors`, or the shards named by `model.safetensors.index.json`, into
/// memory, each tensor in its file's dtype on `device`; for a PEFT adapter directory, its
/// base's weights with the adapter merged in.
pub fn read_weights(dir: &Path, device: &Device) -> Result<Weights> {
    if crate::lora::is_adapter_dir(dir) {
        return crate::lora::merged_weights(dir, device);
    }
    let mut weights = open_weights(dir, device)?;
    for (name, s) in std::mem::take(&mut weights.stored) {
        let mut bytes = vec![0u8; s.len];
        s.read_at(&mut bytes)?;
        let t = Tensor::from_raw_buffer(&bytes, s.dtype, &s.shape, device)
            .map_err(|e| file_err(&s.path, format!("tensor `{name}`: {e}")))?;
        weights.tensors.insert(name, t);
    }
    Ok(weights)
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
/// With `weights`, every variable is read from them except those in `may_be_new`, which
/// are initialised when absent. Without, everything is initialised from `rng`.
pub fn build_trainable(
    config: &ModelConfig,
    head: Head,
    weights: Option<&Weights>,
    may_be_new: &[&str],
    rng: &mut Rng,
    device: &Device,
) -> Result<(Model, VarMap)> {
    let Some(weights) = weights else {
        return build_initialised(config, head, rng, device);
    };
    let (model, tensors) = build_from(config, head, weights, may_be_new, None, rng, device)?;
    let varmap = VarMap::new();
    {
        let mut vars = varmap.data().lock().unwrap();
        for (name, t) in tensors {
            // a variable already (read as one): no copy
            vars.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok((model, varmap))
}

/// Every variable initialised from `rng` ([`init_tensor`]), in name order.
fn build_initialised(
    config: &ModelConfig,
    head: Head,
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
    for (name, var) in &vars {
        let shape = var.shape().dims().to_vec();
        var.set(&init_tensor(
            name,
            &shape,
            config.num_hidden_layers,
            rng,
            device,
        )?)?;
    }
    Ok((model, varmap))
}

/// Build `config`'s model on `weights`, each tensor read as the model takes it: variables
/// (f32) when `frozen` is `None`, else plain tensors in that dtype. Returns the model and
/// its tensors by the model's names. The checks, in this order: a tensor of the wrong
/// shape (the first by name), tensors the model needs that the weights lack (and
/// `may_be_new` does not allow to be new: those are initialised from `rng`), tensors of
/// the weights the model does not use.
fn build_from(
    config: &ModelConfig,
    head: Head,
    weights: &Weights,
    may_be_new: &[&str],
    frozen: Option<DType>,
    rng: &mut Rng,
    device: &Device,
) -> Result<(Model, BTreeMap<String, Tensor>)> {
    let loader = Loader {
        weights,
        file_names: weights
            .names()
            .map(|k| (canonical_name(k, config), k))
            .collect(),
        may_be_new,
        n_layers: config.num_hidden_layers,
        frozen,
        taken: Mutex::new(Taken {
            rng,
            tensors: BTreeMap::new(),
            bad_shape: BTreeMap::new(),
            missing: vec![],
            failed: None,
        }),
    };
    let dtype = frozen.unwrap_or(DType::F32);
    let built = Model::new(
        config,
        head,
        VarBuilder::from_backend(Box::new(&loader), dtype, device.clone()),
    );
    let taken = loader.taken.into_inner().unwrap();
    if let Some(e) = taken.failed {
        return Err(e);
    }
    if let Some((_, e)) = taken.bad_shape.into_iter().next() {
        return Err(e);
    }
    let model = built?;
    let mut missing = taken.missing;
    if !missing.is_empty() {
        missing.sort();
        let more = if missing.len() > 3 {
            format!(" and {} more", missing.len() - 3)
        } else {
            String::new()
        };
        return Err(file_err(
            &weights.dir,
            format!(
                "weights are missing tensor(s) {}{more} that config.json requires",
                quote_list(&missing[..missing.len().min(3)])
            ),
        ));
    }
    let mut unused: Vec<&String> = weights
        .names()
        .filter(|k| !taken.tensors.contains_key(&canonical_name(k, config)) && !ignorable(k, head))
        .collect();
    unused.sort();
    if let Some(first) = unused.first() {
        return Err(file_err(
            &weights.file_of(first),
            format!("unexpected tensor `{first}` ({} unused in all): the weights do not match config.json", unused.len()),
        ));
    }
    Ok((model, taken.tensors))
}

/// The `VarBuilder` backend of [`build_from`]: hands `Model::new` each tensor as it asks,
/// read from the weights then, and notes what did not fit instead of failing at once (so
/// the error names the first bad tensor by name, whatever the order the model asks in).
struct Loader<'a> {
    weights: &'a Weights,
    /// canonical name → name in the weights
    file_names: HashMap<String, &'a String>,
    may_be_new: &'a [&'a str],
    n_layers: usize,
    /// `None`: variables (f32); else plain tensors in this dtype.
    frozen: Option<DType>,
    taken: Mutex<Taken<'a>>,
}

struct Taken<'a> {
    rng: &'a mut Rng,
    tensors: BTreeMap<String, Tensor>,
    bad_shape: BTreeMap<String, Error>,
    missing: Vec<String>,
    failed: Option<Error>,
}

impl Loader<'_> {
    fn take(&self, shape: &[usize], name: &str, device: &Device) -> Result<Tensor> {
        let mut taken = self.taken.lock().unwrap();
        if let Some(t) = taken.tensors.get(name) {
            return Ok(t.clone());
        }
        let dtype = self.frozen.unwrap_or(DType::F32);
        let var = self.frozen.is_none();
        let t = match self.file_names.get(name) {
            Some(stored) => {
                let dims = self.weights.dims(stored).unwrap_or_default();
                if dims != shape {
                    let e = file_err(
                        &self.weights.file_of(stored),
                        format!(
                            "tensor `{stored}` has shape {dims:?}, expected {shape:?} from config.json"
                        ),
                    );
                    taken.bad_shape.insert(name.to_string(), e);
                    // a stand-in so the model's construction goes on to the other tensors
                    return Ok(Tensor::zeros(shape, dtype, device)?);
                }
                match self.weights.load(stored, dtype, var, device) {
                    Ok(t) => t,
                    Err(e) => {
                        let msg = e.to_string();
                        taken.failed.get_or_insert(e);
                        return Err(Error::Msg(msg));
                    }
                }
            }
            None if self.may_be_new.contains(&name) => {
                let t = init_tensor(name, shape, self.n_layers, &mut *taken.rng, device)?;
                if var {
                    Var::from_tensor(&t)?.into_inner()
                } else {
                    t.to_dtype(dtype)?
                }
            }
            None => {
                taken.missing.push(name.to_string());
                return Ok(Tensor::zeros(shape, dtype, device)?);
            }
        };
        taken.tensors.insert(name.to_string(), t.clone());
        Ok(t)
    }
}

impl SimpleBackend for &Loader<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self
            .take(s.dims(), name, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let shape = self
            .file_names
            .get(name)
            .and_then(|k| self.weights.dims(k))
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{name}`")))?
            .to_vec();
        self.get(
            Shape::from(shape),
            name,
            candle_nn::Init::Const(0.0),
            dtype,
            dev,
        )
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.file_names.contains_key(name)
    }
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
    let (model, _) = build_from(
        config,
        head,
        weights,
        &[],
        Some(DType::F32),
        &mut Rng::new(0),
        device,
    )?;
    Ok(model)
}

/// The tensors of `config`'s model read from `weights` (no gradients tracked) in `dtype`,
/// by the model's names: each read once (as f32, then cast); those in `may_be_new` that
/// the weights lack initialised from `rng`. The frozen base of a LoRA run.
pub fn frozen_tensors(
    config: &ModelConfig,
    head: Head,
    weights: &Weights,
    may_be_new: &[&str],
    dtype: DType,
    rng: &mut Rng,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let (_, tensors) = build_from(config, head, weights, may_be_new, Some(dtype), rng, device)?;
    Ok(tensors.into_iter().collect())
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
    let weights = open_weights(dir, device)?;
    let may_be_new = if config.head() == head {
        vec![]
    } else {
        head_var_names(head)
    };
    build_trainable(&config, head, Some(&weights), &may_be_new, rng, device)
}

/// Load a checkpoint frozen, with the head its config names.
pub fn load_frozen(dir: &Path, device: &Device) -> Result<Model> {
    load_frozen_as(dir, DType::F32, device)
}

/// Load a checkpoint frozen in `dtype` (each weight read as f32, then cast: bf16 halves
/// the model), with the head its config names.
pub fn load_frozen_as(dir: &Path, dtype: DType, device: &Device) -> Result<Model> {
    let config = read_config(dir)?;
    let weights = open_weights(dir, device)?;
    let head = config.head();
    let (model, _) = build_from(
        &config,
        head,
        &weights,
        &[],
        Some(dtype),
        &mut Rng::new(0),
        device,
    )?;
    Ok(model)
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Msg(e.to_string())
    }
}
