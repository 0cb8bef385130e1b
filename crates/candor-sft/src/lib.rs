//! Stage: supervised instruction tuning (SFT), step 1 of InstructGPT (Ouyang et al. 2022,
//! §3.5): fine-tune a pretrained model on demonstrations.
//!
//! JSONL `{"prompt","response"}` or `{"messages":[...]}` → each conversation rendered with the
//! chat template (the init checkpoint's, else ChatML) and tokenised, its assistant tokens
//! marked (`candor_data::sft`) → a held-out split → optionally packed several to a row
//! → next-token cross-entropy on the assistant tokens only, with the optimiser, schedule,
//! checkpointing and resume pretraining uses → held-out response loss every `eval_every`
//! steps → an `lm` checkpoint whose tokenizer carries the chat template it was trained with
//! and ends turns (EOS) with the template's end-of-turn token, so `candor generate --chat`,
//! `candor sample` and PPO pose prompts and stop the way it was trained.

use std::path::PathBuf;

use candor_core::checkpoint::{parent_ref, CandorMeta, Head};
use candor_core::record;
use candor_core::rng::Rng;
use candor_data::sft::{chat_tokenizer, load_sft_with, SftExample};
use candor_data::Tokenizer;
use candor_model::io::read_config;
use candor_train::batch::{pack_examples, split_heldout, LmExample};
use candor_train::ckpt::{final_metrics, resume_or_fresh, StageModel, Start};
use candor_train::config::TrainConfig;
use candor_train::err;
use candor_train::lm::{train_lm, LmTraining};
use candor_train::lora::{describe, load_for_training};
use candor_train::optim::{named_vars, AdamW};
use candor_train::progress::Progress;
use candor_train::train_loop::begin;
use serde::{Deserialize, Serialize};

pub use candor_train::ckpt::RunOptions;

