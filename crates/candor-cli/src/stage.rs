//! Stage commands: load the config, resolve options, run the stage library.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::{launch, load_config, CommonStage};

#[derive(Args)]
pub struct StageArgs {
    #[command(flatten)]
    pub common: CommonStage,
}

fn print_config<T: serde::Serialize>(cfg: &T) -> Result<()> {
    print!("{}", serde_yaml::to_string(cfg)?);
    Ok(())
}

fn default_out(stage: &str) -> PathBuf {
    PathBuf::from("runs").join(stage)
}

pub fn pretrain(args: StageArgs) -> Result<()> {
    let c = &args.common;
    let cfg: candor_pretrain::PretrainConfig = load_config(c)?;
    if c.show_config {
        return print_config(&cfg);
    }
    if c.nproc == 0 {
        anyhow::bail!("--nproc: must be at least 1");
    }
    if c.nproc > 1 && !launch::inside_a_run()? {
        return launch::run_ranks(c.nproc);
    }
    let (device, dist) = launch::join(&c.device)?;
    let opts = candor_pretrain::RunOptions {
        out: c.out.clone().unwrap_or_else(|| default_out("pretrain")),
        device,
        resume: c.resume,
        overwrite: c.overwrite,
        origin: c.config.display().to_string(),
        dist,
    };
    let meta = candor_pretrain::run(&cfg, &opts)?;
    if !opts.dist.is_main() {
        return Ok(());
    }
    println!(
        "pretrain: {} (step {}, eval_loss {})",
        opts.out.display(),
        meta.step,
        meta.metrics.get("eval_loss").map(|v| format!("{:.4}", v.as_f64().unwrap_or(f64::NAN))).unwrap_or("-".into())
    );
    Ok(())
}
