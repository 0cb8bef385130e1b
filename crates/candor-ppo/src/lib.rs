//! Stage: reinforcement learning from feedback with PPO (InstructGPT step 3).
//!
//! Four roles: the **policy** (trainable, from SFT), the **reference** (a frozen copy of the
//! SFT model), the **critic** (trainable scalar head, from the reward model by default) and
//! the **reward** (the frozen reward model and/or a rule judge). Each iteration, numbered
//! as in TRL's PPO trainer:
//!
//! 1. sample a batch of prompts;
//! 2. generate responses with the KV cache;
//! 3. score them (reward model at the last token, normalised, plus judges) and compute
//!    log-probs of the policy and the reference and the critic's values;
//! 4. per-token rewards = −β·KL plus the score at the last token, advantages and returns
//!    by GAE, advantages whitened;
//! 5. several PPO epochs over minibatches: clipped policy loss + clipped value loss
//!    (− entropy bonus, + PPO-ptx), early stop on approximate KL;
//! 6. update β, log, evaluate, checkpoint.
//!
//! Steps 2–3 are [`rollout`]'s `roll_out`, step 4 `advantages.rs`, step 5 `update.rs`
//! (`ppo_epochs`, its statistics named in `UpdateStats`); loading the roles (before the
//! loop) and step 6 are in [`run`]. What other RL stages share (response log-probs, the
//! clipped ratio loss, KL, the reward score) is in `candor_train::{seq, rl, rollout, score}`.

mod advantages;
pub mod config;
mod evaluate;
pub mod math;
mod roles;
pub mod rollout;
mod update;

use std::time::Instant;

use candor_core::checkpoint::{parent_ref, CandorMeta, Head};
use candor_core::metrics::MetricsLog;
use candor_core::record;
use candor_core::rng::Rng;
use candor_model::Model;
use candor_train::batch::{Cursor, Sampler};
use candor_train::ckpt::{read_trainer, restore_optimizer, Start, TrainerState};
use candor_train::err;
use candor_train::health::HealthMonitor;
use candor_train::optim::{named_vars, AdamW};
use candor_train::precision::inference_model;
use candor_train::progress::Progress;
use candor_train::rl::{masked_mean_rows, KlController};
use candor_train::rollout::Prompt;
use candor_train::schedule::lr_at;
use candor_train::train_loop::begin;

use advantages::{advantages, Advantages};
pub use config::*;
use evaluate::{read_samples, Evaluation, Saver};
use roles::Roles;
use rollout::{roll_out, RolloutModels, RolloutSampling};
use update::{ppo_epochs, Epochs, Learners, Targets};

