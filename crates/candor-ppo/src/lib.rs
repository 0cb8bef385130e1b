//! Stage: reinforcement learning from feedback with PPO (InstructGPT step 3).
//!
//! Four roles: the **policy** (trainable, from SFT), the **reference** (a frozen copy of the
//! SFT model), the **critic** (trainable scalar head, from the reward model by default) and
//! the **reward** (the frozen reward model and/or a rule judge). Each iteration, numbered
//! as in TRL's PPO trainer:
//!
//! 1. sample a batch of prompts; 2. generate responses with the KV cache; 3. score them
//! (reward model at the last token, normalised, plus judges) and compute log-probs of the
//! policy and the reference and the critic's values; 4. per-token rewards = −β·KL plus the
//! score at the last token, advantages and returns by GAE, advantages whitened; 5. several
//! PPO epochs over minibatches: clipped policy loss + clipped value loss (− entropy bonus,
//! + PPO-ptx), early stop on approximate KL; 6. update β, log, evaluate, checkpoint.

pub mod config;
pub mod math;
pub mod rollout;

use std::path::Path;
use std::time::Instant;

use candor_core::checkpoint::{parent_ref, CandorMeta, Head};
use candor_core::metrics::MetricsLog;
use candor_core::record;
use candor_core::rng::Rng;
use candor_data::chat::{stop_tokens, ChatTemplate};
use candor_data::jsonl::read_jsonl;
use candor_data::text::{pack_corpus, read_corpus, tokenize_documents};
use candor_data::Tokenizer;
use candor_model::generate::generate;
use candor_model::io::{load_trainable, read_config};
use candor_model::Model;
use candor_train::batch::{lm_batch, Cursor, LmExample, Sampler};
use candor_train::ckpt::{
    read_trainer, restore_optimizer, save_checkpoint, write_model_dir, Snapshot, Start,
    TrainerState,
};
use candor_train::dist::Dist;
use candor_train::health::{merged_step, observation_of, HealthMonitor};
use candor_train::loss::lm_loss;
use candor_train::optim::{clip_grad_norm, named_vars, AdamW, Grads};
use candor_train::precision::{compute_model, inference_model, load_frozen};
use candor_train::progress::Progress;
use candor_train::schedule::lr_at;
use serde::Deserialize;

pub use config::*;
use math::{
    gae, masked_mean, masked_mean_rows, masked_whiten, per_token_rewards, policy_loss, scalar,
    value_loss, KlController,
};
use rollout::{logprobs, rows, seq_batch, sequence_scores, tensor, values, Rollout};

pub type Error = candor_train::Error;
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn err(msg: String) -> Error {
    Error::Msg(msg)
}

pub use candor_train::ckpt::RunOptions;

/// A prompt line: `{"prompt": ..., "reference": ...}`; every field besides `prompt` is kept
/// for the judges.
#[derive(Deserialize, Clone)]
pub struct PromptLine {
    pub prompt: String,
    #[serde(flatten)]
    pub fields: candor_judge::Fields,
}

/// A prompt ready to pose: its text, the line's other fields, and tokens (rendered with the
/// chat template).
struct Prompt {
    text: String,
    fields: candor_judge::Fields,
    ids: Vec<u32>,
}

fn load_prompts(
    path: &Path,
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_new: usize,
    ctx: usize,
) -> Result<Vec<Prompt>> {
    let lines = read_jsonl::<PromptLine>(path)?;
    if lines.is_empty() {
        return Err(err(format!(
            "{}: no prompts (expected JSONL lines {{\"prompt\": ...}})",
            path.display()
        )));
    }
    let mut out = vec![];
    for (line, p) in lines {
        if p.prompt.trim().is_empty() {
            return Err(err(format!("{}:{line}: empty prompt", path.display())));
        }
        let ids = tok.encode(&template.render_prompt(&p.prompt)?)?;
        if ids.len() + max_new > ctx {
            return Err(err(format!(
                "{}:{line}: prompt is {} tokens; with rollout.max_new_tokens {max_new} it exceeds the policy's context of {ctx}",
                path.display(),
                ids.len()
            )));
        }
        out.push(Prompt {
            text: p.prompt,
            fields: p.fields,
            ids,
        });
    }
    Ok(out)
}

fn same_tokenizer(a: &Tokenizer, b: &Tokenizer) -> bool {
    let (va, vb) = (a.inner.get_vocab(true), b.inner.get_vocab(true));
    va == vb
}

fn judge(name: &str) -> Result<Box<dyn candor_judge::Judge>> {
    candor_judge::judge_by_name(name).map_err(|e| err(e.to_string()))
}

fn judge_scores(
    judge: &dyn candor_judge::Judge,
    prompts: &[&Prompt],
    responses: &[String],
) -> Result<Vec<f64>> {
    let batch: Vec<candor_judge::Sample> = prompts
        .iter()
        .zip(responses)
        .map(|(p, r)| candor_judge::Sample {
            prompt: &p.text,
            response: r,
            fields: &p.fields,
        })
        .collect();
    judge.score_batch(&batch).map_err(|e| err(e.to_string()))
}

/// Mean and std a reward checkpoint recorded over its training responses.
fn reward_stats(dir: &Path) -> Result<Option<(f64, f64)>> {
    let Some(meta) = CandorMeta::read(dir)? else {
        return Ok(None);
    };
    let get = |k: &str| meta.metrics.get(k).and_then(|v| v.as_f64());
    Ok(match (get("reward_mean"), get("reward_std")) {
        (Some(m), Some(s)) if s > 0.0 => Some((m, s)),
        _ => None,
    })
}

