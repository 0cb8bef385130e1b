//! `candor eval`: a checkpoint's metrics on a data file, as one line or (`--json`) one JSON
//! object on stdout and nothing else.
//!
//! What is measured depends on the checkpoint's head and the kind of data, told apart by
//! the fields of the first JSONL line ([`DataFormat::of`]):
//!
//! | head    | data                                              | metrics                                  |
//! |---------|---------------------------------------------------|------------------------------------------|
//! | `lm`    | text: plain text files, or JSONL `text`           | `eval_loss`, `eval_ppl` per token, `tokens` |
//! | `lm`    | SFT: JSONL `prompt`+`response`, or `messages`     | `eval_loss`, `eval_ppl` per response token, `tokens`, `examples` |
//! | `score` | preferences: `chosen`/`rejected`, or ranked `responses` | `eval_accuracy`, `eval_margin`, `eval_loss`, `pairs`, `prompts` (candor-reward) |
//! | `lm`    | prompts: JSONL `prompt` alone (+ fields for judges) | the policy answers each: `judge_score` (`--judge`), `kl` to `--reference` on its own samples, `response_len`, `prompts`; with `--out`, the responses in `samples.jsonl` |
//!
//! A new pairing (a policy's reward on prompts, say) is one more arm in [`evaluate`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use candor_core::checkpoint::Head;
use candor_data::sft::{chat_tokenizer, load_sft};
use candor_data::text::{pack_all, read_corpus, tokenize_documents};
use candor_data::tokenizer::EOT;
use candor_data::Tokenizer;
use candor_model::io::{load_frozen, read_config};
use candor_train::batch::LmExample;
use candor_train::lm::evaluate as lm_evaluate;
use clap::Args;
use serde_json::{json, Map, Value};

use crate::device;

#[derive(Args)]
pub struct EvalArgs {
    /// Checkpoint directory, or hf:ORG/NAME in the Hugging Face cache.
    #[arg(long)]
    pub model: PathBuf,
    /// Data file: text (.txt, or .jsonl with `text`), SFT JSONL, or preference JSONL.
    #[arg(long)]
    pub data: PathBuf,
    /// Print one JSON object of the metrics and nothing else.
    #[arg(long)]
    pub json: bool,
    /// Also write the metrics to DIR/eval.json (atomically).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub policy: PolicyEvalArgs,
}

/// How a policy answers a prompt file (an `lm` model on JSONL `{"prompt", ...}` lines): the
/// sampling, and what its responses are measured by. PPO and DPO measure their policies the
/// same way on their held-out prompts, so `candor eval` of an SFT, PPO and DPO model with one
/// seed compares them on the same footing.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct PolicyEvalArgs {
    /// A rule judge (`sentiment`, `reference`, ...) scoring each response: `judge_score`.
    #[arg(long)]
    pub judge: Option<String>,
    /// A checkpoint with the model's tokenizer (usually the SFT model): `kl`, the mean over
    /// the responses of Σ_t log π(y_t) − log π_ref(y_t), at the sampling temperature.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seeds the sampling (the stream PPO and DPO evaluate with, for their `seed`).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Only the first N prompts (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_prompts: usize,
}

impl Default for PolicyEvalArgs {
    fn default() -> Self {
        PolicyEvalArgs {
            judge: None,
            reference: None,
            max_new_tokens: 32,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 1,
            max_prompts: 0,
        }
    }
}

/// Metrics by name (DESIGN.md's vocabulary) and counts.
pub type Metrics = Map<String, Value>;

/// The kinds of data `candor eval` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFormat {
    /// Plain text, or JSONL with `text`.
    Text,
    /// `prompt` + `response`, or `messages`.
    Sft,
    /// `chosen`/`rejected`, or ranked `responses`.
    Preference,
    /// `prompt` alone (and fields for judges).
    Prompts,
}

