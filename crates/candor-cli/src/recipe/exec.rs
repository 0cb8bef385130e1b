//! Running a planned recipe: fingerprints, skip decisions, and each stage kind's call.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candor_core::checkpoint::{content_hash, CandorMeta};
use candor_train::ckpt::RunOptions;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::plan::{Planned, Recipe};
use super::RunArgs;
use crate::registry::{FileKey, StageKind, Waiting};

/// The stage's effective config (defaults filled in) as JSON: what its fingerprint covers.
fn effective(p: &Planned) -> Result<serde_json::Value> {
    (p.kind.effective)(&p.config, &p.origin)
}

/// Check a stage's config before anything runs (called while planning): it parses, every
/// file it names exists (unless an earlier stage writes it), and its judge is known.
pub fn check_config(p: &Planned, out: &Path) -> Result<()> {
    effective(p)?;
    for FileKey {
        key,
        dirs,
        made_in_run,
    } in p.kind.file_keys
    {
        let mut v = Some(&p.config);
        for part in key.split('.') {
            v = v.and_then(|v| v.get(part));
        }
        let paths: Vec<&str> = match v {
            Some(serde_yaml::Value::String(s)) => vec![s.as_str()],
            Some(serde_yaml::Value::Sequence(xs)) => xs.iter().filter_map(|x| x.as_str()).collect(),
            _ => vec![],
        };
        for f in paths {
            let f = Path::new(f);
            // hf:ORG/NAME datasets are resolved in the cache when the stage reads them
            let there =
                candor_data::dataset::is_hf_spec(f) || if *dirs { f.exists() } else { f.is_file() };
            let made_here = *made_in_run && f.starts_with(out);
            if !(there || made_here) {
                bail!("{}: {key}: {} does not exist", p.origin, f.display());
            }
        }
    }
    if let Some(check) = p.kind.check {
        check(&p.config, &p.origin)?;
    }
    Ok(())
}

/// What the runner remembers about a finished stage (`<out>/.recipe/<id>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    kind: String,
    fingerprint: String,
    config: serde_json::Value,
    inputs: Vec<(String, String)>,
    output_hash: String,
    elapsed_sec: f64,
}

fn record_path(recipe: &Recipe, p: &Planned) -> PathBuf {
    recipe
        .out
        .join(".recipe")
        .join(format!("{}.json", p.id.replace('/', "--")))
}

fn read_record(path: &Path) -> Option<Record> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    Ok(format!("sha256:{:x}", Sha256::digest(&bytes)))
}

/// What a people-made stage still waits for (None: not made by people, or its input is not
/// there yet).
fn waiting(p: &Planned) -> Option<Waiting> {
    p.kind
        .waits
        .and_then(|w| w(&p.config, &p.origin, &p.dir).ok().flatten())
}

/// Hash of what a stage produced, or None when it is missing or incomplete.
fn output_hash(p: &Planned) -> Option<String> {
    if p.kind.waits.is_some() && waiting(p).is_some_and(|w| w.left > 0) {
        return None; // people are still at it: what is there is not the stage's output yet
    }
    if p.kind.locate.is_some() {
        // someone else's checkpoint: no candor.json to vouch for it, its files are the output
        return content_hash(&p.dir).ok();
    }
    if p.kind.makes_model {
        let meta = CandorMeta::read(&p.dir).ok()??;
        if !meta.complete {
            return None;
        }
        content_hash(&p.dir).ok()
    } else {
        sha256_file(&p.dir.join(p.kind.output_file?)).ok()
    }
}

fn fingerprint(
    kind: &StageKind,
    config: &serde_json::Value,
    inputs: &[(String, String)],
) -> String {
    let v = serde_json::json!({"kind": kind.name, "config": config, "inputs": inputs});
    format!("sha256:{:x}", Sha256::digest(v.to_string().as_bytes()))
}

/// `candor run` stopped at a stage whose output people are still making (exit status 75,
/// EX_TEMPFAIL: run it again later).
#[derive(Debug)]
pub struct WaitingForPeople {
    pub stage: String,
    pub left: usize,
}