/// Everything the scores of a batch of responses are made from.
struct Scorer {
    reward_model: Option<Model>,
    stats: Option<(f64, f64)>,
    judge: Option<Box<dyn candor_judge::Judge>>,
    cfg: ScoreConfig,
}

struct Scores {
    /// The combined, normalised, clipped score PPO optimises.
    combined: Vec<f64>,
    /// The reward model's raw score (or the judge's when there is no reward model).
    raw: Vec<f64>,
}

impl Scorer {
    fn score(
        &self,
        sb: &rollout::SeqBatch,
        prompts: &[&Prompt],
        responses: &[String],
        stopped: &[bool],
    ) -> Result<Scores> {
        let n = prompts.len();
        let mut combined = vec![0.0; n];
        let mut raw = vec![0.0; n];
        if let Some(rm) = &self.reward_model {
            raw = sequence_scores(rm, sb)?;
            for i in 0..n {
                let norm = match (self.cfg.normalize, self.stats) {
                    (true, Some((m, s))) => (raw[i] - m) / s,
                    _ => raw[i],
                };
                combined[i] += self.cfg.reward_model_weight * norm;
            }
        }
        if let Some(j) = &self.judge {
            let js = judge_scores(j.as_ref(), prompts, responses)?;
            for i in 0..n {
                combined[i] += self.cfg.judge_weight * js[i];
            }
            if self.reward_model.is_none() {
                raw = js;
            }
        }
        for i in 0..n {
            if !stopped[i] {
                combined[i] += self.cfg.missing_eos_penalty;
            }
            if self.cfg.clip > 0.0 {
                combined[i] = combined[i].clamp(-self.cfg.clip, self.cfg.clip);
            }
        }
        Ok(Scores { combined, raw })
    }
}

