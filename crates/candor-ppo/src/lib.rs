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
use candor_model::io::{load_frozen, load_trainable, read_config};
use candor_model::Model;
use candor_train::batch::{lm_batch, Cursor, LmExample, Sampler};
use candor_train::ckpt::{plan_start, read_trainer, restore_optimizer, save_checkpoint, write_model_dir, Snapshot, Start, TrainerState};
use candor_train::loss::lm_loss;
use candor_train::optim::{clip_grad_norm, named_vars, AdamW};
use candor_train::progress::Progress;
use candor_train::schedule::lr_at;
use serde::Deserialize;

pub use config::*;
use math::{gae, masked_mean, masked_mean_rows, masked_whiten, per_token_rewards, policy_loss, scalar, value_loss, KlController};
use rollout::{logprobs, rows, seq_batch, sequence_scores, tensor, values};

pub type Error = candor_train::Error;
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn err(msg: String) -> Error {
    Error::Msg(msg)
}

pub use candor_train::ckpt::RunOptions;

/// A prompt line: `{"prompt": ..., "reference": ...}`.
#[derive(Deserialize, Clone)]
pub struct PromptLine {
    pub prompt: String,
    #[serde(default)]
    pub reference: Option<String>,
}

/// A prompt ready to pose: its text, reference, and tokens (rendered with the chat template).
struct Prompt {
    text: String,
    reference: Option<String>,
    ids: Vec<u32>,
}

