//! Stage: critic-free RL with group baselines — GRPO (Shao et al. 2024) and its relatives:
//! Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++ — on a reward model and/or verifiable judges.
//!
//! Two or three roles: the **policy** (trainable, from SFT), the **reward** (judges and/or a
//! frozen reward model), and the **reference** (a frozen copy of the starting policy, loaded
//! only when `grpo.beta ≠ 0`). No critic: a completion's baseline is its group's. Each step,
//! numbered as in TRL's `GRPOTrainer`:
//!
//! 1. sample `rollout.prompts_per_step` prompts; 2. generate `rollout.group_size`
//!    completions each, in one batch with the KV cache; 3. score them (reward model and/or
//!    judges, minus the soft overlong penalty) and take the log-probs of the sampling policy
//!    (when the batch is revisited) and of the reference (when β ≠ 0); with dynamic sampling,
//!    drop groups whose rewards are all equal and sample more prompts until the batch is
//!    full (bounded); 4. group advantages; 5. `grpo.num_iterations` passes over the batch in
//!    updates of `train.batch_size` completions: clipped ratio loss (+ β·k3 KL) reduced as
//!    `loss_type` says; 6. log, evaluate (held-out `judge_score`), checkpoint.

pub mod config;
pub mod math;
pub mod rollout;

use std::time::Instant;

use candle_core::Tensor;
use candor_core::checkpoint::{parent_ref, CandorMeta, Head};
use candor_core::metrics::MetricsLog;
use candor_core::record;
use candor_core::rng::Rng;
use candor_data::chat::{stop_tokens, ChatTemplate};
use candor_data::Tokenizer;
use candor_model::io::read_config;
use candor_model::{Model, Recording};
use candor_train::batch::{Cursor, Sampler};
use candor_train::ckpt::{
    read_trainer, restore_optimizer, save_checkpoint, Snapshot, Start, TrainerState,
};
use candor_train::dist::Dist;
use candor_train::health::HealthMonitor;
use candor_train::lora::load_for_training;
use candor_train::optim::{clip_grad_norm, named_vars, AdamW};
use candor_train::precision::{compute_model, inference_model, load_frozen};
use candor_train::progress::Progress;
use candor_train::rl::{masked_mean, scalar};
use candor_train::rollout::{load_prompts, sample_responses, sample_responses_per_row, Prompt};
use candor_train::schedule::lr_at;
use candor_train::score::{check_judge_fields, judge, judge_means, judge_scores, Scorer};
use candor_train::seq::{grouped_batches, logprobs, response_logprobs, tensor};

pub use config::*;
use math::{
    group_advantages, grpo_loss, no_spread, soft_overlong_penalty, LossSettings, Normaliser,
};
use rollout::Groups;

pub type Error = candor_train::Error;
pub type Result<T, E = Error> = std::result::Result<T, E>;
pub use candor_train::ckpt::RunOptions;

use candor_train::err;

