//! Stage: a reward model from ranked responses.
//!
//! Preference files (`{"prompt","responses":[best, ..., worst],"ranks"?}` or
//! `{"prompt","chosen","rejected"}`) → grouped by prompt, a held-out split of prompts →
//! each exchange rendered with the chat template → the initial model (the SFT checkpoint)
//! with a new scalar `score` head (Hugging Face `LlamaForSequenceClassification`,
//! `num_labels: 1`), read at the last token → the pairwise loss −log σ(r_better − r_worse)
//! over all pairs of each prompt's ranking, every prompt's pairs in one batch (InstructGPT,
//! Ouyang et al. 2022 §3.5) → held-out pairwise accuracy and margin → a `score` checkpoint
//! whose `candor.json` records `reward_mean` and `reward_std` over the training responses,
//! for PPO to normalise rewards with.

pub mod loss;
pub mod score;

use std::path::PathBuf;

use candle_core::Tensor;
use candor_core::checkpoint::{parent_ref, CandorMeta, Head};
use candor_core::metrics::MetricsLog;
use candor_core::record;
use candor_core::rng::Rng;
use candor_data::chat::ChatTemplate;
use candor_data::preference::Labellers;
use candor_data::Tokenizer;
use candor_model::io::read_config;
use candor_model::Model;
use candor_train::batch::split_heldout;
use candor_train::ckpt::{final_metrics, resume_or_fresh, StageModel, Start};
use candor_train::config::TrainConfig;
use candor_train::err;
use candor_train::lora::{describe, load_for_training};
use candor_train::optim::{named_vars, AdamW};
use candor_train::precision::compute_model;
use candor_train::progress::Progress;
use candor_train::sample::last_token_scores;
use candor_train::train_loop::{begin, train_loop, Loop};
use serde::{Deserialize, Serialize};

use crate::loss::{pair_stats, preference_loss};
use candor_data::preference::{encode_comparisons, load_comparisons_with, pair_layout, Encoded};

pub use candor_train::ckpt::RunOptions;
pub type Error = candor_train::Error;
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The reward stage config (`configs/*/reward.yaml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    /// Seeds the score head's initialisation, the held-out split and the data order. Default 1.
    pub seed: u64,
    /// The checkpoint to start from, usually the SFT model (`--init` sets it). Its backbone
    /// is loaded and a new `score` head initialised (N(0, 0.02)); a `score` checkpoint
    /// continues as it is. Default: none (required).
    pub init: Option<PathBuf>,
    /// The rankings to learn from and the held-out part.
    pub data: RewardData,
    /// Optimiser, schedule and cadence; `batch_size` counts prompts (each brings all its
    /// responses and pairs). InstructGPT trains its reward model for a single epoch.
    /// Defaults: [`TrainConfig`]'s, except steps 200, batch_size 8, lr 1e-4, min_lr 1e-5,
    /// warmup_steps 10, weight_decay 0, eval_every 50, eval_batches 0 (all).
    pub train: TrainConfig,
}

/// The reward model's data (`data:`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RewardData {
    /// Preference files: `candor rank` output, chosen/rejected pairs, or TRL's preference
    /// formats (standard or conversational, explicit or implicit prompt, unpaired), in
    /// JSONL, JSON, Parquet, `.jsonl.gz`/`.zst` or `hf:ORG/NAME[@REV][:SPLIT]`
    /// (docs/data.md). Default: none (required).
    pub files: Vec<PathBuf>,
    /// Column names of the files, candor's name → theirs (`{prompt: question, chosen:
    /// good, rejected: bad}`). Default: none.
    #[serde(skip_serializing_if = "candor_data::dataset::Columns::is_empty")]
    pub columns: candor_data::dataset::Columns,
    /// Fraction of prompts held out for `eval_accuracy` / `eval_margin` when `heldout` is
    /// not given. Default 0.1.
    pub heldout_fraction: f64,
    /// A separate held-out preference file (instead of splitting `files`). Default: none.
    pub heldout: Option<PathBuf>,
    /// Longest exchange in tokens; a longer one keeps its last `max_len` tokens (the reward
    /// is read at the end). 0 = the model's `max_position_embeddings`. Default 0.
    pub max_len: usize,
    /// Several people's rankings of one prompt (`candor label` with `--overlap`): `each`
    /// trains on every labeller's ranking, `borda` on their Borda-combined order (ties
    /// where the points tie). Default `each`.
    pub labellers: Labellers,
}

impl Default for RewardData {
    fn default() -> Self {
        RewardData {
            files: vec![],
            columns: Default::default(),
            heldout_fraction: 0.1,
            heldout: None,
            max_len: 0,
            labellers: Labellers::Each,
        }
    }
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            seed: 1,
            init: None,
            data: RewardData::default(),
            train: TrainConfig {
                steps: 200,
                batch_size: 8,
                lr: 1e-4,
                min_lr: 1e-5,
                warmup_steps: 10,
                weight_decay: 0.0,
                eval_every: 50,
                eval_batches: 0,
                ..TrainConfig::default()
            },
        }
    }
}

