//! `candor score`: a reward model's rewards for prompt/response lines.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use candor_reward::score::RewardModel;
use clap::Args;

use crate::device;

#[derive(Args)]
pub struct ScoreArgs {
    /// Reward model checkpoint (`candor reward` output).
    #[arg(long)]
    pub model: PathBuf,
    /// Records with `prompt` and `response` (or TRL's `completion`, or `responses`), in any
    /// dataset file (JSONL, JSON, Parquet, compressed, `hf:`; docs/data.md); other fields
    /// are ignored.
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

struct ScoreLine {
    prompt: String,
    /// One response (`response`, or TRL's `completion`) rather than a list.
    single: bool,
}

/// A record to score: a single-turn `prompt` (a string or a user message) with `response`
/// or `completion` (a string or one assistant message), or with `responses`.
fn score_line(
    fields: &serde_json::Map<String, serde_json::Value>,
) -> std::result::Result<(ScoreLine, Vec<String>), String> {
    use candor_data::formats::{prompt_field, response_field};
    let prompt = prompt_field(
        fields
            .get("prompt")
            .ok_or("expected `prompt` with `response`, `completion` or `responses`")?,
    )?;
    if !prompt.context.is_empty() {
        return Err(
            "the prompt has turns before the last user turn; `score` reads single-turn prompts"
                .into(),
        );
    }
    let one = ["response", "completion"]
        .iter()
        .find_map(|k| fields.get(*k).map(|v| (*k, v)));
    let (responses, single) = match (one, fields.get("responses")) {
        (Some((k, v)), None) => (vec![response_field(v, k)?], true),
        (None, Some(serde_json::Value::Array(rs))) if !rs.is_empty() => (
            rs.iter()
                .map(|r| {
                    r.as_str()
                        .map(String::from)
                        .ok_or("`responses` must be strings")
                })
                .collect::<std::result::Result<_, _>>()?,
            false,
        ),
        (None, Some(_)) => return Err("`responses` must be a non-empty list of strings".into()),
        (Some((k, _)), Some(_)) => return Err(format!("give `{k}` or `responses`, not both")),
        (None, None) => {
            return Err(
                "expected `response` (or `responses`, or TRL's `completion`) beside `prompt`"
                    .into(),
            )
        }
    };
    Ok((
        ScoreLine {
            prompt: prompt.text,
            single,
        },
        responses,
    ))
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let dev = device(&args.device)?;
    let mut lines: Vec<(usize, ScoreLine)> = vec![];
    let mut items: Vec<(usize, Vec<String>)> = vec![];
    for r in candor_data::dataset::read_records(&args.data, &Default::default())? {
        let (line, responses) = score_line(&r.fields).map_err(|m| r.err(m))?;
        lines.push((r.number(), line));
        items.push((r.number(), responses));
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
            let v = if l.single {
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
