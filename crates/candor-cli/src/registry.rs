//! The stage registry: one entry per stage kind a recipe can name, as the judges' `JUDGES`
//! table is one entry per judge. Planning (`recipe/plan.rs`), running (`recipe/exec.rs`),
//! the stage commands (`candor sft`, `--show-config`) and the report read an entry; no
//! other code names a stage kind. Adding a training stage is one crate, one entry here and
//! one clap variant in `main.rs` (docs/adding-a-stage.md).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use candor_core::checkpoint::CandorMeta;
use candor_train::ckpt::RunOptions;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

/// One stage kind.
pub struct StageKind {
    /// The `kind:` a recipe writes, and the `stage` a checkpoint's candor.json records.
    pub name: &'static str,
    /// One line for help and docs.
    pub about: &'static str,
    /// Configured by a stage config file (`config:` in the recipe, `--config` on the
    /// command line); otherwise the stage's options are written in the recipe entry.
    pub config_file: bool,
    /// Its output is a model checkpoint directory (hashed by its files), else a data file.
    pub makes_model: bool,
    /// The file a data stage writes in its directory (what its consumers read).
    pub output_file: Option<&'static str>,
    /// The recipe's `seed` is written into the stage's `seed` key.
    pub seeded: bool,
    /// Inputs by the name of an earlier stage.
    pub roles: &'static [Role],
    /// The config keys that name input files, checked before anything runs.
    pub file_keys: &'static [FileKey],
    /// The typed config with its defaults, as JSON: what the fingerprint and candor.json
    /// cover. Errors name the key (`origin` names the config).
    pub effective: fn(&Value, &str) -> Result<serde_json::Value>,
    /// Checks beyond the config's types and files (a judge's name), or none.
    pub check: Option<fn(&Value, &str) -> Result<()>>,
    /// An existing checkpoint: where it is (resolved while planning). Nothing runs for it;
    /// its files are hashed.
    pub locate: Option<fn(&Value, &str) -> Result<PathBuf>>,
    /// A stage whose output people make (rankings on the label page): how much of it is
    /// still missing in the stage's directory (None: this stage's output is not made by
    /// people). `candor run` stops at such a stage until nothing is left, and never deletes
    /// what is there.
    pub waits: Option<WaitsFn>,
    /// Run the stage into `opts.out`; a training stage returns its checkpoint's metadata.
    pub run: fn(&Value, &RunOptions) -> Result<Option<CandorMeta>>,
    /// What a finished training stage's command prints after `<kind>: <dir> (`.
    pub summary: fn(&CandorMeta) -> String,
    /// What `candor report` draws for a checkpoint of this kind.
    pub report: Report,
}

impl std::fmt::Debug for StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// A people-made stage's count of what is missing: (config, origin, stage directory).
pub type WaitsFn = fn(&Value, &str, &Path) -> Result<Option<Waiting>>;

/// What a stage still waits for from people.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    /// Rankings still needed (0: complete), and wanted in all.
    pub left: usize,
    pub needed: usize,
    /// The command that serves the page, and the address to open.
    pub serve: String,
    pub url: String,
}

/// An input of a stage: the `role` key of its recipe entry names an earlier stage, whose
/// output path is written at `key` in this stage's config.
pub struct Role {
    pub role: &'static str,
    pub required: bool,
    pub key: &'static str,
    /// What the producer must be.
    pub from: Source,
    /// `key` holds a list of paths (the producer's is the one element).
    pub list: bool,
}