/// Held-out pairwise metrics.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct EvalStats {
    /// Mean −log σ(r_better − r_worse) over the pairs.
    pub eval_loss: f64,
    /// Fraction of pairs with r_better > r_worse.
    pub eval_accuracy: f64,
    /// Mean r_better − r_worse.
    pub eval_margin: f64,
    pub pairs: usize,
    pub prompts: usize,
}

/// Train a reward model; returns the output checkpoint's metadata.
pub fn run(cfg: &RewardConfig, opts: &RunOptions) -> Result<CandorMeta> {
    let origin = &opts.origin;
    cfg.train.validate(origin)?;
    let init = cfg.init.as_ref().ok_or_else(|| {
        err(format!(
            "{origin}: init: give the starting checkpoint (the SFT model) with --init DIR"
        ))
    })?;
    // a checkpoint directory, or hf:ORG/NAME in the local Hugging Face cache
    let init_spec = init;
    let init = &candor_model::resolve_model_dir(init)?;
    if cfg.data.files.is_empty() {
        return Err(err(format!(
            "{origin}: data.files: list at least one preference JSONL file (`candor rank` output)"
        )));
    }
    if !(0.0..=0.5).contains(&cfg.data.heldout_fraction) {
        return Err(err(format!(
            "{origin}: data.heldout_fraction: must be in [0, 0.5]"
        )));
    }
    opts.check_batch("train.batch_size", cfg.train.batch_size)?;
    let effective = candor_core::config::effective(cfg);
    let start = begin(opts, "reward", &effective)?;
    if let Start::Done(meta) = start {
        return Ok(meta);
    }
    let resuming = matches!(start, Start::Resume(_));
    let device = &opts.device;

    // 1. model: the init checkpoint's backbone and a score head (or our own partial run)
    let mut init_rng = Rng::derive(cfg.seed, "init");
    let from = if resuming { &opts.out } else { init };
    let model_config = read_config(from)?;
    // every weight, or with train.lora adapters and the score head on the init frozen
    let (model, varmap, adapters) = load_for_training(
        init_spec,
        init,
        resuming.then_some(opts.out.as_path()),
        Head::Score,
        &cfg.train,
        &mut init_rng,
        device,
    )?;
    let tokenizer = Tokenizer::from_dir(from)?;
    let template = ChatTemplate::for_tokenizer(&tokenizer);
    let pad = tokenizer.pad_id();
    let max_len = match cfg.data.max_len {
        0 => model_config.max_position_embeddings,
        n => n.min(model_config.max_position_embeddings),
    };

    // 2. data: comparisons by prompt, a held-out split of prompts, tokenised exchanges
    let all = load_comparisons_with(&cfg.data.files, &cfg.data.columns, cfg.data.labellers)?;
    let (train_cmp, heldout_cmp) = match &cfg.data.heldout {
        Some(path) => (
            all,
            load_comparisons_with(
                std::slice::from_ref(path),
                &cfg.data.columns,
                cfg.data.labellers,
            )?,
        ),
        // by prompt: the lines of a prompt are one `Comparisons`
        None => split_heldout(all, cfg.data.heldout_fraction, cfg.seed),
    };
    let (train_all, cut_train) = encode_comparisons(&train_cmp, &tokenizer, &template, max_len)?;
    let (heldout_all, cut_heldout) =
        encode_comparisons(&heldout_cmp, &tokenizer, &template, max_len)?;
    let train_set: Vec<Encoded> = train_all
        .iter()
        .filter(|e| !e.pairs.is_empty())
        .cloned()
        .collect();
    let heldout: Vec<Encoded> = heldout_all
        .into_iter()
        .filter(|e| !e.pairs.is_empty())
        .collect();
    if train_set.is_empty() {
        return Err(err(format!(
            "{}: no training pairs: every ranking is a single tie (or all prompts were held out)",
            cfg.data.files[0].display()
        )));
    }
    let n_pairs: usize = train_set.iter().map(|e| e.pairs.len()).sum();

    // 3. optimiser and resume state
    let mut opt = AdamW::new(named_vars(&varmap), &cfg.train)?;
    let mut meta = CandorMeta::new("reward", Head::Score, effective);
    meta.parents = vec![parent_ref("init", init)?];
    meta.total_steps = cfg.train.steps as u64;
    let (mut state, mut metrics) =
        resume_or_fresh(&start, &opts.out, cfg.seed, &mut opt, &mut meta, device)?;
    let progress = Progress::for_rank(
        "reward",
        cfg.train.steps as u64,
        state.step,
        opts.dist.is_main(),
    );
    progress.log(&format!(
        "{}, {} training prompts ({n_pairs} pairs, {} prompts all tied), {} held-out prompts ({} pairs){}, {}{}",
        describe(&varmap, adapters.as_ref(), model_config.param_count(Head::Score)),
        train_set.len(),
        train_cmp.len() - train_set.len(),
        heldout.len(),
        heldout.iter().map(|e| e.pairs.len()).sum::<usize>(),
        match cut_train + cut_heldout {
            0 => String::new(),
            n => format!(", {n} exchanges longer than {max_len} tokens kept their last {max_len}"),
        },
        opts.place(cfg.train.dtype),
        if resuming { format!(", resuming at step {}", state.step) } else { String::new() }
    ));
    let saved = StageModel {
        config: &model_config,
        head: Head::Score,
        varmap: &varmap,
        tokenizer: &tokenizer,
        adapters: adapters.as_ref(),
    };
    let log_eval = |step: u64, metrics: &mut MetricsLog| -> Result<Option<EvalStats>> {
        if heldout.is_empty() {
            return Ok(None);
        }
        let model = compute_model(&model, &varmap, cfg.train.dtype)?;
        let e = evaluate(
            &model,
            &heldout,
            cfg.train.batch_size,
            cfg.train.eval_batches,
            pad,
        )?;
        metrics.push(record!(step; "eval_loss" => e.eval_loss, "eval_accuracy" => e.eval_accuracy, "eval_margin" => e.eval_margin));
        Ok(Some(e))
    };
    if state.step == 0 && opts.dist.is_main() {
        log_eval(0, &mut metrics)?;
    }

    // 4. the loop: a batch of prompts, all their responses scored, all their pairs compared
    //    (in train.dtype, this rank's share of each batch, every prompt's pairs on one rank;
    //    the loss per pair of the whole batch, gradients summed over the ranks)
    let loss = |model: &Model, mine: &[usize]| -> Result<(Tensor, usize)> {
        let examples: Vec<&Encoded> = mine.iter().map(|&i| &train_set[i]).collect();
        summed_pair_loss(model, &examples, pad)
    };
    let eval = |step: u64, metrics: &mut MetricsLog| -> Result<Option<String>> {
        Ok(log_eval(step, metrics)?.map(|e| {
            format!(
                "eval_accuracy {:.3} | eval_margin {:.3} ({} pairs)",
                e.eval_accuracy, e.eval_margin, e.pairs
            )
        }))
    };
    let training = Loop {
        model: &model,
        saved: StageModel { ..saved },
        train: &cfg.train,
        seed: cfg.seed,
        out: &opts.out,
        progress: &progress,
        dist: &opts.dist,
        examples: train_set.len(),
        terms: &|i| train_set[i].pairs.len(),
        loss: &loss,
        eval: &eval,
    };
    train_loop(&training, &mut opt, &mut state, &mut metrics, &mut meta)?;

    // 5. reward statistics over the training responses (final model), the final checkpoint
    opts.save_on_main(|| {
        let seqs: Vec<&[u32]> = train_all
            .iter()
            .flat_map(|e| e.seqs.iter().map(Vec::as_slice))
            .collect();
        let rewards = rewards_of(
            &*compute_model(&model, &varmap, cfg.train.dtype)?,
            &seqs,
            cfg.train.batch_size * 4,
            pad,
        )?;
        let (mean, std) = mean_std(&rewards);
        if let Some(r) = metrics.records.last_mut() {
            r.insert("reward_mean".into(), serde_json::json!(mean));
            r.insert("reward_std".into(), serde_json::json!(std));
        }
        meta.complete = true;
        meta.metrics = final_metrics(&metrics);
        meta.metrics.insert(
            "params".into(),
            serde_json::json!(model_config.param_count(Head::Score)),
        );
        saved.save(&opts.out, &state, &metrics, &opt, &mut meta)
    })?;
    progress.finish();
    Ok(meta)
}

