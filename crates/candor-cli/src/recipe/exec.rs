//! Running a planned recipe: fingerprints, skip decisions, and each stage kind's call.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candor_core::checkpoint::{content_hash, CandorMeta};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::plan::{Kind, Planned, Recipe};
use super::RunArgs;

/// A `model` stage: an existing checkpoint to start from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelStage {
    /// A checkpoint directory (candor's or a Hugging Face one) or hf:ORG/NAME[@REVISION].
    pub path: String,
}

/// An `import` stage: a llama.cpp GGUF file dequantized into a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportStage {
    pub gguf: PathBuf,
    /// f32 or bf16.
    #[serde(default = "d_dtype")]
    pub dtype: String,
}
fn d_dtype() -> String {
    "f32".into()
}

/// A `tokenizer` stage: train a byte-level BPE on a corpus.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerStage {
    pub corpus: Vec<PathBuf>,
    pub vocab_size: usize,
}

/// A `sample` stage: K candidates per prompt from a model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleStage {
    pub model: PathBuf,
    pub prompts: PathBuf,
    #[serde(default = "d_k")]
    pub k: usize,
    #[serde(default = "d_new")]
    pub max_new_tokens: usize,
    #[serde(default = "d_temp")]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default = "d_top_p")]
    pub top_p: f64,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Cap on prompts used (0 = all).
    #[serde(default)]
    pub max_prompts: usize,
}
fn d_k() -> usize {
    4
}
fn d_new() -> usize {
    32
}
fn d_temp() -> f64 {
    1.0
}
fn d_top_p() -> f64 {
    1.0
}
fn d_seed() -> u64 {
    1
}

/// A `rank` stage: rank candidates with a rule judge (or a person, without one).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankStage {
    pub input: PathBuf,
    #[serde(default)]
    pub judge: Option<String>,
}

/// An `eval` stage: `candor eval` of a model on a data file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalStage {
    pub model: PathBuf,
    pub data: PathBuf,
}

fn typed<T: serde::de::DeserializeOwned + Serialize>(p: &Planned) -> Result<T> {
    Ok(candor_core::config::from_value::<T>(
        p.config.clone(),
        &p.origin,
    )?)
}

/// The stage's effective config (defaults filled in) as JSON: what its fingerprint covers.
fn effective(p: &Planned) -> Result<serde_json::Value> {
    Ok(match p.kind {
        Kind::Model => serde_json::to_value(typed::<ModelStage>(p)?)?,
        Kind::Import => serde_json::to_value(typed::<ImportStage>(p)?)?,
        Kind::Tokenizer => serde_json::to_value(typed::<TokenizerStage>(p)?)?,
        Kind::Pretrain => serde_json::to_value(typed::<candor_pretrain::PretrainConfig>(p)?)?,
        Kind::Sft => serde_json::to_value(typed::<candor_sft::SftConfig>(p)?)?,
        Kind::Sample => serde_json::to_value(typed::<SampleStage>(p)?)?,
        Kind::Rank => serde_json::to_value(typed::<RankStage>(p)?)?,
        Kind::Reward => serde_json::to_value(typed::<candor_reward::RewardConfig>(p)?)?,
        Kind::Ppo => serde_json::to_value(typed::<candor_ppo::PpoConfig>(p)?)?,
        Kind::Eval => serde_json::to_value(typed::<EvalStage>(p)?)?,
    })
}

/// The config keys of each stage kind that name input files: (key, a directory of files is
/// accepted too, an earlier stage may write it so a path under the run's `out` need not
/// exist yet).
fn file_keys(kind: Kind) -> &'static [(&'static str, bool, bool)] {
    match kind {
        Kind::Pretrain => &[("data.files", true, true), ("data.tokenizer", true, true)],
        Kind::Sft | Kind::Reward => &[("data.files", true, true), ("data.heldout", true, true)],
        Kind::Ppo => &[
            ("data.prompts", true, true),
            ("data.heldout_prompts", true, true),
            ("data.ptx_files", true, true),
        ],
        Kind::Sample => &[("prompts", false, false)],
        Kind::Eval => &[("data", false, false)],
        Kind::Import => &[("gguf", false, false)],
        Kind::Tokenizer => &[("corpus", true, false)],
        Kind::Model | Kind::Rank => &[],
    }
}

