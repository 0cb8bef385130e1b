//! `candor generate`: sample from a checkpoint with the KV cache. With `--chat`, each prompt
//! is posed as a user turn with the checkpoint's chat template (what SFT trained on) and
//! only the assistant's response, up to its end-of-turn token, is printed.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candor_core::rng::Rng;
use candor_data::chat::{encode_prompts, stop_tokens, ChatTemplate};
use candor_data::prompts::read_prompts;
use candor_data::Tokenizer;
use candor_model::generate::{generate, SamplingParams};
use candor_train::precision::{load_frozen, Precision};
use candor_train::sample::response_text;
use clap::Args;

use crate::device;

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint directory, or hf:ORG/NAME for a model in the Hugging Face cache.
    #[arg(long)]
    pub model: PathBuf,
    /// Pose each prompt as a user turn through the tokenizer's chat template and print
    /// only the assistant's reply (stops at the end-of-turn token).
    #[arg(long)]
    pub chat: bool,
    /// Prompt text (repeatable; all are sampled in one batch).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// JSONL file of {"prompt": ...} lines; prints JSONL {"prompt", "response", "stopped"}
    /// (`stopped`: the response ended on a stop token, not the length limit).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Finite and >= 0; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: a probability in (0, 1] (1 = off).
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

pub fn run(args: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
    };
    params.check().map_err(|e| anyhow::anyhow!(e.option()))?;
    let dev = device(&args.device)?;
    let mut prompts: Vec<String> = args.prompt.clone();
    let from_file = args.prompts.is_some();
    if let Some(path) = &args.prompts {
        for (n, p) in read_prompts(path)? {
            let text = p
                .single_turn()
                .map_err(|m| anyhow::anyhow!("{}:{n}: {m}", path.display()))?;
            prompts.push(text.to_string());
        }
    }
    if prompts.is_empty() {
        bail!("give --prompt TEXT or --prompts FILE.jsonl");
    }
    let dir = candor_model::resolve_model_dir(&args.model)?;
    let model = load_frozen(&dir, Precision::parse(&args.dtype, "--dtype")?, &dev)?;
    let tok = Tokenizer::from_dir(&dir)?;
    let (ids, stop): (Vec<Vec<u32>>, Vec<u32>) = if args.chat {
        let template = ChatTemplate::for_tokenizer(&tok);
        let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        (
            encode_prompts(&tok, &template, &texts)
                .context("posing the prompts with the chat template")?,
            stop_tokens(&tok),
        )
    } else {
        let ids = prompts
            .iter()
            .map(|p| tok.encode(p))
            .collect::<candor_data::Result<_>>()
            .context("encoding the prompts")?;
        (ids, tok.eos_id().into_iter().collect())
    };
    if let Some(i) = ids.iter().position(Vec::is_empty) {
        bail!("prompt {} is empty", i + 1);
    }
    let mut rng = Rng::new(args.seed);
    let samples = generate(&model, &ids, &params, &stop, tok.pad_id(), &mut rng)?;
    let mut out = std::io::stdout().lock();
    for (prompt, s) in prompts.iter().zip(&samples) {
        let text = if args.chat {
            response_text(&tok, &s.tokens)?
        } else {
            tok.decode(&s.tokens, true)?
        };
        if from_file {
            writeln!(
                out,
                "{}",
                serde_json::json!({"prompt": prompt, "response": text, "stopped": s.stopped})
            )?;
        } else if args.chat {
            writeln!(out, "{text}")?;
        } else {
            writeln!(out, "{prompt}{text}")?;
        }
    }
    Ok(())
}
