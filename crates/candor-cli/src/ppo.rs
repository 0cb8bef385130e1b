//! `candor ppo`: RLHF with PPO.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::{load_config, CommonStage};

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

pub fn run(args: PpoArgs) -> Result<()> {
    let c = &args.common;
    let mut cfg: candor_ppo::PpoConfig = load_config(c)?;
    if let Some(p) = &args.policy {
        cfg.policy = Some(p.clone());
    }
    if let Some(r) = &args.reward {
        cfg.reward = Some(r.clone());
    }
    if c.show_config {
        print!("{}", serde_yaml::to_string(&cfg)?);
        return Ok(());
    }
    crate::stage::check_parents(
        c,
        &[
            ("policy", cfg.policy.as_ref()),
            ("reward", cfg.reward.as_ref()),
        ],
    )?;
    let Some(opts) = crate::stage::run_options(c, "ppo")? else {
        return Ok(());
    };
    let meta = candor_ppo::run(&cfg, &opts)?;
    if !opts.dist.is_main() {
        return Ok(());
    }
    let m = |k: &str| {
        meta.metrics
            .get(k)
            .and_then(|v| v.as_f64())
            .map_or("-".into(), |v| format!("{v:.4}"))
    };
    println!(
        "ppo: {} (iteration {}, reward_mean {}, kl {}, judge_score {} from {})",
        opts.out.display(),
        meta.step,
        m("reward_mean"),
        m("kl"),
        m("judge_score"),
        m("judge_score_initial")
    );
    Ok(())
}