impl std::fmt::Display for WaitingForPeople {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stage `{}` waits for {} more ranking(s) from people; run the recipe again once they are in",
            self.stage, self.left
        )
    }
}

impl std::error::Error for WaitingForPeople {}

enum Decision {
    Skip,
    Run(String),
}

pub fn execute(recipe: &Recipe, args: &RunArgs) -> Result<()> {
    let device_spec = args.device.clone().unwrap_or_else(|| recipe.device.clone());
    let find = |name: &str| -> Result<usize> {
        recipe
            .stages
            .iter()
            .position(|p| p.name == name || p.id == name)
            .ok_or_else(|| anyhow!("no stage named `{name}` in {}", recipe.path.display()))
    };
    let from = args.from.as_deref().map(find).transpose()?;
    let only = args.only.as_deref().map(find).transpose()?;
    let device = if args.dry_run {
        None
    } else {
        // one `candor run` per run directory: a second is refused at once
        candor_core::output::lock_output(&recipe.out)?;
        Some(crate::device(&device_spec)?)
    };
    let started = Instant::now();
    // output hashes as they become known (None = not produced, or will change this run)
    let mut hashes: Vec<Option<String>> = vec![None; recipe.stages.len()];
    let mut reruns = vec![false; recipe.stages.len()];
    let mut summary = vec![];
    for (i, p) in recipe.stages.iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            hashes[i] = output_hash(p);
            continue;
        }
        let config = effective(p)?;
        let mut inputs = vec![];
        let mut upstream_rerun = None;
        for (role, j) in &p.inputs {
            if reruns[*j] && args.dry_run {
                upstream_rerun = Some(recipe.stages[*j].id.clone());
            }
            match &hashes[*j] {
                Some(h) => inputs.push((role.clone(), h.clone())),
                None if args.dry_run => upstream_rerun = upstream_rerun.or(Some(recipe.stages[*j].id.clone())),
                None => bail!(
                    "stage `{}`: its input `{}` ({}) has not been produced; run the recipe without --only",
                    p.id,
                    recipe.stages[*j].id,
                    recipe.stages[*j].dir.display()
                ),
            }
        }
        let fp = fingerprint(p.kind, &config, &inputs);
        let rec_path = record_path(recipe, p);
        let record = read_record(&rec_path);
        let current = output_hash(p);
        let forced = from.is_some_and(|f| i >= f) || only == Some(i);
        let decision = if forced {
            Decision::Run(if only == Some(i) {
                "--only".into()
            } else {
                "--from".into()
            })
        } else if let Some(up) = upstream_rerun {
            Decision::Run(format!("upstream `{up}` reruns"))
        } else {
            match (&record, &current) {
                (_, None) if p.dir.exists() => Decision::Run("output incomplete (resumes)".into()),
                (_, None) => Decision::Run("no output yet".into()),
                (None, Some(_)) => Decision::Run("output not made by this recipe".into()),
                (Some(r), Some(h)) if r.fingerprint == fp && &r.output_hash == h => Decision::Skip,
                (Some(r), Some(h)) if &r.output_hash != h => {
                    Decision::Run("output changed since it was made".into())
                }
                (Some(r), Some(_)) => Decision::Run(why_changed(r, &config, &inputs, recipe, p)),
            }
        };
        match decision {
            Decision::Skip => {
                println!(
                    "skip  {:<22} {:<9} up to date ({})",
                    p.id,
                    p.kind.name,
                    p.dir.display()
                );
                hashes[i] = current;
                summary.push((p.id.clone(), "skipped", 0.0));
            }
            Decision::Run(_) if waiting(p).is_some_and(|w| w.left > 0) => {
                // people make this stage's output: stop here until they have finished
                let w = waiting(p).unwrap();
                println!(
                    "wait  {:<22} {:<9} {} of {} rankings still needed → {}",
                    p.id,
                    p.kind.name,
                    w.left,
                    w.needed,
                    p.dir.join(p.kind.output_file.unwrap_or_default()).display()
                );
                if args.dry_run {
                    reruns[i] = true;
                    hashes[i] = None;
                    continue;
                }
                // the server appends to a file in the stage's directory
                std::fs::create_dir_all(&p.dir).with_context(|| p.dir.display().to_string())?;
                println!("      serve the page:  {}", w.serve);
                println!("      each labeller opens {}", w.url);
                println!(
                    "      then run again:  candor run {}",
                    recipe.path.display()
                );
                return Err(WaitingForPeople {
                    stage: p.id.clone(),
                    left: w.left,
                }
                .into());
            }
            Decision::Run(reason) if args.dry_run => {
                println!("run   {:<22} {:<9} {reason}", p.id, p.kind.name);
                reruns[i] = true;
                hashes[i] = None;
            }
            Decision::Run(reason) => {
                println!(
                    "run   {:<22} {:<9} {reason} → {}",
                    p.id,
                    p.kind.name,
                    p.dir.display()
                );
                let t = Instant::now();
                run_stage(p, device.as_ref().unwrap(), forced)
                    .with_context(|| format!("stage `{}`", p.id))?;
                let elapsed = t.elapsed().as_secs_f64();
                let h = output_hash(p).ok_or_else(|| {
                    anyhow!(
                        "stage `{}` finished without a complete output in {}",
                        p.id,
                        p.dir.display()
                    )
                })?;
                let rec = Record {
                    kind: p.kind.name.into(),
                    fingerprint: fp,
                    config,
                    inputs,
                    output_hash: h.clone(),
                    elapsed_sec: elapsed,
                };
                candor_core::output::write_atomic(
                    &rec_path,
                    serde_json::to_string_pretty(&rec)?.as_bytes(),
                )?;
                hashes[i] = Some(h);
                reruns[i] = true;
                summary.push((p.id.clone(), "ran", elapsed));
            }
        }
    }
    if !args.dry_run {
        let ran = summary.iter().filter(|s| s.1 == "ran").count();
        println!(
            "recipe {}: {ran} stage(s) ran, {} skipped, {:.1} s → {}",
            recipe.path.display(),
            summary.len() - ran,
            started.elapsed().as_secs_f64(),
            recipe.out.display()
        );
    }
    Ok(())
}