/// Run PPO; returns the output checkpoint's metadata.
pub fn run(cfg: &PpoConfig, opts: &RunOptions) -> Result<CandorMeta> {
    let origin = &opts.origin;
    cfg.train.validate(origin)?;
    validate(cfg, origin)?;
    let policy_dir = cfg.policy.clone().ok_or_else(|| {
        err(format!(
            "{origin}: policy: give the SFT checkpoint (--policy DIR)"
        ))
    })?;
    opts.check_batch(
        "rollout.prompts_per_iteration",
        cfg.rollout.prompts_per_iteration,
    )?;
    // the config as given is what candor.json records; the run reads the resolved
    // directories (a checkpoint directory, or hf:ORG/NAME in the local Hugging Face cache)
    let effective = candor_core::config::effective(cfg);
    let policy_dir = candor_model::resolve_model_dir(&policy_dir)?;
    let resolved = PpoConfig {
        reward: cfg
            .reward
            .as_ref()
            .map(candor_model::resolve_model_dir)
            .transpose()?,
        ..cfg.clone()
    };
    let cfg = &resolved;
    let start = opts.plan_start(&effective)?;
    if let Start::Done(meta) = start {
        eprintln!(
            "[ppo] {} is already complete (step {})",
            opts.out.display(),
            meta.step
        );
        return Ok(meta);
    }
    let resuming = matches!(start, Start::Resume(_));
    let (device, dist, dtype) = (&opts.device, &opts.dist, cfg.train.dtype);

    // the four roles (the frozen ones in train.dtype)
    let tok = Tokenizer::from_dir(&policy_dir)?;
    let template = ChatTemplate::for_tokenizer(&tok);
    let stop = stop_tokens(&tok);
    let pad = tok.pad_id();
    let policy_config = read_config(&policy_dir)?;
    if policy_config.head() != Head::Lm {
        return Err(err(format!(
            "{}: the policy must be an lm checkpoint, this one has a score head",
            policy_dir.display()
        )));
    }
    let reward_model = match &cfg.reward {
        Some(dir) if cfg.score.reward_model_weight != 0.0 => {
            let rm_tok = Tokenizer::from_dir(dir)?;
            if !same_tokenizer(&tok, &rm_tok) {
                return Err(err(format!(
                    "policy ({}) and reward model ({}) use different tokenizers; PPO scores the policy's tokens directly, so they must match",
                    policy_dir.display(),
                    dir.display()
                )));
            }
            let rm = load_frozen(dir, dtype, device)?;
            if rm.head != Head::Score {
                return Err(err(format!(
                    "{}: the reward model must have a score head (LlamaForSequenceClassification)",
                    dir.display()
                )));
            }
            Some(rm)
        }
        _ => None,
    };
    if reward_model.is_none() && cfg.score.judge.is_none() {
        return Err(err(format!("{origin}: no reward: give --reward REWARD_DIR (with score.reward_model_weight ≠ 0) or score.judge")));
    }
    let stats = match (&cfg.reward, cfg.score.normalize) {
        (Some(dir), true) if reward_model.is_some() => {
            let s = reward_stats(dir)?;
            if s.is_none() {
                eprintln!(
                    "[ppo] {}: no reward_mean/reward_std in candor.json; scores are not normalised",
                    dir.display()
                );
            }
            s
        }
        _ => None,
    };
    let scorer = Scorer {
        reward_model,
        stats,
        judge: cfg.score.judge.as_deref().map(judge).transpose()?,
        cfg: cfg.score.clone(),
    };
    let eval_judge_name = cfg.eval.judge.clone().or(cfg.score.judge.clone());
    let eval_judge = eval_judge_name.as_deref().map(judge).transpose()?;

    let ctx = policy_config.max_position_embeddings;
    let max_new = cfg.rollout.max_new_tokens;
    let prompts = load_prompts(&cfg.data.prompts, &tok, &template, max_new, ctx)?;
    let heldout = match &cfg.data.heldout_prompts {
        Some(p) => {
            let mut h = load_prompts(p, &tok, &template, max_new, ctx)?;
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

    let reference = load_frozen(&policy_dir, dtype, device)?;
    let mut init_rng = Rng::derive(cfg.seed, "critic-init");
    let (policy_src, critic_src) = if resuming {
        (opts.out.clone(), opts.out.join("critic"))
    } else {
        let critic_src = match (cfg.critic.init, &cfg.reward) {
            (CriticInit::Reward, Some(r)) => r.clone(),
            _ => policy_dir.clone(),
        };
        (policy_dir.clone(), critic_src)
    };
    let (policy, policy_vars) = load_trainable(&policy_src, Head::Lm, &mut init_rng, device)?;
    let (critic, critic_vars) = load_trainable(&critic_src, Head::Score, &mut init_rng, device)?;
    let critic_config = read_config(&critic_src)?;
    let mut policy_opt = AdamW::new(named_vars(&policy_vars), &cfg.train)?;
    let mut critic_opt = AdamW::new(named_vars(&critic_vars), &cfg.train)?;
    let critic_lr_scale = cfg.critic.lr.map_or(1.0, |lr| lr / cfg.train.lr);

    let mut kl_ctl = KlController {
        value: cfg.kl.coef,
        target: cfg.kl.target,
        horizon: cfg.kl.horizon,
    };
    let mut metrics = MetricsLog::default();
    let mut samples_log = MetricsLog::default();
    let mut state = TrainerState {
        step: 0,
        rng: Rng::derive(cfg.seed, "rollout"),
        cursor: Cursor::default(),
        tokens: 0,
        elapsed_sec: 0.0,
        optimizer_steps: Default::default(),
        extra: serde_json::Value::Null,
    };
    let mut meta = CandorMeta::new("ppo", Head::Lm, effective);
    meta.parents = vec![parent_ref("policy", &policy_dir)?];
    if let Some(r) = &cfg.reward {
        meta.parents.push(parent_ref("reward", r)?);
    }
    meta.total_steps = cfg.train.steps as u64;
    if resuming {
        let (s, tensors) = read_trainer(&opts.out, device)?;
        restore_optimizer(&mut policy_opt, "policy", &s, &tensors, &opts.out)?;
        restore_optimizer(&mut critic_opt, "critic", &s, &tensors, &opts.out)?;
        if let Ok(k) = serde_json::from_value::<KlController>(s.extra["kl"].clone()) {
            kl_ctl = k;
        }
        metrics = MetricsLog::read(&opts.out, Some(s.step))?;
        samples_log = read_samples(&opts.out)?;
        state = s;
    }
    let mut health = HealthMonitor::replay(cfg.health.clone(), &metrics.records);
    let mut prompt_sampler = Sampler::new(prompts.len(), cfg.seed, state.cursor.clone());
    let mut ptx_sampler =
        (!ptx.is_empty()).then(|| Sampler::new(ptx.len(), cfg.seed ^ 0x9e37, Cursor::default()));
    let progress = Progress::for_rank("ppo", cfg.train.steps as u64, state.step, dist.is_main());
    progress.log(&format!(
        "policy {} | reward {} | critic from {} | {} prompts, {} held out | {}{}",
        policy_dir.display(),
        match (&cfg.reward, &cfg.score.judge) {
            (Some(r), Some(j)) if scorer.reward_model.is_some() =>
                format!("{} + judge {j}", r.display()),
            (Some(r), None) => r.display().to_string(),
            (_, Some(j)) => format!("judge {j}"),
            _ => "-".into(),
        },
        critic_src.display(),
        prompts.len(),
        heldout.len(),
        opts.place(dtype),
        if resuming {
            format!(", resuming at iteration {}", state.step)
        } else {
            String::new()
        }
    ));

    let evaluate = |policy: &Model,
                    step: u64,
                    metrics: &mut MetricsLog,
                    samples_log: &mut MetricsLog|
     -> Result<Option<f64>> {
        if heldout.is_empty() {
            return Ok(None);
        }
        let mut rng = Rng::derive(cfg.seed, "eval");
        let ps: Vec<&Prompt> = heldout.iter().collect();
        let ids: Vec<Vec<u32>> = ps.iter().map(|p| p.ids.clone()).collect();
        let out = generate(policy, &ids, &cfg.rollout.sampling(), &stop, pad, &mut rng)?;
        let texts: Vec<String> = out
            .iter()
            .map(|s| tok.decode(&s.tokens, true))
            .collect::<candor_data::Result<_>>()?;
        let mut rec = record!(step;);
        let mut judged = None;
        if let Some(j) = &eval_judge {
            let js = judge_scores(j.as_ref(), &ps, &texts)?;
            let mean = js.iter().sum::<f64>() / js.len() as f64;
            rec.insert("judge_score".into(), serde_json::json!(mean));
            judged = Some(mean);
        }
        if let Some(rm) = &scorer.reward_model {
            let resp: Vec<&[u32]> = out.iter().map(|s| s.tokens.as_slice()).collect();
            let pr: Vec<&[u32]> = ps.iter().map(|p| p.ids.as_slice()).collect();
            let sb = seq_batch(&pr, &resp, pad, device)?;
            let r = sequence_scores(rm, &sb)?;
            rec.insert(
                "eval_reward".into(),
                serde_json::json!(r.iter().sum::<f64>() / r.len() as f64),
            );
        }
        metrics.push(rec);
        for (p, t) in ps.iter().zip(&texts).take(cfg.eval.samples_logged) {
            samples_log.push(record!(step; "prompt" => p.text, "response" => t));
        }
        Ok(judged)
    };
    if state.step == 0 && dist.is_main() {
        if let Some(j) = evaluate(
            &*inference_model(&policy, &policy_vars, dtype)?,
            0,
            &mut metrics,
            &mut samples_log,
        )? {
            progress.log(&format!(
                "before PPO: judge_score {j:.4} on {} held-out prompts",
                heldout.len()
            ));
        }
    }
    let save = |state: &TrainerState,
                metrics: &MetricsLog,
                samples: &MetricsLog,
                p_opt: &AdamW,
                c_opt: &AdamW,
                meta: &mut CandorMeta|
     -> Result<()> {
        let snap = Snapshot {
            config: &policy_config,
            head: Head::Lm,
            varmap: &policy_vars,
            tokenizer: &tok,
            metrics,
            state,
            optimizers: &[("policy", p_opt), ("critic", c_opt)],
        };
        save_checkpoint(&opts.out, &snap, meta, |dir| {
            let cdir = dir.join("critic");
            std::fs::create_dir_all(&cdir).map_err(|e| err(format!("{}: {e}", cdir.display())))?;
            write_model_dir(&cdir, &critic_config, Head::Score, &critic_vars, &tok)?;
            write_samples(dir, samples)
        })
    };

    let sampling = cfg.rollout.sampling();
    let temperature = if sampling.temperature > 0.0 {
        sampling.temperature
    } else {
        1.0
    };
    let mut all_vars = named_vars(&policy_vars);
    all_vars.extend(named_vars(&critic_vars));
    dist.sync_start(&all_vars, state.step)?;
    let elapsed_before = state.elapsed_sec;
    let clock = Instant::now();
    for iteration in state.step as usize..cfg.train.steps {
        let lr = lr_at(&cfg.train, iteration);
        // 1. a batch of prompts (the same on every rank); this rank rolls out its share
        let idx = prompt_sampler.next(cfg.rollout.prompts_per_iteration);
        let batch_prompts: Vec<&Prompt> = idx.iter().map(|&i| &prompts[i]).collect();
        let mine = dist.shard(&batch_prompts);
        // 2. responses, sampled with the KV cache (in train.dtype); rank 0 draws from the
        //    run's generator, the others from streams derived from it and their rank
        let t0 = Instant::now();
        let policy_now = inference_model(&policy, &policy_vars, dtype)?;
        let critic_now = inference_model(&critic, &critic_vars, dtype)?;
        let prompt_ids: Vec<Vec<u32>> = mine.iter().map(|p| p.ids.clone()).collect();
        let mut rank_rng = Rng::derive(
            state.rng.clone().next_u64(),
            &format!("rollout-rank-{}", dist.rank()),
        );
        let rng = if dist.is_main() {
            &mut state.rng
        } else {
            &mut rank_rng
        };
        let samples = generate(&policy_now, &prompt_ids, &sampling, &stop, pad, rng)?;
        state.rng = dist.broadcast_value(&state.rng)?; // it shuffles the minibatches below
        let time_generate = t0.elapsed().as_secs_f64();
        // 3. scores, log-probs of policy and reference, values; then the whole batch on every rank
        let t1 = Instant::now();
        let texts: Vec<String> = samples
            .iter()
            .map(|s| tok.decode(&s.tokens, true))
            .collect::<candor_data::Result<_>>()?;
        let resp: Vec<&[u32]> = samples.iter().map(|s| s.tokens.as_slice()).collect();
        let pr: Vec<&[u32]> = prompt_ids.iter().map(Vec::as_slice).collect();
        let sb = seq_batch(&pr, &resp, pad, device)?;
        let stopped: Vec<bool> = samples.iter().map(|s| s.stopped).collect();
        let scores = scorer.score(&sb, mine, &texts, &stopped)?;
        let old_lp = rows(&logprobs(&policy_now, &sb, temperature)?.0.detach())?;
        let ref_lp = rows(&logprobs(&reference, &sb, temperature)?.0)?;
        let old_values = rows(&values(&critic_now, &sb)?.detach())?;
        drop((policy_now, critic_now));
        let mut local = Rollout::default();
        for i in 0..samples.len() {
            local.push(
                resp[i],
                stopped[i],
                scores.combined[i],
                scores.raw[i],
                &old_lp[i],
                &ref_lp[i],
                &old_values[i],
            );
        }
        let roll = local.gather(dist)?;
        // 4. per-token rewards, GAE, whitening, over the whole batch
        let mask_rows = roll.mask_rows();
        let (old_lp, old_values) = (roll.padded(&roll.old_logprobs), roll.padded(&roll.values));
        let (rewards, kl) = per_token_rewards(
            &roll.combined,
            &old_lp,
            &roll.padded(&roll.ref_logprobs),
            &mask_rows,
            kl_ctl.value,
        );
        let (advantages, returns) = gae(
            &rewards,
            &old_values,
            &mask_rows,
            cfg.ppo.gamma,
            cfg.ppo.lam,
        );
        let advantages = if cfg.ppo.whiten_advantages {
            masked_whiten(&advantages, &mask_rows, true)
        } else {
            advantages
        };
        let time_score = t1.elapsed().as_secs_f64();

        // 5. PPO epochs over minibatches (each rank computes its share of every minibatch)
        let t2 = Instant::now();
        let n = roll.len();
        let mb = cfg.train.batch_size.min(n);
        let batch_ids: Vec<&[u32]> = batch_prompts.iter().map(|p| p.ids.as_slice()).collect();
        let targets = Targets {
            prompts: &batch_ids,
            roll: &roll,
            old_lp: &old_lp,
            old_values: &old_values,
            advantages: &advantages,
            returns: &returns,
        };
        let mut stats = UpdateStats::default();
        'epochs: for _epoch in 0..cfg.ppo.epochs {
            let mut order: Vec<usize> = (0..n).collect();
            state.rng.shuffle(&mut order);
            for chunk in order.chunks(mb) {
                let ptx_rows: Vec<usize> =
                    ptx_sampler.as_mut().map_or(vec![], |s| s.next(chunk.len()));
                let models = Models {
                    policy: &*compute_model(&policy, &policy_vars, dtype)?,
                    critic: &*compute_model(&critic, &critic_vars, dtype)?,
                    policy_opt: &policy_opt,
                    critic_opt: &critic_opt,
                };
                let ptx_batch = PtxBatch {
                    examples: &ptx,
                    rows: &ptx_rows,
                };
                let mut u = minibatch_grads(
                    &models,
                    &targets,
                    chunk,
                    &ptx_batch,
                    &cfg.ppo,
                    temperature,
                    pad,
                    dist,
                )?;
                if candor_train::fault::nan_at(iteration as u64 + 1) {
                    u.loss = f64::NAN;
                }
                if !u.loss.is_finite() {
                    return Err(err(format!(
                        "PPO loss became {} at iteration {}; stopped, the last good checkpoint (if any) is kept in {}",
                        u.loss,
                        iteration + 1,
                        opts.out.display()
                    )));
                }
                let gn = clip_grad_norm(&mut u.policy_grads, cfg.train.grad_clip)?;
                clip_grad_norm(&mut u.critic_grads, cfg.train.grad_clip)?;
                if !gn.is_finite() {
                    return Err(err(format!(
                        "policy gradient norm became {gn} at iteration {}; stopped, the last good checkpoint (if any) is kept in {}",
                        iteration + 1,
                        opts.out.display()
                    )));
                }
                policy_opt.step(&u.policy_grads, lr)?;
                critic_opt.step(&u.critic_grads, lr * critic_lr_scale)?;
                u.stats.grad_norm = gn;
                stats.add(&u.stats);
                if cfg.ppo.max_approx_kl > 0.0 && u.stats.approx_kl > cfg.ppo.max_approx_kl {
                    stats.early_stopped = true;
                    break 'epochs;
                }
            }
        }
        let time_train = t2.elapsed().as_secs_f64();
        let resp: Vec<&[u32]> = roll.responses.iter().map(Vec::as_slice).collect();

        // 6. β, metrics, evaluation, checkpoint
        let seq_kl: Vec<f64> = kl.iter().map(|r| r.iter().sum()).collect();
        let mean_kl = seq_kl.iter().sum::<f64>() / n as f64;
        let kl_coef_used = kl_ctl.value;
        kl_ctl.update(mean_kl, n);
        state.step = iteration as u64 + 1;
        state.cursor = prompt_sampler.cursor.clone();
        state.tokens += resp.iter().map(|r| r.len() as u64).sum::<u64>();
        state.elapsed_sec = elapsed_before + clock.elapsed().as_secs_f64();
        state.extra = serde_json::json!({ "kl": kl_ctl });
        let reward_mean = roll.combined.iter().sum::<f64>() / n as f64;
        let reward_raw_mean = roll.raw.iter().sum::<f64>() / n as f64;
        let response_len = resp.iter().map(|r| r.len()).sum::<usize>() as f64 / n as f64;
        let s = stats.mean();
        let mut rec = record!(state.step;
            "reward_mean" => reward_mean, "reward_raw_mean" => reward_raw_mean, "kl" => mean_kl,
            "kl_coef" => kl_coef_used, "entropy" => s.entropy, "policy_loss" => s.policy_loss,
            "value_loss" => s.value_loss, "clip_frac" => s.clip_frac, "value_clip_frac" => s.value_clip_frac,
            "approx_kl" => s.approx_kl, "grad_norm" => s.grad_norm, "response_len" => response_len,
            "lr" => lr, "time_generate" => time_generate, "time_score" => time_score, "time_train" => time_train,
            "early_stopped" => stats.early_stopped,
            "advantage_mean" => masked_mean_rows(&advantages, &mask_rows));
        if !(state.step as usize).is_multiple_of(cfg.train.log_every)
            && state.step as usize != cfg.train.steps
        {
            rec.retain(|k, _| k == "step" || k == "reward_mean" || k == "kl");
        }
        metrics.push(rec);
        progress.set(
            state.step,
            format!("reward {reward_mean:+.3} | kl {mean_kl:.3} | gen {time_generate:.2}s score {time_score:.2}s train {time_train:.2}s"),
        );
        let last = state.step as usize == cfg.train.steps;
        let mut stop = None;
        if dist.is_main() {
            // rank 0 alone evaluates and writes
            if (cfg.train.eval_every > 0
                && (state.step as usize).is_multiple_of(cfg.train.eval_every))
                || last
            {
                if let Some(j) = evaluate(
                    &*inference_model(&policy, &policy_vars, dtype)?,
                    state.step,
                    &mut metrics,
                    &mut samples_log,
                )? {
                    progress.log(&format!("iteration {} | reward {reward_mean:+.4} | kl {mean_kl:.4} | judge_score {j:.4}", state.step));
                }
            }
            // run health, from what this iteration logged: a tripped signal is logged as
            // `health_*` and warned about once; with train.stop_on_health it stops the run
            let obs = observation_of(&merged_step(&metrics.records, state.step));
            let tripped = health.observe(&obs);
            if !tripped.is_empty() {
                let mut rec = record!(state.step;);
                for t in &tripped {
                    rec.insert(t.key.into(), serde_json::json!(t.value));
                    if health.first_warning(t.key) || cfg.train.stop_on_health {
                        progress.log(&format!("warning: {}", t.message));
                    }
                }
                metrics.push(rec);
                if cfg.train.stop_on_health {
                    stop = Some(tripped[0].message.clone());
                }
            }
        }
        if cfg.train.stop_on_health {
            stop = dist.broadcast_value(&stop)?;
        }
        if let Some(why) = stop {
            return Err(err(format!(
                "run health: {why}; stopped at iteration {} (train.stop_on_health), the last good checkpoint (if any) is kept in {}",
                state.step,
                opts.out.display()
            )));
        }
        if !dist.is_main() {
            continue;
        }
        if cfg.train.save_every > 0
            && (state.step as usize).is_multiple_of(cfg.train.save_every)
            && !last
        {
            meta.complete = false;
            save(
                &state,
                &metrics,
                &samples_log,
                &policy_opt,
                &critic_opt,
                &mut meta,
            )?;
        }
    }
    meta.complete = true;
    meta.step = state.step;
    meta.metrics = candor_train::ckpt::final_metrics(&metrics);
    if let Some(first) = metrics.first("judge_score") {
        meta.metrics
            .insert("judge_score_initial".into(), serde_json::json!(first));
    }
    opts.save_on_main(|| {
        save(
            &state,
            &metrics,
            &samples_log,
            &policy_opt,
            &critic_opt,
            &mut meta,
        )
    })?;
    progress.finish();
    Ok(meta)
}

/// The models one minibatch update runs (in `train.dtype`) and their optimisers.
struct Models<'a> {
    policy: &'a Model,
    critic: &'a Model,
    policy_opt: &'a AdamW,
    critic_opt: &'a AdamW,
}

