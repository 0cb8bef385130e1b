//! `candor reward`: train a reward model from ranked responses.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::{load_config, CommonStage};

#[derive(Args)]
pub struct RewardArgs {
    #[command(flatten)]
    pub common: CommonStage,
    /// The checkpoint to start from (usually the SFT model); sets `init` in the config.
    #[arg(long)]
    pub init: Option<PathBuf>,
}

pub fn run(args: RewardArgs) -> Result<()> {
    let c = &args.common;
    let mut cfg: candor_reward::RewardConfig = load_config(c)?;
    if let Some(init) = &args.init {
        cfg.init = Some(init.clone());
    }
    if c.show_config {
        print!("{}", serde_yaml::to_string(&cfg)?);
        return Ok(());
    }
    crate::stage::check_parents(c, &[("init", cfg.init.as_ref())])?;
    let Some(opts) = crate::stage::run_options(c, "reward")? else {
        return Ok(());
    };
    let meta = candor_reward::run(&cfg, &opts)?;
    if !opts.dist.is_main() {
        return Ok(());
    }
    let m = |k: &str| {
        meta.metrics
            .get(k)
            .and_then(|v| v.as_f64())
            .map(|v| format!("{v:.4}"))
            .unwrap_or("-".into())
    };
    println!(
        "reward: {} (step {}, eval_accuracy {}, eval_margin {}, reward_mean {}, reward_std {})",
        opts.out.display(),
        meta.step,
        m("eval_accuracy"),
        m("eval_margin"),
        m("reward_mean"),
        m("reward_std")
    );
    Ok(())
}
