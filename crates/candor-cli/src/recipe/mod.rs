//! `candor run RECIPE.yaml`: the stages of an experiment, chained through checkpoint
//! directories, each skipped when its output is up to date.
//!
//! A recipe names an output root, a seed, a device and a list of stages. Each stage has a
//! `name`, a `kind`, its config (a file or an inline mapping, plus `set` overrides) and its
//! inputs by the name of an earlier stage (`init: sft`, `policy: sft`, `reward: reward`).
//! `repeat: N` runs a group of stages N times, each round in its own directory, with
//! `carry` naming what the first round starts from and `next` what later rounds take from
//! the round before (InstructGPT's iterated loop: sample from the current policy → rank →
//! retrain the reward model → PPO).
//!
//! Skipping: after a stage finishes, the runner records a fingerprint of what made it (the
//! stage kind, its effective config, and the content hash of each input) and the hash of
//! its output in `<out>/.recipe/`. A stage is skipped when its fingerprint and its output
//! are unchanged; anything else reruns, and downstream stages then see changed inputs and
//! rerun too. A stage interrupted midway resumes from its last checkpoint.

mod exec;
mod plan;

pub use exec::WaitingForPeople;
pub use plan::load_recipe;

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct RunArgs {
    /// The recipe (YAML).
    pub recipe: PathBuf,
    /// Override a recipe key: `--set out=runs/x`, `--set seed=3`, or a stage's config key:
    /// `--set sft.train.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Rerun this stage and every stage after it, even if up to date.
    #[arg(long, value_name = "STAGE")]
    pub from: Option<String>,
    /// Run only this stage (its inputs must exist).
    #[arg(long, value_name = "STAGE", conflicts_with = "from")]
    pub only: Option<String>,
    /// Print the plan (which stages run or skip, and why) and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Override the recipe's device.
    #[arg(long)]
    pub device: Option<String>,
}

pub fn run(args: RunArgs) -> Result<()> {
    let recipe = load_recipe(&args.recipe, &args.set)?;
    exec::execute(&recipe, &args)
}