fn load_prompts(path: &Path, tok: &Tokenizer, template: &ChatTemplate, max_new: usize, ctx: usize) -> Result<Vec<Prompt>> {
    let lines = read_jsonl::<PromptLine>(path)?;
    if lines.is_empty() {
        return Err(err(format!("{}: no prompts (expected JSONL lines {{\"prompt\": ...}})", path.display())));
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
        out.push(Prompt { text: p.prompt, reference: p.reference, ids });
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

fn judge_scores(judge: &dyn candor_judge::Judge, prompts: &[&Prompt], responses: &[String]) -> Result<Vec<f64>> {
    prompts
        .iter()
        .zip(responses)
        .map(|(p, r)| judge.score(&p.text, r, p.reference.as_deref()).map_err(|e| err(e.to_string())))
        .collect()
}

/// Mean and std a reward checkpoint recorded over its training responses.
fn reward_stats(dir: &Path) -> Result<Option<(f64, f64)>> {
    let Some(meta) = CandorMeta::read(dir)? else { return Ok(None) };
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
    fn score(&self, sb: &rollout::SeqBatch, prompts: &[&Prompt], responses: &[String], stopped: &[bool]) -> Result<Scores> {
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
    let policy_dir = cfg.policy.clone().ok_or_else(|| err(format!("{origin}: policy: give the SFT checkpoint (--policy DIR)")))?;
    candor_core::checkpoint::require_model_dir(&policy_dir)?;
    if let Some(r) = &cfg.reward {
        candor_core::checkpoint::require_model_dir(r)?;
    }
    let effective = candor_core::config::effective(cfg);
    let start = plan_start(&opts.out, opts.resume, opts.overwrite, &effective)?;
    if let Start::Done(meta) = start {
        eprintln!("[ppo] {} is already complete (step {})", opts.out.display(), meta.step);
        return Ok(meta);
    }
    let resuming = matches!(start, Start::Resume(_));
    let device = &opts.device;

    // the four roles
    let tok = Tokenizer::from_dir(&policy_dir)?;
    let template = ChatTemplate::for_tokenizer(&tok);
    let stop = stop_tokens(&tok);
    let pad = tok.pad_id();
    let policy_config = read_config(&policy_dir)?;
    if policy_config.head() != Head::Lm {
        return Err(err(format!("{}: the policy must be an lm checkpoint, this one has a score head", policy_dir.display())));
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
            let rm = load_frozen(dir, device)?;
            if rm.head != Head::Score {
                return Err(err(format!("{}: the reward model must have a score head (LlamaForSequenceClassification)", dir.display())));
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
                eprintln!("[ppo] {}: no reward_mean/reward_std in candor.json; scores are not normalised", dir.display());
            }
            s
        }
        _ => None,
    };
    let scorer = Scorer { reward_model, stats, judge: cfg.score.judge.as_deref().map(judge).transpose()?, cfg: cfg.score.clone() };
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
        pack_corpus(&stream, ctx.min(256), 0.0)?.train.into_iter().map(LmExample::dense).collect()
    } else {
        vec![]
    };

    let reference = load_frozen(&policy_dir, device)?;
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

    let mut kl_ctl = KlController { value: cfg.kl.coef, target: cfg.kl.target, horizon: cfg.kl.horizon };
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
    let mut prompt_sampler = Sampler::new(prompts.len(), cfg.seed, state.cursor.clone());
    let mut ptx_sampler = (!ptx.is_empty()).then(|| Sampler::new(ptx.len(), cfg.seed ^ 0x9e37, Cursor::default()));
    let progress = Progress::new("ppo", cfg.train.steps as u64, state.step);
    progress.log(&format!(
        "policy {} | reward {} | critic from {} | {} prompts, {} held out{}",
        policy_dir.display(),
        match (&cfg.reward, &cfg.score.judge) {
            (Some(r), Some(j)) if scorer.reward_model.is_some() => format!("{} + judge {j}", r.display()),
            (Some(r), None) => r.display().to_string(),
            (_, Some(j)) => format!("judge {j}"),
            _ => "-".into(),
        },
        critic_src.display(),
        prompts.len(),
        heldout.len(),
        if resuming { format!(", resuming at iteration {}", state.step) } else { String::new() }
    ));

    let evaluate = |policy: &Model, step: u64, metrics: &mut MetricsLog, samples_log: &mut MetricsLog| -> Result<Option<f64>> {
        if heldout.is_empty() {
            return Ok(None);
        }
        let mut rng = Rng::derive(cfg.seed, "eval");
        let ps: Vec<&Prompt> = heldout.iter().collect();
        let ids: Vec<Vec<u32>> = ps.iter().map(|p| p.ids.clone()).collect();
        let out = generate(policy, &ids, &cfg.rollout.sampling(), &stop, pad, &mut rng)?;
        let texts: Vec<String> = out.iter().map(|s| tok.decode(&s.tokens, true)).collect::<candor_data::Result<_>>()?;
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
            rec.insert("eval_reward".into(), serde_json::json!(r.iter().sum::<f64>() / r.len() as f64));
        }
        metrics.push(rec);
        for (p, t) in ps.iter().zip(&texts).take(cfg.eval.samples_logged) {
            samples_log.push(record!(step; "prompt" => p.text, "response" => t));
        }
        Ok(judged)
    };
    if state.step == 0 {
        if let Some(j) = evaluate(&policy, 0, &mut metrics, &mut samples_log)? {
            progress.log(&format!("before PPO: judge_score {j:.4} on {} held-out prompts", heldout.len()));
        }
    }
    let save = |state: &TrainerState, metrics: &MetricsLog, samples: &MetricsLog, p_opt: &AdamW, c_opt: &AdamW, meta: &mut CandorMeta| -> Result<()> {
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
    let temperature = if sampling.temperature > 0.0 { sampling.temperature } else { 1.0 };
    let elapsed_before = state.elapsed_sec;
    let clock = Instant::now();
    for iteration in state.step as usize..cfg.train.steps {
        let lr = lr_at(&cfg.train, iteration);
        // 1. a batch of prompts
        let idx = prompt_sampler.next(cfg.rollout.prompts_per_iteration);
        let batch_prompts: Vec<&Prompt> = idx.iter().map(|&i| &prompts[i]).collect();
        // 2. responses, sampled with the KV cache
        let t0 = Instant::now();
        let prompt_ids: Vec<Vec<u32>> = batch_prompts.iter().map(|p| p.ids.clone()).collect();
        let samples = generate(&policy, &prompt_ids, &sampling, &stop, pad, &mut state.rng)?;
        let time_generate = t0.elapsed().as_secs_f64();
        // 3. scores, log-probs of policy and reference, values
        let t1 = Instant::now();
        let texts: Vec<String> = samples.iter().map(|s| tok.decode(&s.tokens, true)).collect::<candor_data::Result<_>>()?;
        let resp: Vec<&[u32]> = samples.iter().map(|s| s.tokens.as_slice()).collect();
        let pr: Vec<&[u32]> = prompt_ids.iter().map(Vec::as_slice).collect();
        let sb = seq_batch(&pr, &resp, pad, device)?;
        let stopped: Vec<bool> = samples.iter().map(|s| s.stopped).collect();
        let scores = scorer.score(&sb, &batch_prompts, &texts, &stopped)?;
        let old_lp = rows(&logprobs(&policy, &sb, temperature)?.0.detach())?;
        let ref_lp = rows(&logprobs(&reference, &sb, temperature)?.0)?;
        let old_values = rows(&values(&critic, &sb)?.detach())?;
        // 4. per-token rewards, GAE, whitening
        let (rewards, kl) = per_token_rewards(&scores.combined, &old_lp, &ref_lp, &sb.mask_rows, kl_ctl.value);
        let (advantages, returns) = gae(&rewards, &old_values, &sb.mask_rows, cfg.ppo.gamma, cfg.ppo.lam);
        let advantages = if cfg.ppo.whiten_advantages { masked_whiten(&advantages, &sb.mask_rows, true) } else { advantages };
        let time_score = t1.elapsed().as_secs_f64();

        // 5. PPO epochs over minibatches
        let t2 = Instant::now();
        let n = batch_prompts.len();
        let mb = cfg.train.batch_size.min(n);
        let mut stats = UpdateStats::default();
        'epochs: for _epoch in 0..cfg.ppo.epochs {
            let mut order: Vec<usize> = (0..n).collect();
            state.rng.shuffle(&mut order);
            for chunk in order.chunks(mb) {
                let m_pr: Vec<&[u32]> = chunk.iter().map(|&i| pr[i]).collect();
                let m_resp: Vec<&[u32]> = chunk.iter().map(|&i| resp[i]).collect();
                let msb = seq_batch(&m_pr, &m_resp, pad, device)?;
                let r = msb.response_width;
                let pick = |x: &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
                    chunk.iter().map(|&i| { let mut v = x[i].clone(); v.resize(r, 0.0); v }).collect()
                };
                let old_lp_t = tensor(&pick(&old_lp), device)?;
                let adv_t = tensor(&pick(&advantages), device)?;
                let ret_t = tensor(&pick(&returns), device)?;
                let val_t = tensor(&pick(&old_values), device)?;
                let (new_lp, logits) = logprobs(&policy, &msb, temperature)?;
                let pl = policy_loss(&new_lp, &old_lp_t, &adv_t, &msb.mask, cfg.ppo.cliprange)?;
                let vpred = values(&critic, &msb)?;
                let (vl, vclip) = value_loss(&vpred, &val_t, &ret_t, &msb.mask, cfg.ppo.cliprange_value)?;
                let entropy = masked_mean(&candor_model::ops::entropy(&logits)?, &msb.mask)?;
                let mut loss = (&pl.loss + (&vl * cfg.ppo.vf_coef)?)?;
                if cfg.ppo.entropy_coef != 0.0 {
                    loss = (loss - (&entropy * cfg.ppo.entropy_coef)?)?;
                }
                if let Some(ps) = ptx_sampler.as_mut() {
                    let ex: Vec<&LmExample> = ps.next(chunk.len()).into_iter().map(|i| &ptx[i]).collect();
                    let (_, ptx_loss) = lm_loss(&policy, &lm_batch(&ex, pad, device)?)?;
                    loss = (loss + (ptx_loss * cfg.ppo.ptx_coef)?)?;
                }
                let loss_value = scalar(&loss)?;
                if !loss_value.is_finite() {
                    return Err(err(format!(
                        "PPO loss became {loss_value} at iteration {}; stopped, the last good checkpoint (if any) is kept in {}",
                        iteration + 1,
                        opts.out.display()
                    )));
                }
                let store = loss.backward()?;
                let mut pg = policy_opt.zero_grads();
                policy_opt.accumulate(&store, &mut pg)?;
                let mut cg = critic_opt.zero_grads();
                critic_opt.accumulate(&store, &mut cg)?;
                let gn = clip_grad_norm(&mut pg, cfg.train.grad_clip)?;
                clip_grad_norm(&mut cg, cfg.train.grad_clip)?;
                if !gn.is_finite() {
                    return Err(err(format!(
                        "policy gradient norm became {gn} at iteration {}; stopped, the last good checkpoint (if any) is kept in {}",
                        iteration + 1,
                        opts.out.display()
                    )));
                }
                policy_opt.step(&pg, lr)?;
                critic_opt.step(&cg, lr * critic_lr_scale)?;
                stats.add(scalar(&pl.loss)?, scalar(&vl)?, pl.clip_frac, vclip, pl.approx_kl, scalar(&entropy)?, gn);
                if cfg.ppo.max_approx_kl > 0.0 && pl.approx_kl > cfg.ppo.max_approx_kl {
                    stats.early_stopped = true;
                    break 'epochs;
                }
            }
        }
        let time_train = t2.elapsed().as_secs_f64();

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
        let reward_mean = scores.combined.iter().sum::<f64>() / n as f64;
        let reward_raw_mean = scores.raw.iter().sum::<f64>() / n as f64;
        let response_len = resp.iter().map(|r| r.len()).sum::<usize>() as f64 / n as f64;
        let s = stats.mean();
        let mut rec = record!(state.step;
            "reward_mean" => reward_mean, "reward_raw_mean" => reward_raw_mean, "kl" => mean_kl,
            "kl_coef" => kl_coef_used, "entropy" => s.entropy, "policy_loss" => s.policy_loss,
            "value_loss" => s.value_loss, "clip_frac" => s.clip_frac, "value_clip_frac" => s.value_clip_frac,
            "approx_kl" => s.approx_kl, "grad_norm" => s.grad_norm, "response_len" => response_len,
            "lr" => lr, "time_generate" => time_generate, "time_score" => time_score, "time_train" => time_train,
            "early_stopped" => stats.early_stopped,
            "advantage_mean" => masked_mean_rows(&advantages, &sb.mask_rows));
        if state.step as usize % cfg.train.log_every != 0 && state.step as usize != cfg.train.steps {
            rec.retain(|k, _| k == "step" || k == "reward_mean" || k == "kl");
        }
        metrics.push(rec);
        progress.set(
            state.step,
            format!("reward {reward_mean:+.3} | kl {mean_kl:.3} | gen {time_generate:.2}s score {time_score:.2}s train {time_train:.2}s"),
        );
        let last = state.step as usize == cfg.train.steps;
        if (cfg.train.eval_every > 0 && state.step as usize % cfg.train.eval_every == 0) || last {
            if let Some(j) = evaluate(&policy, state.step, &mut metrics, &mut samples_log)? {
                progress.log(&format!("iteration {} | reward {reward_mean:+.4} | kl {mean_kl:.4} | judge_score {j:.4}", state.step));
            }
        }
        if cfg.train.save_every > 0 && state.step as usize % cfg.train.save_every == 0 && !last {
            meta.complete = false;
            save(&state, &metrics, &samples_log, &policy_opt, &critic_opt, &mut meta)?;
        }
    }
    meta.complete = true;
    meta.metrics = candor_train::ckpt::final_metrics(&metrics);
    if let Some(first) = metrics.first("judge_score") {
        meta.metrics.insert("judge_score_initial".into(), serde_json::json!(first));
    }
    save(&state, &metrics, &samples_log, &policy_opt, &critic_opt, &mut meta)?;
    progress.finish();
    Ok(meta)
}

