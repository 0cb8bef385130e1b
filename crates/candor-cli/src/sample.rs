//! `candor sample`: K distinct candidate responses per prompt, for ranking.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candor_core::checkpoint::Head;
use candor_core::memory::human_bytes;
use candor_core::output::AtomicFile;
use candor_core::rng::Rng;
use candor_data::chat::{encode_prompts, ChatTemplate};
use candor_data::preference::Candidates;
use candor_data::prompts::read_prompts;
use candor_data::Tokenizer;
use candor_model::generate::SamplingParams;
use candor_train::progress::Progress;
use candor_train::sample::{sample_candidates, CandidateParams};
use clap::Args;

use crate::device;

#[derive(Args)]
pub struct SampleArgs {
    /// Checkpoint to sample from (usually the SFT model), or hf:ORG/NAME in the Hugging Face cache.
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL prompts: {"prompt": ..., "reference": ...?}.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Distinct responses per prompt, at least 2 (InstructGPT ranks 4 to 9).
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    /// Output JSONL: {"prompt", "responses": [...], "reference"?}. Written whole when the
    /// run ends (never part of it); an existing file is kept unless --overwrite.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    pub overwrite: bool,
    /// Above 0 and finite (greedy decoding would repeat one response).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: a probability in (0, 1] (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// At least 1.
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences generated together.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Rounds that redraw responses repeating an earlier one of the same prompt. A prompt
    /// still short of K distinct responses after them is kept with the ones it has (a
    /// warning names it), or dropped when it has fewer than 2.
    #[arg(long, default_value_t = 4)]
    pub max_resample: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn run(args: SampleArgs) -> Result<()> {
    let params = CandidateParams {
        k: args.k,
        sampling: SamplingParams {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
        },
        batch_size: args.batch_size,
        max_resample_rounds: args.max_resample,
    };
    params.check()?;
    if args.out.exists() && !args.overwrite {
        bail!(
            "--out {}: already exists; pass --overwrite to replace it",
            args.out.display()
        );
    }
    candor_core::output::lock_output(&args.out).context("--out")?;
    let dev = device(&args.device)?;
    let prompts = read_prompts(&args.prompts)?;
    let model_dir = candor_model::resolve_model_dir(&args.model)?;
    let config = candor_model::io::read_config(&model_dir)?;
    if config.head() != Head::Lm {
        bail!(
            "{}: has a score head (a reward model); sample from a language model (`lm` head)",
            args.model.display()
        );
    }
    let tok = Tokenizer::from_dir(&model_dir)?;
    let template = ChatTemplate::for_tokenizer(&tok);
    let texts: Vec<&str> = prompts
        .iter()
        .map(|(n, p)| {
            p.single_turn()
                .map_err(|m| anyhow::anyhow!("{}:{n}: {m}", args.prompts.display()))
        })
        .collect::<Result<_>>()?;
    let ids = encode_prompts(&tok, &template, &texts)?;
    let max_pos = config.max_position_embeddings;
    let mut longest = 0;
    if let Some((i, p)) = ids.iter().enumerate().max_by_key(|(_, p)| p.len()) {
        longest = p.len();
        if longest.saturating_add(args.max_new_tokens) > max_pos {
            bail!(
                "{}:{}: the prompt is {} tokens as posed, and {} + --max-new-tokens {} exceeds the model's context of {max_pos} positions",
                args.prompts.display(),
                prompts[i].0,
                longest,
                longest,
                args.max_new_tokens
            );
        }
    }
    // what the run will hold in memory, before any of it is allocated
    let Some(needed) = params.memory_needed(ids.len(), longest, &config) else {
        bail!(
            "--k {}: {} prompts x {} responses of up to {} tokens is more than this machine can count in bytes",
            args.k,
            ids.len(),
            args.k,
            args.max_new_tokens
        );
    };
    if let Some(free) = candor_core::memory::available_bytes() {
        if needed > free {
            bail!(
                "--k {}: {} prompts x {} responses (--max-new-tokens {}, --batch-size {}) need about {} of memory; {} is available (lower --k, --max-new-tokens or --batch-size, or split --prompts)",
                args.k,
                ids.len(),
                args.k,
                args.max_new_tokens,
                args.batch_size,
                human_bytes(needed),
                human_bytes(free)
            );
        }
    }
    let model = candor_model::io::load_frozen(&model_dir, &dev)?;
    let total = ids.len() as u64 * args.k as u64; // fits: memory_needed counted n·K
    let progress = Progress::new("sample", total, 0);
    progress.log(&format!(
        "{} prompts x {} responses from {} (about {} of memory)",
        ids.len(),
        args.k,
        args.model.display(),
        human_bytes(needed)
    ));
    let mut rng = Rng::new(args.seed);
    let drawn = sample_candidates(&model, &tok, &ids, &params, &mut rng, &mut |done, _| {
        progress.set((done as u64).min(total), String::new())
    })?;
    progress.finish();

    // written whole or not at all: a killed run or a full disk leaves the old file (or none)
    let mut w = AtomicFile::create(&args.out).context("--out")?;
    let (mut written, mut short, mut dropped) = (0, 0, 0);
    for ((line, p), responses) in prompts.iter().zip(drawn.responses) {
        if responses.len() < args.k {
            let what = if responses.len() < 2 {
                "dropped"
            } else {
                "kept"
            };
            eprintln!(
                "[sample] warning: {}:{line}: only {} distinct response(s) of {} after {} resampling rounds; {what}",
                args.prompts.display(),
                responses.len(),
                args.k,
                args.max_resample
            );
            if responses.len() < 2 {
                dropped += 1;
                continue;
            }
            short += 1;
        }
        let c = Candidates {
            prompt: p.prompt.clone(),
            responses,
            reference: p.reference().map(String::from),
        };
        writeln!(w, "{}", serde_json::to_string(&c)?)
            .with_context(|| format!("--out: {}: cannot write", args.out.display()))?;
        written += 1;
    }
    w.commit().context("--out")?;
    println!(
        "sample: {written} prompts -> {} ({} duplicate responses redrawn{}{})",
        args.out.display(),
        drawn.duplicates,
        if short > 0 {
            format!(", {short} prompts with fewer than {}", args.k)
        } else {
            String::new()
        },
        if dropped > 0 {
            format!(", {dropped} dropped")
        } else {
            String::new()
        }
    );
    Ok(())
}