/// Check a stage's config before anything runs (called while planning): it parses, every
/// file it names exists (unless an earlier stage writes it), and its judge is known.
pub fn check_config(p: &Planned, out: &Path) -> Result<()> {
    effective(p)?;
    for (key, dirs, made_in_run) in file_keys(p.kind) {
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
            let there = if *dirs { f.exists() } else { f.is_file() };
            if !there && !(*made_in_run && f.starts_with(out)) {
                bail!("{}: {key}: {} does not exist", p.origin, f.display());
            }
        }
    }
    if p.kind == Kind::Rank {
        if let Some(j) = typed::<RankStage>(p)?.judge {
            candor_judge::judge_by_name(&j).map_err(|e| anyhow!("{}: judge: {e}", p.origin))?;
        }
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

/// Hash of what a stage produced, or None when it is missing or incomplete.
fn output_hash(p: &Planned) -> Option<String> {
    if p.kind == Kind::Model {
        // someone else's checkpoint: no candor.json to vouch for it, its files are the output
        return content_hash(&p.dir).ok();
    }
    if p.kind.makes_model() {
        let meta = CandorMeta::read(&p.dir).ok()??;
        if !meta.complete {
            return None;
        }
        content_hash(&p.dir).ok()
    } else {
        sha256_file(&p.dir.join(p.kind.output_file()?)).ok()
    }
}

fn fingerprint(kind: Kind, config: &serde_json::Value, inputs: &[(String, String)]) -> String {
    let v = serde_json::json!({"kind": kind.name(), "config": config, "inputs": inputs});
    format!("sha256:{:x}", Sha256::digest(v.to_string().as_bytes()))
}

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
                    p.kind.name(),
                    p.dir.display()
                );
                hashes[i] = current;
                summary.push((p.id.clone(), "skipped", 0.0));
            }
            Decision::Run(reason) if args.dry_run => {
                println!("run   {:<22} {:<9} {reason}", p.id, p.kind.name());
                reruns[i] = true;
                hashes[i] = None;
            }
            Decision::Run(reason) => {
                println!(
                    "run   {:<22} {:<9} {reason} → {}",
                    p.id,
                    p.kind.name(),
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
                    kind: p.kind.name().into(),
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

/// The `--device` spelling of a device, for commands that take one.
fn device_spec(d: &candle_core::Device) -> String {
    match d {
        candle_core::Device::Cpu => "cpu".into(),
        candle_core::Device::Cuda(_) => "cuda".into(),
        candle_core::Device::Metal(_) => "metal".into(),
    }
}

/// Run one stage in-process. A model stage whose directory holds an incomplete checkpoint
/// made from the same config resumes it; anything else there is replaced.
fn run_stage(p: &Planned, device: &candle_core::Device, forced: bool) -> Result<()> {
    let resume = !forced
        && p.kind.makes_model()
        && CandorMeta::read(&p.dir)
            .ok()
            .flatten()
            .is_some_and(|m| !m.complete && m.config == effective(p).unwrap_or_default());
    let overwrite = !resume;
    if overwrite && p.dir.exists() && !p.kind.makes_model() {
        std::fs::remove_dir_all(&p.dir).with_context(|| p.dir.display().to_string())?;
    }
    let out = p.dir.clone();
    let origin = p.origin.clone();
    match p.kind {
        Kind::Pretrain => {
            let cfg: candor_pretrain::PretrainConfig = typed(p)?;
            candor_pretrain::run(
                &cfg,
                &candor_pretrain::RunOptions {
                    out,
                    device: device.clone(),
                    resume,
                    overwrite,
                    origin,
                    dist: Default::default(),
                },
            )?;
        }
        Kind::Sft => {
            let cfg: candor_sft::SftConfig = typed(p)?;
            candor_sft::run(
                &cfg,
                &candor_sft::RunOptions {
                    out,
                    device: device.clone(),
                    resume,
                    overwrite,
                    origin,
                    dist: Default::default(),
                },
            )?;
        }
        Kind::Reward => {
            let cfg: candor_reward::RewardConfig = typed(p)?;
            candor_reward::run(
                &cfg,
                &candor_reward::RunOptions {
                    out,
                    device: device.clone(),
                    resume,
                    overwrite,
                    origin,
                    dist: Default::default(),
                },
            )?;
        }
        Kind::Ppo => {
            let cfg: candor_ppo::PpoConfig = typed(p)?;
            candor_ppo::run(
                &cfg,
                &candor_ppo::RunOptions {
                    out,
                    device: device.clone(),
                    resume,
                    overwrite,
                    origin,
                    dist: Default::default(),
                },
            )?;
        }
        // resolved and hashed while planning; nothing to make
        Kind::Model => {}
        Kind::Import => {
            let i: ImportStage = typed(p)?;
            crate::import::run(crate::import::ImportArgs {
                gguf: i.gguf,
                out,
                dtype: i.dtype,
                overwrite: true,
            })?;
        }
        Kind::Tokenizer => {
            let t: TokenizerStage = typed(p)?;
            let docs = candor_data::text::read_corpus(&t.corpus)?;
            let tok = candor_data::Tokenizer::train(docs.iter().map(String::as_str), t.vocab_size)?;
            let w = candor_core::checkpoint::CheckpointWriter::begin(&out)?;
            tok.save(w.path())?;
            w.commit()?;
        }
        Kind::Sample => {
            let s: SampleStage = typed(p)?;
            std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
            let prompts = match s.max_prompts {
                0 => s.prompts.clone(),
                n => {
                    // the first n prompt lines, as a file the sampler reads
                    let text = std::fs::read_to_string(&s.prompts)
                        .with_context(|| s.prompts.display().to_string())?;
                    let path = out.join("prompts.jsonl");
                    let lines: Vec<&str> = text
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .take(n)
                        .collect();
                    candor_core::output::write_atomic(&path, (lines.join("\n") + "\n").as_bytes())?;
                    path
                }
            };
            crate::sample::run(crate::sample::SampleArgs {
                model: s.model,
                prompts,
                k: s.k,
                out: out.join("samples.jsonl"),
                overwrite: true, // the stage reruns because its output is stale
                temperature: s.temperature,
                top_k: s.top_k,
                top_p: s.top_p,
                max_new_tokens: s.max_new_tokens,
                seed: s.seed,
                batch_size: 64,
                max_resample: 4,
                device: device_spec(device),
            })?;
        }
        Kind::Rank => {
            let r: RankStage = typed(p)?;
            std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
            crate::rank::run(crate::rank::RankArgs {
                input: r.input,
                out: out.join("ranked.jsonl"),
                judge: r.judge,
            })?;
        }
        Kind::Eval => {
            let e: EvalStage = typed(p)?;
            crate::eval::eval_to_dir(&e.model, &e.data, &out, device, 16)?;
        }
    }
    Ok(())
}
