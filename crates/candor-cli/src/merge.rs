//! `candor merge --adapter DIR --out DIR`: a LoRA adapter directory (candor's or one PEFT
//! wrote) merged into its base as a full checkpoint — `W + (alpha/r)·B·A` for every
//! adapted weight, a trained score head in place — with `config.json`, `model.safetensors`
//! (f32), the tokenizer files and `candor.json`, loadable by transformers like any other
//! candor checkpoint (PEFT's `merge_and_unload()`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Device;
use candor_core::checkpoint::{parent_ref, CandorMeta, CheckpointWriter};
use candor_data::Tokenizer;
use candor_model::io::{build_trainable, read_config, read_weights, save_model};
use candor_model::lora;
use clap::Args;
use serde_json::json;

#[derive(Args)]
pub struct MergeArgs {
    /// A LoRA adapter directory (`adapter_config.json`, `adapter_model.safetensors`) whose
    /// base model is a directory or ORG/NAME in the local Hugging Face cache.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output checkpoint directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing checkpoint in --out.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: MergeArgs) -> Result<()> {
    let start = Instant::now();
    if !lora::is_adapter_dir(&args.adapter) {
        bail!(
            "{}: not a LoRA adapter directory ({} is missing)",
            args.adapter.display(),
            lora::ADAPTER_CONFIG
        );
    }
    if args.out.exists() && !args.overwrite {
        bail!(
            "{}: already exists (give --overwrite to replace it)",
            args.out.display()
        );
    }
    let dir = candor_model::resolve_model_dir(&args.adapter)?;
    let base = lora::base_dir(&dir)?;
    let config = read_config(&dir)?;
    let head = config.head();
    // the merged weights, shape-checked against the config as every checkpoint load is
    let weights = read_weights(&dir, &Device::Cpu)?;
    let mut rng = candor_core::rng::Rng::new(0);
    let (_, varmap) = build_trainable(&config, head, Some(&weights), &[], &mut rng, &Device::Cpu)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let writer = CheckpointWriter::begin(&args.out)?;
    save_model(writer.path(), &config, head, &varmap)?;
    tokenizer.save(writer.path())?;
    let mut meta = CandorMeta::new(
        "merge",
        head,
        json!({"adapter": std::fs::canonicalize(&dir).unwrap_or(dir.clone()).display().to_string()}),
    );
    meta.parents = vec![parent_ref("adapter", &dir)?, parent_ref("base", &base)?];
    meta.complete = true;
    meta.elapsed_sec = start.elapsed().as_secs_f64();
    meta.write(writer.path())?;
    writer.commit()?;
    println!(
        "merge: {} ({} adapter on {}, {head} head) in {:.1}s",
        args.out.display(),
        args.adapter.display(),
        base.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