/// A rollout batch and what PPO fits to it, rows in the batch's order, per-token rows
/// padded to the rollout's width.
struct Targets<'a> {
    prompts: &'a [&'a [u32]],
    roll: &'a Rollout,
    old_lp: &'a [Vec<f64>],
    old_values: &'a [Vec<f64>],
    advantages: &'a [Vec<f64>],
    returns: &'a [Vec<f64>],
}

/// PPO-ptx: pretraining examples and the rows of them this minibatch mixes in.
struct PtxBatch<'a> {
    examples: &'a [LmExample],
    rows: &'a [usize],
}

/// One minibatch update's gradients (summed over the ranks), loss and statistics (over the
/// whole minibatch: means over its response tokens; `grad_norm` is set after clipping).
struct MinibatchUpdate {
    policy_grads: Grads,
    critic_grads: Grads,
    loss: f64,
    stats: MeanStats,
}

/// The clipped policy loss + vf_coef · clipped value loss − entropy_coef · entropy (+
/// ptx_coef · next-token loss) of one minibatch (rows `chunk` of the rollout), from this
/// rank's share of its rows, gradients summed over the ranks. Each rank's token means are
/// weighted by its share of the minibatch's response tokens (and of the ptx examples'
/// target tokens), so the sum over the ranks is the whole minibatch's loss, and every rank
/// gets the same gradients and statistics. With `Dist::single()` the weights are 1.
#[allow(clippy::too_many_arguments)]
fn minibatch_grads(
    m: &Models,
    t: &Targets,
    chunk: &[usize],
    ptx: &PtxBatch,
    cfg: &PpoAlgo,
    temperature: f64,
    pad: u32,
    dist: &Dist,
) -> Result<MinibatchUpdate> {
    let device = m.policy.device();
    let mine = dist.shard(chunk);
    let tokens = |rows: &[usize]| {
        rows.iter()
            .map(|&i| t.roll.responses[i].len())
            .sum::<usize>()
    };
    let mut loss: Option<candle_core::Tensor> = None;
    // this rank's weighted: loss, policy loss, value loss, clip_frac, value clip_frac, approx_kl, entropy
    let mut local = [0.0f64; 7];
    if !mine.is_empty() {
        let w = tokens(mine) as f64 / tokens(chunk).max(1) as f64;
        let m_pr: Vec<&[u32]> = mine.iter().map(|&i| t.prompts[i]).collect();
        let m_resp: Vec<&[u32]> = mine
            .iter()
            .map(|&i| t.roll.responses[i].as_slice())
            .collect();
        let msb = seq_batch(&m_pr, &m_resp, pad, device)?;
        let r = msb.response_width;
        let pick = |x: &[Vec<f64>]| -> Vec<Vec<f64>> {
            mine.iter()
                .map(|&i| {
                    let mut v = x[i].clone();
                    v.resize(r, 0.0);
                    v
                })
                .collect()
        };
        let old_lp_t = tensor(&pick(t.old_lp), device)?;
        let adv_t = tensor(&pick(t.advantages), device)?;
        let ret_t = tensor(&pick(t.returns), device)?;
        let val_t = tensor(&pick(t.old_values), device)?;
        let (new_lp, logits) = logprobs(m.policy, &msb, temperature)?;
        let pl = policy_loss(&new_lp, &old_lp_t, &adv_t, &msb.mask, cfg.cliprange)?;
        let vpred = values(m.critic, &msb)?;
        let (vl, vclip) = value_loss(&vpred, &val_t, &ret_t, &msb.mask, cfg.cliprange_value)?;
        let entropy = masked_mean(&candor_model::ops::entropy(&logits)?, &msb.mask)?;
        let mut l = (&pl.loss + (&vl * cfg.vf_coef)?)?;
        if cfg.entropy_coef != 0.0 {
            l = (l - (&entropy * cfg.entropy_coef)?)?;
        }
        let l = (l * w)?;
        local = [
            scalar(&l)?,
            scalar(&pl.loss)?,
            scalar(&vl)?,
            pl.clip_frac,
            vclip,
            pl.approx_kl,
            scalar(&entropy)?,
        ];
        for x in &mut local[1..] {
            *x *= w;
        }
        loss = Some(l);
    }
    let ptx_mine = dist.shard(ptx.rows);
    if !ptx_mine.is_empty() {
        let all: usize = ptx.rows.iter().map(|&i| ptx.examples[i].n_targets()).sum();
        let ex: Vec<&LmExample> = ptx_mine.iter().map(|&i| &ptx.examples[i]).collect();
        let (sum, _) = lm_loss(m.policy, &lm_batch(&ex, pad, device)?)?;
        let l = (sum * (cfg.ptx_coef / all.max(1) as f64))?;
        local[0] += scalar(&l)?;
        loss = Some(match loss {
            Some(x) => (x + l)?,
            None => l,
        });
    }
    let mut policy_grads = m.policy_opt.zero_grads();
    let mut critic_grads = m.critic_opt.zero_grads();
    if let Some(loss) = loss {
        let store = loss.backward()?;
        m.policy_opt.accumulate(&store, &mut policy_grads)?;
        m.critic_opt.accumulate(&store, &mut critic_grads)?;
    }
    dist.all_reduce_grads(&mut policy_grads, m.policy_opt)?;
    dist.all_reduce_grads(&mut critic_grads, m.critic_opt)?;
    let g = dist.all_reduce_f64(&local)?;
    let stats = MeanStats::from_array([g[1], g[2], g[3], g[4], g[5], g[6], 0.0]);
    Ok(MinibatchUpdate {
        policy_grads,
        critic_grads,
        loss: g[0],
        stats,
    })
}

