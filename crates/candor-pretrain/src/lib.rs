//! Stage: next-token pretraining.
//!
//! Text files or JSONL `text` → tokenised (a given tokenizer, or a byte-level BPE trained on
//! the training corpus) → packed into `ctx + 1`-token sequences, the tail held out →
//! AdamW with warm-up + cosine decay, clipping, accumulation → held-out loss/perplexity
//! every `eval_every` steps → an `lm` checkpoint.

use std::path::{Path, PathBuf};

use candor_core::checkpoint::{parent_ref, CandorMeta, Head};
use candor_core::record;
use candor_core::rng::Rng;
use candor_data::text::{pack_corpus, read_corpus, tokenize_documents};
use candor_data::Tokenizer;
use candor_model::io::{build_trainable, load_trainable, read_config};
use candor_model::ModelConfig;
use candor_train::batch::LmExample;
use candor_train::ckpt::{final_metrics, resume_or_fresh, StageModel, Start};
use candor_train::config::TrainConfig;
use candor_train::err;
use candor_train::lm::{train_lm, LmTraining};
use candor_train::optim::{named_vars, AdamW};
use candor_train::progress::Progress;
use candor_train::train_loop::begin;
use serde::{Deserialize, Serialize};

pub type Error = candor_train::Error;
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The pretraining stage config (`configs/*/pretrain.yaml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Seeds weight initialisation and data order. Default 1.
    pub seed: u64,
    /// The corpus, its held-out tail and the tokenizer.
    pub data: DataConfig,
    /// Shape of a model trained from scratch (with `init`, only `model.ctx` is read: the
    /// sequence length).
    pub model: ModelShape,
    /// Continue pretraining from this checkpoint instead of a fresh model: a directory, or
    /// `hf:ORG/NAME` for a model in the Hugging Face cache. Default: none (a fresh model).
    pub init: Option<PathBuf>,
    /// Optimiser, schedule and cadence; `batch_size` counts sequences of `model.ctx`
    /// tokens. Defaults: [`TrainConfig`]'s.
    pub train: TrainConfig,
}

/// The pretraining corpus (`data:`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Text files (one document each), JSONL files (`text` per line) or directories of them.
    /// Default: none (required).
    pub files: Vec<PathBuf>,
    /// Fraction of the token stream (its tail) held out for `eval_loss` / `eval_ppl`, in
    /// [0, 0.5). Default 0.05.
    pub heldout_fraction: f64,
    /// A `tokenizer.json` to use instead of the `init` checkpoint's. Default: none — the
    /// `init` checkpoint's tokenizer, or without `init` a byte-level BPE of `vocab_size`
    /// tokens trained on the training files.
    pub tokenizer: Option<PathBuf>,
    /// Tokens of the BPE trained when there is neither `tokenizer` nor `init` (ignored
    /// otherwise). Default 512.
    pub vocab_size: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            files: vec![],
            heldout_fraction: 0.05,
            tokenizer: None,
            vocab_size: 512,
        }
    }
}

/// A llama-style shape for training from scratch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelShape {
    /// Width of the residual stream (transformers `hidden_size`). Default 64.
    pub hidden_size: usize,
    /// Transformer blocks (transformers `num_hidden_layers`). Default 2.
    pub layers: usize,
    /// Attention heads; `hidden_size` must be a multiple (transformers
    /// `num_attention_heads`). Default 4.
    pub heads: usize,
    /// Key/value heads for grouped-query attention, 0 = same as `heads` (transformers
    /// `num_key_value_heads`). Default 0.
    pub kv_heads: usize,
    /// SwiGLU width, 0 = 8/3 · hidden_size rounded up to a multiple of 32, as in Llama
    /// (transformers `intermediate_size`). Default 0.
    pub intermediate_size: usize,
    /// Context length: tokens per training sequence and the model's positions
    /// (transformers `max_position_embeddings`). Default 128.
    pub ctx: usize,
    /// RoPE base θ (Su et al. 2021; transformers `rope_theta`). Default 10000.
    pub rope_theta: f64,
    /// Share the input embedding with the output head (transformers
    /// `tie_word_embeddings`). Default true.
    pub tie_embeddings: bool,
}

impl Default for ModelShape {
    fn default() -> Self {
        ModelShape {
            hidden_size: 64,
            layers: 2,
            heads: 4,
            kv_heads: 0,
            intermediate_size: 0,
            ctx: 128,
            rope_theta: 10000.0,
            tie_embeddings: true,
        }
    }
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            seed: 1,
            data: DataConfig::default(),
            model: ModelShape::default(),
            init: None,
            train: TrainConfig::default(),
        }
    }
}

impl ModelShape {
    pub fn to_config(&self, vocab_size: usize) -> ModelConfig {
        let inter = if self.intermediate_size > 0 {
            self.intermediate_size
        } else {
            (8 * self.hidden_size / 3).div_ceil(32) * 32
        };
        let kv = if self.kv_heads > 0 {
            self.kv_heads
        } else {
            self.heads
        };
        ModelConfig::llama(
            vocab_size,
            self.hidden_size,
            self.layers,
            self.heads,
            kv,
            inter,
            self.ctx,
            self.rope_theta,
            self.tie_embeddings,
        )
    }
}

pub use candor_train::ckpt::RunOptions;

/// Run pretraining; returns the output checkpoint's metadata.
pub fn run(cfg: &PretrainConfig, opts: &RunOptions) -> Result<CandorMeta> {
    let origin = &opts.origin;
    cfg.train.validate(origin)?;
    cfg.train.refuse_lora(origin, "pretrain")?;
    if cfg.data.files.is_empty() {
        return Err(err(format!(
            "{origin}: data.files: list at least one text or JSONL file"
        )));
    }
    if !(0.0..0.5).contains(&cfg.data.heldout_fraction) {
        return Err(err(format!(
            "{origin}: data.heldout_fraction: must be in [0, 0.5)"
        )));
    }
    opts.check_batch("train.batch_size", cfg.train.batch_size)?;
    let effective = candor_core::config::effective(cfg);
    let start = begin(opts, "pretrain", &effective)?;
    if let Start::Done(meta) = start {
        return Ok(meta);
    }
    let resuming = matches!(start, Start::Resume(_));
    let device = &opts.device;

    // 1. tokenizer and data
    let init = cfg
        .init
        .as_ref()
        .map(candor_model::resolve_model_dir)
        .transpose()?;
    let docs = read_corpus(&cfg.data.files)?;
    let (tokenizer, parents) = match (&init, &cfg.data.tokenizer) {
        (_, Some(path)) => (Tokenizer::from_file(path)?, vec![]),
        (Some(init), None) => (Tokenizer::from_dir(init)?, vec![parent_ref("init", init)?]),
        (None, None) if resuming => (Tokenizer::from_dir(&opts.out)?, vec![]),
        (None, None) => {
            // train on the documents that will be training data (the held-out tail is split
            // off by tokens later; a BPE fitted on a few more documents changes nothing material)
            (
                Tokenizer::train(docs.iter().map(String::as_str), cfg.data.vocab_size)?,
                vec![],
            )
        }
    };
    let parents = match (&init, parents.is_empty()) {
        (Some(init), true) => vec![parent_ref("init", init)?],
        _ => parents,
    };
    let eos = tokenizer
        .eos_id()
        .ok_or_else(|| err("tokenizer has no end-of-text token (<|endoftext|> or eos_token)"))?;

    // 2. model
    let mut init_rng = Rng::derive(cfg.seed, "init");
    let (model_config, (model, varmap)) = if resuming {
        let c = read_config(&opts.out)?;
        (
            c,
            load_trainable(&opts.out, Head::Lm, &mut init_rng, device)?,
        )
    } else if let Some(init) = &init {
        let c = read_config(init)?;
        (c, load_trainable(init, Head::Lm, &mut init_rng, device)?)
    } else {
        let mut c = cfg.model.to_config(tokenizer.vocab_size());
        // transformers reads these from config.json (generation stops, score-head pooling)
        c.eos_token_id = Some(eos.into());
        c.pad_token_id = Some(tokenizer.pad_id());
        c.bos_token_id = tokenizer.bos_id();
        c.validate(Path::new(origin))?;
        let built = build_trainable(&c, Head::Lm, None, &[], &mut init_rng, device)?;
        (c, built)
    };
    let ctx = cfg.model.ctx;
    check_compatible(
        &tokenizer,
        &model_config,
        cfg.model.ctx,
        init.as_deref(),
        origin,
    )?;

    let stream = tokenize_documents(&tokenizer, &docs, eos)?;
    let corpus = pack_corpus(&stream, ctx, cfg.data.heldout_fraction)?;
    let train_set: Vec<LmExample> = corpus.train.into_iter().map(LmExample::dense).collect();
    let heldout: Vec<LmExample> = corpus.heldout.into_iter().map(LmExample::dense).collect();
    let unigram = unigram_loss(&train_set, &heldout, model_config.vocab_size);

    // 3. optimiser and resume state
    let mut opt = AdamW::new(named_vars(&varmap), &cfg.train)?;
    let mut meta = CandorMeta::new("pretrain", Head::Lm, effective);
    meta.parents = parents;
    meta.total_steps = cfg.train.steps as u64;
    let (mut state, mut metrics) =
        resume_or_fresh(&start, &opts.out, cfg.seed, &mut opt, &mut meta, device)?;
    let params = model_config.param_count(Head::Lm);
    let progress = Progress::for_rank(
        "pretrain",
        cfg.train.steps as u64,
        state.step,
        opts.dist.is_main(),
    );
    progress.log(&format!(
        "{} params, {} training / {} held-out sequences of {ctx} tokens, unigram baseline loss {unigram:.3}, {}{}",
        params,
        train_set.len(),
        heldout.len(),
        opts.place(cfg.train.dtype),
        if resuming { format!(", resuming at step {}", state.step) } else { String::new() }
    ));
    let training = LmTraining {
        model: &model,
        saved: StageModel {
            config: &model_config,
            head: Head::Lm,
            varmap: &varmap,
            tokenizer: &tokenizer,
            adapters: None,
        },
        train_set: &train_set,
        heldout: &heldout,
        train: &cfg.train,
        seed: cfg.seed,
        out: &opts.out,
        progress: &progress,
        dist: &opts.dist,
    };
    if let Some(eval) = training.eval_before_training(&state)? {
        metrics.push(
            record!(0; "eval_loss" => eval, "eval_ppl" => eval.exp(), "unigram_loss" => unigram),
        );
    }

    // 4. the loop (shared with SFT): batch, forward, backward, clip, step, log, eval, checkpoint
    train_lm(&training, &mut opt, &mut state, &mut metrics, &mut meta)?;

    // 5. the final checkpoint
    meta.complete = true;
    meta.metrics = final_metrics(&metrics);
    meta.metrics
        .insert("unigram_loss".into(), serde_json::json!(unigram));
    meta.metrics
        .insert("params".into(), serde_json::json!(params));
    opts.save_on_main(|| {
        training
            .saved
            .save(&opts.out, &state, &metrics, &opt, &mut meta)
    })?;
    progress.finish();
    Ok(meta)
}

fn check_compatible(
    tok: &Tokenizer,
    model: &ModelConfig,
    ctx: usize,
    init: Option<&Path>,
    origin: &str,
) -> Result<()> {
    let where_ = init
        .map(|p| p.join("config.json").display().to_string())
        .unwrap_or_else(|| origin.to_string());
    if tok.id_bound() > model.vocab_size {
        return Err(err(format!(
            "{where_}: vocab_size {} is smaller than the tokenizer's {} tokens: tokenizer and model do not match",
            model.vocab_size,
            tok.id_bound()
        )));
    }
    if ctx > model.max_position_embeddings {
        return Err(err(format!(
            "{origin}: model.ctx {ctx} is larger than the model's max_position_embeddings {} ({where_})",
            model.max_position_embeddings
        )));
    }
    Ok(())
}

/// Held-out cross-entropy of a unigram model fitted on the training targets (add-one
/// smoothing): the loss a model that ignores context would reach.
pub fn unigram_loss(train: &[LmExample], heldout: &[LmExample], vocab: usize) -> f64 {
    let mut counts = vec![1.0f64; vocab];
    for e in train {
        for &t in &e.tokens[1..] {
            counts[t as usize] += 1.0;
        }
    }
    let total: f64 = counts.iter().sum();
    let eval = if heldout.is_empty() { train } else { heldout };
    let (mut sum, mut n) = (0.0, 0usize);
    for e in eval {
        for &t in &e.tokens[1..] {
            sum -= (counts[t as usize] / total).ln();
            n += 1;
        }
    }
    sum / n.max(1) as f64
}
