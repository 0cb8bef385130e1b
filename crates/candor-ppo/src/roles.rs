//! Step 0 of PPO: the four roles — the policy and the critic (trainable, from the SFT and
//! reward checkpoints, or from our own partial run when resuming), the frozen reference
//! (in `train.dtype`), the reward (model and/or judge) — with the tokenizer, the prompts
//! posed with the chat template and PPO-ptx's pretraining examples.

use std::path::{Path, PathBuf};

use candle_nn::VarMap;
use candor_core::checkpoint::Head;
use candor_core::rng::Rng;
use candor_data::chat::{stop_tokens, ChatTemplate};
use candor_data::text::{pack_corpus, read_corpus, tokenize_documents};
use candor_data::Tokenizer;
use candor_model::io::read_config;
use candor_model::lora::Adapters;
use candor_model::{Model, ModelConfig};
use candor_train::batch::LmExample;
use candor_train::ckpt::RunOptions;
use candor_train::err;
use candor_train::lora::load_for_training;
use candor_train::precision::load_frozen;
use candor_train::rollout::{load_prompts_with, Prompt};
use candor_train::score::{check_judge_fields, judge, Judge, Scorer};

use crate::{CriticInit, PpoConfig, Result};

/// Everything a PPO run reads besides its own progress.
pub(crate) struct Roles {
    pub tok: Tokenizer,
    /// The chat template's end-of-turn tokens: where sampling stops.
    pub stop: Vec<u32>,
    pub pad: u32,
    pub policy_config: ModelConfig,
    pub scorer: Scorer,
    /// Scores held-out responses (`eval.judge`, else `score.judge`).
    pub eval_judge: Option<Box<dyn Judge>>,
    pub prompts: Vec<Prompt>,
    pub heldout: Vec<Prompt>,
    pub ptx: Vec<LmExample>,
    /// The starting policy, frozen: in a LoRA run the policy with its adapters off (the
    /// same weights, no second copy).
    pub reference: Model,
    /// Where the critic was loaded from.
    pub critic_src: PathBuf,
    pub policy: Model,
    pub policy_vars: VarMap,
    pub critic: Model,
    pub critic_vars: VarMap,
    pub critic_config: ModelConfig,
    /// A LoRA run's adapters (`train.lora`): the policy's and the critic's (with its head).
    pub policy_adapters: Option<Adapters>,
    pub critic_adapters: Option<Adapters>,
}

impl Roles {
    /// Load the roles of `cfg` (paths resolved) for a run into `opts.out`.
    pub fn load(
        cfg: &PpoConfig,
        opts: &RunOptions,
        policy_dir: &Path,
        resuming: bool,
    ) -> Result<Roles> {
        let (device, dtype) = (&opts.device, cfg.train.dtype);
        let tok = Tokenizer::from_dir(policy_dir)?;
        let template = ChatTemplate::for_tokenizer(&tok);
        let stop = stop_tokens(&tok);
        let pad = tok.pad_id();
        let policy_config = read_config(policy_dir)?;
        if policy_config.head() != Head::Lm {
            return Err(err(format!(
                "{}: the policy must be an lm checkpoint, this one has a score head",
                policy_dir.display()
            )));
        }
        let scorer = Scorer::load(
            &cfg.score,
            cfg.reward.as_deref(),
            (&tok, policy_dir),
            dtype,
            opts,
            "ppo",
        )?;
        let eval_judge_name = cfg.eval.judge.clone().or(cfg.score.judge.clone());
        let eval_judge = eval_judge_name.as_deref().map(judge).transpose()?;

        let ctx = policy_config.max_position_embeddings;
        let max_new = cfg.rollout.max_new_tokens;
        let max_new_key = "rollout.max_new_tokens";
        let prompts = load_prompts_with(
            &cfg.data.prompts,
            &cfg.data.columns,
            &tok,
            &template,
            max_new,
            max_new_key,
            ctx,
        )?;
        // every prompt line carries the fields the judges read (named by file and line)
        check_judge_fields(&cfg.data.prompts, &scorer.judges())?;
        let heldout = match &cfg.data.heldout_prompts {
            Some(p) => {
                if let Some(j) = &eval_judge {
                    check_judge_fields(p, &[j.as_ref()])?;
                }
                let mut h = load_prompts_with(
                    p,
                    &cfg.data.columns,
                    &tok,
                    &template,
                    max_new,
                    max_new_key,
                    ctx,
                )?;
                h.truncate(cfg.eval.max_prompts.max(1));
                h
            }
            None => vec![],
        };
        let ptx: Vec<LmExample> = if cfg.ppo.ptx_coef > 0.0 {
            let docs = read_corpus(&cfg.data.ptx_files)?;
            let stream = tokenize_documents(&tok, &docs, tok.eos_id().unwrap_or(pad))?;
            pack_corpus(&stream, ctx.min(256), 0.0)?
                .train
                .into_iter()
                .map(LmExample::dense)
                .collect()
        } else {
            vec![]
        };

        let mut init_rng = Rng::derive(cfg.seed, "critic-init");
        let critic_init = match (cfg.critic.init, &cfg.reward) {
            (CriticInit::Reward, Some(r)) => r.clone(),
            _ => policy_dir.to_path_buf(),
        };
        let critic_resume = opts.out.join("critic");
        let (policy_spec, resume) = (
            cfg.policy.as_deref().unwrap_or(policy_dir),
            resuming.then_some(opts.out.as_path()),
        );
        // every weight, or with train.lora adapters (and the critic's head) on the starting
        // checkpoints frozen; resuming, from our partial run
        let (policy, policy_vars, policy_adapters) = load_for_training(
            policy_spec,
            policy_dir,
            resume,
            Head::Lm,
            &cfg.train,
            &mut init_rng,
            device,
        )?;
        let (critic, critic_vars, critic_adapters) = load_for_training(
            &critic_init,
            &critic_init,
            resuming.then_some(critic_resume.as_path()),
            Head::Score,
            &cfg.train,
            &mut init_rng,
            device,
        )?;
        let reference = match &policy_adapters {
            Some(_) => policy.without_adapters(),
            None => load_frozen(policy_dir, dtype, device)?,
        };
        let critic_src = if resuming { critic_resume } else { critic_init };
        let critic_config = read_config(&critic_src)?;
        Ok(Roles {
            tok,
            stop,
            pad,
            policy_config,
            scorer,
            eval_judge,
            prompts,
            heldout,
            ptx,
            reference,
            critic_src,
            policy,
            policy_vars,
            critic,
            critic_vars,
            critic_config,
            policy_adapters,
            critic_adapters,
        })
    }
}
