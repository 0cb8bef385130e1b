//! `candor generate`: sample from a checkpoint with the KV cache.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use candor_core::rng::Rng;
use candor_data::jsonl::read_jsonl;
use candor_data::Tokenizer;
use candor_model::generate::{generate, SamplingParams};
use candor_train::precision::{frozen_model, Precision};
use serde::Deserialize;

use crate::device;

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text (repeatable; all are sampled in one batch).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// JSONL file of {"prompt": ...} lines; prints JSONL {"prompt", "response"}.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, or bf16 (weights, activations and KV cache; for GPUs).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

#[derive(Deserialize)]
struct PromptLine {
    prompt: String,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let dev = device(&args.device)?;
    let mut prompts: Vec<String> = args.prompt.clone();
    let from_file = args.prompts.is_some();
    if let Some(path) = &args.prompts {
        prompts.extend(read_jsonl::<PromptLine>(path)?.into_iter().map(|(_, p)| p.prompt));
    }
    if prompts.is_empty() {
        bail!("give --prompt TEXT or --prompts FILE.jsonl");
    }
    let model = match Precision::parse(&args.dtype, "--dtype")? {
        Precision::F32 => candor_model::io::load_frozen(&args.model, &dev)?,
        p => {
            let config = candor_model::io::read_config(&args.model)?;
            let (_, vars) = candor_model::io::load_trainable(&args.model, config.head(), &mut Rng::new(0), &dev)?;
            frozen_model(&config, config.head(), &vars, p.dtype(), &dev)?
        }
    };
    let tok = Tokenizer::from_dir(&args.model)?;
    let ids: Vec<Vec<u32>> =
        prompts.iter().map(|p| tok.encode(p)).collect::<candor_data::Result<_>>().context("encoding the prompts")?;
    if let Some(i) = ids.iter().position(Vec::is_empty) {
        bail!("prompt {} is empty", i + 1);
    }
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
    };
    let stop: Vec<u32> = tok.eos_id().into_iter().collect();
    let mut rng = Rng::new(args.seed);
    let samples = generate(&model, &ids, &params, &stop, tok.pad_id(), &mut rng)?;
    let mut out = std::io::stdout().lock();
    for (prompt, s) in prompts.iter().zip(&samples) {
        let text = tok.decode(&s.tokens, true)?;
        if from_file {
            writeln!(out, "{}", serde_json::json!({"prompt": prompt, "response": text}))?;
        } else {
            writeln!(out, "{prompt}{text}")?;
        }
    }
    Ok(())
}
