//! `candor tokenizer train|convert`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candor_data::text::read_corpus;
use candor_data::Tokenizer;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE (special tokens <|endoftext|>, <|im_start|>, <|im_end|> reserved).
    Train {
        /// Text or JSONL (`text`) files, or directories of them.
        #[arg(long, num_args = 1.., required = true)]
        corpus: Vec<PathBuf>,
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        /// Output tokenizer.json (tokenizer_config.json is written beside it).
        #[arg(long)]
        out: PathBuf,
    },
    /// Convert GPT-2's BPE files (vocab.json or encoder.json + merges.txt or vocab.bpe)
    /// into a tokenizer.json that encodes exactly as transformers' GPT-2 tokenizer.
    Convert {
        /// vocab.json / encoder.json: token → id.
        #[arg(long)]
        vocab: PathBuf,
        /// merges.txt / vocab.bpe: one merge per line.
        #[arg(long)]
        merges: PathBuf,
        /// Output tokenizer.json (tokenizer_config.json is written beside it).
        #[arg(long)]
        out: PathBuf,
    },
}

/// The directory of an `--out .../tokenizer.json`, created.
fn out_dir(out: &std::path::Path) -> Result<PathBuf> {
    if out.file_name().and_then(|n| n.to_str()) != Some("tokenizer.json") {
        anyhow::bail!(
            "{}: --out must name a file called tokenizer.json",
            out.display()
        );
    }
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| ".".into());
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    Ok(dir)
}

pub fn run(cmd: TokenizerCommand) -> Result<()> {
    match cmd {
        TokenizerCommand::Train {
            corpus,
            vocab_size,
            out,
        } => {
            let docs = read_corpus(&corpus)?;
            let tok = Tokenizer::train(docs.iter().map(String::as_str), vocab_size)?;
            tok.save(&out_dir(&out)?)?;
            println!("tokenizer: {} ({} tokens)", out.display(), tok.vocab_size());
            Ok(())
        }
        TokenizerCommand::Convert { vocab, merges, out } => {
            let dir = out_dir(&out)?;
            let tok = candor_data::convert::from_gpt2_files(&vocab, &merges)?;
            tok.save(&dir)?;
            println!(
                "tokenizer: {} ({} tokens, from {} and {})",
                out.display(),
                tok.vocab_size(),
                vocab.display(),
                merges.display()
            );
            Ok(())
        }
    }
}
