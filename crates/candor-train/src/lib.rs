//! candor-train: what every training stage's loop calls, as plain functions and small
//! structs — no trainer framework. A stage's `train` reads top to bottom: get batch,
//! forward, backward, clip, step, log, eval, checkpoint.
//!
//! - [`config::TrainConfig`]: the optimizer/schedule/cadence section shared by stage configs.
//! - [`optim::AdamW`]: AdamW whose moments are saved for exact resume.
//! - [`schedule::lr_at`]: linear warm-up, cosine decay.
//! - [`batch`]: epoch-shuffled sampling with a resumable cursor; padded LM batches; packing.
//! - [`loss`]: masked next-token cross-entropy.
//! - [`lm`]: the next-token loop pretraining and SFT share ([`lm::train_lm`]: get batch,
//!   forward, backward, clip, step, log, eval, checkpoint), its steps' gradients, held-out loss.
//! - [`ckpt`]: writing a stage's checkpoint directory and its resume state.
//! - [`progress::Progress`]: the progress bar and log lines.
//! - [`sample`]: chat prompts → K distinct candidate responses; the token ids a reward model reads.

pub mod batch;
pub mod bench;
pub mod ckpt;
pub mod config;
pub mod error;
pub mod lm;
pub mod loss;
pub mod optim;
pub mod progress;
pub mod sample;
pub mod schedule;

pub use error::{Error, Result};
