//! Stage: direct preference optimisation from ranked responses.
//!
//! The policy learns from the same preference data the reward stage reads, with no reward
//! model, critic or sampling: for every pair (y_w better than y_l) of a prompt's ranking,
//! the loss pushes the policy's log-ratio to a frozen reference, log π(y|x) − log π_ref(y|x),
//! up for y_w and down for y_l ([`loss`]; DPO, Rafailov et al. 2023, and its variants).
//!
//! 1. the policy from `init` (an SFT checkpoint); the data: preference files grouped by
//!    prompt, all K·(K−1)/2 pairs of each ranking, each prompt and response tokenised once
//!    ([`data`]); a held-out split of prompts;
//! 2. the reference's log-probs of every response, computed once in `train.dtype` and kept
//!    in the run's trainer state (`trainer/reference_logps.safetensors`, so `--resume` reads them),
//!    the reference freed before the first step (SimPO loads none);
//! 3. the loop: a batch of prompts, each of their responses scored once by the policy,
//!    every pair's loss, backward, clip, AdamW step; log, evaluate (held-out pairs; the
//!    judge on held-out prompts), checkpoint;
//! 4. an `lm` checkpoint.

pub mod config;
pub mod data;
pub mod forward;
pub mod loss;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candor_core::checkpoint::{parent_ref, CandorMeta, Head, TRAINER_DIR};
use candor_core::metrics::MetricsLog;
use candor_core::record;
use candor_core::rng::Rng;
use candor_data::chat::{stop_tokens, ChatTemplate};
use candor_data::preference::{load_comparisons, Comparisons};
use candor_data::Tokenizer;
use candor_model::io::read_config;
use candor_model::{Model, Recording};
use candor_train::batch::{split_heldout, Sampler};
use candor_train::ckpt::{final_metrics, save_checkpoint, Snapshot, Start, TrainerState};
use candor_train::health::HealthMonitor;
use candor_train::lora::load_for_training;
use candor_train::optim::{check_finite, clip_grad_norm, named_vars, AdamW};
use candor_train::precision::{compute_model, inference_model, load_frozen};
use candor_train::progress::{human, Progress};
use candor_train::rollout::{load_prompts, Prompt};
use candor_train::schedule::lr_at;
use candor_train::score::same_tokenizer;
use serde::{Deserialize, Serialize};

pub use candor_train::ckpt::RunOptions;
pub use config::*;
use data::{groups, pair_layout, prepare, PromptPairs};
use forward::response_logps;
use loss::{pair_loss, sharded_loss, PairLogps, PairStats};

pub type Error = candor_train::Error;
pub type Result<T, E = Error> = std::result::Result<T, E>;

use candor_train::err;

/// Where the reference's log-probs live in a checkpoint (beside the optimiser state).
pub const REFERENCE_LOGPS_FILE: &str = "reference_logps.safetensors";
const SAMPLES_FILE: &str = "samples.jsonl";

/// The reference's log-probs of every training and held-out response, and what they were
/// computed on (a digest of the token ids), so a resumed run can tell they still apply.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ReferenceLogps {
    pub digest: String,
    /// By prompt, by response: Σ log π_ref over the response's tokens.
    pub train: Vec<Vec<f64>>,
    pub heldout: Vec<Vec<f64>>,
}

/// Check the config before anything is loaded; errors name the config file and key.
fn validate(cfg: &DpoConfig, origin: &str) -> Result<()> {
    cfg.train.validate(origin)?;
    cfg.health.validate(origin)?;
    cfg.dpo.check().map_err(|m| err(format!("{origin}: {m}")))?;
    if cfg.data.files.is_empty() {
        return Err(err(format!(
            "{origin}: data.files: list at least one preference JSONL file (`candor rank` output, or chosen/rejected lines)"
        )));
    }
    if !(0.0..=0.5).contains(&cfg.data.heldout_fraction) {
        return Err(err(format!(
            "{origin}: data.heldout_fraction: must be in [0, 0.5]"
        )));
    }
    if cfg.eval.judge.is_some() && cfg.eval.prompts.is_none() {
        return Err(err(format!(
            "{origin}: eval.judge: needs eval.prompts (the held-out prompts the policy answers)"
        )));
    }
    Ok(())
}

