//! Step 6 of a PPO iteration's bookkeeping: the held-out evaluation (responses to the
//! held-out prompts, their judge score and reward; the first few logged as samples) and
//! the checkpoint (the policy, the critic in `critic/`, the logged samples).

use std::path::Path;

use candle_nn::VarMap;
use candor_core::checkpoint::{CandorMeta, Head};
use candor_core::metrics::MetricsLog;
use candor_core::record;
use candor_core::rng::Rng;
use candor_data::Tokenizer;
use candor_model::lora::Adapters;
use candor_model::{Model, ModelConfig};
use candor_train::ckpt::{save_checkpoint, write_model_dir, Snapshot, TrainerState};
use candor_train::err;
use candor_train::optim::AdamW;
use candor_train::rollout::{sample_responses, Prompt};
use candor_train::score::{judge_scores, Judge};
use candor_train::seq::sequence_scores;

use crate::{PpoConfig, Result};

const SAMPLES_FILE: &str = "samples.jsonl";

/// The held-out evaluation of a PPO run.
pub(crate) struct Evaluation<'a> {
    pub cfg: &'a PpoConfig,
    pub heldout: &'a [Prompt],
    pub tok: &'a Tokenizer,
    pub stop: &'a [u32],
    pub judge: Option<&'a dyn Judge>,
    pub reward_model: Option<&'a Model>,
}

impl Evaluation<'_> {
    /// Responses of `policy` to the held-out prompts (the same sampling seed every time),
    /// their mean `judge_score` and `eval_reward` recorded at `step`, the first
    /// `eval.samples_logged` in `samples_log`. Returns the judge score, if any.
    pub fn run(
        &self,
        policy: &Model,
        step: u64,
        metrics: &mut MetricsLog,
        samples_log: &mut MetricsLog,
    ) -> Result<Option<f64>> {
        let cfg = self.cfg;
        if self.heldout.is_empty() {
            return Ok(None);
        }
        let mut rng = Rng::derive(cfg.seed, "eval");
        let ps: Vec<&Prompt> = self.heldout.iter().collect();
        let out = sample_responses(
            policy,
            self.tok,
            &ps,
            &cfg.rollout.sampling(),
            self.stop,
            &mut rng,
        )?;
        let texts = &out.texts;
        let mut rec = record!(step;);
        let mut judged = None;
        if let Some(j) = self.judge {
            let js = judge_scores(j, &ps, texts)?;
            let mean = js.iter().sum::<f64>() / js.len() as f64;
            rec.insert("judge_score".into(), serde_json::json!(mean));
            judged = Some(mean);
        }
        if let Some(rm) = self.reward_model {
            let sb = out.seq_batch(&ps, self.tok.pad_id(), policy.device())?;
            let r = sequence_scores(rm, &sb)?;
            rec.insert(
                "eval_reward".into(),
                serde_json::json!(r.iter().sum::<f64>() / r.len() as f64),
            );
        }
        metrics.push(rec);
        for (p, t) in ps.iter().zip(texts).take(cfg.eval.samples_logged) {
            samples_log.push(record!(step; "prompt" => p.text, "response" => t));
        }
        Ok(judged)
    }
}

/// What a PPO checkpoint writes.
pub(crate) struct Saver<'a> {
    pub out: &'a Path,
    pub policy_config: &'a ModelConfig,
    pub policy_vars: &'a VarMap,
    pub critic_config: &'a ModelConfig,
    pub critic_vars: &'a VarMap,
    pub tok: &'a Tokenizer,
    /// A LoRA run's adapters: both models are then written as adapter directories.
    pub policy_adapters: Option<&'a Adapters>,
    pub critic_adapters: Option<&'a Adapters>,
}

impl Saver<'_> {
    /// Write a checkpoint (atomically): the policy with both optimisers' moments, the
    /// critic in `critic/`, the logged samples.
    pub fn save(
        &self,
        state: &TrainerState,
        metrics: &MetricsLog,
        samples: &MetricsLog,
        (policy_opt, critic_opt): (&AdamW, &AdamW),
        meta: &mut CandorMeta,
    ) -> Result<()> {
        let snap = Snapshot {
            config: self.policy_config,
            head: Head::Lm,
            varmap: self.policy_vars,
            tokenizer: self.tok,
            adapters: self.policy_adapters,
            metrics,
            state,
            optimizers: &[("policy", policy_opt), ("critic", critic_opt)],
        };
        save_checkpoint(self.out, &snap, meta, |dir| {
            let cdir = dir.join("critic");
            std::fs::create_dir_all(&cdir).map_err(|e| err(format!("{}: {e}", cdir.display())))?;
            match self.critic_adapters {
                Some(adapters) => {
                    candor_model::lora::save_adapter(&cdir, adapters)?;
                    self.tok.save(&cdir)?;
                }
                None => write_model_dir(
                    &cdir,
                    self.critic_config,
                    Head::Score,
                    self.critic_vars,
                    self.tok,
                )?,
            }
            write_samples(dir, samples)
        })
    }
}

fn write_samples(dir: &Path, samples: &MetricsLog) -> Result<()> {
    Ok(samples.write_file(&dir.join(SAMPLES_FILE))?)
}

/// The samples a partial run logged (to resume).
pub(crate) fn read_samples(dir: &Path) -> Result<MetricsLog> {
    Ok(MetricsLog::read_file(&dir.join(SAMPLES_FILE), None)?)
}