/// Run GRPO; returns the output checkpoint's metadata.
pub fn run(cfg: &GrpoConfig, opts: &RunOptions) -> Result<CandorMeta> {
    let origin = &opts.origin;
    cfg.train.validate(origin)?;
    validate(cfg, origin)?;
    let policy_dir = cfg.policy.clone().ok_or_else(|| {
        err(format!(
            "{origin}: policy: give the starting checkpoint (--policy DIR)"
        ))
    })?;
    opts.check_batch("rollout.prompts_per_step", cfg.rollout.prompts_per_step)?;
    let effective = candor_core::config::effective(cfg);
    let policy_spec = policy_dir.clone();
    let policy_dir = candor_model::resolve_model_dir(&policy_dir)?;
    let resolved = GrpoConfig {
        reward: cfg
            .reward
            .as_ref()
            .map(candor_model::resolve_model_dir)
            .transpose()?,
        ..cfg.clone()
    };
    let cfg = &resolved;
    let (device, dist, dtype) = (&opts.device, &opts.dist, cfg.train.dtype);

    // the roles, and every input checked before anything is written
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
    let scorer = Scorer::load(
        &cfg.score,
        cfg.reward.as_deref(),
        (&tok, &policy_dir),
        dtype,
        opts,
        "grpo",
    )?;
    let eval_judge_name = cfg.eval.judge.clone().or(cfg.score.judge.clone());
    let eval_judge = eval_judge_name.as_deref().map(judge).transpose()?;
    let ctx = policy_config.max_position_embeddings;
    let (max_new, key) = (cfg.rollout.max_new_tokens, "rollout.max_new_tokens");
    let prompts = load_prompts(&cfg.data.prompts, &tok, &template, max_new, key, ctx)?;
    check_judge_fields(&cfg.data.prompts, &scorer.judges())?;
    let heldout = match &cfg.data.heldout_prompts {
        Some(p) => {
            if let Some(j) = &eval_judge {
                check_judge_fields(p, &[j.as_ref()])?;
            }
            let mut h = load_prompts(p, &tok, &template, max_new, key, ctx)?;
            h.truncate(cfg.eval.max_prompts.max(1));
            h
        }
        None => vec![],
    };

    let start = opts.plan_start(&effective)?;
    if let Start::Done(meta) = start {
        eprintln!(
            "[grpo] {} is already complete (step {})",
            opts.out.display(),
            meta.step
        );
        return Ok(meta);
    }
    let resuming = matches!(start, Start::Resume(_));
    let mut init_rng = Rng::derive(cfg.seed, "policy-init");
    // every weight, or with train.lora adapters on the starting policy frozen
    let (policy, policy_vars, adapters) = load_for_training(
        &policy_spec,
        &policy_dir,
        resuming.then_some(opts.out.as_path()),
        Head::Lm,
        &cfg.train,
        &mut init_rng,
        device,
    )?;
    // the frozen reference: in a LoRA run the policy with its adapters off (the same
    // weights, no second copy), else a copy of the starting policy
    let reference = match (cfg.grpo.beta != 0.0, &adapters) {
        (false, _) => None,
        (true, Some(_)) => Some(policy.without_adapters()),
        (true, None) => Some(load_frozen(&policy_dir, dtype, device)?),
    };
    let mut opt = AdamW::new(named_vars(&policy_vars), &cfg.train)?;

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
    let mut meta = CandorMeta::new("grpo", Head::Lm, effective);
    meta.parents = vec![parent_ref("policy", &policy_dir)?];
    if let Some(r) = &cfg.reward {
        meta.parents.push(parent_ref("reward", r)?);
    }
    meta.total_steps = cfg.train.steps as u64;
    if resuming {
        let (s, tensors) = read_trainer(&opts.out, device)?;
        restore_optimizer(&mut opt, "policy", &s, &tensors, &opts.out)?;
        metrics = MetricsLog::read(&opts.out, Some(s.step))?;
        samples_log = MetricsLog::read_file(&opts.out.join(SAMPLES_FILE), None)?;
        state = s;
    }
    let mut health = HealthMonitor::replay(cfg.health.clone(), &metrics.records);
    let mut prompt_sampler = Sampler::new(prompts.len(), cfg.seed, state.cursor.clone());
    let progress = Progress::for_rank("grpo", cfg.train.steps as u64, state.step, dist.is_main());
    progress.log(&format!(
        "policy {} | reward {} | reference {} | {} prompts × {} completions per step ({} prompts, {} held out) | {}{}",
        policy_dir.display(),
        match (&cfg.reward, &cfg.score.judge) {
            (Some(r), Some(j)) if scorer.reward_model.is_some() => format!("{} + judge {j}", r.display()),
            (Some(r), None) => r.display().to_string(),
            (_, Some(j)) => format!("judge {j}"),
            _ => "-".into(),
        } + &scorer
            .judges_name()
            .map(|w| format!(" + judges {w}"))
            .unwrap_or_default(),
        if reference.is_some() { "loaded (β ≠ 0)" } else { "none (β = 0)" },
        cfg.rollout.prompts_per_step,
        cfg.rollout.group_size,
        prompts.len(),
        heldout.len(),
        opts.place(dtype),
        if resuming { format!(", resuming at step {}", state.step) } else { String::new() }
    ));

    let sampling = cfg.rollout.sampling();
    let temperature = if sampling.temperature > 0.0 {
        sampling.temperature
    } else {
        1.0
    };
    let eval_sampling = candor_model::generate::SamplingParams {
        temperature: cfg.eval.temperature.unwrap_or(sampling.temperature),
        ..sampling.clone()
    };
    // held-out score: the eval judge's mean on responses sampled from the held-out prompts
    let evaluate = |policy: &Model,
                    step: u64,
                    metrics: &mut MetricsLog,
                    samples: &mut MetricsLog|
     -> Result<Option<f64>> {
        let Some(j) = &eval_judge else {
            return Ok(None);
        };
        if heldout.is_empty() {
            return Ok(None);
        }
        let ps: Vec<&Prompt> = heldout.iter().collect();
        let mut rng = Rng::derive(cfg.seed, "eval");
        let out = sample_responses(policy, &tok, &ps, &eval_sampling, &stop, &mut rng)?;
        let js = judge_scores(j.as_ref(), &ps, &out.texts)?;
        let mean = js.iter().sum::<f64>() / js.len() as f64;
        let len = out.tokens.iter().map(Vec::len).sum::<usize>() as f64 / js.len() as f64;
        metrics.push(record!(step; "judge_score" => mean, "eval_response_len" => len));
        for (p, t) in ps.iter().zip(&out.texts).take(cfg.eval.samples_logged) {
            samples.push(record!(step; "prompt" => p.text, "response" => t));
        }
        Ok(Some(mean))
    };
    if state.step == 0 && dist.is_main() {
        let now = inference_model(&policy, &policy_vars, dtype)?;
        if let Some(j) = evaluate(&now, 0, &mut metrics, &mut samples_log)? {
            progress.log(&format!(
                "before GRPO: judge_score {j:.4} on {} held-out prompts",
                heldout.len()
            ));
        }
    }
    let save = |state: &TrainerState,
                metrics: &MetricsLog,
                samples: &MetricsLog,
                opt: &AdamW,
                meta: &mut CandorMeta|
     -> Result<()> {
        let snap = Snapshot {
            config: &policy_config,
            head: Head::Lm,
            varmap: &policy_vars,
            tokenizer: &tok,
            adapters: adapters.as_ref(),
            metrics,
            state,
            optimizers: &[("policy", opt)],
        };
        save_checkpoint(&opts.out, &snap, meta, |dir| {
            Ok(samples.write_file(&dir.join(SAMPLES_FILE))?)
        })
    };

    let settings = LossSettings {
        loss_type: cfg.grpo.loss_type,
        level: cfg.grpo.importance_sampling_level,
        epsilon: cfg.grpo.epsilon,
        epsilon_high: cfg.grpo.epsilon_high(),
        beta: cfg.grpo.beta,
        max_completion_length: max_new,
    };
    let judge_labels: Vec<String> = scorer
        .judges
        .as_ref()
        .map(|w| w.judges.iter().map(|(l, _, _)| l.clone()).collect())
        .unwrap_or_default();
    let group = cfg.rollout.group_size;
    let batch_rows = cfg.rollout.prompts_per_step * group;
    let updates_per_pass = batch_rows.div_ceil(cfg.train.batch_size);
    // the sampling policy's log-probs are needed only when the policy moves before an update
    // reads them; otherwise the ratio is exp(lp − lp.detach()) = 1, as TRL does
    let need_old = cfg.grpo.num_iterations > 1 || updates_per_pass > 1;
    dist.sync_start(&named_vars(&policy_vars), state.step)?;
    let elapsed_before = state.elapsed_sec;
    let clock = Instant::now();
    for step in state.step as usize..cfg.train.steps {
        let lr = lr_at(&cfg.train, step);
        // 1–3. prompts, groups of completions, rewards; with dynamic sampling, refill the
        //      batch with groups that have a spread, for at most max_sampling_rounds rounds
        let policy_now = inference_model(&policy, &policy_vars, dtype)?;
        let mut batch = Groups::default();
        let (mut rounds, mut groups_seen, mut groups_flat) = (0usize, 0usize, 0usize);
        let (mut time_generate, mut time_score) = (0.0, 0.0);
        loop {
            rounds += 1;
            let idx = prompt_sampler.next(cfg.rollout.prompts_per_step);
            let t = Instant::now();
            let mine = dist.shard(&idx);
            let rows_prompt: Vec<usize> = mine
                .iter()
                .flat_map(|&i| std::iter::repeat_n(i, group))
                .collect();
            let posed: Vec<&Prompt> = rows_prompt.iter().map(|&i| &prompts[i]).collect();
            // each row of the round draws from its own stream, numbered in the whole batch:
            // what a row samples does not depend on how the batch is split over ranks
            let round_seed = state.rng.next_u64();
            let first_row = dist.shard_range(idx.len()).start * group;
            let mut streams: Vec<Rng> = (first_row..first_row + posed.len())
                .map(|r| Rng::derive(round_seed, &format!("row-{r}")))
                .collect();
            let out = sample_responses_per_row(
                &policy_now,
                &tok,
                &posed,
                &sampling,
                &stop,
                &mut streams,
            )?;
            time_generate += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let scores =
                scorer.score_grouped(&posed, &out.tokens, pad, &out.texts, &out.stopped)?;
            let n = out.tokens.len();
            let reward: Vec<f64> = (0..n)
                .map(|i| {
                    scores.combined[i]
                        + cfg.grpo.overlong_penalty
                            * soft_overlong_penalty(
                                out.tokens[i].len(),
                                max_new,
                                cfg.grpo.overlong_buffer,
                            )
                })
                .collect();
            let posed_ids: Vec<&[u32]> = posed.iter().map(|p| p.ids.as_slice()).collect();
            let drawn: Vec<&[u32]> = out.tokens.iter().map(Vec::as_slice).collect();
            let per_token = |m: &Model| response_logprobs(m, &posed_ids, &drawn, temperature, pad);
            let old_logprobs = if need_old {
                per_token(&policy_now)?
            } else {
                vec![vec![]; n]
            };
            let ref_logprobs = match &reference {
                Some(r) => per_token(r)?,
                None => vec![vec![]; n],
            };
            let judges = (0..n)
                .map(|i| scores.per_judge.iter().map(|(_, s)| s[i]).collect())
                .collect();
            let mine_rows = Groups {
                prompt: rows_prompt,
                tokens: out.tokens,
                stopped: out.stopped,
                reward,
                raw: scores.raw,
                old_logprobs,
                ref_logprobs,
                judges,
            };
            let round = mine_rows.gather(dist)?;
            time_score += t.elapsed().as_secs_f64();
            for g in 0..round.len() / group {
                let flat = no_spread(&round.reward[g * group..(g + 1) * group]);
                groups_seen += 1;
                groups_flat += usize::from(flat);
                if !(cfg.grpo.dynamic_sampling && flat) && batch.len() < batch_rows {
                    for i in g * group..(g + 1) * group {
                        batch.push_row(&round, i);
                    }
                }
            }
            if !cfg.grpo.dynamic_sampling
                || batch.len() >= batch_rows
                || rounds >= cfg.grpo.max_sampling_rounds
            {
                break;
            }
        }
        drop(policy_now);

        // 4. group advantages over the batch
        let adv = group_advantages(
            &batch.reward,
            group,
            cfg.grpo.advantage,
            cfg.grpo.scale_rewards,
        );

        // 5. num_iterations passes over the batch, in updates of train.batch_size completions
        let t2 = Instant::now();
        let n = batch.len();
        let keep: Vec<bool> = (0..n)
            .map(|i| !cfg.grpo.mask_truncated_completions || batch.stopped[i])
            .collect();
        let real = |i: usize| if keep[i] { batch.tokens[i].len() } else { 0 };
        let batch_tokens: usize = (0..n).map(real).sum();
        let updates = n.div_ceil(cfg.train.batch_size).max(1);
        let mut stats = StepStats::default();
        for _pass in 0..cfg.grpo.num_iterations {
            if n == 0 {
                break;
            }
            let mut order: Vec<usize> = (0..n).collect();
            state.rng.shuffle(&mut order);
            for chunk in order.chunks(cfg.train.batch_size) {
                let norm = Normaliser {
                    rows: chunk.len(),
                    tokens: chunk.iter().map(|&i| real(i)).sum::<usize>() as f64,
                    batch_tokens_per_update: batch_tokens as f64 / updates as f64,
                };
                let model = compute_model(&policy, &policy_vars, dtype)?;
                model.set_adapter_training(true); // LoRA dropout, when there is any
                let u = update(
                    &model,
                    cfg.train.gradient_checkpointing,
                    &opt,
                    &batch,
                    &adv.advantages,
                    &keep,
                    dist.shard(chunk),
                    &prompts,
                    &settings,
                    &norm,
                    temperature,
                    pad,
                    dist,
                )?;
                model.set_adapter_training(false);
                let mut grads = u.grads;
                if !u.sums[0].is_finite() {
                    return Err(err(format!(
                        "GRPO loss became {} at step {}; stopped, the last good checkpoint (if any) is kept in {}",
                        u.sums[0], step + 1, opts.out.display()
                    )));
                }
                let gn = clip_grad_norm(&mut grads, cfg.train.grad_clip)?;
                if !gn.is_finite() {
                    return Err(err(format!(
                        "policy gradient norm became {gn} at step {}; stopped, the last good checkpoint (if any) is kept in {}",
                        step + 1, opts.out.display()
                    )));
                }
                opt.step(&grads, lr)?;
                stats.add(&u.sums, gn);
            }
        }
        let time_train = t2.elapsed().as_secs_f64();

        // 6. metrics, evaluation, checkpoint
        state.step = step as u64 + 1;
        state.cursor = prompt_sampler.cursor.clone();
        state.tokens += batch.tokens.iter().map(|r| r.len() as u64).sum::<u64>();
        state.elapsed_sec = elapsed_before + clock.elapsed().as_secs_f64();
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len().max(1) as f64;
        let reward_mean = mean(&batch.reward);
        let reward_std = (mean(
            &batch
                .reward
                .iter()
                .map(|r| (r - reward_mean).powi(2))
                .collect::<Vec<_>>(),
        ))
        .sqrt();
        let response_len = mean(
            &batch
                .tokens
                .iter()
                .map(|t| t.len() as f64)
                .collect::<Vec<_>>(),
        );
        let s = stats.means();
        let mut rec = record!(state.step;
            "reward_mean" => reward_mean, "reward_std" => reward_std, "reward_raw_mean" => mean(&batch.raw),
            "zero_spread" => groups_flat as f64 / groups_seen.max(1) as f64,
            "policy_loss" => s.loss, "entropy" => s.entropy, "clip_frac" => s.clip_region,
            "clip_low" => s.clip_low, "clip_high" => s.clip_high, "grad_norm" => s.grad_norm,
            "response_len" => response_len, "truncated" => batch.stopped.iter().filter(|&&x| !x).count() as f64 / n.max(1) as f64,
            "lr" => lr, "time_generate" => time_generate, "time_score" => time_score, "time_train" => time_train);
        if cfg.grpo.beta != 0.0 {
            rec.insert("kl".into(), serde_json::json!(s.kl));
        }
        if cfg.grpo.dynamic_sampling {
            rec.insert("sampling_rounds".into(), serde_json::json!(rounds));
            rec.insert("groups".into(), serde_json::json!(n / group));
        }
        // each of score.judges' mean over the batch (every rank holds the whole batch)
        let per_judge: Vec<(String, Vec<f64>)> = judge_labels
            .iter()
            .enumerate()
            .map(|(k, l)| (l.clone(), batch.judges.iter().map(|r| r[k]).collect()))
            .collect();
        let judge_means = judge_means(&per_judge, &Dist::single())?;
        for (key, mean) in &judge_means {
            rec.insert(key.clone(), serde_json::json!(mean));
        }
        if !cfg.train.log_due(state.step) {
            let judged = |k: &str| judge_means.iter().any(|(l, _)| k == l);
            rec.retain(|k, _| k == "step" || k == "reward_mean" || k == "kl" || judged(k));
        }
        metrics.push(rec);
        progress.set(
            state.step,
            format!("reward {reward_mean:+.3} | kl {:.4} | zero-spread {:.2} | gen {time_generate:.2}s score {time_score:.2}s train {time_train:.2}s", s.kl, groups_flat as f64 / groups_seen.max(1) as f64),
        );
        let mut stop = None;
        if dist.is_main() {
            // rank 0 alone evaluates and writes
            if cfg.train.eval_due(state.step) {
                let now = inference_model(&policy, &policy_vars, dtype)?;
                if let Some(j) = evaluate(&now, state.step, &mut metrics, &mut samples_log)? {
                    progress.log(&format!(
                        "step {} | reward {reward_mean:+.4} | judge_score {j:.4}",
                        state.step
                    ));
                }
            }
            // run health, from what this step logged: a tripped signal is logged as
            // `health_*` and warned about once; with train.stop_on_health it stops the run
            let checked = health.check(&mut metrics, state.step, cfg.train.stop_on_health);
            for w in &checked.warnings {
                progress.log(w);
            }
            stop = checked.stop;
        }
        candor_train::health::stop_if_tripped(
            stop,
            cfg.train.stop_on_health,
            dist,
            "step",
            state.step,
            &opts.out,
        )?;
        if !dist.is_main() {
            continue;
        }
        if cfg.train.save_due(state.step) {
            meta.complete = false;
            save(&state, &metrics, &samples_log, &opt, &mut meta)?;
        }
    }
    meta.complete = true;
    meta.step = state.step;
    meta.metrics = candor_train::ckpt::final_metrics(&metrics);
    if let Some(first) = metrics.first("judge_score") {
        meta.metrics
            .insert("judge_score_initial".into(), serde_json::json!(first));
    }
    opts.save_on_main(|| save(&state, &metrics, &samples_log, &opt, &mut meta))?;
    progress.finish();
    Ok(meta)
}