fn validate(cfg: &PpoConfig, origin: &str) -> Result<()> {
    let bad = |key: &str, msg: &str| Err(err(format!("{origin}: {key}: {msg}")));
    if cfg.train.grad_accum != 1 {
        return bad(
            "train.grad_accum",
            "must be 1 in PPO (minibatches are set by train.batch_size)",
        );
    }
    if cfg.data.prompts.as_os_str().is_empty() {
        return bad(
            "data.prompts",
            "give a JSONL file of {\"prompt\": ...} lines",
        );
    }
    if cfg.rollout.prompts_per_iteration == 0 {
        return bad("rollout.prompts_per_iteration", "must be at least 1");
    }
    if let Err(e) = cfg.rollout.sampling().check() {
        return Err(err(format!("{origin}: {}", e.key("rollout"))));
    }
    if cfg.ppo.epochs == 0 {
        return bad("ppo.epochs", "must be at least 1");
    }
    cfg.health.validate(origin)?;
    if cfg.ppo.ptx_coef > 0.0 && cfg.data.ptx_files.is_empty() {
        return bad(
            "data.ptx_files",
            "PPO-ptx (ppo.ptx_coef > 0) needs pretraining text files",
        );
    }
    Ok(())
}

#[derive(Default)]
struct UpdateStats {
    n: usize,
    sums: [f64; 7],
    early_stopped: bool,
}

