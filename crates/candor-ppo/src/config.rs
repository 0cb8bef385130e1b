//! The PPO stage config (`configs/*/ppo.yaml`). Names follow TRL's `PPOConfig` where one
//! exists; defaults follow InstructGPT / TRL unless a comment says otherwise.

use std::path::PathBuf;

use candor_model::generate::SamplingParams;
use candor_train::config::TrainConfig;
use candor_train::health::HealthConfig;
pub use candor_train::score::ScoreConfig;
use serde::{Deserialize, Serialize};

/// The PPO stage config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// Seeds prompt order, sampling and the critic's new head. Default 1.
    pub seed: u64,
    /// The SFT checkpoint: the policy starts from it and the frozen reference is a copy of
    /// it (`--policy` overrides). Default: none (required).
    pub policy: Option<PathBuf>,
    /// The reward model checkpoint (a `score` head; `--reward` overrides). Optional when the
    /// reward comes from a rule judge alone. Default: none.
    pub reward: Option<PathBuf>,
    /// The prompts posed to the policy, held-out prompts and PPO-ptx text.
    pub data: PpoData,
    /// How responses are sampled each iteration.
    pub rollout: RolloutConfig,
    /// How a response's scalar score is made.
    pub score: ScoreConfig,
    /// The per-token KL penalty β·(log π − log π_ref).
    pub kl: KlConfig,
    /// The PPO update: epochs, clipping, GAE, loss coefficients.
    pub ppo: PpoAlgo,
    /// The value model (critic): where it starts and its learning rate.
    pub critic: CriticConfig,
    /// What each evaluation on the held-out prompts reports.
    pub eval: EvalConfig,
    /// Run-health thresholds: warnings for entropy collapse, runaway KL, response-length
    /// drift, reward hacking, a persistently high clip fraction, gradient spikes
    /// (`train.stop_on_health` stops the run instead; docs/health.md).
    pub health: HealthConfig,
    /// Optimiser and cadence. In PPO `steps` counts iterations (rollout batches), the
    /// learning-rate schedule runs over iterations, and `batch_size` is the minibatch size
    /// of the PPO updates (TRL `mini_batch_size`). `grad_accum` must be 1. Defaults:
    /// [`TrainConfig`]'s, except steps 20, batch_size 8, lr 1e-5, min_lr 1e-5 (constant),
    /// warmup_steps 0, weight_decay 0, eval_every 5, eval_batches 0, save_every 0,
    /// log_every 1.
    pub train: TrainConfig,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            seed: 1,
            policy: None,
            reward: None,
            data: PpoData::default(),
            rollout: RolloutConfig::default(),
            score: ScoreConfig::default(),
            kl: KlConfig::default(),
            ppo: PpoAlgo::default(),
            critic: CriticConfig::default(),
            eval: EvalConfig::default(),
            health: HealthConfig::default(),
            train: TrainConfig {
                steps: 20,
                batch_size: 8,
                lr: 1e-5,
                min_lr: 1e-5,
                warmup_steps: 0,
                weight_decay: 0.0,
                eval_every: 5,
                eval_batches: 0,
                save_every: 0,
                log_every: 1,
                ..TrainConfig::default()
            },
        }
    }
}

/// PPO's data (`data:`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PpoData {
    /// Prompts posed to the policy during training: `{"prompt": ..., "reference"?: ...}`
    /// (a string or a TRL conversational message list; every other field goes to the
    /// judges), in JSONL, JSON, Parquet, `.jsonl.gz`/`.zst` or `hf:ORG/NAME[@REV][:SPLIT]`
    /// (docs/data.md). Default: none (required).
    pub prompts: PathBuf,
    /// Held-out prompts for `judge_score` / `eval_reward` (same format). Default: none
    /// (no evaluation).
    pub heldout_prompts: Option<PathBuf>,
    /// Pretraining text mixed into the loss when `ppo.ptx_coef > 0` (PPO-ptx, InstructGPT):
    /// text or JSONL files, as pretraining's `data.files`. Default: none.
    pub ptx_files: Vec<PathBuf>,
    /// Column names of the prompt files, candor's name → theirs (`{prompt: question,
    /// reference: answer}`). Default: none.
    #[serde(skip_serializing_if = "candor_data::dataset::Columns::is_empty")]
    pub columns: candor_data::dataset::Columns,
}

