//! Mixed precision: f32 master weights and optimiser state, forward and backward in bf16.
//!
//! The trainable model's variables (`VarMap`) and AdamW's moments stay f32. For a bf16 step,
//! [`compute_model`] builds a second `Model` whose weights are bf16 *casts* of those
//! variables; the casts are recorded in candle's graph, so `backward()` of a loss computed
//! with it hands back f32 gradients for the f32 variables (the cast's backward converts
//! them). This is what PyTorch's autocast does op by op, done once per step for all weights.
//! Reductions run in f32 inside the model whatever its dtype (`candor_model::ops`:
//! RMSNorm's mean square, the attention softmax, log-softmax and the loss), and the
//! optimiser update is f32, so updates smaller than a bf16 step of the weight accumulate.
//!
//! Generation ([`frozen_model`]) runs entirely in the requested dtype, KV cache included.

use std::collections::HashMap;
use std::ops::Deref;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candor_model::{Head, Model, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The dtype of a model's forward and backward pass (`train.dtype`, `--dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 weights and activations in the pass; f32 reductions, master weights and
    /// optimiser state (Micikevicius et al. 2018, "Mixed Precision Training"; bf16 needs
    /// no loss scaling: it has f32's exponent range).
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// Parse `f32` / `bf16` (a command-line flag); `origin` names the flag in errors.
    pub fn parse(s: &str, origin: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(Error::Msg(format!("{origin} `{s}`: expected f32 or bf16"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// The model one training step runs: the master model itself (f32), or a model over
/// tracked casts of the master variables.
pub enum StepModel<'a> {
    Master(&'a Model),
    Cast(Box<Model>),
}

impl Deref for StepModel<'_> {
    type Target = Model;
    fn deref(&self) -> &Model {
        match self {
            StepModel::Master(m) => m,
            StepModel::Cast(m) => m,
        }
    }
}

/// The model to run this step's forward/backward with. For [`Precision::F32`] that is
/// `master` (built on `varmap`'s f32 variables). For bf16, a model whose weights are
/// `var.to_dtype(bf16)` — gradients flow back through the casts into the f32 variables.
/// Build it once per optimiser step (after the update, the casts are stale).
pub fn compute_model<'a>(
    master: &'a Model,
    varmap: &VarMap,
    precision: Precision,
) -> Result<StepModel<'a>> {
    if precision.dtype() == master.dtype() {
        return Ok(StepModel::Master(master));
    }
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, precision.dtype(), master.device());
    Ok(StepModel::Cast(Box::new(Model::new(
        &master.config,
        master.head,
        vb,
    )?)))
}

/// The model to sample and score with, where no gradient is wanted (PPO's rollouts): the
/// master model itself for f32, a gradient-free bf16 copy of its current weights for bf16
/// (sampling over tracked casts would keep every step's graph alive in the KV cache).
/// Build it again after an optimiser step.
pub fn inference_model<'a>(
    master: &'a Model,
    varmap: &VarMap,
    precision: Precision,
) -> Result<StepModel<'a>> {
    if precision.dtype() == master.dtype() {
        return Ok(StepModel::Master(master));
    }
    let copy = frozen_model(
        &master.config,
        master.head,
        varmap,
        precision.dtype(),
        master.device(),
    )?;
    Ok(StepModel::Cast(Box::new(copy)))
}

/// A gradient-free copy of `varmap`'s current values in `dtype` (generation, reference
/// models): weights, activations and the KV cache all in that dtype.
pub fn frozen_model(
    config: &ModelConfig,
    head: Head,
    varmap: &VarMap,
    dtype: DType,
    device: &Device,
) -> Result<Model> {
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    Ok(Model::new(
        config,
        head,
        VarBuilder::from_tensors(tensors, dtype, device),
    )?)
}

