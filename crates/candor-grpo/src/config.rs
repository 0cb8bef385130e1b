//! The GRPO stage config (`configs/*/grpo.yaml`). Names follow TRL's `GRPOConfig` where one
//! exists (its name is given beside each field); defaults follow TRL 1.16 unless a comment
//! says why not.

use std::path::PathBuf;

use candor_model::generate::SamplingParams;
use candor_train::config::TrainConfig;
use candor_train::health::HealthConfig;
use candor_train::score::ScoreConfig;
use serde::{Deserialize, Serialize};

pub use crate::math::{Advantage, ImportanceSamplingLevel, LossType, ScaleRewards};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// Seeds prompt order, sampling and minibatch order. Default 1.
    pub seed: u64,
    /// The policy to start from, usually an SFT checkpoint; the frozen reference is a copy
    /// of it (`--policy` overrides). Required.
    pub policy: Option<PathBuf>,
    /// A reward model checkpoint (a `score` head, the policy's tokenizer; `--reward`
    /// overrides). Optional when the reward comes from judges alone.
    pub reward: Option<PathBuf>,
    pub data: GrpoData,
    /// How completions are sampled each step.
    pub rollout: RolloutConfig,
    /// How a completion's reward is made: reward model and/or judges, weighted, clipped
    /// (the same section as PPO's).
    pub score: ScoreConfig,
    /// The algorithm: advantages, loss, clipping, KL, dynamic sampling.
    pub grpo: GrpoAlgo,
    pub eval: EvalConfig,
    /// Run-health thresholds (the same section as PPO's): warnings for entropy collapse,
    /// runaway KL (with β ≠ 0), response-length drift, reward hacking (the training reward
    /// rising while the held-out judge falls), a clip fraction that stays high, gradient
    /// spikes, and steps where every group scored alike (`zero_spread`: no learning
    /// signal). `train.stop_on_health` stops the run instead.
    pub health: HealthConfig,
    /// Optimiser and cadence. `steps` counts GRPO steps (generation batches; the
    /// learning-rate schedule runs over them); `batch_size` is the completions per optimiser
    /// update (TRL `per_device_train_batch_size`): a generation batch of
    /// `prompts_per_step × group_size` completions is split into ⌈that ÷ batch_size⌉
    /// updates per pass (TRL `steps_per_generation`). `grad_accum` must be 1.
    /// Defaults: 20 steps, batch_size 64, lr 1e-5 constant, no warm-up, no weight decay,
    /// grad_clip 1.0 (TRL: lr 1e-6, grad_clip 1.0).
    pub train: TrainConfig,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            seed: 1,
            policy: None,
            reward: None,
            data: GrpoData::default(),
            rollout: RolloutConfig::default(),
            score: ScoreConfig::default(),
            grpo: GrpoAlgo::default(),
            eval: EvalConfig::default(),
            health: HealthConfig::default(),
            train: TrainConfig {
                steps: 20,
                batch_size: 64,
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
pub struct GrpoData {
    /// JSONL `{"prompt": ..., "reference"?: ..., ...}` posed to the policy; the other fields
    /// are what judges read (every line must carry the fields the judges need). Required.
    pub prompts: PathBuf,
    /// Held-out prompts (same format) for `judge_score`, the eval judge's mean score (with
    /// `math`: exact-match accuracy). Default none.
    pub heldout_prompts: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// Prompts per GRPO step. Default 8.
    pub prompts_per_step: usize,
    /// Completions sampled per prompt: the group its advantages are taken within (TRL
    /// `num_generations`, default 8). At least 2.
    pub group_size: usize,
    /// Most tokens per completion (TRL `max_completion_length`, default 256; 32 here for
    /// small models).
    pub max_new_tokens: usize,
    /// Sampling temperature; log-probs are taken at this temperature too (TRL
    /// `temperature`, default 1.0).
    pub temperature: f64,
    /// Top-k / top-p truncation while sampling (TRL `top_k` 0, `top_p` 1.0: off).
    pub top_k: usize,
    pub top_p: f64,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            prompts_per_step: 8,
            group_size: 8,
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
pub struct GrpoAlgo {
    /// How advantages are made from a group's rewards: `grpo` (r − group mean, scaled by
    /// `scale_rewards`; Shao et al. 2024), `rloo` (r − mean of the other completions;
    /// Ahmadian et al. 2024, TRL `RLOOTrainer`), `reinforce_pp` (REINFORCE++-baseline, Hu et
    /// al. 2025: r − group mean, whitened over the batch). Default `grpo`.
    pub advantage: Advantage,
    /// For `advantage: grpo`, what r − mean is divided by (+ 1e-4): `group` (its group's
    /// std), `batch` (the batch's std; Liu et al. 2025), `none` / `false` (Dr. GRPO, Liu et
    /// al. 2025). TRL `scale_rewards`, default `group`.
    pub scale_rewards: ScaleRewards,
    /// How per-token losses are reduced: `grpo` (per-completion mean, then mean),
    /// `dr_grpo` (÷ completions × max_new_tokens), `dapo` (÷ the generation batch's tokens),
    /// `bnpo` (÷ the update's tokens). TRL `loss_type`, default `dapo`.
    pub loss_type: LossType,
    /// Ratios are clipped below at 1 − epsilon (PPO's ε; TRL `epsilon`, default 0.2).
    pub epsilon: f64,
    /// Upper clip 1 + epsilon_high; DAPO's clip-higher uses 0.28 (Yu et al. 2025). Absent =
    /// `epsilon` (TRL `epsilon_high`, default None). Must not be below `epsilon`.
    pub epsilon_high: Option<f64>,
    /// `token` (one ratio per token) or `sequence` (one per completion: GSPO, Zheng et al.
    /// 2025). TRL `importance_sampling_level`, default `token`.
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// Weight of the k3 KL to the reference in the loss (Schulman's estimator, as DeepSeekMath);
    /// 0 loads no reference model. TRL `beta`, default 0.0.
    pub beta: f64,
    /// Optimisation passes over each generation batch, ratios taken against the policy that
    /// sampled it (GRPO's μ; TRL `num_iterations`, default 1).
    pub num_iterations: usize,
    /// Completions that hit `max_new_tokens` without a stop token get no loss (DAPO's
    /// overlong filtering; TRL `mask_truncated_completions`, default false).
    pub mask_truncated_completions: bool,
    /// DAPO's dynamic sampling (Yu et al. 2025): groups whose rewards are all equal (no
    /// signal) are dropped and more prompts are sampled to refill the batch, at most
    /// `max_sampling_rounds` generations per step (verl `filter_groups`). Default false.
    pub dynamic_sampling: bool,
    /// Generation rounds per step when `dynamic_sampling` refills (verl
    /// `max_num_gen_batches`); when they run out the step trains on the groups it has.
    /// Default 3.
    pub max_sampling_rounds: usize,
    /// DAPO's soft overlong punishment: completions longer than max_new_tokens − buffer
    /// tokens lose up to `overlong_penalty` of reward, linearly (Yu et al. 2025, eq. 13; TRL
    /// `get_soft_overlong_punishment(max_completion_len, soft_punish_cache)`). 0 = off
    /// (default).
    pub overlong_buffer: usize,
    /// The penalty at max_new_tokens (verl `overlong_buffer.penalty_factor`, default 1.0).
    pub overlong_penalty: f64,
}

impl Default for GrpoAlgo {
    fn default() -> Self {
        GrpoAlgo {
            advantage: Advantage::Grpo,
            scale_rewards: ScaleRewards::Group,
            loss_type: LossType::Dapo,
            epsilon: 0.2,
            epsilon_high: None,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            beta: 0.0,
            num_iterations: 1,
            mask_truncated_completions: false,
            dynamic_sampling: false,
            max_sampling_rounds: 3,
            overlong_buffer: 0,
            overlong_penalty: 1.0,
        }
    }
}

impl GrpoAlgo {
    /// The upper clip: `epsilon_high`, or `epsilon` when absent.
    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Judge whose mean score on the held-out prompts is logged as `judge_score` (with
    /// `math`: exact-match accuracy); absent = the first of `score`'s judges. The starting
    /// policy is scored before training.
    pub judge: Option<String>,
    /// At most this many held-out prompts per evaluation. Default 64.
    pub max_prompts: usize,
    /// Sampling temperature of the held-out responses; absent = `rollout.temperature` (as
    /// PPO does, so the two compare), 0 = greedy.
    pub temperature: Option<f64>,
    /// Held-out responses kept in `samples.jsonl` at each evaluation. Default 3.
    pub samples_logged: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            judge: None,
            max_prompts: 64,
            temperature: None,
            samples_logged: 3,
        }
    }
}
