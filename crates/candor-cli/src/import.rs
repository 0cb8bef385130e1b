//! `candor import --gguf FILE --out DIR [--dtype f32|bf16]`: a llama.cpp GGUF model as a
//! normal candor checkpoint (dequantized weights with Hugging Face names, `config.json`,
//! `tokenizer.json` and `tokenizer_config.json` with the chat template, `candor.json`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candor_core::checkpoint::{CandorMeta, CheckpointWriter};
use candor_data::convert::{from_byte_level_bpe, gguf_pre_tokenizer, ByteLevelBpe, SpecialTokens};
use candor_model::gguf::read_gguf;
use candor_model::Head;
use clap::Args;
use serde_json::json;

#[derive(Args)]
pub struct ImportArgs {
    /// A llama.cpp GGUF file (architecture `llama`, byte-level BPE vocabulary), any
    /// quantization candle reads (F32, F16, Q4_0, Q4_1, Q8_0, K-quants, ...).
    #[arg(long)]
    pub gguf: PathBuf,
    /// Output checkpoint directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Stored dtype of the dequantized weights: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Replace an existing checkpoint in --out.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: ImportArgs) -> Result<()> {
    let (dtype, torch_dtype) = match args.dtype.as_str() {
        "f32" | "float32" => (DType::F32, "float32"),
        "bf16" | "bfloat16" => (DType::BF16, "bfloat16"),
        other => bail!("--dtype: `{other}` (expected f32 or bf16)"),
    };
    if args.out.exists() && !args.overwrite {
        bail!(
            "{}: already exists (give --overwrite to replace it)",
            args.out.display()
        );
    }
    let start = Instant::now();
    eprintln!("[import] reading and dequantizing {}", args.gguf.display());
    let gguf = read_gguf(&args.gguf)?;
    let origin = args.gguf.display();

    // 1. tokenizer from the GGUF vocabulary
    let v = &gguf.vocab;
    if v.model != "gpt2" {
        bail!("{origin}: `tokenizer.ggml.model`: `{}` is not supported (expected gpt2, a byte-level BPE)", v.model);
    }
    let Some(individual_digits) = gguf_pre_tokenizer(v.pre.as_deref()) else {
        bail!(
            "{origin}: `tokenizer.ggml.pre`: `{}` is not supported (expected default, gpt2, smollm, starcoder or refact)",
            v.pre.as_deref().unwrap_or("")
        );
    };
    if v.tokens.len() > gguf.config.vocab_size {
        bail!(
            "{origin}: `tokenizer.ggml.tokens` has {} tokens, more than the model's vocabulary {}",
            v.tokens.len(),
            gguf.config.vocab_size
        );
    }
    let bpe = ByteLevelBpe {
        tokens: v.tokens.clone(),
        merges: v.merges.clone(),
        special_ids: v.special_ids(),
        individual_digits,
    };
    let special = SpecialTokens {
        bos: v.bos_id,
        eos: v.eos_id,
        unk: v.unk_id,
        pad: v.pad_id,
        chat_template: v.chat_template.clone(),
        model_max_length: Some(gguf.config.max_position_embeddings),
    };
    let tokenizer =
        from_byte_level_bpe(&bpe, &special).with_context(|| format!("{origin}: tokenizer"))?;

    // 2. weights in the requested dtype, config, tokenizer, candor.json: written atomically
    let mut config = gguf.config.clone();
    config.set_head(Head::Lm);
    config.torch_dtype = torch_dtype.into();
    let tensors: HashMap<String, Tensor> = gguf
        .tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    let mut types: BTreeMap<&str, usize> = BTreeMap::new();
    for t in gguf.stored_types.values() {
        *types.entry(t.as_str()).or_default() += 1;
    }
    let writer = CheckpointWriter::begin(&args.out)?;
    let dir = writer.path().to_path_buf();
    config.write(&dir.join("config.json"))?;
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights)
        .with_context(|| format!("{}", weights.display()))?;
    tokenizer.save(&dir)?;
    let size = std::fs::metadata(&args.gguf).map(|m| m.len()).unwrap_or(0);
    let source = std::fs::canonicalize(&args.gguf).unwrap_or_else(|_| args.gguf.clone());
    let mut meta = CandorMeta::new(
        "import",
        Head::Lm,
        json!({"gguf": source.display().to_string(), "gguf_bytes": size, "name": gguf.name, "dtype": torch_dtype, "stored_types": types}),
    );
    meta.complete = true;
    meta.elapsed_sec = start.elapsed().as_secs_f64();
    meta.write(&dir)?;
    writer.commit()?;
    let params = config.param_count(Head::Lm);
    println!(
        "import: {} ({}, {} layers, {:.1}M parameters, vocab {}, {} weights from {}) in {:.1}s",
        args.out.display(),
        gguf.name.as_deref().unwrap_or("llama"),
        config.num_hidden_layers,
        params as f64 / 1e6,
        tokenizer.vocab_size(),
        torch_dtype,
        types
            .iter()
            .map(|(t, n)| format!("{n}×{t}"))
            .collect::<Vec<_>>()
            .join(" "),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
