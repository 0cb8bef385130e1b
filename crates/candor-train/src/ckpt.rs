//! Writing a stage's checkpoint directory and reading back its resume state.
//!
//! ```text
//! <out>/config.json model.safetensors tokenizer.json tokenizer_config.json
//!       candor.json metrics.jsonl trainer/{trainer_state.json, optimizer.safetensors}
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use candor_core::checkpoint::{CandorMeta, TRAINER_DIR};
use candor_core::metrics::MetricsLog;
use candor_core::rng::Rng;
use candor_data::Tokenizer;
use candor_model::lora::Adapters;
use candor_model::{Head, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::batch::Cursor;
use crate::error::{Error, Result};
use crate::optim::AdamW;

/// [`RunOptions`] lived here first; it has its own module now.
pub use crate::run::RunOptions;

/// Everything besides weights and optimizer moments that an exact resume needs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimiser steps completed.
    pub step: u64,
    pub rng: Rng,
    pub cursor: Cursor,
    pub tokens: u64,
    pub elapsed_sec: f64,
    /// AdamW step counts by optimiser name (bias correction).
    pub optimizer_steps: BTreeMap<String, u64>,
    /// Stage-specific state (PPO's adaptive KL coefficient, ...).
    #[serde(default)]
    pub extra: serde_json::Value,
}

impl TrainerState {
    /// The state of a run that has not taken a step: its RNG derived from `seed`.
    pub fn new(seed: u64) -> Self {
        TrainerState {
            step: 0,
            rng: Rng::derive(seed, "train"),
            cursor: Cursor::default(),
            tokens: 0,
            elapsed_sec: 0.0,
            optimizer_steps: Default::default(),
            extra: serde_json::Value::Null,
        }
    }
}

/// Where a one-model stage starts its loop: a fresh trainer state and an empty metrics log,
/// or, resuming the partial checkpoint in `out`, its state and log (up to its step), its
/// optimiser moments restored into `opt` (saved under the name "model"), and its parents
/// kept in `meta`.
pub fn resume_or_fresh(
    start: &Start,
    out: &Path,
    seed: u64,
    opt: &mut AdamW,
    meta: &mut CandorMeta,
    device: &Device,
) -> Result<(TrainerState, MetricsLog)> {
    let Start::Resume(prev) = start else {
        return Ok((TrainerState::new(seed), MetricsLog::default()));
    };
    let (state, tensors) = read_trainer(out, device)?;
    restore_optimizer(opt, "model", &state, &tensors, out)?;
    let metrics = MetricsLog::read(out, Some(state.step))?;
    meta.parents = prev.parents.clone();
    Ok((state, metrics))
}

/// The model a one-model stage trains, with the tokenizer it is saved with: what every
/// checkpoint of the run writes besides its progress.
pub struct StageModel<'a> {
    pub config: &'a ModelConfig,
    pub head: Head,
    pub varmap: &'a VarMap,
    pub tokenizer: &'a Tokenizer,
    /// A LoRA run's adapters (`varmap` is theirs): checkpoints are adapter directories.
    pub adapters: Option<&'a Adapters>,
}

impl StageModel<'_> {
    /// Write a checkpoint of the run into `out` (atomically; see [`save_checkpoint`]), the
    /// optimiser's moments under the name "model".
    pub fn save(
        &self,
        out: &Path,
        state: &TrainerState,
        metrics: &MetricsLog,
        opt: &AdamW,
        meta: &mut CandorMeta,
    ) -> Result<()> {
        let snap = Snapshot {
            config: self.config,
            head: self.head,
            varmap: self.varmap,
            tokenizer: self.tokenizer,
            adapters: self.adapters,
            metrics,
            state,
            optimizers: &[("model", opt)],
        };
        save_checkpoint(out, &snap, meta, |_| Ok(()))
    }
}

/// Write `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`.
pub fn write_model_dir(
    dir: &Path,
    config: &ModelConfig,
    head: Head,
    varmap: &VarMap,
    tokenizer: &Tokenizer,
) -> Result<()> {
    candor_model::io::save_model(dir, config, head, varmap)?;
    tokenizer.save(dir)?;
    Ok(())
}

/// Write `trainer/trainer_state.json` and `trainer/optimizer.safetensors` (moments of each
/// named optimiser, prefixed `<name>/`).
pub fn write_trainer(
    dir: &Path,
    state: &TrainerState,
    optimizers: &[(&str, &AdamW)],
) -> Result<()> {
    let tdir = dir.join(TRAINER_DIR);
    std::fs::create_dir_all(&tdir).map_err(|e| Error::Msg(format!("{}: {e}", tdir.display())))?;
    let mut state = state.clone();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, opt) in optimizers {
        state.optimizer_steps.insert(name.to_string(), opt.t);
        tensors.extend(opt.state_tensors(&format!("{name}/"))?);
    }
    let path = tdir.join("optimizer.safetensors");
    candle_core::safetensors::save(&tensors, &path)
        .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
    let path = tdir.join("trainer_state.json");
    let text = serde_json::to_string_pretty(&state).expect("state serialises");
    std::fs::write(&path, text + "\n").map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
}