pub type Error = candor_train::Error;
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub use candor_train::ckpt::RunOptions;

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
    let start = begin(opts, "ppo", &effective)?;
    if let Start::Done(meta) = start {
        return Ok(meta);
    }
    let resuming = matches!(start, Start::Resume(_));
    let (device, dist, dtype) = (&opts.device, &opts.dist, cfg.train.dtype);

    // the four roles (the frozen ones in train.dtype), the prompts, the ptx examples
    let Roles {
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
    } = Roles::load(cfg, opts, &policy_dir, resuming)?;
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
        } + &scorer
            .judges_name()
            .map(|w| format!(" + judges {w}"))
            .unwrap_or_default(),
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

    let evaluation = Evaluation {
        cfg,
        heldout: &heldout,
        tok: &tok,
        stop: &stop,
        judge: eval_judge.as_deref(),
        reward_model: scorer.reward_model.as_ref(),
    };
    let evaluate = |policy: &Model, step, metrics: &mut _, samples_log: &mut _| {
        evaluation.run(policy, step, metrics, samples_log)
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
    let saver = Saver {
        out: &opts.out,
        policy_config: &policy_config,
        policy_vars: &policy_vars,
        critic_config: &critic_config,
        critic_vars: &critic_vars,
        tok: &tok,
        policy_adapters: policy_adapters.as_ref(),
        critic_adapters: critic_adapters.as_ref(),
    };
    let save = |state: &TrainerState,
                metrics: &MetricsLog,
                samples: &MetricsLog,
                p_opt: &AdamW,
                c_opt: &AdamW,
                meta: &mut CandorMeta| {
        saver.save(state, metrics, samples, (p_opt, c_opt), meta)
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
        // 2.-3. responses sampled with the KV cache, scored, with the log-probs of policy and
        //    reference and the critic's values; then the whole batch on every rank
        let models = RolloutModels {
            policy: &policy,
            policy_vars: &policy_vars,
            critic: &critic,
            critic_vars: &critic_vars,
            reference: &reference,
            dtype,
            scorer: &scorer,
        };
        let how = RolloutSampling {
            tok: &tok,
            params: &sampling,
            stop: &stop,
            temperature,
        };
        // a judge that fails (a program that died, a server that is gone) ends the run here,
        // before anything of this iteration is written
        let (roll, times) = roll_out(&models, &how, mine, &mut state.rng, dist).map_err(|e| {
            err(format!(
                "{e}; stopped at iteration {}, the last good checkpoint (if any) is kept in {}",
                iteration + 1,
                opts.out.display()
            ))
        })?;
        let time_generate = times.generate;
        // 4. per-token rewards, GAE, whitening, over the whole batch
        let Advantages {
            mask_rows,
            old_lp,
            old_values,
            kl,
            advantages,
            returns,
        } = advantages(&roll, kl_ctl.value, &cfg.ppo);
        let time_score = times.score_start.elapsed().as_secs_f64();

        // 5. PPO epochs over minibatches (each rank computes its share of every minibatch)
        let t2 = Instant::now();
        let n = roll.len();
        let batch_ids: Vec<&[u32]> = batch_prompts.iter().map(|p| p.ids.as_slice()).collect();
        let targets = Targets {
            prompts: &batch_ids,
            roll: &roll,
            old_lp: &old_lp,
            old_values: &old_values,
            advantages: &advantages,
            returns: &returns,
        };
        let mut learners = Learners {
            policy: &policy,
            policy_vars: &policy_vars,
            critic: &critic,
            critic_vars: &critic_vars,
            policy_opt: &mut policy_opt,
            critic_opt: &mut critic_opt,
        };
        let epochs = Epochs {
            cfg,
            lr,
            critic_lr_scale,
            temperature,
            pad,
            dist,
            iteration,
            out: &opts.out,
            ptx: &ptx,
        };
        let stats = ppo_epochs(
            &mut learners,
            &targets,
            &mut ptx_sampler,
            &mut state.rng,
            &epochs,
        )?;
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
        for (key, mean) in &times.judge_means {
            rec.insert(key.clone(), serde_json::json!(mean));
        }
        if !(state.step as usize).is_multiple_of(cfg.train.log_every)
            && state.step as usize != cfg.train.steps
        {
            let judged = |k: &str| times.judge_means.iter().any(|(l, _)| k == l);
            rec.retain(|k, _| k == "step" || k == "reward_mean" || k == "kl" || judged(k));
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
            "iteration",
            state.step,
            &opts.out,
        )?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Rollout;
    use crate::update::{minibatch_grads, Models, PtxBatch};
    use candle_core::Device;
    use candor_model::io::build_trainable;
    use candor_model::ModelConfig;
    use candor_train::batch::LmExample;
    use candor_train::config::TrainConfig;
    use candor_train::dist::Dist;
    use candor_train::dist::LocalGroup;

    /// Per-row advantages and returns.
    type AdvantagesReturns = [Vec<Vec<f64>>; 2];

    /// A rollout of 5 rows with responses of different lengths (one empty-ish, 1 token) and
    /// random per-token targets, and 4 pretraining examples for PPO-ptx.
    fn rollout() -> (Vec<Vec<u32>>, Rollout, AdvantagesReturns, Vec<LmExample>) {
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
        update_with(dist, chunk, false)
    }

    /// [`update`], with `train.gradient_checkpointing` as `checkpointing`.
    fn update_with(dist: &Dist, chunk: &[usize], checkpointing: bool) -> (Vec<Vec<f32>>, Vec<f64>) {
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
            gradient_checkpointing: checkpointing,
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
        let s = u.stats;
        let stats = vec![
            u.loss,
            s.policy_loss,
            s.value_loss,
            s.clip_frac,
            s.value_clip_frac,
            s.approx_kl,
            s.entropy,
        ];
        (grads, stats)
    }

    /// Gradient checkpointing in the PPO update (policy loss, value loss, entropy and the
    /// ptx term; policy and critic recomputed): the same gradients of both models and the
    /// same statistics as without, every parameter's gradient non-zero.
    #[test]
    fn checkpointing_gives_the_same_minibatch_update() {
        let chunk = [4usize, 0, 2, 1];
        let (g0, s0) = update_with(&Dist::single(), &chunk, false);
        let (g1, s1) = update_with(&Dist::single(), &chunk, true);
        assert_eq!(s0, s1, "statistics");
        let scale = g0.iter().flatten().fold(0.0f32, |m, x| m.max(x.abs()));
        let worst = g0
            .iter()
            .zip(&g1)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
            .fold(0.0f32, f32::max);
        println!(
            "checkpointed PPO update: worst gradient difference {worst:.2e} (largest {scale:.2e})"
        );
        assert!(worst <= 1e-6 * scale, "gradients differ by {worst}");
        for g in &g1 {
            assert!(
                g.iter().any(|&x| x != 0.0),
                "a parameter got a zero gradient"
            );
        }
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
