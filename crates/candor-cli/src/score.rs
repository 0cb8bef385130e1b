//! `candor score`: a reward model's rewards for prompt/response lines.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use candor_data::jsonl::read_jsonl;
use candor_reward::score::RewardModel;
use clap::Args;
use serde::Deserialize;

use crate::device;

#[derive(Args)]
pub struct ScoreArgs {
    /// Reward model checkpoint (`candor reward` output).
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL lines with `prompt` and `response` (or `responses`); other fields are ignored.
    #[arg(long)]
    pub data: PathBuf,
    /// Print JSONL: each input line with `reward` (or `rewards`) added.
    #[arg(long)]
    pub json: bool,
    /// Exchanges scored together.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(Deserialize)]
struct ScoreLine {
    prompt: String,
    response: Option<String>,
    responses: Option<Vec<String>>,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let dev = device(&args.device)?;
    let lines: Vec<(usize, ScoreLine)> = read_jsonl(&args.data)?;
    let mut items: Vec<(usize, Vec<String>)> = vec![];
    for (n, l) in &lines {
        let responses = match (&l.response, &l.responses) {
            (Some(r), None) => vec![r.clone()],
            (None, Some(rs)) if !rs.is_empty() => rs.clone(),
            (None, Some(_)) => bail!("{}:{n}: `responses` is empty", args.data.display()),
            (Some(_), Some(_)) => bail!(
                "{}:{n}: give `response` or `responses`, not both",
                args.data.display()
            ),
            (None, None) => bail!(
                "{}:{n}: expected `response` (or `responses`) beside `prompt`",
                args.data.display()
            ),
        };
        items.push((*n, responses));
    }
    if items.is_empty() {
        bail!("{}: no lines to score", args.data.display());
    }
    let rm = RewardModel::load(&candor_model::resolve_model_dir(&args.model)?, &dev)?;
    let pairs: Vec<(&str, &str)> = lines
        .iter()
        .zip(&items)
        .flat_map(|((_, l), (_, rs))| rs.iter().map(move |r| (l.prompt.as_str(), r.as_str())))
        .collect();
    let rewards = rm.score(&pairs, args.batch_size.max(1))?;
    let mut out = std::io::stdout().lock();
    let mut next = rewards.iter();
    for ((_, l), (_, rs)) in lines.iter().zip(&items) {
        let mine: Vec<f64> = next.by_ref().take(rs.len()).copied().collect();
        if args.json {
            let v = if l.response.is_some() {
                serde_json::json!({"prompt": l.prompt, "response": rs[0], "reward": mine[0]})
            } else {
                serde_json::json!({"prompt": l.prompt, "responses": rs, "rewards": mine})
            };
            writeln!(out, "{v}")?;
        } else {
            writeln!(out, "{}", one_line(&l.prompt))?;
            for (r, x) in rs.iter().zip(&mine) {
                writeln!(out, "  {x:+.4}  {}", one_line(r))?;
            }
        }
    }
    if !args.json {
        let (mean, std) = candor_reward::mean_std(&rewards);
        writeln!(
            out,
            "score: {} responses, reward mean {mean:.4}, std {std:.4}",
            rewards.len()
        )?;
    }
    Ok(())
}

fn one_line(s: &str) -> String {
    s.replace('\n', " / ")
}
