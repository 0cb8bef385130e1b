//! Stage commands: load the config, resolve options, run the stage library.

use std::path::PathBuf;

use anyhow::Result;
use candor_core::checkpoint::CandorMeta;
use candor_train::ckpt::RunOptions;
use clap::Args;

use crate::{launch, load_config, CommonStage};

#[derive(Args)]
pub struct StageArgs {
    #[command(flatten)]
    pub common: CommonStage,
}

#[derive(Args)]
pub struct SftArgs {
    #[command(flatten)]
    pub common: CommonStage,
    /// The checkpoint to fine-tune (usually the pretrained model), or hf:ORG/NAME in the
    /// Hugging Face cache; sets `init` in the config.
    #[arg(long)]
    pub init: Option<PathBuf>,
}

fn print_config<T: serde::Serialize>(cfg: &T) -> Result<()> {
    print!("{}", serde_yaml::to_string(cfg)?);
    Ok(())
}

/// Where and how a stage runs: `--out` (default `runs/<stage>`), `--device`, `--resume`,
/// `--overwrite`; errors name the config file. With `--nproc N` (N > 1) outside a launched
/// run, this process starts N ranks of the same command, waits for them and returns `None`:
/// the command's work is done. A rank (started so, or by torchrun/srun) joins its run.
pub fn run_options(c: &CommonStage, stage: &str) -> Result<Option<RunOptions>> {
    if c.nproc == 0 {
        anyhow::bail!("--nproc: must be at least 1");
    }
    if c.nproc > 1 && !launch::inside_a_run()? {
        launch::run_ranks(c.nproc)?;
        return Ok(None);
    }
    let (device, dist) = launch::join(&c.device)?;
    Ok(Some(RunOptions {
        out: c
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(stage)),
        device,
        resume: c.resume,
        overwrite: c.overwrite,
        origin: c.config.display().to_string(),
        dist,
    }))
}

/// Refuse parents (`(key, dir)`: `init`, `policy`, `reward`) whose runs have not finished,
/// unless `--allow-incomplete`.
pub fn check_parents(c: &CommonStage, parents: &[(&str, Option<&PathBuf>)]) -> Result<()> {
    for (key, dir) in parents {
        if let Some(dir) = dir {
            candor_core::checkpoint::require_complete(dir, key, c.allow_incomplete)?;
        }
    }
    Ok(())
}

/// `<stage>: <dir> (step N, eval_loss X)`: the line a finished LM stage prints (on rank 0).
fn print_summary(stage: &str, opts: &RunOptions, meta: &CandorMeta) {
    if !opts.dist.is_main() {
        return;
    }
    println!(
        "{stage}: {} (step {}, eval_loss {})",
        opts.out.display(),
        meta.step,
        meta.metrics
            .get("eval_loss")
            .map(|v| format!("{:.4}", v.as_f64().unwrap_or(f64::NAN)))
            .unwrap_or("-".into())
    );
}

pub fn pretrain(args: StageArgs) -> Result<()> {
    let c = &args.common;
    let cfg: candor_pretrain::PretrainConfig = load_config(c)?;
    if c.show_config {
        return print_config(&cfg);
    }
    let Some(opts) = run_options(c, "pretrain")? else {
        return Ok(());
    };
    let meta = candor_pretrain::run(&cfg, &opts)?;
    print_summary("pretrain", &opts, &meta);
    Ok(())
}

pub fn sft(args: SftArgs) -> Result<()> {
    let c = &args.common;
    let mut cfg: candor_sft::SftConfig = load_config(c)?;
    if let Some(init) = &args.init {
        cfg.init = Some(init.clone());
    }
    if c.show_config {
        return print_config(&cfg);
    }
    check_parents(c, &[("init", cfg.init.as_ref())])?;
    let Some(opts) = run_options(c, "sft")? else {
        return Ok(());
    };
    let meta = candor_sft::run(&cfg, &opts)?;
    print_summary("sft", &opts, &meta);
    Ok(())
}
