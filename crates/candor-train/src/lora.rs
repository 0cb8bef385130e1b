//! The model a stage trains, full or LoRA (`train.lora`): one call for every stage.

use std::path::Path;

use candle_core::Device;
use candle_nn::VarMap;
use candor_core::rng::Rng;
use candor_model::io::load_trainable;
use candor_model::lora::{self, Adapters};
use candor_model::{Head, Model};

use crate::config::TrainConfig;
use crate::error::Result;

/// The model a stage trains and its trainable variables (what AdamW holds): every weight
/// of `init` — or of `resume`, the run's own partial checkpoint — or, with `train.lora`,
/// the adapters (and a score head) on `init` frozen, as [`Adapters`]; a LoRA run resumes
/// its adapters from `resume`. `spec` is `init` as the user gave it (`hf:ORG/NAME` or a
/// directory): the adapters' `base_model_name_or_path`.
pub fn load_for_training(
    spec: &Path,
    init: &Path,
    resume: Option<&Path>,
    head: Head,
    train: &TrainConfig,
    rng: &mut Rng,
    device: &Device,
) -> Result<(Model, VarMap, Option<Adapters>)> {
    match &train.lora {
        None => {
            let (model, varmap) = load_trainable(resume.unwrap_or(init), head, rng, device)?;
            Ok((model, varmap, None))
        }
        Some(cfg) => {
            let base = lora::base_name(spec, init);
            // the frozen base in train.dtype (bf16 halves it), the adapters in f32
            let dtype = train.dtype.dtype();
            let (model, adapters) =
                lora::load_trainable(init, base, head, cfg, resume, dtype, rng, device)?;
            Ok((model, adapters.varmap.clone(), Some(adapters)))
        }
    }
}

/// "N of M parameters trained (LoRA rank r on ...)" for a run's first log line.
pub fn describe(varmap: &VarMap, adapters: Option<&Adapters>, total: usize) -> String {
    match adapters {
        None => format!("{total} params"),
        Some(a) => {
            let trained: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
            let targets = a
                .config
                .resolved_targets(a.arch)
                .map(|t| t.join(" "))
                .unwrap_or_default();
            format!(
                "LoRA rank {} on {targets}: {trained} of {total} params trained",
                a.config.rank
            )
        }
    }
}