/// The statistics of one minibatch update, or their means over an iteration's updates.
#[derive(Debug, PartialEq)]
struct MeanStats {
    policy_loss: f64,
    value_loss: f64,
    clip_frac: f64,
    value_clip_frac: f64,
    approx_kl: f64,
    entropy: f64,
    grad_norm: f64,
}

impl MeanStats {
    fn from_array(m: [f64; 7]) -> Self {
        MeanStats {
            policy_loss: m[0],
            value_loss: m[1],
            clip_frac: m[2],
            value_clip_frac: m[3],
            approx_kl: m[4],
            entropy: m[5],
            grad_norm: m[6],
        }
    }
    fn to_array(&self) -> [f64; 7] {
        [
            self.policy_loss,
            self.value_loss,
            self.clip_frac,
            self.value_clip_frac,
            self.approx_kl,
            self.entropy,
            self.grad_norm,
        ]
    }
}

impl UpdateStats {
    fn add(&mut self, stats: &MeanStats) {
        for (s, v) in self.sums.iter_mut().zip(stats.to_array()) {
            *s += v;
        }
        self.n += 1;
    }
    fn mean(&self) -> MeanStats {
        MeanStats::from_array(self.sums.map(|s| s / self.n.max(1) as f64))
    }
}

const SAMPLES_FILE: &str = "samples.jsonl";