/// Score every response of the given prompts in one forward pass and compare each pair:
/// (mean loss over pairs, r_better (P,), r_worse (P,), tokens).
/// The training loop's loss: the pairwise loss summed over the pairs of `examples`, and the
/// tokens read.
pub fn summed_pair_loss(model: &Model, examples: &[&Encoded], pad: u32) -> Result<(Tensor, usize)> {
    let (mean, better, _, tokens) = pair_forward(model, examples, pad)?;
    Ok(((mean * better.dim(0)? as f64)?, tokens))
}

pub fn pair_forward(
    model: &Model,
    examples: &[&Encoded],
    pad: u32,
) -> Result<(Tensor, Tensor, Tensor, usize)> {
    let layout = pair_layout(examples);
    let rewards = last_token_scores(model, &layout.seqs, pad)?; // (N,)
    let device = model.device();
    let better = rewards.index_select(&Tensor::new(layout.better.as_slice(), device)?, 0)?; // (P,)
    let worse = rewards.index_select(&Tensor::new(layout.worse.as_slice(), device)?, 0)?; // (P,)
    let loss = preference_loss(&better, &worse)?;
    Ok((loss, better, worse, layout.tokens))
}

/// Pairwise loss, accuracy and margin over held-out prompts, `batch_size` prompts at a
/// time, the first `max_batches` batches (0 = all).
pub fn evaluate(
    model: &Model,
    heldout: &[Encoded],
    batch_size: usize,
    max_batches: usize,
    pad: u32,
) -> Result<EvalStats> {
    let (mut better, mut worse) = (vec![], vec![]);
    let mut prompts = 0;
    for (i, chunk) in heldout.chunks(batch_size.max(1)).enumerate() {
        if max_batches > 0 && i >= max_batches {
            break;
        }
        let examples: Vec<&Encoded> = chunk.iter().filter(|e| !e.pairs.is_empty()).collect();
        if examples.is_empty() {
            continue;
        }
        let (_, b, w, _) = pair_forward(model, &examples, pad)?;
        better.extend(b.detach().to_vec1::<f32>()?);
        worse.extend(w.detach().to_vec1::<f32>()?);
        prompts += examples.len();
    }
    let (eval_accuracy, eval_margin) = pair_stats(&better, &worse);
    let eval_loss = better
        .iter()
        .zip(&worse)
        .map(|(b, w)| softplus((w - b) as f64))
        .sum::<f64>()
        / better.len().max(1) as f64;
    Ok(EvalStats {
        eval_loss,
        eval_accuracy,
        eval_margin,
        pairs: better.len(),
        prompts,
    })
}

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// Rewards of token sequences, `batch_size` at a time.
pub fn rewards_of(model: &Model, seqs: &[&[u32]], batch_size: usize, pad: u32) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size.max(1)) {
        let r = last_token_scores(model, chunk, pad)?
            .detach()
            .to_vec1::<f32>()?;
        out.extend(r.into_iter().map(f64::from));
    }
    Ok(out)
}