/// What kind of stage may fill a role.
pub enum Source {
    /// A stage that makes a model checkpoint.
    Model,
    /// A data stage's output file (the kind named, for the error message).
    Data(&'static str),
}

/// A config key naming input files.
pub struct FileKey {
    pub key: &'static str,
    /// A directory of files is accepted too.
    pub dirs: bool,
    /// An earlier stage may write it, so a path under the run's `out` need not exist yet.
    pub made_in_run: bool,
}

/// The charts of a stage's section in `report.md`.
pub struct Report {
    /// The x axis of its curves (`step`, `iteration`).
    pub x: &'static str,
    /// (file suffix, title, metrics.jsonl keys drawn).
    pub charts: &'static [(&'static str, &'static str, &'static [&'static str])],
    /// More of the section, from the checkpoint directory (PPO: SFT vs PPO samples).
    pub extra: Option<fn(&mut String, &Path) -> Result<()>>,
}

const fn role(role: &'static str, required: bool, key: &'static str) -> Role {
    Role {
        role,
        required,
        key,
        from: Source::Model,
        list: false,
    }
}

const fn data_role(role: &'static str, key: &'static str, from: &'static str, list: bool) -> Role {
    Role {
        role,
        required: false,
        key,
        from: Source::Data(from),
        list,
    }
}

const fn file(key: &'static str, dirs: bool, made_in_run: bool) -> FileKey {
    FileKey {
        key,
        dirs,
        made_in_run,
    }
}

const NO_REPORT: Report = Report {
    x: "step",
    charts: &[],
    extra: None,
};

const LM_REPORT: Report = Report {
    x: "step",
    charts: &[("loss", "loss", &["loss", "eval_loss"])],
    extra: None,
};

/// Parse a config into its type (unknown keys rejected, defaults filled in).
pub fn typed<T: DeserializeOwned>(config: &Value, origin: &str) -> Result<T> {
    Ok(candor_core::config::from_value::<T>(
        config.clone(),
        origin,
    )?)
}

fn effective<T: DeserializeOwned + Serialize>(
    config: &Value,
    origin: &str,
) -> Result<serde_json::Value> {
    Ok(serde_json::to_value(typed::<T>(config, origin)?)?)
}

/// A training stage's `run`: its typed config into its library's `run`.
fn train<T: DeserializeOwned>(
    config: &Value,
    opts: &RunOptions,
    run: fn(&T, &RunOptions) -> candor_train::Result<CandorMeta>,
) -> Result<Option<CandorMeta>> {
    Ok(Some(run(&typed::<T>(config, &opts.origin)?, opts)?))
}

/// `key value` of the metrics a summary shows (`-` when absent).
fn metric(meta: &CandorMeta, key: &str) -> String {
    meta.metrics
        .get(key)
        .and_then(|v| v.as_f64())
        .map_or("-".into(), |v| format!("{v:.4}"))
}

fn lm_summary(meta: &CandorMeta) -> String {
    format!(
        "step {}, eval_loss {}",
        meta.step,
        metric(meta, "eval_loss")
    )
}

fn no_summary(_: &CandorMeta) -> String {
    String::new()
}

/// The registry. One entry per stage kind, in pipeline order.
pub static STAGES: &[StageKind] = &[
    StageKind {
        name: "model",
        about: "an existing checkpoint (a directory or hf:ORG/NAME); nothing runs, its files are hashed",
        config_file: false,
        makes_model: true,
        output_file: None,
        seeded: false,
        roles: &[],
        file_keys: &[],
        effective: effective::<ModelStage>,
        check: None,
        locate: Some(|config, at| {
            let spec = config.get("path").and_then(Value::as_str).ok_or_else(|| {
                anyhow!("{at}: `path` (a checkpoint directory or hf:ORG/NAME) is missing")
            })?;
            candor_model::resolve_model_dir(spec).map_err(|e| anyhow!("{at}: {e}"))
        }),
        waits: None,
        run: |_, _| Ok(None), // resolved and hashed while planning; nothing to make
        summary: no_summary,
        report: NO_REPORT,
    },
    StageKind {
        name: "import",
        about: "a llama.cpp GGUF file dequantized into a checkpoint",
        config_file: false,
        makes_model: true,
        output_file: None,
        seeded: false,
        roles: &[],
        file_keys: &[file("gguf", false, false)],
        effective: effective::<ImportStage>,
        check: None,
        locate: None,
        waits: None,
        run: |config, opts| {
            let i: ImportStage = typed(config, &opts.origin)?;
            crate::import::run(crate::import::ImportArgs {
                gguf: i.gguf,
                out: opts.out.clone(),
                dtype: i.dtype,
                overwrite: true,
            })?;
            Ok(None)
        },
        summary: no_summary,
        report: NO_REPORT,
    },
    StageKind {
        name: "tokenizer",
        about: "a byte-level BPE trained on a corpus",
        config_file: false,
        makes_model: false,
        output_file: Some("tokenizer.json"),
        seeded: false,
        roles: &[],
        file_keys: &[file("corpus", true, false)],
        effective: effective::<TokenizerStage>,
        check: None,
        locate: None,
        waits: None,
        run: |config, opts| {
            let t: TokenizerStage = typed(config, &opts.origin)?;
            let docs = candor_data::text::read_corpus(&t.corpus)?;
            let tok = candor_data::Tokenizer::train(docs.iter().map(String::as_str), t.vocab_size)?;
            let w = candor_core::checkpoint::CheckpointWriter::begin(&opts.out)?;
            tok.save(w.path())?;
            w.commit()?;
            Ok(None)
        },
        summary: no_summary,
        report: NO_REPORT,
    },
    StageKind {
        name: "pretrain",
        about: "next-token pretraining from text files",
        config_file: true,
        makes_model: true,
        output_file: None,
        seeded: true,
        roles: &[
            data_role("tokenizer", "data.tokenizer", "tokenizer", false),
            role("init", false, "init"),
        ],
        file_keys: &[file("data.files", true, true), file("data.tokenizer", true, true)],
        effective: effective::<candor_pretrain::PretrainConfig>,
        check: None,
        locate: None,
        waits: None,
        run: |config, opts| train(config, opts, candor_pretrain::run),
        summary: lm_summary,
        report: LM_REPORT,
    },
    StageKind {
        name: "sft",
        about: "supervised instruction tuning: loss on the assistant's tokens only",
        config_file: true,
        makes_model: true,
        output_file: None,
        seeded: true,
        roles: &[role("init", true, "init")],
        file_keys: &[file("data.files", true, true), file("data.heldout", true, true)],
        effective: effective::<candor_sft::SftConfig>,
        check: None,
        locate: None,
        waits: None,
        run: |config, opts| train(config, opts, candor_sft::run),
        summary: lm_summary,
        report: LM_REPORT,
    },
    StageKind {
        name: "sample",
        about: "K distinct candidate responses per prompt from a model, for ranking",
        config_file: false,
        makes_model: false,
        output_file: Some("samples.jsonl"),
        seeded: true,
        roles: &[role("model", true, "model")],
        file_keys: &[file("prompts", false, false)],
        effective: effective::<SampleStage>,
        check: None,
        locate: None,
        waits: None,
        run: run_sample,
        summary: no_summary,
        report: NO_REPORT,
    },
    StageKind {
        name: "rank",
        about: "candidates ranked by a rule judge, or by people (one in the terminal, or a team on the label page)",
        config_file: false,
        makes_model: false,
        output_file: Some("ranked.jsonl"),
        seeded: false,
        roles: &[data_role("input", "input", "sample", false)],
        file_keys: &[file("labellers", false, false)],
        effective: effective::<RankStage>,
        check: Some(|config, origin| typed::<RankStage>(config, origin)?.check(origin)),
        locate: None,
        waits: Some(|config, origin, dir| typed::<RankStage>(config, origin)?.waiting(dir)),
        run: |config, opts| {
            let r: RankStage = typed(config, &opts.origin)?;
            std::fs::create_dir_all(&opts.out).with_context(|| opts.out.display().to_string())?;
            if r.labellers.is_some() {
                // people write ranked.jsonl through `candor label serve`; the runner calls
                // this only once `waits` says nothing is left, and there is nothing to do
                return Ok(None);
            }
            crate::rank::run(crate::rank::RankArgs {
                input: r.input,
                out: opts.out.join("ranked.jsonl"),
                judge: r.judge.into_iter().collect(),
            })?;
            Ok(None)
        },
        summary: no_summary,
        report: NO_REPORT,
    },
    StageKind {
        name: "reward",
        about: "a reward model (score head) trained on ranked responses",
        config_file: true,
        makes_model: true,
        output_file: None,
        seeded: true,
        roles: &[
            role("init", true, "init"),
            data_role("data", "data.files", "rank", true),
            data_role("heldout", "data.heldout", "rank", false),
        ],
        file_keys: &[file("data.files", true, true), file("data.heldout", true, true)],
        effective: effective::<candor_reward::RewardConfig>,
        check: None,
        locate: None,
        waits: None,
        run: |config, opts| train(config, opts, candor_reward::run),
        summary: |meta| {
            format!(
                "step {}, eval_accuracy {}, eval_margin {}, reward_mean {}, reward_std {}",
                meta.step,
                metric(meta, "eval_accuracy"),
                metric(meta, "eval_margin"),
                metric(meta, "reward_mean"),
                metric(meta, "reward_std")
            )
        },
        report: Report {
            x: "step",
            charts: &[
                ("loss", "loss", &["loss", "eval_loss"]),
                ("accuracy", "held-out pairwise accuracy", &["eval_accuracy"]),
            ],
            extra: None,
        },
    },
    StageKind {
        name: "ppo",
        about: "RLHF: the policy optimised against the reward model and/or judges with PPO",
        config_file: true,
        makes_model: true,
        output_file: None,
        seeded: true,
        roles: &[role("policy", true, "policy"), role("reward", false, "reward")],
        file_keys: &[
            file("data.prompts", true, true),
            file("data.heldout_prompts", true, true),
            file("data.ptx_files", true, true),
        ],
        effective: effective::<candor_ppo::PpoConfig>,
        check: None,
        locate: None,
        waits: None,
        run: |config, opts| train(config, opts, candor_ppo::run),
        summary: |meta| {
            format!(
                "iteration {}, reward_mean {}, kl {}, judge_score {} from {}",
                meta.step,
                metric(meta, "reward_mean"),
                metric(meta, "kl"),
                metric(meta, "judge_score"),
                metric(meta, "judge_score_initial")
            )
        },
        report: Report {
            x: "iteration",
            charts: &[
                ("reward", "reward", &["reward_mean", "reward_raw_mean"]),
                ("kl", "KL to the reference", &["kl"]),
                ("judge", "held-out judge score", &["judge_score"]),
            ],
            extra: Some(crate::report::side_by_side),
        },
    },
    StageKind {
        name: "grpo",
        about: "RL with group baselines (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++) on judges and/or a reward model",
        config_file: true,
        makes_model: true,
        output_file: None,
        seeded: true,
        roles: &[role("policy", true, "policy"), role("reward", false, "reward")],
        file_keys: &[
            file("data.prompts", true, true),
            file("data.heldout_prompts", true, true),
        ],
        effective: effective::<candor_grpo::GrpoConfig>,
        check: None,
        locate: None,
        waits: None,
        run: |config, opts| train(config, opts, candor_grpo::run),
        summary: |meta| {
            format!(
                "step {}, reward_mean {}, kl {}, judge_score {} from {}",
                meta.step,
                metric(meta, "reward_mean"),
                metric(meta, "kl"),
                metric(meta, "judge_score"),
                metric(meta, "judge_score_initial")
            )
        },
        report: Report {
            x: "step",
            charts: &[
                ("reward", "reward", &["reward_mean", "reward_raw_mean"]),
                ("judge", "held-out judge score (math: exact-match accuracy)", &["judge_score"]),
                ("kl", "KL to the reference (k3)", &["kl"]),
                ("entropy", "entropy", &["entropy"]),
                ("length", "completion length (tokens)", &["response_len"]),
                ("zero-spread", "share of groups with zero reward spread", &["zero_spread"]),
            ],
            extra: None,
        },
    },
    StageKind {
        name: "dpo",
        about: "direct preference optimisation of a policy on ranked responses (DPO, IPO, hinge, SimPO)",
        config_file: true,
        makes_model: true,
        output_file: None,
        seeded: true,
        roles: &[
            role("init", true, "init"),
            role("reference", false, "reference"),
            data_role("data", "data.files", "rank", true),
            data_role("heldout", "data.heldout", "rank", false),
        ],
        file_keys: &[
            file("data.files", true, true),
            file("data.heldout", true, true),
            file("eval.prompts", false, true),
        ],
        effective: effective::<candor_dpo::DpoConfig>,
        check: Some(|config, origin| {
            if let Some(j) = typed::<candor_dpo::DpoConfig>(config, origin)?.eval.judge {
                candor_judge::judge_by_name(&j).map_err(|e| anyhow!("{origin}: eval.judge: {e}"))?;
            }
            Ok(())
        }),
        locate: None,
        waits: None,
        run: |config, opts| train(config, opts, candor_dpo::run),
        summary: |meta| {
            format!(
                "step {}, eval_accuracy {}, eval_margin {}, judge_score {} from {}, kl {}",
                meta.step,
                metric(meta, "eval_accuracy"),
                metric(meta, "eval_margin"),
                metric(meta, "judge_score"),
                metric(meta, "judge_score_initial"),
                metric(meta, "kl")
            )
        },
        report: Report {
            x: "step",
            charts: &[
                ("loss", "loss", &["loss", "eval_loss"]),
                ("accuracy", "held-out pairwise accuracy", &["eval_accuracy"]),
                ("rewards", "implicit rewards β·log π/π_ref", &["reward_chosen", "reward_rejected"]),
                ("judge", "held-out judge score", &["judge_score"]),
                ("kl", "KL to the reference on held-out prompts", &["kl"]),
            ],
            extra: Some(crate::report::side_by_side),
        },
    },
    StageKind {
        name: "eval",
        about: "held-out metrics of a model on a data file (`candor eval`)",
        config_file: false,
        makes_model: false,
        output_file: Some("eval.json"),
        seeded: true,
        roles: &[role("model", true, "model"), role("reference", false, "reference")],
        file_keys: &[file("data", false, false)],
        effective: effective::<EvalStage>,
        check: Some(|config, origin| {
            if let Some(j) = typed::<EvalStage>(config, origin)?.judge {
                candor_judge::judge_by_name(&j).map_err(|e| anyhow!("{origin}: judge: {e}"))?;
            }
            Ok(())
        }),
        locate: None,
        waits: None,
        run: |config, opts| {
            let e: EvalStage = typed(config, &opts.origin)?;
            let policy = e.policy();
            crate::eval::eval_to_dir(&e.model, &e.data, &opts.out, &opts.device, 16, &policy)?;
            Ok(None)
        },
        summary: no_summary,
        report: NO_REPORT,
    },
];

/// The entry of a stage kind.
pub fn find(name: &str) -> Option<&'static StageKind> {
    STAGES.iter().find(|k| k.name == name)
}

/// The kinds, for messages: `model, import, ...`.
pub fn names() -> String {
    STAGES.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

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

/// A `rank` stage: rank candidates with a rule judge, or by people — one person in the
/// terminal (neither `judge` nor `labellers`), or a team on the label page (`labellers`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankStage {
    /// Candidates JSONL (`candor sample` output); filled from the `input:` stage.
    pub input: PathBuf,
    /// A rule judge that ranks instead of a person (`candor judges` lists them). Default:
    /// none.
    #[serde(default)]
    pub judge: Option<String>,
    /// A team ranks on the label page (`candor label serve`): the labellers file (names and
    /// tokens, docs/label.md). `candor run` stops at this stage, prints the command that
    /// serves the page and how many rankings are still needed, and goes on from here on a
    /// later `candor run` once they are all in. Default: none.
    #[serde(default)]
    pub labellers: Option<PathBuf>,
    /// How many different labellers rank each prompt (`--overlap`). Default 1.
    #[serde(default = "d_overlap")]
    pub overlap: usize,
    /// The address the label page is served on (`--bind`). Default 127.0.0.1:8080.
    #[serde(default = "d_bind")]
    pub bind: String,
}

fn d_overlap() -> usize {
    1
}
fn d_bind() -> String {
    "127.0.0.1:8080".into()
}

impl RankStage {
    fn check(&self, origin: &str) -> Result<()> {
        if let Some(j) = &self.judge {
            candor_judge::judge_by_name(j).map_err(|e| anyhow!("{origin}: judge: {e}"))?;
            if self.labellers.is_some() {
                return Err(anyhow!(
                    "{origin}: judge and labellers: a stage is ranked by a judge or by people, not both"
                ));
            }
        }
        if self.labellers.is_some() {
            if self.overlap == 0 {
                return Err(anyhow!("{origin}: overlap: expected at least 1, got 0"));
            }
            if self.bind.parse::<std::net::SocketAddr>().is_err() {
                return Err(anyhow!(
                    "{origin}: bind: expected an address and port such as 127.0.0.1:8080, got `{}`",
                    self.bind
                ));
            }
            // the file is read now so that a bad one stops the plan, not the stage
            if let Some(team) = &self.labellers {
                candor_label::team::read_team(team)
                    .map_err(|e| anyhow!("{origin}: labellers: {e}"))?;
            }
        }
        Ok(())
    }