fn write_samples(dir: &Path, samples: &MetricsLog) -> Result<()> {
    Ok(samples.write_file(&dir.join(SAMPLES_FILE))?)
}

fn read_samples(dir: &Path) -> Result<MetricsLog> {
    Ok(MetricsLog::read_file(&dir.join(SAMPLES_FILE), None)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candor_model::io::build_trainable;
    use candor_model::ModelConfig;
    use candor_train::config::TrainConfig;
    use candor_train::dist::LocalGroup;

    /// A rollout of 5 rows with responses of different lengths (one empty-ish, 1 token) and
    /// random per-token targets, and 4 pretraining examples for PPO-ptx.
    fn rollout() -> (Vec<Vec<u32>>, Rollout, [Vec<Vec<f64>>; 2], Vec<LmExample>) {
        let mut rng = Rng::new(21);
        let mut roll = Rollout::default();
        let mut prompts = vec![];
        let (mut adv, mut ret) = (vec![], vec![]);
        for (i, len) in [5usize, 1, 7, 3, 6].into_iter().enumerate() {
            prompts.push((0..2 + i).map(|_| rng.below(40) as u32 + 1).collect());
            let resp: Vec<u32> = (0..len).map(|_| rng.below(40) as u32 + 1).collect();
            let row = |rng: &mut Rng, scale: f64, shift: f64| -> Vec<f64> {
                (0..len).map(|_| shift + scale * rng.normal()).collect()
            };
            let (old, reference, values) = (
                row(&mut rng, 0.3, -3.7),
                row(&mut rng, 0.3, -3.7),
                row(&mut rng, 0.5, 0.0),
            );
            roll.push(
                &resp,
                i % 2 == 0,
                rng.normal(),
                rng.normal(),
                &old,
                &reference,
                &values,
            );
            adv.push(row(&mut rng, 1.0, 0.0));
            ret.push(row(&mut rng, 1.0, 0.0));
        }
        let ptx = (0..4)
            .map(|i| LmExample::dense((0..6 + 3 * i).map(|_| rng.below(40) as u32 + 1).collect()))
            .collect();
        let pad = |rows: Vec<Vec<f64>>| roll.padded(&rows);
        let targets = [pad(adv), pad(ret)];
        (prompts, roll, targets, ptx)
    }

    /// The grads and statistics of one minibatch (`chunk`, with ptx rows) on this rank.
    fn update(dist: &Dist, chunk: &[usize]) -> (Vec<Vec<f32>>, Vec<f64>) {
        let config = ModelConfig::llama(41, 32, 2, 4, 2, 48, 64, 10000.0, false);
        let dev = Device::Cpu;
        let (policy, pv) =
            build_trainable(&config, Head::Lm, None, &[], &mut Rng::new(1), &dev).unwrap();
        let (critic, cv) =
            build_trainable(&config, Head::Score, None, &[], &mut Rng::new(2), &dev).unwrap();
        let train = TrainConfig::default();
        let (po, co) = (
            AdamW::new(named_vars(&pv), &train).unwrap(),
            AdamW::new(named_vars(&cv), &train).unwrap(),
        );
        let (prompts, roll, [adv, ret], ptx) = rollout();
        let ids: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let (old_lp, old_values) = (roll.padded(&roll.old_logprobs), roll.padded(&roll.values));
        let t = Targets {
            prompts: &ids,
            roll: &roll,
            old_lp: &old_lp,
            old_values: &old_values,
            advantages: &adv,
            returns: &ret,
        };
        let m = Models {
            policy: &policy,
            critic: &critic,
            policy_opt: &po,
            critic_opt: &co,
        };
        let cfg = PpoAlgo {
            entropy_coef: 0.01,
            ptx_coef: 0.5,
            ..Default::default()
        };
        let ptx_rows: Vec<usize> = chunk.iter().map(|&i| i % 4).collect();
        let u = minibatch_grads(
            &m,
            &t,
            chunk,
            &PtxBatch {
                examples: &ptx,
                rows: &ptx_rows,
            },
            &cfg,
            0.8,
            0,
            dist,
        )
        .unwrap();
        let grads = u
            .policy_grads
            .0
            .iter()
            .chain(&u.critic_grads.0)
            .map(|g| {
                g.as_ref()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        let mut stats = vec![u.loss];
        stats.extend(&u.stats.to_array()[..6]);
        (grads, stats)
    }

    /// A minibatch split over ranks — unevenly (3 rows on 2 ranks), and with a rank that has
    /// no row at all (2 rows on 3 ranks) — gives every rank the gradients and statistics of
    /// the whole minibatch in one process: token means weighted by each rank's share.
    #[test]
    fn a_minibatch_split_over_ranks_gives_the_whole_minibatch_update() {
        for (world, chunk) in [(2usize, vec![4usize, 0, 2]), (3, vec![3, 1])] {
            let (g1, s1) = update(&Dist::single(), &chunk);
            let handles: Vec<_> = LocalGroup::new(world)
                .into_iter()
                .map(|member| {
                    let chunk = chunk.clone();
                    std::thread::spawn(move || update(&Dist::new(member), &chunk))
                })
                .collect();
            for h in handles {
                let (g, s) = h.join().unwrap();
                let worst = g1
                    .iter()
                    .zip(&g)
                    .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
                    .fold(0.0f32, f32::max);
                let scale = g1.iter().flatten().fold(0.0f32, |m, x| m.max(x.abs()));
                println!("world {world}, rows {chunk:?}: worst gradient difference {worst:.2e} (largest gradient {scale:.2e}); stats {s:?}");
                assert!(worst < 1e-5 * scale.max(1.0), "gradients differ by {worst}");
                // value_clip_frac (index 4) counts tokens where the clipped value loss is the
                // larger, and where the clip is inactive the two losses are equal but for
                // rounding (TRL's formula: v_old + (v − v_old) vs v), so a token may tip
                // either way when the batch's layout changes the last bit of v
                let tokens: usize = chunk.iter().map(|&i| rollout().1.responses[i].len()).sum();
                for (k, (a, b)) in s1.iter().zip(&s).enumerate() {
                    let tol = if k == 4 {
                        1.0 / tokens as f64 + 1e-6
                    } else {
                        1e-5 * a.abs().max(1.0)
                    };
                    assert!((a - b).abs() < tol, "stats {s:?} vs {s1:?}");
                }
            }
            assert!(
                s1[3] > 0.0 && s1[3] < 1.0,
                "some ratios clipped, some not: {s1:?}"
            );
        }
    }

    /// Each rank's rollout rows reach every rank whole and in rank order.
    #[test]
    fn rollout_rows_gather_in_rank_order() {
        let (_, roll, _, _) = rollout();
        let parts = [0..2, 2..3, 3..5];
        let handles: Vec<_> = LocalGroup::new(3)
            .into_iter()
            .zip(parts)
            .map(|(member, range)| {
                let (_, roll, _, _) = rollout();
                std::thread::spawn(move || {
                    let mut mine = Rollout::default();
                    for i in range {
                        mine.push(
                            &roll.responses[i],
                            roll.stopped[i],
                            roll.combined[i],
                            roll.raw[i],
                            &roll.old_logprobs[i],
                            &roll.ref_logprobs[i],
                            &roll.values[i],
                        );
                    }
                    mine.gather(&Dist::new(member)).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), roll);
        }
    }
}