fn why_changed(
    r: &Record,
    config: &serde_json::Value,
    inputs: &[(String, String)],
    recipe: &Recipe,
    p: &Planned,
) -> String {
    if let Some(k) = candor_train::ckpt::first_difference(&r.config, config, "") {
        return format!("config changed at `{k}`");
    }
    for (role, h) in inputs {
        if !r.inputs.iter().any(|(rr, rh)| rr == role && rh == h) {
            let (_, j) = p.inputs.iter().find(|(rr, _)| rr == role).unwrap();
            return format!("input `{}` changed", recipe.stages[*j].id);
        }
    }
    "inputs changed".into()
}

/// Run one stage in-process. A model stage whose directory holds an incomplete checkpoint
/// made from the same config resumes it; anything else there is replaced.
fn run_stage(p: &Planned, device: &candle_core::Device, forced: bool) -> Result<()> {
    let resume = !forced
        && p.kind.makes_model
        && CandorMeta::read(&p.dir)
            .ok()
            .flatten()
            .is_some_and(|m| !m.complete && m.config == effective(p).unwrap_or_default());
    let overwrite = !resume;
    // what people made is never deleted; a stale stage output of a program is
    if overwrite && p.dir.exists() && !p.kind.makes_model && waiting(p).is_none() {
        std::fs::remove_dir_all(&p.dir).with_context(|| p.dir.display().to_string())?;
    }
    let opts = RunOptions {
        out: p.dir.clone(),
        device: device.clone(),
        resume,
        overwrite,
        origin: p.origin.clone(),
        dist: Default::default(),
    };
    (p.kind.run)(&p.config, &opts)?;
    Ok(())
}
