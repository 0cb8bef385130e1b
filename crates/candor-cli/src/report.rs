//! `candor report RUN_DIR`: `report.md` with a table per stage and SVG plots of the
//! training curves, and SFT vs PPO responses side by side on held-out prompts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candor_core::checkpoint::CandorMeta;
use candor_core::metrics::MetricsLog;
use clap::Args;
use plotters::prelude::*;
use serde_json::Value;

#[derive(Args)]
pub struct ReportArgs {
    /// A run directory (a recipe's `out`, or any directory of checkpoints).
    pub run_dir: PathBuf,
}

/// A checkpoint found in the run directory.
struct Stage {
    id: String,
    dir: PathBuf,
    meta: CandorMeta,
    metrics: MetricsLog,
}

fn find_stages(root: &Path) -> Result<Vec<Stage>> {
    let mut out = vec![];
    let mut visit = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = visit.pop() {
        if let Some(meta) = CandorMeta::read(&dir)? {
            let id = dir.strip_prefix(root).unwrap_or(&dir).display().to_string();
            let metrics = MetricsLog::read(&dir, None)?;
            out.push(Stage {
                id: if id.is_empty() { ".".into() } else { id },
                dir,
                meta,
                metrics,
            });
            continue;
        }
        if depth >= 2 {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if e.path().is_dir() && !name.starts_with('.') {
                visit.push((e.path(), depth + 1));
            }
        }
    }
    // run order: by when each stage finished its work (mtime of candor.json)
    out.sort_by_key(|s| {
        std::fs::metadata(s.dir.join("candor.json"))
            .and_then(|m| m.modified())
            .ok()
    });
    Ok(out)
}