    /// For a team-ranked stage: the rankings still missing in `dir`/ranked.jsonl.
    fn waiting(&self, dir: &Path) -> Result<Option<Waiting>> {
        let Some(team) = &self.labellers else {
            return Ok(None);
        };
        let out = dir.join("ranked.jsonl");
        let (left, needed) = candor_label::book::remaining(&self.input, &out, self.overlap)?;
        let serve = format!(
            "candor label serve --in {} --out {} --labellers {} --overlap {} --bind {}",
            self.input.display(),
            out.display(),
            team.display(),
            self.overlap,
            self.bind
        );
        let url = format!("http://{}/#token=THEIR_TOKEN", self.bind);
        Ok(Some(Waiting {
            left,
            needed,
            serve,
            url,
        }))
    }
}

/// An `eval` stage: `candor eval` of a model on a data file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalStage {
    pub model: PathBuf,
    pub data: PathBuf,
    /// For a policy on a prompt file (`candor eval`'s options of the same names): the judge,
    /// the reference of the KL, and the sampling.
    #[serde(default)]
    pub judge: Option<String>,
    #[serde(default)]
    pub reference: Option<PathBuf>,
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
    #[serde(default)]
    pub max_prompts: usize,
}

impl EvalStage {
    fn policy(&self) -> crate::eval::PolicyEvalArgs {
        crate::eval::PolicyEvalArgs {
            judge: self.judge.clone(),
            reference: self.reference.clone(),
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            max_prompts: self.max_prompts,
        }
    }
}