/// What one update sums over its rows (every rank's share added): loss, Σ k3 KL, real
/// tokens, Σ entropy, clipped low / high / either, and what the clip counts are over.
struct Update {
    grads: candor_train::optim::Grads,
    sums: [f64; 8],
}

/// The loss of this rank's rows `mine` of one update and its gradients, summed over the
/// ranks (each rank's share is divided by the whole update's normaliser, so the sum is the
/// update's loss).
#[allow(clippy::too_many_arguments)]
fn update(
    policy: &Model,
    gradient_checkpointing: bool,
    opt: &AdamW,
    batch: &Groups,
    advantages: &[f64],
    keep: &[bool],
    mine: &[usize],
    prompts: &[Prompt],
    s: &LossSettings,
    norm: &Normaliser,
    temperature: f64,
    pad: u32,
    dist: &Dist,
) -> Result<Update> {
    let device = policy.device();
    let mut local = [0.0f64; 8];
    let mut grads = opt.zero_grads();
    let pr: Vec<&[u32]> = mine
        .iter()
        .map(|&i| prompts[batch.prompt[i]].ids.as_slice())
        .collect();
    let rs: Vec<&[u32]> = mine.iter().map(|&i| batch.tokens[i].as_slice()).collect();
    // rows of similar length together, each group padded to its own longest and its
    // gradients added to the others' (each part's loss is already divided by the whole
    // update's normaliser, so the parts sum to the update's loss)
    for (group, sb) in grouped_batches(&pr, &rs, pad, device)? {
        let rows: Vec<usize> = group.iter().map(|&g| mine[g]).collect();
        let recording = Recording::start(&[policy], gradient_checkpointing);
        let width = sb.response_width;
        let padded = |x: &[Vec<f64>]| -> Vec<Vec<f64>> {
            rows.iter()
                .map(|&i| {
                    let mut r = x[i].clone();
                    r.resize(width, 0.0);
                    r
                })
                .collect()
        };
        let (lp, logits) = logprobs(policy, &sb, temperature)?; // (B, R), (B, R, V)
        let keep_rows: Vec<f32> = rows
            .iter()
            .map(|&i| if keep[i] { 1.0 } else { 0.0 })
            .collect();
        let keep_t = Tensor::from_vec(keep_rows, (rows.len(), 1), device)?;
        let mask = sb.mask.broadcast_mul(&keep_t)?; // (B, R)
        let old = if batch.old_logprobs[rows[0]].is_empty() {
            lp.detach()
        } else {
            tensor(&padded(&batch.old_logprobs), device)?
        };
        let reference = if s.beta != 0.0 {
            Some(tensor(&padded(&batch.ref_logprobs), device)?)
        } else {
            None
        };
        let adv: Vec<f32> = rows.iter().map(|&i| advantages[i] as f32).collect();
        let adv = Tensor::from_vec(adv, rows.len(), device)?;
        let out = grpo_loss(&lp, &old, reference.as_ref(), &adv, &mask, s, norm)?;
        let entropy = candor_model::ops::entropy(&logits.detach())?;
        let tokens = out.tokens;
        let part = [
            scalar(&out.loss)?,
            out.kl_sum,
            tokens,
            scalar(&masked_mean(&entropy, &mask)?)? * tokens,
            out.clip_low,
            out.clip_high,
            out.clip_region,
            out.clip_count,
        ];
        for (sum, x) in local.iter_mut().zip(part) {
            *sum += x;
        }
        drop((lp, logits)); // the head's graph goes with the loss, before any recomputation
        recording.backward(out.loss, |store| opt.accumulate(store, &mut grads))?;
    }
    dist.all_reduce_grads(&mut grads, opt)?;
    let g = dist.all_reduce_f64(&local)?;
    Ok(Update {
        grads,
        sums: [g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]],
    })
}

