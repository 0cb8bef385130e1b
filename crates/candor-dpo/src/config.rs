//! The DPO stage config (`configs/*/dpo.yaml`). Names follow TRL's `DPOConfig` (and its
//! `CPOConfig` for SimPO) where one exists; defaults are TRL's unless a comment says otherwise.

use std::path::PathBuf;

use candor_model::generate::SamplingParams;
use candor_train::config::TrainConfig;
use candor_train::health::HealthConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    /// Seeds the held-out split, the order of the training pairs and the evaluation's
    /// sampling. Default 1.
    pub seed: u64,
    /// The checkpoint the policy starts from, usually the SFT model (`--init` sets it); an
    /// `lm` checkpoint directory or hf:ORG/NAME in the local Hugging Face cache. Default:
    /// none (required).
    pub init: Option<PathBuf>,
    /// The frozen reference π_ref of the implicit reward β·log(π/π_ref) (`--reference` sets
    /// it). It must use the policy's tokenizer. Default: none, meaning `init` frozen, as in
    /// TRL when no `ref_model` is given. Not read with `dpo.loss_type: simpo`.
    pub reference: Option<PathBuf>,
    pub data: DpoData,
    /// The preference loss.
    pub dpo: DpoAlgo,
    /// Held-out evaluation.
    pub eval: DpoEval,
    /// Run-health thresholds (the section PPO and GRPO have; those that apply to DPO):
    /// margin collapse (the held-out `eval_margin` falling from its best), chosen responses
    /// losing likelihood (`reward_chosen` below −`chosen_floor`), gradient spikes, and with
    /// `eval.prompts`: runaway KL, response-length drift, reward hacking (the training
    /// margin rising while the held-out judge falls). `train.stop_on_health` stops the run
    /// instead.
    pub health: HealthConfig,
    /// Optimiser, schedule and cadence; `batch_size` counts preference pairs per step (TRL's
    /// `per_device_train_batch_size`); a prompt's pairs are kept together, so a step takes
    /// whole prompts until it has at least `batch_size` pairs.
    pub train: TrainConfig,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            seed: 1,
            init: None,
            reference: None,
            data: DpoData::default(),
            dpo: DpoAlgo::default(),
            eval: DpoEval::default(),
            health: HealthConfig::default(),
            train: TrainConfig {
                steps: 100,
                batch_size: 16,
                // TRL's DPOConfig: learning_rate 1e-6 for real models; candor's tiny models
                // need more, so configs set it
                lr: 1e-6,
                min_lr: 1e-6,
                warmup_steps: 0,
                weight_decay: 0.0,
                eval_every: 25,
                eval_batches: 0,
                log_every: 1,
                ..TrainConfig::default()
            },
        }
    }
}

/// What to do with an exchange longer than `data.max_len` tokens.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TooLong {
    /// Keep its first `max_len` tokens: the prompt and the start of the response (TRL's
    /// `truncation_mode: keep_start`). A prompt that alone fills `max_len` is dropped.
    Truncate,
    /// Leave the response (and the pairs it is in) out.
    Drop,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DpoData {
    /// Preference JSONL files, what the reward stage reads: `{"prompt", "responses",
    /// "ranks"?}` (`candor rank` output; every pair of a ranking, ties make no pair) or
    /// `{"prompt", "chosen", "rejected"}`. Default: none (required).
    pub files: Vec<PathBuf>,
    /// A separate held-out preference file for `eval_loss`, `eval_accuracy`, `eval_margin`.
    /// Default: none (then `heldout_fraction` of the prompts of `files` are held out).
    pub heldout: Option<PathBuf>,
    /// Fraction of prompts held out when `heldout` is not given. Default 0.1.
    pub heldout_fraction: f64,
    /// Longest prompt + response in tokens (TRL's `max_length`). 0 = the model's
    /// `max_position_embeddings` (which is also the upper bound). Default 0.
    pub max_len: usize,
    /// `truncate` or `drop` an exchange longer than `max_len`; the log counts them.
    /// Default `truncate` (TRL).
    pub too_long: TooLong,
}

impl Default for DpoData {
    fn default() -> Self {
        DpoData {
            files: vec![],
            heldout: None,
            heldout_fraction: 0.1,
            max_len: 0,
            too_long: TooLong::Truncate,
        }
    }
}

/// The loss family (`dpo.loss_type`), with TRL's names.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    /// DPO: −log σ(β·Δ), Δ = log-ratio of the better response − that of the worse (Rafailov
    /// et al. 2023, eq. 7; TRL `sigmoid`). With `label_smoothing` ε: conservative DPO (cDPO,
    /// Mitchell 2023), −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ).
    Sigmoid,
    /// IPO: (Δ̄ − 1/(2β))², Δ̄ from length-averaged log-ratios (Azar et al. 2023, eq. 17;
    /// TRL `ipo`, which averages over the response's tokens).
    Ipo,
    /// SLiC's hinge: max(0, 1 − β·Δ) (Zhao et al. 2023; TRL `hinge`).
    Hinge,
    /// SimPO: reference-free, −log σ(β·(avg log π(better) − avg log π(worse)) − γ), log-probs
    /// averaged over the response's tokens (Meng et al. 2024; TRL's `CPOTrainer` with
    /// `loss_type: simpo`, `cpo_alpha: 0`). No reference model is loaded.
    Simpo,
}