/// The `--device` spelling of a device, for commands that take one.
fn device_spec(d: &candle_core::Device) -> String {
    match d {
        candle_core::Device::Cpu => "cpu".into(),
        candle_core::Device::Cuda(_) => "cuda".into(),
        candle_core::Device::Metal(_) => "metal".into(),
    }
}

fn run_sample(config: &Value, opts: &RunOptions) -> Result<Option<CandorMeta>> {
    let s: SampleStage = typed(config, &opts.origin)?;
    let out = &opts.out;
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
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
        device: device_spec(&opts.device),
    })?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names are unique, every role fills a key, and a data role's producer kind exists
    /// and writes a file.
    #[test]
    fn the_registry_is_consistent() {
        for (i, k) in STAGES.iter().enumerate() {
            assert!(
                STAGES[i + 1..].iter().all(|o| o.name != k.name),
                "{} twice",
                k.name
            );
            assert_eq!(k.makes_model, k.output_file.is_none(), "{}", k.name);
            for r in k.roles {
                assert!(!r.key.is_empty());
                if let Source::Data(from) = r.from {
                    let producer = find(from).unwrap_or_else(|| panic!("{}: {from}", k.name));
                    assert!(producer.output_file.is_some(), "{}: {from}", k.name);
                }
            }
        }
        assert_eq!(
            names(),
            "model, import, tokenizer, pretrain, sft, sample, rank, reward, ppo, grpo, dpo, eval"
        );
    }
}
