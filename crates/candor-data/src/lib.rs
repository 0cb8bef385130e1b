//! candor-data: tokenizers, datasets, chat templates, batching.
//!
//! - [`tokenizer`]: load any `tokenizer.json`; train a byte-level BPE; `tokenizer_config.json`.
//! - [`convert`]: GPT-2 BPE files and GGUF vocabularies to `tokenizer.json`.
//! - [`text`]: pretraining corpora (plain text or JSONL `text`), tokenised and packed into
//!   context-length sequences with a held-out split.
//! - [`prompts`]: prompt files, every field of a line kept for judges.
//! - [`preference`]: candidate and ranked-preference files; rankings as (better, worse)
//!   pairs grouped by prompt and tokenised (reward model, DPO).
//! - [`chat`]: chat templates; prompts and (prompt, response) exchanges as token ids.
//! - [`sft`]: instruction data (`prompt`/`response` or `messages`), tokenised with a mark on
//!   the assistant tokens that SFT trains; the chat tokenizer an SFT checkpoint is saved with.

pub mod chat;
pub mod convert;
pub mod dataset;
pub mod error;
pub mod formats;
pub mod jsonl;
pub mod preference;
pub mod prompts;
pub mod sft;
pub mod text;
pub mod tokenizer;

pub use error::{Error, Result};
pub use tokenizer::Tokenizer;