/// Mean and (population) standard deviation.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candor_core::rng::Rng;
    use candor_model::io::build_trainable;
    use candor_model::ModelConfig;
    use candor_train::batch::Sampler;
    use candor_train::dist::Dist;
    use candor_train::optim::named_vars;
    use candor_train::step::sharded_grads;

    /// The reward model's training step (`summed_pair_loss` through `sharded_grads`, two
    /// micro-batches of prompts with 2–3 responses of different lengths, every pair) with
    /// `train.gradient_checkpointing`: the gradients without, every one non-zero.
    #[test]
    fn checkpointing_gives_the_reward_models_gradients() {
        let config = ModelConfig::llama(40, 32, 2, 4, 2, 48, 64, 10000.0, true);
        let mut rng = Rng::new(3);
        let examples: Vec<Encoded> = (0..4)
            .map(|i| {
                let k = 2 + i % 2;
                let seqs: Vec<Vec<u32>> = (0..k)
                    .map(|r| (0..5 + 3 * r + i).map(|_| rng.below(40) as u32).collect())
                    .collect();
                let pairs = (0..k)
                    .flat_map(|a| (a + 1..k).map(move |b| (a, b)))
                    .collect();
                Encoded {
                    prompt_lens: vec![3; k],
                    seqs,
                    pairs,
                }
            })
            .collect();
        let grads = |checkpointing: bool| -> Vec<Vec<f32>> {
            let (model, varmap) = build_trainable(
                &config,
                Head::Score,
                None,
                &[],
                &mut Rng::new(1),
                &Device::Cpu,
            )
            .unwrap();
            let train = TrainConfig {
                batch_size: 2,
                grad_accum: 2,
                gradient_checkpointing: checkpointing,
                ..Default::default()
            };
            let opt = AdamW::new(named_vars(&varmap), &train).unwrap();
            let mut sampler = Sampler::new(examples.len(), 5, Default::default());
            let terms = |i: usize| examples[i].pairs.len();
            let step = sharded_grads(
                &model,
                &opt,
                &mut sampler,
                &train,
                &Dist::single(),
                terms,
                |mine| {
                    let batch: Vec<&Encoded> = mine.iter().map(|&i| &examples[i]).collect();
                    summed_pair_loss(&model, &batch, 0)
                },
            )
            .unwrap();
            step.grads
                .0
                .iter()
                .map(|g| {
                    g.as_ref()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect()
        };
        let (plain, ckpt) = (grads(false), grads(true));
        let mut worst = 0f32;
        for (a, b) in plain.iter().zip(&ckpt) {
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(
                scale > 0.0 && b.iter().any(|&x| x != 0.0),
                "a zero gradient"
            );
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
            worst = worst.max(err);
        }
        println!("reward model, checkpointed: worst relative gradient difference {worst:.2e}");
        assert!(worst < 1e-5, "{worst}");
    }
}
