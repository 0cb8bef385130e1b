//! `candor rank`: rank each prompt's candidate responses — typed by a person in the
//! terminal, or by a rule judge — appending every answer to the output at once.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candor_data::preference::{read_candidates, Candidates, PreferenceLine};
use candor_judge::rank::{parse_answer, rank_by_scores, Answer, Ranking};
use candor_judge::Judge;
use candor_train::progress::Progress;
use clap::Args;

#[derive(Args)]
pub struct RankArgs {
    /// Candidates JSONL (`candor sample` output): {"prompt", "responses": [...]}.
    #[arg(long = "in")]
    pub input: PathBuf,
    /// Output JSONL, appended to: {"prompt", "responses": [best, ..., worst], "ranks": [...]}.
    /// Prompts already in it are not asked again.
    #[arg(long)]
    pub out: PathBuf,
    /// Rank by a judge instead of asking: `sentiment`, `reference`, `math`, `regex:PATTERN`,
    /// `length:MIN-MAX`, `command:PROGRAM [ARGS]`, `http://HOST:PORT/PATH` (docs/judges.md).
    /// Give it more than once, each as `NAME[=WEIGHT]`, to rank by the weighted sum of several.
    #[arg(long)]
    pub judge: Vec<String>,
}

/// A prompt and its responses as a set: how an answered prompt is recognised on restart.
fn key(prompt: &str, responses: &[String]) -> (String, Vec<String>) {
    let mut r = responses.to_vec();
    r.sort();
    (prompt.to_string(), r)
}

/// The prompts already ranked in `out` (with multiplicity). A last line cut off mid-write
/// (no newline, not valid JSON) is removed, so that prompt is asked again.
fn answered(out: &Path) -> Result<HashMap<(String, Vec<String>), usize>> {
    let mut done = HashMap::new();
    let (text, cut) = candor_data::jsonl::repair_tail::<PreferenceLine>(out)?;
    if cut {
        eprintln!("[rank] {}: removed an incomplete last line (an answer cut off mid-write); its prompt is asked again", out.display());
    }
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: PreferenceLine = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: not a ranked line: {e}", out.display(), i + 1))?;
        let responses = p
            .responses
            .clone()
            .or_else(|| Some(vec![p.chosen.clone()?, p.rejected.clone()?]))
            .unwrap_or_default();
        *done.entry(key(&p.prompt, &responses)).or_insert(0) += 1;
    }
    Ok(done)
}

/// Append one answer and fsync, so it survives a crash the moment it is given.
fn append(
    file: &mut std::fs::File,
    c: &Candidates,
    ranking: &Ranking,
    scores: Option<(&[f64], &str)>,
) -> Result<()> {
    let order = ranking.order();
    let line = PreferenceLine {
        prompt: c.prompt.clone(),
        responses: Some(order.iter().map(|&i| c.responses[i].clone()).collect()),
        ranks: Some(ranking.ranks()),
        reference: c.reference.clone(),
        scores: scores.map(|(s, _)| order.iter().map(|&i| s[i]).collect()),
        judge: scores.map(|(_, name)| name.to_string()),
        ..Default::default()
    };
    file.write_all((serde_json::to_string(&line)? + "\n").as_bytes())?;
    file.sync_data()?;
    Ok(())
}

pub fn run(args: RankArgs) -> Result<()> {
    if args.input == args.out {
        bail!(
            "--out {}: must differ from --in (answers are appended to it)",
            args.out.display()
        );
    }
    let judge = match args.judge.is_empty() {
        true => None,
        false => {
            let specs = args
                .judge
                .iter()
                .map(|j| candor_judge::parse_weighted(j).map(|(name, w)| (name, None, w)))
                .collect::<candor_judge::Result<Vec<_>>>()?;
            Some(candor_judge::WeightedJudges::new(&specs)?)
        }
    };
    let candidates = read_candidates(&args.input)?;
    let mut done = answered(&args.out)?;
    let todo: Vec<&(usize, Candidates)> = candidates
        .iter()
        .filter(|(_, c)| match done.get_mut(&key(&c.prompt, &c.responses)) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .collect();
    let already = candidates.len() - todo.len();
    if todo.is_empty() {
        println!(
            "rank: all {} prompts of {} are ranked in {}",
            candidates.len(),
            args.input.display(),
            args.out.display()
        );
        return Ok(());
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .with_context(|| format!("{}", args.out.display()))?;
    match judge {
        Some(judge) => {
            let progress = Progress::new("rank", todo.len() as u64, 0);
            let mut ties = 0;
            for (n, (line, c)) in todo.iter().enumerate() {
                let mut fields = candor_judge::Fields::new();
                if let Some(r) = &c.reference {
                    fields.insert("reference".into(), r.clone().into());
                }
                let batch: Vec<candor_judge::Sample> = c
                    .responses
                    .iter()
                    .map(|r| candor_judge::Sample {
                        prompt: &c.prompt,
                        response: r,
                        fields: &fields,
                    })
                    .collect();
                let scores = judge
                    .score_batch(&batch)
                    .map_err(|e| anyhow::anyhow!("{}:{line}: {e}", args.input.display()))?;
                let ranking = rank_by_scores(&scores)
                    .map_err(|e| anyhow::anyhow!("{}:{line}: {e}", args.input.display()))?;
                ties += (ranking.ties() > 0) as usize;
                append(&mut file, c, &ranking, Some((&scores, judge.name())))?;
                progress.set(n as u64 + 1, String::new());
            }
            progress.finish();
            println!(
                "rank: {} prompts ranked by judge `{}` -> {} ({ties} with ties; {already} were already there)",
                todo.len(),
                judge.name(),
                args.out.display()
            );
        }
        None => interactive(&todo, &mut file, already, candidates.len(), &args.out)?,
    }
    Ok(())
}

/// Ask a person, prompt by prompt, reading answers line by line from stdin.
fn interactive(
    todo: &[&(usize, Candidates)],
    file: &mut std::fs::File,
    already: usize,
    total: usize,
    out: &Path,
) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    let mut lines = std::io::stdin().lock().lines();
    writeln!(
        stdout,
        "Ranking {} prompts ({already} of {total} already in {}).\n\
         For each, type the response numbers best first, e.g. `3 1 2 4`; `=` ties two (`3 1=2 4`);\n\
         `s` skips a prompt (it is asked again next time); `q` quits. Every answer is saved at once.",
        todo.len(),
        out.display()
    )?;
    let (mut answered, mut skipped) = (0, 0);
    'prompts: for (n, (_, c)) in todo.iter().enumerate() {
        writeln!(stdout, "\n[{}/{}] {}", already + n + 1, total, c.prompt)?;
        for (i, r) in c.responses.iter().enumerate() {
            writeln!(stdout, "  {}) {}", i + 1, r.replace('\n', "\n     "))?;
        }
        loop {
            write!(stdout, "order> ")?;
            stdout.flush()?;
            let Some(line) = lines.next() else {
                writeln!(stdout)?;
                break 'prompts; // end of input: as `q`
            };
            match parse_answer(&line?, c.responses.len()) {
                Ok(Answer::Order(ranking)) => {
                    append(file, c, &ranking, None)?;
                    answered += 1;
                    break;
                }
                Ok(Answer::Skip) => {
                    skipped += 1;
                    break;
                }
                Ok(Answer::Quit) => break 'prompts,
                Err(msg) => writeln!(stdout, "  {msg}. Try again.")?,
            }
        }
    }
    writeln!(
        stdout,
        "rank: {answered} answered now, {skipped} skipped; {} of {total} prompts ranked in {}",
        already + answered,
        out.display()
    )?;
    Ok(())
}
