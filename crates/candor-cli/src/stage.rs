//! Training stage commands (`candor pretrain|sft|reward|ppo`): load the config, apply the
//! command's overrides, look the stage up in the registry, run it.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use candor_train::ckpt::RunOptions;
use clap::Args;

use crate::{launch, registry, CommonStage};

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

#[derive(Args)]
pub struct RewardArgs {
    #[command(flatten)]
    pub common: CommonStage,
    /// The checkpoint to start from (usually the SFT model); sets `init` in the config.
    #[arg(long)]
    pub init: Option<PathBuf>,
}

#[derive(Args)]
pub struct PpoArgs {
    #[command(flatten)]
    pub common: CommonStage,
    /// The SFT checkpoint the policy starts from (and the frozen reference copies), or
    /// hf:ORG/NAME in the Hugging Face cache.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// The reward model checkpoint (a score head).
    #[arg(long)]
    pub reward: Option<PathBuf>,
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

/// Run the training stage `kind` from its command line: the config file with `--set`
/// overrides, then `paths` (config key, the command's option for it, when given);
/// `--show-config` prints the effective config (defaults filled in) and stops. On rank 0
/// a finished stage prints `<kind>: <dir> (<the registry's summary>)`.
pub fn command(kind: &str, c: &CommonStage, paths: &[(&str, &Option<PathBuf>)]) -> Result<()> {
    let entry = registry::find(kind).ok_or_else(|| anyhow!("no stage kind `{kind}`"))?;
    let origin = c.config.display().to_string();
    let mut config = candor_core::config::read_yaml(&c.config)?;
    candor_core::config::apply_overrides(&mut config, &c.set, &origin)?;
    for (key, path) in paths {
        if let Some(p) = path {
            let v = serde_yaml::Value::String(p.display().to_string());
            candor_core::config::set_path(&mut config, key, v)
                .map_err(|e| anyhow!("{origin}: {e}"))?;
        }
    }
    let effective = (entry.effective)(&config, &origin)?;
    if c.show_config {
        print!("{}", serde_yaml::to_string(&effective)?);
        return Ok(());
    }
    let Some(opts) = run_options(c, kind)? else {
        return Ok(());
    };
    let meta = (entry.run)(&config, &opts)?;
    if let (Some(meta), true) = (meta, opts.dist.is_main()) {
        println!(
            "{kind}: {} ({})",
            opts.out.display(),
            (entry.summary)(&meta)
        );
    }
    Ok(())
}
