//! `candor sample`: K distinct candidate responses per prompt, for ranking.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candor_core::checkpoint::Head;
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
    /// Distinct responses per prompt (InstructGPT ranks 4 to 9).
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    /// Output JSONL: {"prompt", "responses": [...], "reference"?}.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
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
    if args.k < 2 {
        bail!(
            "--k {}: a ranking needs at least 2 responses per prompt",
            args.k
        );
    }
    if args.temperature <= 0.0 {
        bail!("--temperature {}: greedy decoding gives the same response every time; use a temperature above 0", args.temperature);
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
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
    let model = candor_model::io::load_frozen(&model_dir, &dev)?;
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
    if let Some((i, longest)) = ids.iter().enumerate().max_by_key(|(_, p)| p.len()) {
        if longest.len() + args.max_new_tokens > max_pos {
            bail!(
                "{}:{}: the prompt is {} tokens as posed, and {} + --max-new-tokens {} exceeds the model's context of {max_pos} positions",
                args.prompts.display(),
                prompts[i].0,
                longest.len(),
                longest.len(),
                args.max_new_tokens
            );
        }
    }
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
    let total = (ids.len() * args.k) as u64;
    let progress = Progress::new("sample", total, 0);
    progress.log(&format!(
        "{} prompts x {} responses from {}",
        ids.len(),
        args.k,
        args.model.display()
    ));
    let mut rng = Rng::new(args.seed);
    let drawn = sample_candidates(&model, &tok, &ids, &params, &mut rng, &mut |done, _| {
        progress.set((done as u64).min(total), String::new())
    })?;
    progress.finish();

    // write to a temporary sibling, then rename: a killed run leaves no half-written file
    let tmp = args.out.with_file_name(format!(
        ".{}.tmp-{}",
        args.out
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
        std::process::id()
    ));
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("{}", tmp.display()))?,
    );
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
        writeln!(w, "{}", serde_json::to_string(&c)?)?;
        written += 1;
    }
    w.flush()?;
    w.get_ref().sync_all()?;
    drop(w);
    std::fs::rename(&tmp, &args.out).with_context(|| format!("{}", args.out.display()))?;
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