pub type Error = candor_train::Error;
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The SFT stage config (`configs/*/sft.yaml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Seeds the held-out split and the data order. Default 0.
    pub seed: u64,
    /// The checkpoint to fine-tune: an `lm` checkpoint, usually the pretrained model
    /// (`--init` sets it). Default: none (required).
    pub init: Option<PathBuf>,
    /// The conversations to train on and how they are cut and packed.
    pub data: SftData,
    /// Optimiser, schedule and cadence; `batch_size` counts rows (a conversation, or with
    /// `data.packing` a row of packed conversations). Fine-tuning wants a smaller `lr` than
    /// pretraining; InstructGPT trains SFT for 16 epochs with cosine decay (Appendix C).
    /// Defaults: [`TrainConfig`]'s.
    pub train: TrainConfig,
}

/// The SFT data (`data:`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SftData {
    /// Instruction data: `{"prompt","response"}`, `{"messages":[{"role","content"},...]}`
    /// (roles system, user, assistant; any number of turns) or TRL's prompt-completion
    /// (`{"prompt","completion"}`, strings or message lists), in JSONL, JSON, Parquet,
    /// `.jsonl.gz`/`.zst` files or `hf:ORG/NAME[@REV][:SPLIT]` (docs/data.md). Default: none
    /// (required).
    pub files: Vec<PathBuf>,
    /// Column names of the files, candor's name → theirs (`{prompt: question, completion:
    /// answer}`). Default: none.
    #[serde(skip_serializing_if = "candor_data::dataset::Columns::is_empty")]
    pub columns: candor_data::dataset::Columns,
    /// Fraction of the conversations held out (chosen with the seed) for `eval_loss`, the
    /// mean loss per response token. Ignored with `heldout`. Default 0.05.
    pub heldout_fraction: f64,
    /// A separate held-out file (same format) instead of a split. Default: none.
    pub heldout: Option<PathBuf>,
    /// Longest conversation in tokens, and the length of a packed row (0 = the model's
    /// `max_position_embeddings`). A longer conversation is an error naming its line,
    /// unless `skip_long`. Default 0.
    pub max_len: usize,
    /// Leave out (and count in the log) conversations longer than `max_len` instead of
    /// failing on the first: for a small-context model on data written for larger ones.
    /// Default false.
    pub skip_long: bool,
    /// Pack several conversations into one row of up to `max_len` tokens, each attending
    /// only to itself with its own positions (no cross-contamination; Krell et al. 2021,
    /// "Efficient Sequence Packing without Cross-contamination"), instead of one padded
    /// row per conversation. Same loss, fewer wasted positions. Default false.
    pub packing: bool,
    /// A Jinja chat template (Hugging Face convention) to train with, instead of the init
    /// checkpoint's own (or ChatML, `candor_data::chat::DEFAULT_TEMPLATE`, when it has
    /// none); `chatml` names plain ChatML, without the default system message some models'
    /// templates add to every conversation. It is written into the output's
    /// `tokenizer_config.json`, so every stage after reads it. TRL: `chat_template_path`.
    /// Default: none.
    pub chat_template: Option<String>,
}

impl Default for SftData {
    fn default() -> Self {
        SftData {
            files: vec![],
            columns: Default::default(),
            heldout_fraction: 0.05,
            heldout: None,
            max_len: 0,
            skip_long: false,
            packing: false,
            chat_template: None,
        }
    }
}

/// A tokenised conversation as a training example: its assistant tokens are the targets.
fn to_example(e: SftExample) -> LmExample {
    LmExample {
        tokens: e.tokens,
        targets: e.trained,
        segments: None,
    }
}

/// Run SFT; returns the output checkpoint's metadata.
pub fn run(cfg: &SftConfig, opts: &RunOptions) -> Result<CandorMeta> {
    let origin = &opts.origin;
    cfg.train.validate(origin)?;
    let init = cfg.init.as_ref().ok_or_else(|| err(format!("{origin}: init: give the checkpoint to fine-tune (the pretrained model) with --init DIR")))?;
    // a checkpoint directory, or hf:ORG/NAME in the local Hugging Face cache
    let init_spec = init;
    let init = &candor_model::resolve_model_dir(init)?;
    if cfg.data.files.is_empty() {
        return Err(err(format!(
            "{origin}: data.files: list at least one SFT JSONL file"
        )));
    }
    if !(0.0..0.5).contains(&cfg.data.heldout_fraction) {
        return Err(err(format!(
            "{origin}: data.heldout_fraction: must be in [0, 0.5)"
        )));
    }
    opts.check_batch("train.batch_size", cfg.train.batch_size)?;
    let effective = candor_core::config::effective(cfg);
    let start = begin(opts, "sft", &effective)?;
    if let Start::Done(meta) = start {
        return Ok(meta);
    }
    let resuming = matches!(start, Start::Resume(_));
    let device = &opts.device;

    // 1. model and chat tokenizer: the init checkpoint's (or this run's partial checkpoint's)
    let from = if resuming { &opts.out } else { init };
    let model_config = read_config(from)?;
    if model_config.head() != Head::Lm {
        return Err(err(format!(
            "{}: is a reward model (score head); SFT fine-tunes a language model (lm head)",
            from.display()
        )));
    }
    // every weight, or with train.lora adapters on the init checkpoint frozen
    let (model, varmap, adapters) = load_for_training(
        init_spec,
        init,
        resuming.then_some(opts.out.as_path()),
        Head::Lm,
        &cfg.train,
        &mut Rng::derive(cfg.seed, "init"),
        device,
    )?;
    let (tokenizer, template) = chat_tokenizer(
        &Tokenizer::from_dir(from)?,
        cfg.data.chat_template.as_deref(),
    )?;
    let max_pos = model_config.max_position_embeddings;
    let max_len = match cfg.data.max_len {
        0 => max_pos,
        n if n > max_pos => {
            return Err(err(format!("{origin}: data.max_len {n} is larger than the model's max_position_embeddings {max_pos}")))
        }
        n => n,
    };

    // 2. data: conversations → tokens with their assistant tokens marked → split → rows
    let mut skipped = 0;
    let mut load = |files: &[PathBuf]| -> Result<Vec<LmExample>> {
        let set = load_sft_with(
            files,
            &cfg.data.columns,
            &tokenizer,
            &template,
            max_len,
            cfg.data.skip_long,
        )?;
        skipped += set.skipped;
        let mut out = vec![];
        for (e, path, line) in set.examples {
            if let Some(t) = e
                .tokens
                .iter()
                .find(|&&t| t as usize >= model_config.vocab_size)
            {
                return Err(err(format!(
                    "{}:{line}: token id {t} is outside the model's vocabulary ({}): the tokenizer does not match the model",
                    path.display(),
                    model_config.vocab_size
                )));
            }
            out.push(to_example(e));
        }
        Ok(out)
    };
    let (train_set, heldout) = match &cfg.data.heldout {
        Some(path) => (load(&cfg.data.files)?, load(std::slice::from_ref(path))?),
        None => split_heldout(load(&cfg.data.files)?, cfg.data.heldout_fraction, cfg.seed),
    };
    if train_set.is_empty() {
        return Err(err(format!(
            "{}: no training conversations left after the held-out split",
            cfg.data.files[0].display()
        )));
    }
    let n_conversations = train_set.len();
    let response_tokens: usize = train_set.iter().map(LmExample::n_targets).sum();
    let all_tokens: usize = train_set.iter().map(|e| e.tokens.len()).sum();
    let train_set = if cfg.data.packing {
        pack_examples(&train_set, max_len)
    } else {
        train_set
    };

    // 3. optimiser and resume state
    let mut opt = AdamW::new(named_vars(&varmap), &cfg.train)?;
    let mut meta = CandorMeta::new("sft", Head::Lm, effective);
    meta.parents = vec![parent_ref("init", init)?];
    meta.total_steps = cfg.train.steps as u64;
    let (mut state, mut metrics) =
        resume_or_fresh(&start, &opts.out, cfg.seed, &mut opt, &mut meta, device)?;
    let params = model_config.param_count(Head::Lm);
    let progress = Progress::for_rank(
        "sft",
        cfg.train.steps as u64,
        state.step,
        opts.dist.is_main(),
    );
    progress.log(&format!(
        "{}, {n_conversations} training conversations ({response_tokens} of {all_tokens} tokens trained){}, {} held out{}, {}{}",
        describe(&varmap, adapters.as_ref(), params),
        if cfg.data.packing { format!(" packed into {} rows of up to {max_len} tokens", train_set.len()) } else { String::new() },
        heldout.len(),
        if skipped > 0 { format!(", {skipped} longer than {max_len} tokens left out") } else { String::new() },
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
            adapters: adapters.as_ref(),
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
        metrics.push(record!(0; "eval_loss" => eval, "eval_ppl" => eval.exp()));
        progress.log(&format!(
            "step 0 | eval_loss {eval:.4} | eval_ppl {:.2}",
            eval.exp()
        ));
    }

    // 4. the loop (shared with pretraining; only the targets differ: the assistant's tokens)
    train_lm(&training, &mut opt, &mut state, &mut metrics, &mut meta)?;

    // 5. the final checkpoint, with the chat tokenizer
    meta.complete = true;
    meta.metrics = final_metrics(&metrics);
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