impl DataFormat {
    /// Plain text (`.txt`, `.md`, anything not a dataset file) is text; a dataset file
    /// (JSONL, JSON, Parquet, compressed, `hf:`) is told by its first record's fields.
    pub fn of(path: &Path) -> Result<DataFormat> {
        let name = path.to_string_lossy();
        if !candor_data::dataset::is_hf_spec(path)
            && !candor_data::dataset::DATA_EXTENSIONS
                .iter()
                .any(|e| name.ends_with(e))
        {
            return Ok(DataFormat::Text);
        }
        let records = candor_data::dataset::read_records(path, &Default::default())?;
        let Some(first) = records.first() else {
            bail!("{}: holds no lines", path.display());
        };
        let has = |k: &str| first.fields.contains_key(k);
        Ok(
            if has("chosen") || has("rejected") || has("responses") || has("label") {
                DataFormat::Preference
            } else if has("messages") || has("response") || has("completion") {
                DataFormat::Sft
            } else if has("text") {
                DataFormat::Text
            } else if has("prompt") {
                DataFormat::Prompts
            } else {
                return Err(first
                    .err("cannot tell what data this is: expected `text` (text), `prompt` and `response`, `prompt` and `completion` or `messages` (SFT), or `chosen`/`rejected`, `responses` or `completion` and `label` (preferences), or `prompt` alone (prompts)")
                    .into());
            },
        )
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    let dev = device(&args.device)?;
    let model_dir = candor_model::resolve_model_dir(&args.model)?;
    let metrics = match &args.out {
        Some(out) => eval_to_dir(
            &model_dir,
            &args.data,
            out,
            &dev,
            args.batch_size,
            &args.policy,
        )?,
        None => evaluate(&model_dir, &args.data, &dev, args.batch_size, &args.policy)?.0,
    };
    if args.json {
        println!("{}", Value::Object(metrics));
    } else {
        let fields: Vec<String> = metrics
            .iter()
            .map(|(k, v)| match v.as_f64() {
                Some(x) if !v.is_u64() => format!("{k} {x:.4}"),
                _ => format!("{k} {v}"),
            })
            .collect();
        println!(
            "eval: {} on {}: {}",
            args.model.display(),
            args.data.display(),
            fields.join(" | ")
        );
    }
    Ok(())
}

/// Responses a policy gave to a prompt file (`prompt`, `response` records), for `samples.jsonl`.
pub type Samples = Vec<Map<String, Value>>;

/// Measure a checkpoint on a data file: the pairing of its head and the data's kind; a
/// policy on prompts also returns its responses.
pub fn evaluate(
    model: &Path,
    data: &Path,
    dev: &Device,
    batch_size: usize,
    policy: &PolicyEvalArgs,
) -> Result<(Metrics, Samples)> {
    candor_core::checkpoint::require_model_dir(model)?;
    let head = read_config(model)?.head();
    let none = |m: Result<Metrics>| m.map(|m| (m, vec![]));
    match (head, DataFormat::of(data)?) {
        (Head::Lm, DataFormat::Text) => none(text_metrics(model, data, dev, batch_size)),
        (Head::Lm, DataFormat::Sft) => none(sft_metrics(model, data, dev, batch_size)),
        (Head::Lm, DataFormat::Prompts) => policy_metrics(model, data, dev, policy),
        // the reward-model branch: pairwise accuracy and margin on ranked responses
        (Head::Score, DataFormat::Preference) => none(reward_metrics(model, data, dev, batch_size)),
        (Head::Lm, DataFormat::Preference) => bail!(
            "{}: preference data measures a reward model, but {} is a language model (lm head)",
            data.display(),
            model.display()
        ),
        (Head::Score, _) => bail!(
            "{}: is a reward model (score head); evaluate it on preference data (`chosen`/`rejected` or ranked `responses`), not {}",
            model.display(),
            data.display()
        ),
    }
}

/// [`evaluate`], and write the metrics to `out/eval.json` and a policy's responses to
/// `out/samples.jsonl` (a directory written atomically).
pub fn eval_to_dir(
    model: &Path,
    data: &Path,
    out: &Path,
    dev: &Device,
    batch_size: usize,
    policy: &PolicyEvalArgs,
) -> Result<Metrics> {
    let (metrics, samples) = evaluate(model, data, dev, batch_size, policy)?;
    let w = candor_core::checkpoint::CheckpointWriter::begin(out)?;
    let path = w.path().join("eval.json");
    std::fs::write(&path, serde_json::to_string_pretty(&metrics)? + "\n")
        .with_context(|| path.display().to_string())?;
    if !samples.is_empty() {
        let path = w.path().join("samples.jsonl");
        let lines: Vec<String> = samples
            .iter()
            .map(|r| Value::Object(r.clone()).to_string())
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n")
            .with_context(|| path.display().to_string())?;
    }
    w.commit()?;
    Ok(metrics)
}

/// Loss and perplexity per token of a text: documents separated by `<|endoftext|>` (as in
/// pretraining), cut into windows of the model's context, every token predicted once.
fn text_metrics(model_dir: &Path, data: &Path, dev: &Device, batch_size: usize) -> Result<Metrics> {
    let model = load_frozen(model_dir, dev)?;
    let tok = Tokenizer::from_dir(model_dir)?;
    let sep = tok
        .token_id(EOT)
        .or(tok.eos_id())
        .context("the tokenizer has no end-of-text token to separate documents")?;
    let docs = read_corpus(&[data.to_path_buf()])?;
    let stream = tokenize_documents(&tok, &docs, sep)?;
    let ctx = model.config.max_position_embeddings.min(2048);
    let examples: Vec<LmExample> = pack_all(&stream, ctx)
        .into_iter()
        .map(LmExample::dense)
        .collect();
    if examples.is_empty() {
        bail!(
            "{}: too little text to evaluate (fewer than two tokens)",
            data.display()
        );
    }
    let e = lm_evaluate(&model, &examples, batch_size, 0, tok.pad_id())?;
    Ok(to_metrics(
        json!({"eval_loss": e.loss, "eval_ppl": e.loss.exp(), "tokens": e.tokens}),
    ))
}

/// Loss and perplexity per response token of SFT data, rendered and masked exactly as SFT
/// trains (the checkpoint's chat template, or ChatML for a model that has none).
fn sft_metrics(model_dir: &Path, data: &Path, dev: &Device, batch_size: usize) -> Result<Metrics> {
    let model = load_frozen(model_dir, dev)?;
    let (tok, template) = chat_tokenizer(&Tokenizer::from_dir(model_dir)?, None)?;
    let examples: Vec<LmExample> = load_sft(
        &[data.to_path_buf()],
        &tok,
        &template,
        model.config.max_position_embeddings,
        false,
    )?
    .examples
    .into_iter()
    .map(|(e, _, _)| LmExample {
        tokens: e.tokens,
        targets: e.trained,
        segments: None,
    })
    .collect();
    let e = lm_evaluate(&model, &examples, batch_size, 0, tok.pad_id())?;
    Ok(to_metrics(
        json!({"eval_loss": e.loss, "eval_ppl": e.loss.exp(), "tokens": e.tokens, "examples": examples.len()}),
    ))
}

/// Pairwise accuracy, margin and loss of a reward model on a preference file.
fn reward_metrics(
    model_dir: &Path,
    data: &Path,
    dev: &Device,
    batch_size: usize,
) -> Result<Metrics> {
    let stats =
        candor_reward::score::RewardModel::load(model_dir, dev)?.evaluate_file(data, batch_size)?;
    Ok(to_metrics(serde_json::to_value(stats)?))
}

/// A policy's answers to held-out prompts: the judge's mean score, the KL to a reference on
/// its own samples, the response length ([`candor_train::rollout::evaluate_policy`], what
/// PPO and DPO report), sampled from the stream PPO and DPO evaluate with.
fn policy_metrics(
    model_dir: &Path,
    data: &Path,
    dev: &Device,
    o: &PolicyEvalArgs,
) -> Result<(Metrics, Samples)> {
    use candor_train::rollout::{evaluate_policy, load_prompts, Prompt};
    let policy = load_frozen(model_dir, dev)?;
    let tok = Tokenizer::from_dir(model_dir)?;
    let template = candor_data::chat::ChatTemplate::for_tokenizer(&tok);
    let ctx = policy.config.max_position_embeddings;
    let mut prompts = load_prompts(
        data,
        &tok,
        &template,
        o.max_new_tokens,
        "--max-new-tokens",
        ctx,
    )?;
    if o.max_prompts > 0 {
        prompts.truncate(o.max_prompts);
    }
    let reference = match &o.reference {
        Some(r) => {
            let r = candor_model::resolve_model_dir(r)?;
            if !candor_train::score::same_tokenizer(&tok, &Tokenizer::from_dir(&r)?) {
                bail!(
                    "--reference {}: its tokenizer differs from {}'s; the KL compares both models' log-probs of the same tokens",
                    r.display(),
                    model_dir.display()
                );
            }
            Some(load_frozen(&r, dev)?)
        }
        None => None,
    };
    let judge = o
        .judge
        .as_deref()
        .map(candor_train::score::judge)
        .transpose()?;
    let ps: Vec<&Prompt> = prompts.iter().collect();
    let params = candor_model::generate::SamplingParams {
        max_new_tokens: o.max_new_tokens,
        temperature: o.temperature,
        top_k: o.top_k,
        top_p: o.top_p,
    };
    let stop = candor_data::chat::stop_tokens(&tok);
    let mut rng = candor_core::rng::Rng::derive(o.seed, "eval");
    let e = evaluate_policy(
        &policy,
        reference.as_ref(),
        judge.as_deref(),
        &tok,
        &ps,
        &params,
        &stop,
        &mut rng,
    )?;
    let mut m = Metrics::new();
    if let Some(j) = e.judge_score {
        m.insert("judge_score".into(), json!(j));
    }
    if let Some(kl) = e.kl {
        m.insert("kl".into(), json!(kl));
    }
    m.insert("response_len".into(), json!(e.response_len));
    m.insert("prompts".into(), json!(ps.len()));
    let samples = ps
        .iter()
        .zip(&e.responses.texts)
        .map(|(p, r)| to_metrics(json!({"prompt": p.text, "response": r})))
        .collect();
    Ok((m, samples))
}

fn to_metrics(v: Value) -> Metrics {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("metrics are built as objects"),
    }
}
