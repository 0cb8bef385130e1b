//! Training stage commands (`candor pretrain|sft|reward|ppo|dpo`): load the config, apply the
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

#[derive(Args)]
pub struct DpoArgs {
    #[command(flatten)]
    pub common: CommonStage,
    /// The checkpoint the policy starts from (usually the SFT model), or hf:ORG/NAME in the
    /// Hugging Face cache; sets `init` in the config.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// The frozen reference of the implicit reward (default: the --init checkpoint); sets
    /// `reference` in the config.
    #[arg(long)]
    pub reference: Option<PathBuf>,
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
        print!("{}", resolved_paths(entry, &effective));
        return Ok(());
    }
    // parents whose runs have not finished are refused, unless --allow-incomplete
    for (key, _) in paths {
        let named = key.split('.').try_fold(&effective, |v, k| v.get(k));
        if let Some(dir) = named.and_then(|v| v.as_str()) {
            candor_core::checkpoint::require_complete(
                std::path::Path::new(dir),
                key,
                c.allow_incomplete,
            )?;
        }
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

/// The paths the config names, as the run will read them, as YAML comments (the printed
/// config stays loadable): each role's checkpoint (hf:ORG/NAME → its directory in the
/// Hugging Face cache) and each input file, absolute; a missing one is marked.
fn resolved_paths(entry: &registry::StageKind, effective: &serde_json::Value) -> String {
    let at = |key: &str| key.split('.').try_fold(effective, |v, k| v.get(k));
    let strings = |v: &serde_json::Value| -> Vec<String> {
        match v {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(xs) => xs
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            _ => vec![],
        }
    };
    let absolute = |p: &std::path::Path| {
        std::path::absolute(p).map_or_else(|_| p.display().to_string(), |a| a.display().to_string())
    };
    let local = |spec: &str| {
        let p = std::path::Path::new(spec);
        let missing = if p.exists() { "" } else { " (does not exist)" };
        format!("{}{missing}", absolute(p))
    };
    let mut lines = vec![];
    let mut seen = vec![];
    for role in entry.roles {
        for spec in at(role.key).map(strings).unwrap_or_default() {
            let shown = match spec.strip_prefix("hf:") {
                Some(_) => match candor_model::resolve_model_dir(&spec) {
                    Ok(dir) => absolute(&dir),
                    Err(e) => format!("(not in the Hugging Face cache: {e})"),
                },
                None => local(&spec),
            };
            lines.push(format!("#   {}: {shown}", role.key));
        }
        seen.push(role.key);
    }
    for file in entry.file_keys {
        if seen.contains(&file.key) {
            continue;
        }
        for spec in at(file.key).map(strings).unwrap_or_default() {
            lines.push(format!("#   {}: {}", file.key, local(&spec)));
        }
    }
    if lines.is_empty() {
        return String::new();
    }
    format!("# resolved paths:\n{}\n", lines.join("\n"))
}
