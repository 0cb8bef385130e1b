//! The training section every stage config embeds as `train:`.

use serde::{Deserialize, Serialize};

/// Optimiser, schedule and cadence. Defaults follow nanoGPT / GPT-3 small-model practice;
/// the reward and PPO stages start from their own defaults (their configs' `Default`),
/// noted below as "reward" and "PPO". Names in parentheses are the Hugging Face
/// `TrainingArguments` (TRL) equivalents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimiser steps, each over `batch_size × grad_accum` examples (TRL `max_steps`; in
    /// PPO, iterations). Default 200 (PPO 20).
    pub steps: usize,
    /// Examples (sequences) per micro-batch, for the whole run: with several ranks it is
    /// the global batch, split among them (TRL's `per_device_train_batch_size` × ranks).
    /// Default 16 (reward, PPO 8).
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed before each optimiser step (TRL
    /// `gradient_accumulation_steps`). Default 1.
    pub grad_accum: usize,
    /// Peak learning rate, reached after `warmup_steps` (TRL `learning_rate`). Default 1e-3
    /// (reward 1e-4, PPO 1e-5).
    pub lr: f64,
    /// Learning rate at the end of the cosine decay (nanoGPT `min_lr`). Default 1e-4
    /// (reward 1e-5, PPO 1e-5: constant).
    pub min_lr: f64,
    /// Linear warm-up steps from 0 to `lr` (TRL `warmup_steps`). Default 20 (reward 10,
    /// PPO 0).
    pub warmup_steps: usize,
    /// Decoupled weight decay (AdamW, Loshchilov & Hutter 2019) on matrices and embeddings,
    /// not on norms and biases (TRL `weight_decay`). Default 0.1 (reward, PPO 0).
    pub weight_decay: f64,
    /// AdamW β1 (TRL `adam_beta1`). Default 0.9.
    pub beta1: f64,
    /// AdamW β2 (TRL `adam_beta2`; 0.95 as in GPT-3 and nanoGPT, where TRL has 0.999).
    /// Default 0.95.
    pub beta2: f64,
    /// AdamW ε (TRL `adam_epsilon`). Default 1e-8.
    pub eps: f64,
    /// Clip the global gradient norm to this, 0 = off (TRL `max_grad_norm`). Default 1.0.
    pub grad_clip: f64,
    /// Evaluate on held-out data every N steps, and always after the last; 0 = only at the
    /// end (TRL `eval_steps`). Default 50 (PPO 5).
    pub eval_every: usize,
    /// Held-out batches per evaluation, 0 = all. Default 8 (reward, PPO 0).
    pub eval_batches: usize,
    /// Write a resumable checkpoint every N steps; 0 = only the final one (TRL
    /// `save_steps`). Default 0.
    pub save_every: usize,
    /// Log training metrics every N steps, and after the last (TRL `logging_steps`).
    /// Default 10 (PPO 1).
    pub log_every: usize,
    /// Forward/backward precision: `f32`, or `bf16` mixed precision — bf16 weights and
    /// activations in the pass, f32 reductions (norms, softmax, loss), f32 master weights
    /// and AdamW state (Micikevicius et al. 2018; bf16 needs no loss scaling; TRL `bf16`).
    /// Meant for GPUs; candle's CPU backend runs it too, more slowly than f32. Default `f32`.
    pub dtype: crate::precision::Precision,
    /// PPO, GRPO and DPO: stop the run when a run-health signal trips (see `health:` and
    /// docs/health.md), keeping the last good checkpoint; otherwise a tripped signal only
    /// warns (default false).
    pub stop_on_health: bool,
    /// Recompute each transformer block's activations during the backward instead of
    /// keeping them from the forward (activation checkpointing, Chen et al. 2016;
    /// transformers' and TRL's `gradient_checkpointing`): peak memory holds one block's
    /// activations plus every block's input, for about one more forward pass of compute.
    /// Same gradients (up to float summation order). Default false. Written to the
    /// effective config only when on.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
    /// Train LoRA adapters on a frozen base instead of every weight (Hu et al. 2021; TRL's
    /// `peft_config`): `{rank, alpha, dropout, target_modules}`, see
    /// [`candor_model::LoraConfig`] and docs/lora.md. Checkpoints are then PEFT adapter
    /// directories. Default: none (full fine-tuning).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<candor_model::LoraConfig>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 200,
            batch_size: 16,
            grad_accum: 1,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 20,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            eval_every: 50,
            eval_batches: 8,
            save_every: 0,
            log_every: 10,
            dtype: Default::default(),
            stop_on_health: false,
            gradient_checkpointing: false,
            lora: None,
        }
    }
}

impl TrainConfig {
    /// Whether to log training metrics after optimiser step `step` (counted from 1).
    pub fn log_due(&self, step: u64) -> bool {
        step.is_multiple_of(self.log_every as u64) || step == self.steps as u64
    }

    /// Whether to evaluate after step `step`: every `eval_every` steps, and at the end.
    pub fn eval_due(&self, step: u64) -> bool {
        (self.eval_every > 0 && step.is_multiple_of(self.eval_every as u64))
            || step == self.steps as u64
    }

    /// Whether to write an intermediate checkpoint after step `step` (the final one is
    /// written anyway).
    pub fn save_due(&self, step: u64) -> bool {
        self.save_every > 0
            && step.is_multiple_of(self.save_every as u64)
            && step != self.steps as u64
    }

    /// Refuse `train.lora` in a stage that trains full weights only.
    pub fn refuse_lora(&self, origin: &str, stage: &str) -> crate::Result<()> {
        match self.lora {
            Some(_) => Err(crate::Error::Msg(format!(
                "{origin}: train.lora: the {stage} stage trains full weights only (LoRA: sft, reward, dpo, grpo, ppo)"
            ))),
            None => Ok(()),
        }
    }

    /// Check ranges; `origin` names the config file in errors.
    pub fn validate(&self, origin: &str) -> crate::Result<()> {
        let bad =
            |key: &str, msg: &str| Err(crate::Error::Msg(format!("{origin}: train.{key}: {msg}")));
        if self.steps == 0 {
            return bad("steps", "must be at least 1");
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be a positive number");
        }
        if self.min_lr < 0.0 || self.min_lr > self.lr {
            return bad("min_lr", "must be between 0 and lr");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("beta1", "β1 and β2 must be in [0, 1)");
        }
        if self.log_every == 0 {
            return bad("log_every", "must be at least 1");
        }
        if let Some(lora) = &self.lora {
            lora.validate(&format!("{origin}: train.lora"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cadence_counts_steps_from_one_and_always_ends_with_log_and_eval() {
        let c = TrainConfig {
            steps: 10,
            log_every: 3,
            eval_every: 0,
            save_every: 5,
            ..Default::default()
        };
        let due =
            |f: fn(&TrainConfig, u64) -> bool| (1..=10).filter(|&s| f(&c, s)).collect::<Vec<u64>>();
        assert_eq!(due(TrainConfig::log_due), vec![3, 6, 9, 10]);
        assert_eq!(due(TrainConfig::eval_due), vec![10]);
        assert_eq!(
            due(TrainConfig::save_due),
            vec![5],
            "the final checkpoint is the caller's"
        );
    }
}