fn series(m: &MetricsLog, key: &str) -> Vec<(f64, f64)> {
    m.records
        .iter()
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
        .filter(|(_, y)| y.is_finite())
        .collect()
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One SVG line chart of named series; `marks` are the steps where a run-health signal tripped, drawn as red
/// vertical lines.
fn plot(
    path: &Path,
    title: &str,
    x_desc: &str,
    lines: &[(String, Vec<(f64, f64)>)],
    marks: &[f64],
) -> Result<bool> {
    let lines: Vec<&(String, Vec<(f64, f64)>)> =
        lines.iter().filter(|(_, s)| !s.is_empty()).collect();
    if lines.is_empty() {
        return Ok(false);
    }
    let pts = lines.iter().flat_map(|(_, s)| s.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    // drawn into memory, then written atomically (a report is never left half-drawn)
    let mut svg = String::new();
    let root = SVGBackend::with_string(&mut svg, (720, 400)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
        chart.configure_mesh().x_desc(x_desc).draw()?;
        for (i, &x) in marks.iter().enumerate() {
            let series = chart.draw_series(LineSeries::new(
                [(x, y0 - pad), (x, y1 + pad)],
                RED.mix(0.5).stroke_width(1),
            ))?;
            if i == 0 {
                series.label("health warning").legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], RED.mix(0.5).stroke_width(1))
                });
            }
        }
        for (i, (name, s)) in lines.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(s.iter().cloned(), c.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            if s.len() < 12 {
                chart.draw_series(s.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("{}: cannot draw plot: {e}", path.display()))?;
    drop(root);
    candor_core::output::write_atomic(path, svg.as_bytes())?;
    Ok(true)
}

fn fmt(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap();
            if x.abs() >= 1e4 || (x != 0.0 && x.abs() < 1e-3) {
                format!("{x:.3e}")
            } else {
                format!("{x:.4}")
            }
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

const TABLE_KEYS: [&str; 16] = [
    "loss",
    "eval_loss",
    "eval_ppl",
    "unigram_loss",
    "eval_accuracy",
    "eval_margin",
    "reward_mean",
    "reward_std",
    "reward_raw_mean",
    "kl",
    "kl_coef",
    "judge_score_initial",
    "judge_score",
    "entropy",
    "response_len",
    "params",
];

/// `text` with its first letter in upper case.
fn capitalised(text: &str) -> String {
    let mut c = text.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

pub fn run(args: ReportArgs) -> Result<()> {
    let root = &args.run_dir;
    if !root.is_dir() {
        bail!("{}: no such run directory", root.display());
    }
    let stages = find_stages(root)?;
    if stages.is_empty() {
        bail!(
            "{}: no checkpoints (candor.json) found in this directory or two levels below",
            root.display()
        );
    }
    let plots = root.join("plots");
    std::fs::create_dir_all(&plots).with_context(|| plots.display().to_string())?;
    let mut md = String::new();
    writeln!(md, "# candor run report: {}\n", root.display())?;
    writeln!(
        md,
        "| stage | kind | head | steps | time (s) | tokens | complete |"
    )?;
    writeln!(md, "|---|---|---|---:|---:|---:|---|")?;
    let mut total = 0.0;
    for s in &stages {
        total += s.meta.elapsed_sec;
        writeln!(
            md,
            "| {} | {} | {} | {}/{} | {:.1} | {} | {} |",
            s.id,
            s.meta.stage,
            s.meta.head,
            s.meta.step,
            s.meta.total_steps,
            s.meta.elapsed_sec,
            s.meta.tokens,
            s.meta.complete
        )?;
    }
    writeln!(md, "\nTotal training time {total:.1} s.\n")?;
    for s in &stages {
        writeln!(md, "## {} ({})\n", s.id, s.meta.stage)?;
        if let Some(kind) = crate::registry::find(&s.meta.stage) {
            writeln!(md, "{}.\n", capitalised(kind.about))?;
        }
        if !s.meta.parents.is_empty() {
            let parents: Vec<String> = s
                .meta
                .parents
                .iter()
                .map(|p| {
                    format!(
                        "{} = `{}` ({})",
                        p.role,
                        p.path,
                        &p.content_hash[..19.min(p.content_hash.len())]
                    )
                })
                .collect();
            writeln!(md, "From {}.\n", parents.join(", "))?;
        }
        writeln!(md, "| metric | final |\n|---|---:|")?;
        for k in TABLE_KEYS {
            if let Some(v) = s.meta.metrics.get(k) {
                writeln!(md, "| {k} | {} |", fmt(v))?;
            }
        }
        writeln!(md)?;
        let marks = health_summary(&mut md, &s.metrics)?;
        let slug = s.id.replace(['/', '.'], "_");
        let mut figures = vec![];
        // what the registry draws for this kind (nothing for a kind it does not know)
        let Some(kind) = crate::registry::find(&s.meta.stage) else {
            continue;
        };
        for (name, title, keys) in kind.report.charts {
            let lines: Vec<(String, Vec<(f64, f64)>)> = keys
                .iter()
                .map(|k| (k.to_string(), series(&s.metrics, k)))
                .collect();
            let file = plots.join(format!("{slug}-{name}.svg"));
            if plot(
                &file,
                &format!("{} — {title}", s.id),
                kind.report.x,
                &lines,
                &marks,
            )? {
                figures.push(format!("![{title}](plots/{slug}-{name}.svg)"));
            }
        }
        // PPO's and GRPO's `score.judges`: each judge's batch mean (`reward_<label>`)
        let judged: Vec<(String, Vec<(f64, f64)>)> = judge_keys(&s.meta.config)
            .into_iter()
            .map(|k| {
                let points = series(&s.metrics, &k);
                (k, points)
            })
            .collect();
        let file = plots.join(format!("{slug}-judges.svg"));
        let title = "reward per judge (score.judges)";
        if plot(
            &file,
            &format!("{} — {title}", s.id),
            kind.report.x,
            &judged,
            &marks,
        )? {
            figures.push(format!("![{title}](plots/{slug}-judges.svg)"));
        }
        for f in figures {
            writeln!(md, "{f}\n")?;
        }
        if let Some(extra) = kind.report.extra {
            extra(&mut md, &s.dir)?;
        }
    }
    policies_compared(&mut md, root)?;
    let path = root.join("report.md");
    candor_core::output::write_atomic(&path, md.as_bytes())?;
    println!("report: {}", path.display());
    Ok(())
}

/// The `reward_<label>` keys of a stage config's `score.judges` (none without them).
fn judge_keys(config: &Value) -> Vec<String> {
    let list = config.pointer("/score/judges").cloned().unwrap_or_default();
    serde_json::from_value::<Vec<candor_train::score::WeightedJudge>>(list)
        .unwrap_or_default()
        .iter()
        .map(|j| j.metric_key())
        .collect()
}

/// A "Run health" table for a stage whose log has tripped `health_*` signals (each: the
/// first and last step it tripped at, how often, its last value); returns the steps where
/// any tripped, for the plots.
fn health_summary(md: &mut String, m: &MetricsLog) -> Result<Vec<f64>> {
    let mut steps = vec![];
    let mut rows = vec![];
    for key in candor_train::health::HEALTH_KEYS {
        let hits = series(m, key);
        if hits.is_empty() {
            continue;
        }
        steps.extend(hits.iter().map(|&(x, _)| x));
        rows.push(format!(
            "| {key} | {} | {} | {} | {:.4} |",
            hits[0].0,
            hits.last().unwrap().0,
            hits.len(),
            hits.last().unwrap().1
        ));
    }
    if !rows.is_empty() {
        writeln!(
            md,
            "**Run health: {} signal(s) tripped** (red lines on the plots).\n\n| signal | first at | last at | times | last value |\n|---|---:|---:|---:|---:|",
            rows.len()
        )?;
        for r in rows {
            writeln!(md, "{r}")?;
        }
        writeln!(md)?;
    }
    steps.sort_by(f64::total_cmp);
    steps.dedup();
    Ok(steps)
}

/// The held-out responses PPO logged before training (the SFT policy) and at its last
/// evaluation (the PPO policy), for the same prompts and sampling seed.
pub fn side_by_side(md: &mut String, ppo_dir: &Path) -> Result<()> {
    let samples = MetricsLog::read_file(&ppo_dir.join("samples.jsonl"), None)?;
    if samples.records.is_empty() {
        return Ok(());
    }
    let last_step = samples
        .records
        .iter()
        .filter_map(|r| r.get("step")?.as_u64())
        .max()
        .unwrap_or(0);
    let mut by_prompt: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    for r in &samples.records {
        let (Some(step), Some(p), Some(resp)) = (
            r.get("step").and_then(Value::as_u64),
            r.get("prompt").and_then(Value::as_str),
            r.get("response").and_then(Value::as_str),
        ) else {
            continue;
        };
        let e = by_prompt.entry(p.to_string()).or_default();
        if step == 0 {
            e.0 = Some(resp.to_string());
        } else if step == last_step {
            e.1 = Some(resp.to_string());
        }
    }
    let meta = CandorMeta::read(ppo_dir)?;
    let judge = meta
        .as_ref()
        .and_then(|m| {
            m.config
                .get("eval")
                .and_then(|e| e.get("judge"))
                .and_then(Value::as_str)
                .map(String::from)
        })
        .or_else(|| {
            meta.as_ref().and_then(|m| {
                m.config
                    .get("score")?
                    .get("judge")?
                    .as_str()
                    .map(String::from)
            })
        });
    let judge = judge.and_then(|j| candor_judge::judge_by_name(&j).ok());
    // the stage that logged the samples: PPO (iterations) or DPO (steps)
    let (name, unit) = match meta.as_ref().map(|m| m.stage.as_str()) {
        Some("ppo") | None => ("PPO".to_string(), "iteration"),
        Some(other) => (other.to_uppercase(), "step"),
    };
    writeln!(
        md,
        "### SFT vs {name} on held-out prompts ({unit} 0 vs {last_step})\n"
    )?;
    let judged = judge.is_some();
    if judged {
        writeln!(
            md,
            "| prompt | SFT policy | judge | {name} policy | judge |\n|---|---|---:|---|---:|"
        )?;
    } else {
        writeln!(md, "| prompt | SFT policy | {name} policy |\n|---|---|---|")?;
    }
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    for (p, (a, b)) in by_prompt {
        let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
        match &judge {
            Some(j) => {
                let sa = candor_judge::score_with_reference(j.as_ref(), &p, &a, None)
                    .map(|x| format!("{x:+.3}"))
                    .unwrap_or_default();
                let sb = candor_judge::score_with_reference(j.as_ref(), &p, &b, None)
                    .map(|x| format!("{x:+.3}"))
                    .unwrap_or_default();
                writeln!(
                    md,
                    "| {} | {} | {sa} | {} | {sb} |",
                    cell(&p),
                    cell(&a),
                    cell(&b)
                )?;
            }
            None => writeln!(md, "| {} | {} | {} |", cell(&p), cell(&a), cell(&b))?,
        }
    }
    writeln!(md)?;
    Ok(())
}

/// The policies `eval` stages measured on the same prompt file (`candor eval` of an `lm`
/// model on prompts: judge score, KL to the reference, response length), one row each with
/// the training time of the stage that made the model, then their responses to the same
/// prompts side by side: e.g. SFT, PPO and DPO of configs/recipes/tiny-compare.yaml.
fn policies_compared(md: &mut String, root: &Path) -> Result<()> {
    /// An eval stage's directory name, metrics and (prompt, response) samples.
    type Measured = (String, Value, Vec<(String, String)>);
    let mut evals: Vec<Measured> = vec![];
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    dirs.sort();
    for dir in dirs {
        let Ok(text) = std::fs::read_to_string(dir.join("eval.json")) else {
            continue;
        };
        let Ok(m) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if m.get("judge_score").is_none() && m.get("kl").is_none() {
            continue;
        }
        let samples = MetricsLog::read_file(&dir.join("samples.jsonl"), None)?
            .records
            .iter()
            .filter_map(|r| {
                Some((
                    r.get("prompt")?.as_str()?.to_string(),
                    r.get("response")?.as_str()?.to_string(),
                ))
            })
            .collect();
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        evals.push((name, m, samples));
    }
    if evals.is_empty() {
        return Ok(());
    }
    // the model each eval stage measured, and the time its training took (the recipe's record)
    let trained_secs = |eval_name: &str| -> Option<f64> {
        let rec =
            std::fs::read_to_string(root.join(".recipe").join(format!("{eval_name}.json"))).ok()?;
        let rec: Value = serde_json::from_str(&rec).ok()?;
        let model = rec
            .pointer("/config/model")
            .and_then(Value::as_str)?
            .to_string();
        let meta = CandorMeta::read(Path::new(&model)).ok()??;
        Some(meta.elapsed_sec)
    };
    writeln!(md, "## Policies compared on held-out prompts\n")?;
    writeln!(
        md,
        "| eval stage | judge_score | kl (to the reference) | response_len | training time (s) |\n|---|---:|---:|---:|---:|"
    )?;
    let num = |m: &Value, k: &str| m.get(k).map(fmt).unwrap_or_else(|| "-".into());
    for (name, m, _) in &evals {
        writeln!(
            md,
            "| {name} | {} | {} | {} | {} |",
            num(m, "judge_score"),
            num(m, "kl"),
            num(m, "response_len"),
            trained_secs(name).map_or("-".into(), |t| format!("{t:.1}"))
        )?;
    }
    writeln!(md)?;
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let shown = 5;
    writeln!(
        md,
        "| prompt | {} |",
        evals
            .iter()
            .map(|e| e.0.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    )?;
    writeln!(md, "|---|{}", "---|".repeat(evals.len()))?;
    for (i, (prompt, _)) in evals[0].2.iter().enumerate().take(shown) {
        let row: Vec<String> = evals
            .iter()
            .map(|e| {
                e.2.get(i)
                    .filter(|(p, _)| p == prompt)
                    .map_or(String::new(), |(_, r)| cell(r))
            })
            .collect();
        writeln!(md, "| {} | {} |", cell(prompt), row.join(" | "))?;
    }
    writeln!(md)?;
    Ok(())
}