/// Means over a step's updates of the update statistics.
#[derive(Default)]
struct StepStats {
    n: usize,
    loss: f64,
    grad_norm: f64,
    sums: [f64; 7],
}

struct StepMeans {
    loss: f64,
    kl: f64,
    entropy: f64,
    clip_low: f64,
    clip_high: f64,
    clip_region: f64,
    grad_norm: f64,
}

impl StepStats {
    fn add(&mut self, sums: &[f64; 8], grad_norm: f64) {
        self.n += 1;
        self.loss += sums[0];
        self.grad_norm += grad_norm;
        for (a, b) in self.sums.iter_mut().zip(&sums[1..]) {
            *a += b;
        }
    }
    fn means(&self) -> StepMeans {
        let [kl, tokens, entropy, low, high, region, count] = self.sums;
        let per = |x: f64, over: f64| if over > 0.0 { x / over } else { 0.0 };
        StepMeans {
            loss: per(self.loss, self.n as f64),
            kl: per(kl, tokens),
            entropy: per(entropy, tokens),
            clip_low: per(low, count),
            clip_high: per(high, count),
            clip_region: per(region, count),
            grad_norm: per(self.grad_norm, self.n as f64),
        }
    }
}

const SAMPLES_FILE: &str = "samples.jsonl";

