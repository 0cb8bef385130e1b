//! The PPO stage config (`configs/*/ppo.yaml`). Names follow TRL's `PPOConfig` where one
//! exists; defaults follow InstructGPT / TRL unless a comment says otherwise.

use std::path::PathBuf;

use candor_model::generate::SamplingParams;
use candor_train::config::TrainConfig;
use candor_train::health::HealthConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// Seeds prompt order, sampling and the critic's new head.
    pub seed: u64,
    /// The SFT checkpoint: the policy starts from it and the frozen reference is a copy of
    /// it (`--policy` overrides).
    pub policy: Option<PathBuf>,
    /// The reward model checkpoint (a `score` head; `--reward` overrides). Optional when the
    /// reward comes from a rule judge alone.
    pub reward: Option<PathBuf>,
    pub data: PpoData,
    /// How responses are sampled each iteration.
    pub rollout: RolloutConfig,
    /// How a response's scalar score is made.
    pub score: ScoreConfig,
    /// The per-token KL penalty β·(log π − log π_ref).
    pub kl: KlConfig,
    pub ppo: PpoAlgo,
    pub critic: CriticConfig,
    pub eval: EvalConfig,
    /// Run-health thresholds: warnings for entropy collapse, runaway KL, response-length
    /// drift, reward hacking, a persistently high clip fraction, gradient spikes
    /// (`train.stop_on_health` stops the run instead).
    pub health: HealthConfig,
    /// Optimiser and cadence. In PPO `steps` counts iterations (rollout batches), the
    /// learning-rate schedule runs over iterations, and `batch_size` is the minibatch size
    /// of the PPO updates. `grad_accum` must be 1.
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PpoData {
    /// JSONL `{"prompt": ..., "reference"?: ...}` posed to the policy during training.
    pub prompts: PathBuf,
    /// Held-out prompts for `judge_score` / `eval_reward` (same format).
    pub heldout_prompts: Option<PathBuf>,
    /// Pretraining text mixed into the loss when `ppo.ptx_coef > 0` (PPO-ptx, InstructGPT).
    pub ptx_files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// Prompts sampled per iteration (TRL `batch_size`).
    pub prompts_per_iteration: usize,
    /// Most tokens per response (TRL `response_length`).
    pub max_new_tokens: usize,
    /// Sampling temperature; policy log-probs are computed at this temperature too (TRL).
    pub temperature: f64,
    /// Top-k / top-p truncation while sampling (0 / 1.0 = off; TRL samples untruncated).
    pub top_k: usize,
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ScoreConfig {
    /// Weight of the reward model's (normalised) score.
    pub reward_model_weight: f64,
    /// A rule judge (`candor_judge`), e.g. `sentiment`; its score is added with `judge_weight`.
    pub judge: Option<String>,
    pub judge_weight: f64,
    /// Normalise reward-model scores with the mean/std the reward stage stored in its
    /// candor.json (`reward_mean`, `reward_std`).
    pub normalize: bool,
    /// Clip the combined score to ±clip (0 = off).
    pub clip: f64,
    /// Added to the score of responses that hit `max_new_tokens` without a stop token
    /// (TRL's `missing_eos_penalty`; 0 = off).
    pub missing_eos_penalty: f64,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        ScoreConfig {
            reward_model_weight: 1.0,
            judge: None,
            judge_weight: 0.0,
            normalize: true,
            clip: 0.0,
            missing_eos_penalty: 0.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KlConfig {
    /// Initial β (TRL `init_kl_coef` 0.2; InstructGPT used 0.02).
    pub coef: f64,
    /// Adapt β toward this per-sequence KL (Ziegler et al. 2019); absent = fixed β.
    pub target: Option<f64>,
    /// Controller horizon in sequences (TRL 10000).
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PpoAlgo {
    /// PPO epochs over each rollout batch (TRL `ppo_epochs` 4).
    pub epochs: usize,
    /// Policy ratio clip ε (Schulman et al. 2017; TRL 0.2).
    pub cliprange: f64,
    /// Value clip around the rollout values (TRL 0.2).
    pub cliprange_value: f64,
    /// Value-loss coefficient (TRL `vf_coef` 0.1).
    pub vf_coef: f64,
    /// GAE discount γ and λ (TRL 1.0, 0.95).
    pub gamma: f64,
    pub lam: f64,
    /// Entropy bonus coefficient (0 = off).
    pub entropy_coef: f64,
    /// Whiten advantages over each rollout batch (TRL does).
    pub whiten_advantages: bool,
    /// Stop an iteration's updates once the approximate KL to the rollout policy exceeds
    /// this (0 = never; TRL's `early_stopping` with `target_kl`).
    pub max_approx_kl: f64,
    /// PPO-ptx: coefficient of the pretraining loss mixed in (InstructGPT's γ; 0 = off).
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

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CriticInit {
    /// From the reward model (InstructGPT); falls back to the policy when there is none.
    Reward,
    /// From the policy's backbone with a new value head.
    Policy,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CriticConfig {
    pub init: CriticInit,
    /// Critic learning rate (absent = `train.lr`).
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Judge whose mean score on the held-out prompts is reported as `judge_score` (defaults
    /// to `score.judge`); the SFT policy is scored before training starts.
    pub judge: Option<String>,
    /// At most this many held-out prompts per evaluation.
    pub max_prompts: usize,
    /// Sampled responses printed and kept in `samples.jsonl` at each evaluation.
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
