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
//! - [`precision`]: bf16 mixed precision (f32 master weights and optimiser state).
//! - [`dist`]: data parallel — sharding, gradient all-reduce (threads, TCP, NCCL), launcher env.
//! - [`fault`]: a NaN on demand at a chosen step, for tests (debug builds only).
//! - [`health`]: run-health signals of RL stages (entropy collapse, runaway KL, reward hacking, ...).
//! - [`sample`]: chat prompts → K distinct candidate responses; the token ids a reward model reads.

pub mod batch;
pub mod bench;
pub mod ckpt;
pub mod config;
pub mod dist;
pub mod error;
pub mod fault;
pub mod health;
pub mod lm;
pub mod loss;
pub mod optim;
pub mod precision;
pub mod progress;
pub mod sample;
pub mod schedule;

pub use error::{Error, Result};
