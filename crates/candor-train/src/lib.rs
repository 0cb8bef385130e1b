//! candor-train: what every training stage's loop calls, as plain functions and small
//! structs — no trainer framework. A stage's `train` reads top to bottom: get batch,
//! forward, backward, clip, step, log, eval, checkpoint.
//!
//! - [`config::TrainConfig`]: the optimizer/schedule/cadence section shared by stage configs.
//! - [`optim::AdamW`]: AdamW whose moments are saved for exact resume.
//! - [`schedule::lr_at`]: linear warm-up, cosine decay.
//! - [`batch`]: epoch-shuffled sampling with a resumable cursor; padded LM batches; packing.
//! - [`lora`]: the model a stage trains, full or LoRA adapters on a frozen base.
//! - [`loss`]: masked next-token cross-entropy.
//! - [`train_loop`]: the loop of every stage whose step is a batch in, a loss out
//!   ([`train_loop::train_loop`]: get batch, the stage's loss closure, backward, clip, step,
//!   log, eval, checkpoint) and [`train_loop::begin`], every stage's preamble.
//! - [`lm`]: the next-token loss pretraining and SFT hand that loop ([`lm::train_lm`]: get batch,
//!   forward, backward, clip, step, log, eval, checkpoint), its steps' gradients, held-out loss.
//! - [`bench`], [`model_bench`]: `candor bench` — training and sampling throughput of a named
//!   shape, and of a real checkpoint (full weights, gradient checkpointing, generation).
//! - [`ckpt`]: writing a stage's checkpoint directory and its resume state.
//! - [`run::RunOptions`]: how a stage is run (output, device, resume, its rank).
//! - [`progress::Progress`]: the progress bar and log lines.
//! - [`precision`]: bf16 mixed precision (f32 master weights and optimiser state).
//! - [`dist`]: data parallel — sharding, gradient all-reduce (threads, TCP, NCCL), launcher env.
//! - [`fault`]: a NaN on demand at a chosen step, for tests (debug builds only).
//! - [`health`]: run-health signals of RL stages (entropy collapse, runaway KL, reward hacking, ...).
//! - [`step`]: one optimiser step's gradients over its micro-batches, sharded over the ranks.
//! - [`sample`]: chat prompts → K distinct candidate responses; a reward model's last-token
//!   scores of whole exchanges.
//! - [`seq`]: prompt + response batches ([`seq::SeqBatch`]) and the forward passes RL and
//!   preference stages run on them: response log-probs, values, sequence scores.
//! - [`rl`]: policy-gradient math shared by RL stages (masked means, whitening, the clipped
//!   ratio loss, KL estimators k1/k2/k3, the adaptive KL controller), checked against TRL.
//! - [`rollout`]: prompt files posed with the chat template; a batch of sampled responses.
//! - [`score`]: the scalar score RL optimises (reward model, normalised, + judges, clipped).

pub mod batch;
pub mod bench;
pub mod ckpt;
pub mod config;
pub mod dist;
pub mod error;
pub mod fault;
pub mod health;
pub mod lm;
pub mod lora;
pub mod loss;
pub mod model_bench;
pub mod optim;
pub mod precision;
pub mod progress;
pub mod rl;
pub mod rollout;
pub mod run;
pub mod sample;
pub mod schedule;
pub mod score;
pub mod seq;
pub mod step;
pub mod train_loop;

pub use error::{err, Error, Result};