impl LossType {
    pub fn name(self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Ipo => "ipo",
            LossType::Hinge => "hinge",
            LossType::Simpo => "simpo",
        }
    }

    /// Whether the loss reads a reference model's log-probs.
    pub fn needs_reference(self) -> bool {
        self != LossType::Simpo
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DpoAlgo {
    /// `sigmoid` (DPO), `ipo`, `hinge` (SLiC) or `simpo`; see [`LossType`]. Default `sigmoid`.
    pub loss_type: LossType,
    /// β: the inverse temperature of the implicit reward β·log(π/π_ref); higher stays closer
    /// to the reference. For `ipo` it is τ of the paper; for `simpo` the reward scale (the
    /// SimPO paper uses 2.0–2.5). Must be > 0. Default 0.1 (TRL).
    pub beta: f64,
    /// ε of conservative DPO (`sigmoid`) and SimPO: the assumed probability that a pair's
    /// label is flipped, in [0, 0.5). Only with `sigmoid` or `simpo`. Default 0.
    pub label_smoothing: f64,
    /// γ, SimPO's target reward margin (TRL `CPOConfig.simpo_gamma`). Only with `simpo`.
    /// Default 0.5 (TRL).
    pub simpo_gamma: f64,
    /// Weight of an NLL term on the better response of each pair, −Σ log π(y_w) / Σ|y_w|
    /// over the batch's pairs (RPO, Pang et al. 2024; TRL `loss_type: [sigmoid, sft]` with
    /// `loss_weights: [1, sft_coef]`, formerly `rpo_alpha`). 0 = off. Default 0.
    pub sft_coef: f64,
}

impl Default for DpoAlgo {
    fn default() -> Self {
        DpoAlgo {
            loss_type: LossType::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            sft_coef: 0.0,
        }
    }
}

impl DpoAlgo {
    /// Why these settings cannot train, as `dpo.KEY: what is expected`.
    pub fn check(&self) -> Result<(), String> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(format!(
                "dpo.beta: must be a positive number, got {}",
                self.beta
            ));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(format!(
                "dpo.label_smoothing: must be in [0, 0.5), got {}",
                self.label_smoothing
            ));
        }
        if self.label_smoothing > 0.0
            && !matches!(self.loss_type, LossType::Sigmoid | LossType::Simpo)
        {
            return Err(format!(
                "dpo.label_smoothing: applies to loss_type sigmoid (cDPO) and simpo, not {}",
                self.loss_type.name()
            ));
        }
        if !self.simpo_gamma.is_finite() {
            return Err("dpo.simpo_gamma: must be a finite number".into());
        }
        if !(self.sft_coef >= 0.0 && self.sft_coef.is_finite()) {
            return Err(format!("dpo.sft_coef: must be ≥ 0, got {}", self.sft_coef));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DpoEval {
    /// Held-out prompts (JSONL `{"prompt", ...}`) the policy answers at each evaluation, for
    /// `judge_score` (with `judge`) and `kl` (to the reference, on its own samples). Default:
    /// none (no sampling evaluation).
    pub prompts: Option<PathBuf>,
    /// The judge whose mean score on `prompts` is `judge_score`, as PPO reports it; the
    /// initial policy is scored before training. Default: none.
    pub judge: Option<String>,
    /// At most this many held-out prompts per evaluation. Default 64.
    pub max_prompts: usize,
    /// Sampled responses kept in `samples.jsonl` at each evaluation. Default 3.
    pub samples_logged: usize,
    /// Most tokens per sampled response. Default 32.
    pub max_new_tokens: usize,
    /// Sampling temperature (and top-k / top-p; 0 / 1.0 = off). Default 1.0.
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
}

impl Default for DpoEval {
    fn default() -> Self {
        DpoEval {
            prompts: None,
            judge: None,
            max_prompts: 64,
            samples_logged: 3,
            max_new_tokens: 32,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl DpoEval {
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_name_their_key() {
        let bad = |f: fn(&mut DpoAlgo)| {
            let mut a = DpoAlgo::default();
            f(&mut a);
            a.check().unwrap_err()
        };
        assert!(bad(|a| a.beta = 0.0).starts_with("dpo.beta: must be a positive number"));
        assert!(bad(|a| a.beta = -1.0).starts_with("dpo.beta:"));
        assert!(bad(|a| a.label_smoothing = 0.5).starts_with("dpo.label_smoothing:"));
        assert!(bad(|a| {
            a.loss_type = LossType::Ipo;
            a.label_smoothing = 0.1
        })
        .contains("not ipo"));
        assert!(bad(|a| a.sft_coef = -0.1).starts_with("dpo.sft_coef:"));
        assert!(DpoAlgo::default().check().is_ok());
    }

    #[test]
    fn unknown_loss_type_and_keys_are_rejected_by_name() {
        let e = serde_yaml::from_str::<DpoConfig>("dpo:\n  loss_type: kto\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown variant `kto`") && e.contains("sigmoid"),
            "{e}"
        );
        let e = serde_yaml::from_str::<DpoConfig>("dpo:\n  betta: 0.1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `betta`"), "{e}");
        let c: DpoConfig = serde_yaml::from_str("dpo:\n  loss_type: simpo\n").unwrap();
        assert!(!c.dpo.loss_type.needs_reference());
    }
}
