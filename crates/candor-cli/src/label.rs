//! `candor label serve|stats`: the labelling web server for a team, and its figures
//! (the work is in the candor-label crate).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum LabelCommand {
    /// Serve the ranking page: prompts and their K responses, ordered by people.
    Serve(ServeArgs),
    /// Per-labeller counts and time, agreement and Kendall's tau-b between labellers, flags.
    Stats(StatsArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Candidates JSONL (`candor sample` output): {"prompt", "responses": [...]}.
    #[arg(long = "in")]
    pub input: PathBuf,
    /// Rankings JSONL, appended to and fsynced at each answer (`candor rank`'s format plus
    /// labeller, seconds, flags, comment). A restarted server continues from it.
    #[arg(long)]
    pub out: PathBuf,
    /// Address to listen on. Anything but a loopback address needs --labellers.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub bind: String,
    /// Labellers file (YAML: `- {name: ana, token: ..., lead: true}`); every request then
    /// needs a labeller's token.
    #[arg(long)]
    pub labellers: Option<PathBuf>,
    /// How many different labellers rank each prompt.
    #[arg(long, default_value_t = 1)]
    pub overlap: usize,
}

#[derive(Args)]
pub struct StatsArgs {
    /// Rankings JSONL (`candor label serve` or `candor rank` output).
    pub rankings: PathBuf,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: LabelCommand) -> Result<()> {
    match cmd {
        LabelCommand::Serve(a) => serve(a),
        LabelCommand::Stats(a) => {
            let stats = candor_label::stats::read_stats(&a.rankings)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print!("{}", stats.render());
            }
            Ok(())
        }
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    let opts = candor_label::ServeOptions {
        input: a.input,
        out: a.out,
        bind: a.bind,
        labellers: a.labellers,
        overlap: a.overlap,
    };
    let server = candor_label::Server::start(&opts, true)?;
    let (left, needed) = candor_label::book::remaining(&opts.input, &opts.out, opts.overlap)?;
    println!("label: serving {}", server.url());
    println!(
        "label: {left} of {needed} rankings still needed ({} -> {}); Ctrl-C stops",
        opts.input.display(),
        opts.out.display()
    );
    if opts.labellers.is_some() {
        println!(
            "label: each labeller opens {}#token=THEIR_TOKEN",
            server.url()
        );
    }
    Ok(server.wait()?)
}