/// Read the resume state of a checkpoint: the trainer state and the optimiser tensors.
pub fn read_trainer(
    dir: &Path,
    device: &Device,
) -> Result<(TrainerState, HashMap<String, Tensor>)> {
    let tdir = dir.join(TRAINER_DIR);
    let path = tdir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::Msg(format!("{}: cannot resume: {e}", path.display())))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| {
        Error::Msg(format!(
            "{}: not a valid trainer state: {e}",
            path.display()
        ))
    })?;
    let opath = tdir.join("optimizer.safetensors");
    let tensors = candle_core::safetensors::load(&opath, device).map_err(|e| {
        Error::Msg(format!(
            "{}: cannot read optimizer state: {e}",
            opath.display()
        ))
    })?;
    Ok((state, tensors))
}

/// Restore a named optimiser from resume state.
pub fn restore_optimizer(
    opt: &mut AdamW,
    name: &str,
    state: &TrainerState,
    tensors: &HashMap<String, Tensor>,
    dir: &Path,
) -> Result<()> {
    let t = state.optimizer_steps.get(name).copied().unwrap_or(0);
    opt.load_state(
        tensors,
        &format!("{name}/"),
        t,
        &dir.join(TRAINER_DIR).join("optimizer.safetensors"),
    )
}

/// What a stage should do with its output directory.
pub enum Start {
    /// Nothing there: start from scratch.
    Fresh,
    /// A partial run to continue (its metadata).
    Resume(CandorMeta),
    /// A finished run with this config: nothing to do.
    Done(CandorMeta),
}

/// Decide how to start given `--resume`, refusing to clobber an existing checkpoint and
/// refusing to resume one made from a different config.
pub fn plan_start(
    out: &Path,
    resume: bool,
    overwrite: bool,
    effective: &serde_json::Value,
) -> Result<Start> {
    candor_core::checkpoint::recover_interrupted(out)?;
    if !out.exists() {
        return Ok(Start::Fresh);
    }
    let meta = CandorMeta::read(out)?;
    if overwrite {
        std::fs::remove_dir_all(out)
            .map_err(|e| Error::Msg(format!("{}: cannot remove: {e}", out.display())))?;
        return Ok(Start::Fresh);
    }
    let Some(meta) = meta else {
        return Err(Error::Msg(format!(
            "{}: exists and is not a candor checkpoint; choose another --out or remove it",
            out.display()
        )));
    };
    if !resume {
        return Err(Error::Msg(format!(
            "{}: already holds a checkpoint (step {} of {}); pass --resume to continue it or --overwrite to replace it",
            out.display(),
            meta.step,
            meta.total_steps
        )));
    }
    if let Some(key) = first_difference(&meta.config, effective, "") {
        return Err(Error::Msg(format!(
            "{}: cannot resume: the config differs from the checkpoint's at `{key}`; use --overwrite to start over",
            out.display()
        )));
    }
    Ok(if meta.complete {
        Start::Done(meta)
    } else {
        Start::Resume(meta)
    })
}

/// The first key path where two JSON values differ.
pub fn first_difference(
    a: &serde_json::Value,
    b: &serde_json::Value,
    path: &str,
) -> Option<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => first_difference(u, v, &p),
                    _ => Some(p),
                }
            })
        }
        _ if a == b => None,
        _ => Some(if path.is_empty() {
            "(root)".into()
        } else {
            path.to_string()
        }),
    }
}

/// The last value of each metric in the log (what `candor.json` records as final metrics).
pub fn final_metrics(metrics: &MetricsLog) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    for r in &metrics.records {
        for (k, v) in r {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Everything a stage checkpoint holds for one trainable model.
pub struct Snapshot<'a> {
    pub config: &'a ModelConfig,
    pub head: Head,
    pub varmap: &'a VarMap,
    pub tokenizer: &'a Tokenizer,
    /// A LoRA run's adapters (`varmap` is theirs): the model is written as PEFT's adapter
    /// directory (`adapter_config.json`, `adapter_model.safetensors`) with the tokenizer.
    pub adapters: Option<&'a Adapters>,
    pub metrics: &'a MetricsLog,
    pub state: &'a TrainerState,
    pub optimizers: &'a [(&'a str, &'a AdamW)],
}

/// Write a complete checkpoint directory atomically: model, tokenizer, metrics, resume
/// state, then `candor.json` (hashing the model files); `extra` may add files (a critic).
pub fn save_checkpoint(
    out: &Path,
    snap: &Snapshot,
    meta: &mut CandorMeta,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let w = candor_core::checkpoint::CheckpointWriter::begin(out)?;
    match snap.adapters {
        Some(adapters) => {
            candor_model::lora::save_adapter(w.path(), adapters)?;
            snap.tokenizer.save(w.path())?;
        }
        None => write_model_dir(
            w.path(),
            snap.config,
            snap.head,
            snap.varmap,
            snap.tokenizer,
        )?,
    }
    snap.metrics.write(w.path())?;
    write_trainer(w.path(), snap.state, snap.optimizers)?;
    extra(w.path())?;
    meta.step = snap.state.step;
    meta.tokens = snap.state.tokens;
    meta.elapsed_sec = snap.state.elapsed_sec;
    meta.write(w.path())?;
    w.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_difference_names_the_key() {
        let a = serde_json::json!({"train": {"lr": 1, "steps": 2}, "seed": 1});
        let b = serde_json::json!({"train": {"lr": 1, "steps": 3}, "seed": 1});
        assert_eq!(first_difference(&a, &b, "").as_deref(), Some("train.steps"));
        assert_eq!(first_difference(&a, &a, ""), None);
    }
}
