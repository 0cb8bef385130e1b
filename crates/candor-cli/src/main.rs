//! `candor`: the command line. It parses arguments, calls the stage libraries, prints.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

mod bench;
mod chat;
mod eval;
#[cfg(test)]
mod fuzz;
mod generate;
mod import;
mod label;
mod launch;
mod merge;
mod rank;
mod recipe;
mod registry;
mod report;
mod sample;
mod score;
mod stage;
mod tokenizer;

#[derive(Parser)]
#[command(
    name = "candor",
    version,
    about = "Train language models the InstructGPT way: pretrain, SFT, reward model, PPO"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a recipe: the pipeline's stages in order, skipping those already up to date.
    Run(recipe::RunArgs),
    /// Write report.md (tables, plots, SFT vs PPO samples) for a run directory.
    Report(report::ReportArgs),
    /// Next-token pretraining from text files.
    Pretrain(stage::StageArgs),
    /// Supervised instruction tuning: loss on the assistant's tokens only.
    Sft(stage::SftArgs),
    /// RLHF: optimise the policy against the reward model with PPO.
    Ppo(stage::PpoArgs),
    /// RL with group baselines (GRPO, Dr. GRPO, DAPO, GSPO, RLOO): judges and/or a reward model.
    Grpo(stage::PpoArgs),
    /// Direct preference optimisation of the policy on ranked responses (DPO, IPO, SimPO, ...).
    Dpo(stage::DpoArgs),
    /// Sample K distinct candidate responses per prompt, for ranking.
    Sample(sample::SampleArgs),
    /// Rank candidate responses: typed in the terminal, or by a rule judge (--judge).
    Rank(rank::RankArgs),
    /// The ranking loop as a web page for a team of labellers (serve), and its figures (stats).
    #[command(subcommand)]
    Label(label::LabelCommand),
    /// Train a reward model from ranked responses.
    Reward(stage::RewardArgs),
    /// Print a reward model's rewards for prompt/response lines.
    Score(score::ScoreArgs),
    /// Sample continuations from a checkpoint (KV cache); --chat answers as an assistant.
    Generate(generate::GenerateArgs),
    /// Talk with a checkpoint in the terminal: a multi-turn chat, replies streamed.
    Chat(chat::ChatArgs),
    /// Held-out metrics of a checkpoint on a data file: perplexity, response loss, ...
    Eval(eval::EvalArgs),
    /// Training / sampling throughput of a named model shape on random tokens, or of a real
    /// checkpoint (--model: full, gradient-checkpointed, generation).
    Bench(bench::BenchArgs),
    /// Train or convert tokenizers.
    #[command(subcommand)]
    Tokenizer(tokenizer::TokenizerCommand),
    /// Import a llama.cpp GGUF model (dequantized) as a checkpoint directory.
    Import(import::ImportArgs),
    /// Merge a LoRA adapter directory (PEFT's format) into its base: a full checkpoint.
    Merge(merge::MergeArgs),
}

/// Options every stage command shares.
#[derive(Args, Clone, Debug)]
pub struct CommonStage {
    /// Stage config (YAML).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config key: `--set train.lr=1e-3` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Output checkpoint directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Continue an interrupted run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Replace an existing checkpoint in --out.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Start from a parent checkpoint (init, policy, reward) whose run has not finished
    /// (`complete: false`); refused without it.
    #[arg(long)]
    pub allow_incomplete: bool,
    /// Print the resolved config (defaults and --set applied) as YAML and exit.
    #[arg(long)]
    pub show_config: bool,
    /// Data parallel on this machine: start N processes (ranks), one per GPU
    /// (cuda:0…N-1) or all on the CPU. Under torchrun/srun, their environment decides.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nproc: usize,
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => recipe::run(args),
        Command::Report(args) => report::run(args),
        Command::Pretrain(args) => stage::command("pretrain", &args.common, &[]),
        Command::Sft(args) => stage::command("sft", &args.common, &[("init", &args.init)]),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Sample(args) => sample::run(args),
        Command::Rank(args) => rank::run(args),
        Command::Label(cmd) => label::run(cmd),
        Command::Reward(args) => stage::command("reward", &args.common, &[("init", &args.init)]),
        Command::Score(args) => score::run(args),
        Command::Ppo(args) => stage::command(
            "ppo",
            &args.common,
            &[("policy", &args.policy), ("reward", &args.reward)],
        ),
        Command::Grpo(args) => stage::command(
            "grpo",
            &args.common,
            &[("policy", &args.policy), ("reward", &args.reward)],
        ),
        Command::Dpo(args) => stage::command(
            "dpo",
            &args.common,
            &[("init", &args.init), ("reference", &args.reference)],
        ),
        Command::Tokenizer(cmd) => tokenizer::run(cmd),
        Command::Bench(args) => bench::run(args),
        Command::Import(args) => import::run(args),
        Command::Merge(args) => merge::run(args),
    }
}

fn main() -> ExitCode {
    candor_model::fused::runtime::init(); // thread-pool and allocator settings, before any thread
                                          // A panic is a bug in candor; still end with one line and a non-zero status.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        // `candor ... | head`: the reader went away; like any Unix tool, stop quietly
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error (please report): {msg}{at}");
    }));
    let cli = parse_args();
    let result = run(cli);
    candor_core::output::release_outputs();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<recipe::WaitingForPeople>().is_some() => {
            eprintln!("candor run: {e}");
            ExitCode::from(75) // EX_TEMPFAIL: not a failure; try again later
        }
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Parse the command line. A negative number after an option that takes a value is that
/// value (`--k -1`), so the error names the option (`invalid value '-1' for '--k <K>'`)
/// rather than taking `-1` for an unknown flag. A usage error is one `error:` line (exit 2);
/// `--help` and `--version` print as usual.
fn parse_args() -> Cli {
    fn negatives(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| {
            if a.get_action().takes_values() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        })
        .mut_subcommands(negatives)
    }
    let exit = |e: clap::Error| -> ! {
        use clap::error::ErrorKind;
        if matches!(
            e.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        ) {
            e.exit();
        }
        let text = e.render().to_string();
        let line = text.lines().next().unwrap_or("error: invalid arguments");
        eprintln!("{line} (see --help)");
        std::process::exit(2);
    };
    let matches = negatives(Cli::command())
        .try_get_matches()
        .unwrap_or_else(|e| exit(e));
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| exit(e))
}

/// The error chain on one line, without repeating a cause its context already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = vec![];
    for cause in e.chain() {
        let s = cause.to_string();
        if parts.last().is_some_and(|p| p.contains(&s)) {
            continue;
        }
        parts.push(s);
    }
    parts.join(": ").replace('\n', " ")
}

pub fn device(spec: &str) -> Result<candle_core::Device> {
    candor_core::device::parse_device(spec).context("--device")
}