/// A checkpoint directory as a gradient-free model in `precision` (generation, PPO's
/// reference and reward models): f32 as `candor_model::io::load_frozen`, bf16 with every
/// weight, activation and the KV cache in bf16.
pub fn load_frozen(dir: &Path, precision: Precision, device: &Device) -> Result<Model> {
    Ok(candor_model::io::load_frozen_as(
        dir,
        precision.dtype(),
        device,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{lm_batch, LmExample};
    use crate::config::TrainConfig;
    use crate::loss::lm_loss;
    use crate::optim::{named_vars, AdamW};
    use candor_core::rng::Rng;
    use candor_model::generate::{generate, SamplingParams};
    use candor_model::io::build_trainable;

    fn tiny() -> (Model, VarMap, ModelConfig) {
        let config = ModelConfig::llama(64, 32, 2, 4, 2, 64, 32, 10000.0, true);
        let (m, v) =
            build_trainable(&config, Head::Lm, None, &[], &mut Rng::new(5), &Device::Cpu).unwrap();
        (m, v, config)
    }

    fn batch(seed: u64) -> crate::batch::LmBatch {
        let mut rng = Rng::new(seed);
        let ex: Vec<LmExample> = (0..4)
            .map(|_| LmExample::dense((0..17).map(|_| rng.below(64) as u32).collect()))
            .collect();
        lm_batch(&ex.iter().collect::<Vec<_>>(), 0, &Device::Cpu).unwrap()
    }

    /// The bf16 pass gives f32 gradients for every f32 master variable, close to the f32
    /// pass's: relative L2 error per tensor below 3% (bf16 keeps 8 bits of mantissa, ~0.4%
    /// per rounding; errors add up over two layers forward and back).
    #[test]
    fn bf16_pass_gives_f32_gradients_close_to_the_f32_ones() {
        let (model, varmap, _) = tiny();
        let b = batch(1);
        let grads = |p: Precision| {
            let m = compute_model(&model, &varmap, p).unwrap();
            assert_eq!(m.dtype(), p.dtype());
            let (_, mean) = lm_loss(&m, &b).unwrap();
            assert_eq!(mean.dtype(), DType::F32, "the loss is reduced in f32");
            let store = mean.backward().unwrap();
            let loss = mean.to_scalar::<f32>().unwrap();
            let g: Vec<Tensor> = named_vars(&varmap)
                .iter()
                .map(|(_, v)| store.get(v.as_tensor()).unwrap().clone())
                .collect();
            (loss, g)
        };
        let (l32, g32) = grads(Precision::F32);
        let (l16, g16) = grads(Precision::Bf16);
        let mut worst = 0.0f32;
        for (a, b) in g32.iter().zip(&g16) {
            assert_eq!(b.dtype(), DType::F32, "gradient of an f32 master variable");
            let diff = (a - b)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt();
            let norm = a
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt();
            worst = worst.max(diff / norm.max(1e-12));
        }
        println!(
            "bf16 vs f32: loss {l16:.5} vs {l32:.5}; worst relative gradient error {worst:.4}"
        );
        assert!((l16 - l32).abs() < 0.02, "{l16} vs {l32}");
        assert!(worst < 0.03, "bf16 gradients differ from f32 by {worst}");
        assert!(worst > 0.0, "the bf16 pass was not in bf16");
    }

    /// Master weights and AdamW moments stay f32 under bf16 steps, and an update far below
    /// the weights' bf16 resolution still moves them (it would round away in bf16 weights).
    #[test]
    fn master_weights_and_moments_stay_f32_and_keep_sub_bf16_updates() {
        let (model, varmap, _) = tiny();
        let train = TrainConfig {
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(named_vars(&varmap), &train).unwrap();
        let before: Vec<Tensor> = named_vars(&varmap)
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        let lr = 1e-5; // AdamW's first step moves each weight by ≈ lr; bf16 spacing near 1.0 is 2^-7
        for step in 0..3 {
            let m = compute_model(&model, &varmap, Precision::Bf16).unwrap();
            let (_, mean) = lm_loss(&m, &batch(10 + step)).unwrap();
            let store = mean.backward().unwrap();
            let mut g = opt.zero_grads();
            opt.accumulate(&store, &mut g).unwrap();
            opt.step(&g, lr).unwrap();
        }
        for (_, t) in opt.state_tensors("").unwrap() {
            assert_eq!(t.dtype(), DType::F32);
        }
        for ((name, v), b) in named_vars(&varmap).iter().zip(&before) {
            assert_eq!(v.dtype(), DType::F32, "{name}");
            if name.ends_with("norm.weight") {
                // weights of 1.0: 3 steps of ~1e-5 each are ~400× below bf16's spacing there
                let moved = (v.as_tensor() - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let as_bf16 = (v
                    .as_tensor()
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(moved > 1e-6 && moved < 1e-4, "{name} moved by {moved}");
                assert_eq!(
                    as_bf16, 0.0,
                    "{name}: the same update in bf16 weights would be lost"
                );
            }
        }
    }

    /// Generation in bf16 (weights, activations, KV cache) picks the same greedy tokens as
    /// f32 on a model trained a little (ties aside), and its cached keys are bf16.
    #[test]
    fn bf16_generation_uses_the_cache_and_matches_f32_greedy() {
        let (model, varmap, config) = tiny();
        let train = TrainConfig {
            lr: 3e-3,
            warmup_steps: 0,
            ..Default::default()
        };
        let mut opt = AdamW::new(named_vars(&varmap), &train).unwrap();
        // overfit a repeating sequence so the greedy continuation is clear-cut
        let ex = LmExample::dense((0..33).map(|i| (i % 7) as u32 + 3).collect());
        let b = lm_batch(&[&ex], 0, &Device::Cpu).unwrap();
        for _ in 0..60 {
            let (_, mean) = lm_loss(&model, &b).unwrap();
            let mut g = opt.zero_grads();
            opt.accumulate(&mean.backward().unwrap(), &mut g).unwrap();
            opt.step(&g, 3e-3).unwrap();
        }
        let f32m = frozen_model(&config, Head::Lm, &varmap, DType::F32, &Device::Cpu).unwrap();
        let bf16m = frozen_model(&config, Head::Lm, &varmap, DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(bf16m.dtype(), DType::BF16);
        let mut cache = bf16m.new_cache();
        let ids = Tensor::new(&[[3u32, 4, 5]], &Device::Cpu).unwrap();
        let h = bf16m
            .forward_hidden(&ids, None, None, Some(&mut cache))
            .unwrap();
        assert_eq!((h.dtype(), cache.len()), (DType::BF16, 3));
        let p = SamplingParams {
            max_new_tokens: 12,
            temperature: 0.0,
            ..Default::default()
        };
        let prompts = vec![vec![3u32, 4, 5], vec![6, 7, 8, 9, 3]];
        let a = generate(&f32m, &prompts, &p, &[], 0, &mut Rng::new(0)).unwrap();
        let c = generate(&bf16m, &prompts, &p, &[], 0, &mut Rng::new(0)).unwrap();
        for (x, y) in a.iter().zip(&c) {
            assert_eq!(x.tokens, y.tokens);
            for (u, v) in x.logprobs.iter().zip(&y.logprobs) {
                assert!((u - v).abs() < 0.05, "{u} vs {v}");
            }
        }
        assert_eq!(
            a[0].tokens[..4],
            [6, 7, 8, 9],
            "the model did not learn the sequence"
        );
    }
}