/// Train a policy by DPO; returns the output checkpoint's metadata.
pub fn run(cfg: &DpoConfig, opts: &RunOptions) -> Result<CandorMeta> {
    let origin = &opts.origin;
    validate(cfg, origin)?;
    let init = cfg.init.as_ref().ok_or_else(|| {
        err(format!(
            "{origin}: init: give the starting checkpoint (the SFT model) with --init DIR"
        ))
    })?;
    // checkpoint directories, or hf:ORG/NAME in the local Hugging Face cache
    let init_spec = init;
    let init = candor_model::resolve_model_dir(init)?;
    // SimPO reads no reference: `reference` is not even looked at, and the held-out KL is
    // measured against `init`
    let reference_dir = match &cfg.reference {
        Some(r) if cfg.dpo.loss_type.needs_reference() => candor_model::resolve_model_dir(r)?,
        _ => init.clone(),
    };
    opts.check_batch("train.batch_size", cfg.train.batch_size)?;
    let effective = candor_core::config::effective(cfg);
    let start = opts.plan_start(&effective)?;
    if let Start::Done(meta) = start {
        eprintln!(
            "[dpo] {} is already complete (step {})",
            opts.out.display(),
            meta.step
        );
        return Ok(meta);
    }
    let resuming = matches!(start, Start::Resume(_));
    let (device, dist, dtype) = (&opts.device, &opts.dist, cfg.train.dtype);

    // 1. the policy (from init, or our partial run), its tokenizer and the data
    let model_config = read_config(&init)?;
    if model_config.head() != Head::Lm {
        return Err(err(format!(
            "{}: the policy must be an lm checkpoint, this one has a score head",
            init.display()
        )));
    }
    let tok = Tokenizer::from_dir(&init)?;
    let needs_reference = cfg.dpo.loss_type.needs_reference();
    if needs_reference && reference_dir != init {
        check_reference(&reference_dir, &init, &tok)?;
    }
    let template = ChatTemplate::for_tokenizer(&tok);
    let pad = tok.pad_id();
    let ctx = model_config.max_position_embeddings;
    let max_len = match cfg.data.max_len {
        0 => ctx,
        n => n.min(ctx),
    };
    let all = load_comparisons(&cfg.data.files)?;
    let (train_cmp, heldout_cmp) = match &cfg.data.heldout {
        Some(path) => (all, load_comparisons(std::slice::from_ref(path))?),
        None => split_heldout(all, cfg.data.heldout_fraction, cfg.seed),
    };
    let train = prepare(&train_cmp, &tok, &template, max_len, cfg.data.too_long)?;
    let heldout = prepare(&heldout_cmp, &tok, &template, max_len, cfg.data.too_long)?;
    if train.prompts.is_empty() {
        return Err(no_pairs(&cfg.data.files, &train_cmp, &train));
    }
    let eval_prompts = match &cfg.eval.prompts {
        Some(p) => {
            let mut h = load_prompts(
                p,
                &tok,
                &template,
                cfg.eval.max_new_tokens,
                "eval.max_new_tokens",
                ctx,
            )?;
            h.truncate(cfg.eval.max_prompts.max(1));
            h
        }
        None => vec![],
    };
    let eval_judge = cfg
        .eval
        .judge
        .as_deref()
        .map(candor_train::score::judge)
        .transpose()?;

    let mut init_rng = Rng::derive(cfg.seed, "init");
    // every weight, or with train.lora adapters on init frozen
    let (policy, varmap, adapters) = load_for_training(
        init_spec,
        &init,
        resuming.then_some(opts.out.as_path()),
        Head::Lm,
        &cfg.train,
        &mut init_rng,
        device,
    )?;
    // the frozen reference: a LoRA run's reference, when it is init, is the policy with its
    // adapters off (the same weights, no second copy); otherwise its checkpoint
    let load_reference = || -> Result<Model> {
        match &adapters {
            Some(_) if reference_dir == init => Ok(policy.without_adapters()),
            _ => load_frozen(&reference_dir, dtype, device),
        }
    };
    let mut opt = AdamW::new(named_vars(&varmap), &cfg.train)?;
    let mut meta = CandorMeta::new("dpo", Head::Lm, effective);
    meta.parents = vec![parent_ref("init", &init)?];
    if needs_reference && cfg.reference.is_some() {
        meta.parents.push(parent_ref("reference", &reference_dir)?);
    }
    meta.total_steps = cfg.train.steps as u64;
    let (mut state, mut metrics, mut samples_log) = match &start {
        Start::Resume(prev) => {
            let (s, tensors) = candor_train::ckpt::read_trainer(&opts.out, device)?;
            candor_train::ckpt::restore_optimizer(&mut opt, "model", &s, &tensors, &opts.out)?;
            meta.parents = prev.parents.clone();
            let m = MetricsLog::read(&opts.out, Some(s.step))?;
            let samples = MetricsLog::read_file(&opts.out.join(SAMPLES_FILE), Some(s.step))?;
            (s, m, samples)
        }
        _ => (
            TrainerState::new(cfg.seed),
            MetricsLog::default(),
            MetricsLog::default(),
        ),
    };

    // 2. the reference's log-probs, once (or from the partial run), then the reference is gone
    let digest = data_digest(&train.prompts, &heldout.prompts);
    let reference = if !needs_reference {
        None
    } else {
        let saved = resuming
            .then(|| read_reference_logps(&opts.out, &train.prompts, &heldout.prompts))
            .transpose()?
            .flatten()
            .filter(|r| r.digest == digest);
        Some(match saved {
            Some(r) => r,
            None => {
                let t0 = Instant::now();
                let reference = load_reference()?;
                let r = ReferenceLogps {
                    digest: digest.clone(),
                    train: response_logps_all(
                        &reference,
                        &train.prompts,
                        cfg.train.batch_size,
                        pad,
                    )?,
                    heldout: response_logps_all(
                        &reference,
                        &heldout.prompts,
                        cfg.train.batch_size,
                        pad,
                    )?,
                };
                drop(reference);
                if dist.is_main() {
                    eprintln!(
                        "[dpo] reference log-probs of {} responses in {:.1}s",
                        r.train
                            .iter()
                            .chain(&r.heldout)
                            .map(Vec::len)
                            .sum::<usize>(),
                        t0.elapsed().as_secs_f64()
                    );
                }
                r
            }
        })
    };

    let mut health = HealthMonitor::replay(cfg.health.clone(), &metrics.records);
    let mut sampler = Sampler::new(train.prompts.len(), cfg.seed, state.cursor.clone());
    let progress = Progress::for_rank("dpo", cfg.train.steps as u64, state.step, dist.is_main());
    progress.log(&format!(
        "{} ({}) | {} training prompts, {} pairs ({} prompts without a pair) | {} held-out prompts, {} pairs{}{} | {}{}",
        cfg.dpo.loss_type.name(),
        match (needs_reference, &cfg.reference) {
            (false, _) => "no reference".to_string(),
            (true, Some(r)) => format!("reference {}", r.display()),
            (true, None) => "reference: init, frozen".to_string(),
        },
        train.prompts.len(),
        train.pairs(),
        train.without_pairs,
        heldout.prompts.len(),
        heldout.pairs(),
        match train.truncated + heldout.truncated {
            0 => String::new(),
            n => format!(" | {n} responses longer than {max_len} tokens truncated"),
        },
        match train.dropped + heldout.dropped {
            0 => String::new(),
            n => format!(" | {n} responses longer than {max_len} tokens dropped"),
        },
        opts.place(dtype),
        if resuming { format!(", resuming at step {}", state.step) } else { String::new() }
    ));

    // evaluation: the held-out pairs' loss, accuracy and margin; the judge on held-out prompts
    let stop = stop_tokens(&tok);
    let evaluate = |policy: &Model,
                    step: u64,
                    metrics: &mut MetricsLog,
                    samples: &mut MetricsLog|
     -> Result<String> {
        let mut rec = record!(step;);
        let mut line = vec![];
        if !heldout.prompts.is_empty() {
            let e = evaluate_pairs(
                &cfg.dpo,
                policy,
                &heldout.prompts,
                reference.as_ref().map(|r| r.heldout.as_slice()),
                cfg.train.batch_size,
                pad,
            )?;
            rec.insert("eval_loss".into(), e.loss.into());
            rec.insert("eval_accuracy".into(), e.stats.accuracy.into());
            rec.insert("eval_margin".into(), e.stats.margin.into());
            line.push(format!(
                "eval_loss {:.4} | eval_accuracy {:.3} | eval_margin {:.3}",
                e.loss, e.stats.accuracy, e.stats.margin
            ));
        }
        if !eval_prompts.is_empty() {
            let reference = load_reference()?;
            let ps: Vec<&Prompt> = eval_prompts.iter().collect();
            let mut rng = Rng::derive(cfg.seed, "eval");
            let e = candor_train::rollout::evaluate_policy(
                policy,
                Some(&reference),
                eval_judge.as_deref(),
                &tok,
                &ps,
                &cfg.eval.sampling(),
                &stop,
                &mut rng,
            )?;
            if let Some(j) = e.judge_score {
                rec.insert("judge_score".into(), j.into());
                line.push(format!("judge_score {j:.4}"));
            }
            if let Some(kl) = e.kl {
                rec.insert("kl".into(), kl.into());
                line.push(format!("kl {kl:.4}"));
            }
            rec.insert("response_len".into(), e.response_len.into());
            for (p, t) in ps
                .iter()
                .zip(&e.responses.texts)
                .take(cfg.eval.samples_logged)
            {
                samples.push(record!(step; "prompt" => p.text, "response" => t));
            }
        }
        if rec.len() > 1 {
            metrics.push(rec);
        }
        Ok(line.join(" | "))
    };
    let save = |state: &TrainerState,
                metrics: &MetricsLog,
                samples: &MetricsLog,
                opt: &AdamW,
                meta: &mut CandorMeta|
     -> Result<()> {
        let snap = Snapshot {
            config: &model_config,
            head: Head::Lm,
            varmap: &varmap,
            tokenizer: &tok,
            adapters: adapters.as_ref(),
            metrics,
            state,
            optimizers: &[("model", opt)],
        };
        save_checkpoint(&opts.out, &snap, meta, |dir| {
            if let Some(r) = &reference {
                write_reference_logps(&dir.join(TRAINER_DIR).join(REFERENCE_LOGPS_FILE), r)?;
            }
            Ok(samples.write_file(&dir.join(SAMPLES_FILE))?)
        })
    };
    if state.step == 0 && dist.is_main() {
        let line = evaluate(
            &*inference_model(&policy, &varmap, dtype)?,
            0,
            &mut metrics,
            &mut samples_log,
        )?;
        if !line.is_empty() {
            progress.log(&format!("before DPO: {line}"));
        }
        // the starting point of the signals (held-out length, KL, margin), as a resumed
        // run's replay of the log sees it; nothing trips on a first value
        health.check(&mut metrics, 0, false);
    }

    // 3. the loop: a batch of prompts, each response scored once, every pair's loss
    dist.sync_start(&named_vars(&varmap), state.step)?;
    let elapsed_before = state.elapsed_sec;
    let clock = Instant::now();
    let mut window = (Instant::now(), 0u64);
    for step in state.step as usize..cfg.train.steps {
        let lr = lr_at(&cfg.train, step);
        let step_model = compute_model(&policy, &varmap, dtype)?;
        let mut grads = opt.zero_grads();
        // this rank's sums: loss, tokens, then the pairs' statistics
        let mut local = StepSums::default();
        step_model.set_adapter_training(true); // LoRA dropout, when there is any
        for _ in 0..cfg.train.grad_accum {
            let idx = sampler.next(cfg.train.batch_size);
            let batch: Vec<&PromptPairs> = idx.iter().map(|&i| &train.prompts[i]).collect();
            let global_pairs: usize = batch.iter().map(|p| p.pairs.len()).sum();
            let global_chosen_tokens: usize = batch
                .iter()
                .flat_map(|p| p.pairs.iter().map(|&(b, _)| p.responses[b].len()))
                .sum();
            let mine = dist.shard(&idx);
            if mine.is_empty() {
                continue;
            }
            let examples: Vec<&PromptPairs> = mine.iter().map(|&i| &train.prompts[i]).collect();
            let recording = Recording::start(&[&step_model], cfg.train.gradient_checkpointing);
            let ref_rows: Option<Vec<&[f64]>> = reference
                .as_ref()
                .map(|r| mine.iter().map(|&i| r.train[i].as_slice()).collect());
            let f = policy_pairs(&step_model, &examples, ref_rows.as_deref(), pad)?;
            let x = f.logps();
            let pairs = pair_loss(&cfg.dpo, &x)?;
            // this rank's share of the whole batch's loss, over the accumulation steps
            let share = sharded_loss(
                &cfg.dpo,
                &pairs,
                &x,
                global_pairs,
                global_chosen_tokens as f64,
            )?;
            let share = (share / cfg.train.grad_accum as f64)?;
            local.loss += share.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            local.tokens += examples.iter().map(|e| e.tokens()).sum::<usize>() as f64;
            local.add_pairs(&pairs, &x, cfg.dpo.loss_type)?;
            drop((x, pairs));
            drop(f); // the policy's graph goes with the loss
            recording.backward(share, |store| opt.accumulate(store, &mut grads))?;
        }
        step_model.set_adapter_training(false);
        dist.all_reduce_grads(&mut grads, &opt)?;
        let sums = StepSums::from_vec(&dist.all_reduce_f64(&local.to_vec())?);
        let grad_norm = clip_grad_norm(&mut grads, cfg.train.grad_clip)?;
        check_finite(sums.loss, grad_norm, step as u64 + 1, &opts.out)?;
        opt.step(&grads, lr)?;
        state.step = step as u64 + 1;
        state.cursor = sampler.cursor.clone();
        state.tokens += sums.tokens as u64;
        state.elapsed_sec = elapsed_before + clock.elapsed().as_secs_f64();
        window.1 += sums.tokens as u64;
        let tok_s = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
        let s = sums.stats();
        progress.set(
            state.step,
            format!(
                "loss {:.4} | acc {:.2} | margin {:+.3} | {} tok/s",
                sums.loss,
                s.accuracy,
                s.margin,
                human(tok_s)
            ),
        );
        if cfg.train.log_due(state.step) {
            metrics.push(record!(state.step;
                "loss" => sums.loss, "lr" => lr, "grad_norm" => grad_norm, "tokens_per_sec" => tok_s,
                "reward_chosen" => s.reward_chosen, "reward_rejected" => s.reward_rejected,
                "logps_chosen" => sums.logps_chosen / sums.pairs.max(1.0),
                "logps_rejected" => sums.logps_rejected / sums.pairs.max(1.0)));
            window = (Instant::now(), 0);
        }
        let mut stop = None;
        if dist.is_main() {
            // rank 0 alone evaluates and writes
            if cfg.train.eval_due(state.step) {
                let line = evaluate(
                    &*inference_model(&policy, &varmap, dtype)?,
                    state.step,
                    &mut metrics,
                    &mut samples_log,
                )?;
                if !line.is_empty() {
                    progress.log(&format!(
                        "step {} | loss {:.4} | {line}",
                        state.step, sums.loss
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

    // 4. the final checkpoint
    meta.step = state.step;
    meta.complete = true;
    meta.metrics = final_metrics(&metrics);
    if let Some(first) = metrics.first("judge_score") {
        meta.metrics
            .insert("judge_score_initial".into(), serde_json::json!(first));
    }
    opts.save_on_main(|| save(&state, &metrics, &samples_log, &opt, &mut meta))?;
    progress.finish();
    Ok(meta)
}

/// The reference must read the policy's tokens: the same vocabulary.
fn check_reference(reference: &Path, init: &Path, tok: &Tokenizer) -> Result<()> {
    let ref_config = read_config(reference)?;
    if ref_config.head() != Head::Lm {
        return Err(err(format!(
            "{}: the reference must be an lm checkpoint, this one has a score head",
            reference.display()
        )));
    }
    if !same_tokenizer(tok, &Tokenizer::from_dir(reference)?) {
        return Err(err(format!(
            "{}: the reference's tokenizer differs from the policy's ({}); DPO compares both models' log-probs of the same tokens, so they must match",
            reference.display(),
            init.display()
        )));
    }
    Ok(())
}

/// Why there is nothing to train on, naming the data file.
fn no_pairs(files: &[PathBuf], cmp: &[Comparisons], p: &data::Prepared) -> Error {
    let file = files[0].display();
    if cmp.is_empty() {
        return err(format!(
            "{file}: no preference lines (expected JSONL {{\"prompt\", \"responses\", \"ranks\"}} or {{\"prompt\", \"chosen\", \"rejected\"}}){}",
            if files.len() > 1 { " in any of data.files" } else { "" }
        ));
    }
    if p.dropped > 0 {
        return err(format!(
            "{file}: no training pairs left: {} responses are longer than data.max_len (data.too_long: drop)",
            p.dropped
        ));
    }
    err(format!(
        "{file}: no training pairs: every ranking is all ties (equal ranks make no pair)"
    ))
}

/// A digest of the prepared token ids: reference log-probs saved with a run apply to it
/// only if the data is the same.
fn data_digest(train: &[PromptPairs], heldout: &[PromptPairs]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (tag, set) in [(0u8, train), (1, heldout)] {
        h.update([tag]);
        for p in set {
            h.update((p.prompt.len() as u64).to_le_bytes());
            for t in &p.prompt {
                h.update(t.to_le_bytes());
            }
            for r in &p.responses {
                h.update((r.len() as u64).to_le_bytes());
                for t in r {
                    h.update(t.to_le_bytes());
                }
            }
        }
    }
    format!("{:x}", h.finalize())
}

/// The reference log-probs as f64 tensors (bit-exact on reading back; JSON text is not):
/// `train` and `heldout` flat in prompt order, `digest` as its bytes.
fn write_reference_logps(path: &Path, r: &ReferenceLogps) -> Result<()> {
    let flat = |rows: &[Vec<f64>]| -> Result<Tensor> {
        let v: Vec<f64> = rows.iter().flatten().copied().collect();
        Ok(Tensor::new(v, &Device::Cpu)?)
    };
    let tensors = std::collections::HashMap::from([
        ("train".to_string(), flat(&r.train)?),
        ("heldout".to_string(), flat(&r.heldout)?),
        (
            "digest".to_string(),
            Tensor::new(r.digest.as_bytes(), &Device::Cpu)?,
        ),
    ]);
    candle_core::safetensors::save(&tensors, path)
        .map_err(|e| err(format!("{}: {e}", path.display())))
}

/// The reference log-probs a partial run saved, shaped like `train` and `heldout`; `None`
/// when there are none or they do not fit this data.
fn read_reference_logps(
    dir: &Path,
    train: &[PromptPairs],
    heldout: &[PromptPairs],
) -> Result<Option<ReferenceLogps>> {
    let path = dir.join(TRAINER_DIR).join(REFERENCE_LOGPS_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let bad = |e: &dyn std::fmt::Display| {
        err(format!(
            "{}: not valid reference log-probs: {e}",
            path.display()
        ))
    };
    let t = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| bad(&e))?;
    let get = |k: &str| t.get(k).ok_or_else(|| bad(&format!("no tensor `{k}`")));
    let digest = String::from_utf8(get("digest")?.to_vec1::<u8>()?).map_err(|e| bad(&e))?;
    let split = |flat: Vec<f64>, set: &[PromptPairs]| -> Option<Vec<Vec<f64>>> {
        let counts: Vec<usize> = set.iter().map(|p| p.responses.len()).collect();
        if counts.iter().sum::<usize>() != flat.len() {
            return None;
        }
        let mut at = 0;
        Some(
            counts
                .iter()
                .map(|&n| {
                    at += n;
                    flat[at - n..at].to_vec()
                })
                .collect(),
        )
    };
    let (Some(train), Some(heldout)) = (
        split(get("train")?.to_vec1::<f64>()?, train),
        split(get("heldout")?.to_vec1::<f64>()?, heldout),
    ) else {
        return Ok(None);
    };
    Ok(Some(ReferenceLogps {
        digest,
        train,
        heldout,
    }))
}

/// Σ log π(response) of every response of `prompts` (by prompt, by response), `batch_size`
/// prompts per forward pass; no gradient.
pub fn response_logps_all(
    model: &Model,
    prompts: &[PromptPairs],
    batch_size: usize,
    pad: u32,
) -> Result<Vec<Vec<f64>>> {
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch_size.max(1)) {
        let examples: Vec<&PromptPairs> = chunk.iter().collect();
        let sums = response_logps(model, &groups(&examples), pad)?
            .detach()
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let mut at = 0;
        for e in chunk {
            out.push(sums[at..at + e.responses.len()].to_vec());
            at += e.responses.len();
        }
    }
    Ok(out)
}

/// The policy's log-probs of a batch's pairs, with the reference's and the lengths, as
/// (P,) f32 tensors.
struct PairForward {
    chosen: Tensor,
    rejected: Tensor,
    reference: Option<(Tensor, Tensor)>,
    len_chosen: Tensor,
    len_rejected: Tensor,
}

impl PairForward {
    fn logps(&self) -> PairLogps<'_> {
        PairLogps {
            chosen: &self.chosen,
            rejected: &self.rejected,
            reference: self.reference.as_ref().map(|(c, r)| (c, r)),
            len_chosen: &self.len_chosen,
            len_rejected: &self.len_rejected,
        }
    }
}

/// Score each response of `examples` once with `model` and lay out every pair; `reference`
/// holds the reference's sums by prompt, by response.
fn policy_pairs(
    model: &Model,
    examples: &[&PromptPairs],
    reference: Option<&[&[f64]]>,
    pad: u32,
) -> Result<PairForward> {
    let device = model.device();
    let layout = pair_layout(examples);
    let sums = response_logps(model, &groups(examples), pad)?; // (N,)
    let pick =
        |i: &[u32]| -> Result<Tensor> { Ok(sums.index_select(&Tensor::new(i, device)?, 0)?) };
    let lens: Vec<f32> = examples
        .iter()
        .flat_map(|e| e.responses.iter().map(|r| r.len() as f32))
        .collect();
    let take = |xs: &[f32], i: &[u32]| -> Result<Tensor> {
        let v: Vec<f32> = i.iter().map(|&j| xs[j as usize]).collect();
        Ok(Tensor::new(v, device)?)
    };
    let reference = match reference {
        None => None,
        Some(rows) => {
            let flat: Vec<f32> = rows
                .iter()
                .flat_map(|r| r.iter().map(|&x| x as f32))
                .collect();
            Some((take(&flat, &layout.better)?, take(&flat, &layout.worse)?))
        }
    };
    Ok(PairForward {
        chosen: pick(&layout.better)?,
        rejected: pick(&layout.worse)?,
        reference,
        len_chosen: take(&lens, &layout.better)?,
        len_rejected: take(&lens, &layout.worse)?,
    })
}

/// Sums over a step's pairs, exchanged between ranks as one vector.
#[derive(Default)]
struct StepSums {
    loss: f64,
    tokens: f64,
    pairs: f64,
    correct: f64,
    reward_chosen: f64,
    reward_rejected: f64,
    logps_chosen: f64,
    logps_rejected: f64,
}

impl StepSums {
    fn to_vec(&self) -> Vec<f64> {
        vec![
            self.loss,
            self.tokens,
            self.pairs,
            self.correct,
            self.reward_chosen,
            self.reward_rejected,
            self.logps_chosen,
            self.logps_rejected,
        ]
    }

    fn from_vec(v: &[f64]) -> Self {
        StepSums {
            loss: v[0],
            tokens: v[1],
            pairs: v[2],
            correct: v[3],
            reward_chosen: v[4],
            reward_rejected: v[5],
            logps_chosen: v[6],
            logps_rejected: v[7],
        }
    }

    /// Add a micro-batch's pairs: their rewards and the log-probs the loss reads (sums, or
    /// length-averaged for SimPO, as TRL logs them).
    fn add_pairs(
        &mut self,
        pairs: &loss::PairLoss,
        x: &PairLogps,
        loss_type: LossType,
    ) -> Result<()> {
        let v = |t: &Tensor| -> Result<Vec<f64>> {
            Ok(t.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?)
        };
        let (rc, rr) = (v(&pairs.chosen_rewards)?, v(&pairs.rejected_rewards)?);
        let (mut lc, mut lr) = (v(x.chosen)?, v(x.rejected)?);
        if loss_type == LossType::Simpo {
            for (l, n) in lc.iter_mut().zip(v(x.len_chosen)?) {
                *l /= n;
            }
            for (l, n) in lr.iter_mut().zip(v(x.len_rejected)?) {
                *l /= n;
            }
        }
        self.pairs += rc.len() as f64;
        self.correct += rc.iter().zip(&rr).filter(|(c, r)| c > r).count() as f64;
        self.reward_chosen += rc.iter().sum::<f64>();
        self.reward_rejected += rr.iter().sum::<f64>();
        self.logps_chosen += lc.iter().sum::<f64>();
        self.logps_rejected += lr.iter().sum::<f64>();
        Ok(())
    }

    fn stats(&self) -> PairStats {
        let n = self.pairs.max(1.0);
        PairStats {
            accuracy: self.correct / n,
            margin: (self.reward_chosen - self.reward_rejected) / n,
            reward_chosen: self.reward_chosen / n,
            reward_rejected: self.reward_rejected / n,
        }
    }
}

/// The loss and pair statistics of the policy on held-out prompts.
pub struct PairEval {
    pub loss: f64,
    pub stats: PairStats,
    pub pairs: usize,
}

/// The configured loss (with the NLL term) over all held-out pairs, and how often the
/// better response has the higher implicit reward; in f64 on the CPU from the policy's
/// sequence log-probs, `batch_size` prompts per forward pass.
pub fn evaluate_pairs(
    cfg: &DpoAlgo,
    policy: &Model,
    heldout: &[PromptPairs],
    reference: Option<&[Vec<f64>]>,
    batch_size: usize,
    pad: u32,
) -> Result<PairEval> {
    let policy_sums = response_logps_all(policy, heldout, batch_size, pad)?;
    let (mut c, mut r, mut rc, mut rr, mut lc, mut lr) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (i, p) in heldout.iter().enumerate() {
        for &(b, w) in &p.pairs {
            c.push(policy_sums[i][b]);
            r.push(policy_sums[i][w]);
            if let Some(refs) = reference {
                rc.push(refs[i][b]);
                rr.push(refs[i][w]);
            }
            lc.push(p.responses[b].len() as f64);
            lr.push(p.responses[w].len() as f64);
        }
    }
    let t = |v: &[f64]| Tensor::new(v, &Device::Cpu);
    let (c, r, lc, lr) = (t(&c)?, t(&r)?, t(&lc)?, t(&lr)?);
    let (rc, rr) = (t(&rc)?, t(&rr)?);
    let x = PairLogps {
        chosen: &c,
        rejected: &r,
        reference: reference.map(|_| (&rc, &rr)),
        len_chosen: &lc,
        len_rejected: &lr,
    };
    let (loss, pairs) = loss::batch_loss(cfg, &x)?;
    let stats = PairStats::of(
        &pairs.chosen_rewards.to_vec1()?,
        &pairs.rejected_rewards.to_vec1()?,
    );
    Ok(PairEval {
        loss: loss.to_scalar::<f64>()?,
        stats,
        pairs: c.dim(0)?,
    })
}