/// Ranges and combinations the config must respect, each named by its key.
pub fn validate(cfg: &GrpoConfig, origin: &str) -> Result<()> {
    let bad = |key: &str, msg: String| Err(err(format!("{origin}: {key}: {msg}")));
    let g = &cfg.grpo;
    cfg.health.validate(origin)?;
    if cfg.train.grad_accum != 1 {
        return bad(
            "train.grad_accum",
            "must be 1 in GRPO (updates are set by train.batch_size)".into(),
        );
    }
    if cfg.data.prompts.as_os_str().is_empty() {
        return bad(
            "data.prompts",
            "give a JSONL file of {\"prompt\": ...} lines".into(),
        );
    }
    if cfg.rollout.group_size < 2 {
        return bad(
            "rollout.group_size",
            format!(
                "is {}; a group needs at least 2 completions (its advantages compare them)",
                cfg.rollout.group_size
            ),
        );
    }
    if cfg.rollout.prompts_per_step == 0 {
        return bad("rollout.prompts_per_step", "must be at least 1".into());
    }
    // the one sampling-settings check (max_new_tokens ≥ 1, temperature, top-p), as PPO's
    if let Err(e) = cfg.rollout.sampling().check() {
        return Err(err(format!("{origin}: {}", e.key("rollout"))));
    }
    if !(g.epsilon > 0.0 && g.epsilon < 1.0) {
        return bad(
            "grpo.epsilon",
            format!("is {}; expected a number in (0, 1)", g.epsilon),
        );
    }
    if let Some(high) = g.epsilon_high {
        if high.is_nan() || high < g.epsilon {
            return bad(
                "grpo.epsilon_high",
                format!(
                    "is {high}, below grpo.epsilon {}; clip-higher widens the upper clip only",
                    g.epsilon
                ),
            );
        }
    }
    if !(g.beta >= 0.0 && g.beta.is_finite()) {
        return bad("grpo.beta", format!("is {}; expected a number ≥ 0", g.beta));
    }
    if g.num_iterations == 0 {
        return bad("grpo.num_iterations", "must be at least 1".into());
    }
    if g.dynamic_sampling && g.max_sampling_rounds == 0 {
        return bad("grpo.max_sampling_rounds", "must be at least 1".into());
    }
    if g.overlong_buffer > cfg.rollout.max_new_tokens {
        return bad(
            "grpo.overlong_buffer",
            format!(
                "is {}, more than rollout.max_new_tokens {}",
                g.overlong_buffer, cfg.rollout.max_new_tokens
            ),
        );
    }
    Ok(())
}