fn validate(cfg: &PpoConfig, origin: &str) -> Result<()> {
    let bad = |key: &str, msg: &str| Err(err(format!("{origin}: {key}: {msg}")));
    if cfg.train.grad_accum != 1 {
        return bad("train.grad_accum", "must be 1 in PPO (minibatches are set by train.batch_size)");
    }
    if cfg.data.prompts.as_os_str().is_empty() {
        return bad("data.prompts", "give a JSONL file of {\"prompt\": ...} lines");
    }
    if cfg.rollout.prompts_per_iteration == 0 {
        return bad("rollout.prompts_per_iteration", "must be at least 1");
    }
    if cfg.rollout.max_new_tokens == 0 {
        return bad("rollout.max_new_tokens", "must be at least 1");
    }
    if cfg.ppo.epochs == 0 {
        return bad("ppo.epochs", "must be at least 1");
    }
    if cfg.ppo.ptx_coef > 0.0 && cfg.data.ptx_files.is_empty() {
        return bad("data.ptx_files", "PPO-ptx (ppo.ptx_coef > 0) needs pretraining text files");
    }
    Ok(())
}

#[derive(Default)]
struct UpdateStats {
    n: usize,
    sums: [f64; 7],
    early_stopped: bool,
}

struct MeanStats {
    policy_loss: f64,
    value_loss: f64,
    clip_frac: f64,
    value_clip_frac: f64,
    approx_kl: f64,
    entropy: f64,
    grad_norm: f64,
}

impl UpdateStats {
    #[allow(clippy::too_many_arguments)]
    fn add(&mut self, pl: f64, vl: f64, cf: f64, vcf: f64, akl: f64, ent: f64, gn: f64) {
        for (s, v) in self.sums.iter_mut().zip([pl, vl, cf, vcf, akl, ent, gn]) {
            *s += v;
        }
        self.n += 1;
    }
    fn mean(&self) -> MeanStats {
        let m: Vec<f64> = self.sums.iter().map(|s| s / self.n.max(1) as f64).collect();
        MeanStats { policy_loss: m[0], value_loss: m[1], clip_frac: m[2], value_clip_frac: m[3], approx_kl: m[4], entropy: m[5], grad_norm: m[6] }
    }
}

const SAMPLES_FILE: &str = "samples.jsonl";

fn write_samples(dir: &Path, samples: &MetricsLog) -> Result<()> {
    Ok(samples.write_file(&dir.join(SAMPLES_FILE))?)
}

fn read_samples(dir: &Path) -> Result<MetricsLog> {
    Ok(MetricsLog::read_file(&dir.join(SAMPLES_FILE), None)?)
}