/// Sampling the responses of each iteration (`rollout:`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// Prompts sampled per iteration (TRL `batch_size`). Default 16.
    pub prompts_per_iteration: usize,
    /// Most tokens per response (TRL `response_length`). Default 32.
    pub max_new_tokens: usize,
    /// Sampling temperature; policy log-probs are computed at this temperature too (TRL
    /// `temperature`). Default 1.0.
    pub temperature: f64,
    /// Top-k truncation while sampling, 0 = off (TRL samples untruncated). Default 0.
    pub top_k: usize,
    /// Top-p (nucleus) truncation while sampling, 1.0 = off (Holtzman et al. 2020).
    /// Default 1.0.
    pub top_p: f64,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            prompts_per_iteration: 16,
            max_new_tokens: 32,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl RolloutConfig {
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
}

/// The KL penalty against the reference policy (`kl:`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KlConfig {
    /// Initial β (TRL `init_kl_coef` 0.2; InstructGPT used 0.02). Default 0.05.
    pub coef: f64,
    /// Adapt β toward this per-sequence KL (Ziegler et al. 2019; TRL `target`); absent =
    /// fixed β. Default: none.
    pub target: Option<f64>,
    /// Controller horizon in sequences (TRL `horizon` 10000). Default 10000.
    pub horizon: f64,
}

impl Default for KlConfig {
    fn default() -> Self {
        KlConfig {
            coef: 0.05,
            target: None,
            horizon: 10000.0,
        }
    }
}

/// The PPO update (`ppo:`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PpoAlgo {
    /// PPO epochs over each rollout batch (TRL `ppo_epochs`/`num_ppo_epochs` 4). Default 4.
    pub epochs: usize,
    /// Policy ratio clip ε (Schulman et al. 2017; TRL `cliprange` 0.2). Default 0.2.
    pub cliprange: f64,
    /// Value clip around the rollout values (TRL `cliprange_value` 0.2). Default 0.2.
    pub cliprange_value: f64,
    /// Value-loss coefficient (TRL `vf_coef` 0.1). Default 0.1.
    pub vf_coef: f64,
    /// GAE discount γ (Schulman et al. 2016; TRL `gamma` 1.0). Default 1.0.
    pub gamma: f64,
    /// GAE λ (TRL `lam` 0.95). Default 0.95.
    pub lam: f64,
    /// Entropy bonus coefficient, 0 = off. Default 0.
    pub entropy_coef: f64,
    /// Whiten advantages over each rollout batch (TRL does). Default true.
    pub whiten_advantages: bool,
    /// Stop an iteration's updates once the approximate KL to the rollout policy exceeds
    /// this (0 = never; TRL's `early_stopping` with `target_kl`). Default 0.
    pub max_approx_kl: f64,
    /// PPO-ptx: coefficient of the pretraining loss mixed in (InstructGPT's γ; 0 = off).
    /// Default 0.
    pub ptx_coef: f64,
}

impl Default for PpoAlgo {
    fn default() -> Self {
        PpoAlgo {
            epochs: 4,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            entropy_coef: 0.0,
            whiten_advantages: true,
            max_approx_kl: 0.0,
            ptx_coef: 0.0,
        }
    }
}

/// Where the critic's weights start (`critic.init`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CriticInit {
    /// From the reward model (InstructGPT); falls back to the policy when there is none.
    Reward,
    /// From the policy's backbone with a new value head.
    Policy,
}

/// The value model (`critic:`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CriticConfig {
    /// `reward`: from the reward model, as InstructGPT (the policy when there is none);
    /// `policy`: the policy's backbone with a new value head. Default `reward`.
    pub init: CriticInit,
    /// Critic peak learning rate, on the policy's schedule (absent = `train.lr`). Default:
    /// none.
    pub lr: Option<f64>,
}

impl Default for CriticConfig {
    fn default() -> Self {
        CriticConfig {
            init: CriticInit::Reward,
            lr: None,
        }
    }
}

/// Evaluation on `data.heldout_prompts` (`eval:`), every `train.eval_every` iterations.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Judge whose mean score on the held-out prompts is reported as `judge_score`; the SFT
    /// policy is scored before training starts. Default: none (`score.judge`).
    pub judge: Option<String>,
    /// At most this many held-out prompts per evaluation. Default 64.
    pub max_prompts: usize,
    /// Sampled responses printed and kept in `samples.jsonl` at each evaluation. Default 3.
    pub samples_logged: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            judge: None,
            max_prompts: 64,
            samples_logged: 3,
        }
    }
}
