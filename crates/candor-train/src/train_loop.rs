//! The loop every stage whose step is "a batch in, a loss out" runs (pretraining, SFT, the
//! reward model; DPO), read top to bottom like nanoGPT's `train.py`: get batch → the
//! stage's loss closure → backward → clip → step → log → eval → checkpoint; and
//! [`begin`], the preamble of every stage's `run` (fresh, resume or already done).
//!
//! The loop runs in `train.dtype` (bf16: over casts of the f32 master weights,
//! [`crate::precision`]) and on every rank of a data-parallel run ([`crate::dist`]): each
//! rank takes its shard of every global batch, the gradients are summed over the ranks, and
//! rank 0 alone evaluates and writes checkpoints.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use candor_core::checkpoint::CandorMeta;
use candor_core::metrics::MetricsLog;
use candor_core::record;
use candor_model::Model;

use crate::batch::Sampler;
use crate::ckpt::{RunOptions, StageModel, Start, TrainerState};
use crate::config::TrainConfig;
use crate::dist::Dist;
use crate::error::Result;
use crate::optim::{check_finite, clip_grad_norm, named_vars, AdamW};
use crate::precision::compute_model;
use crate::progress::{human, Progress};
use crate::schedule::lr_at;
use crate::step::{sharded_grads, StepGrads};

/// Decide how a stage's run starts in `opts.out` ([`RunOptions::plan_start`]): fresh,
/// resuming a partial run, or — a finished run made from the same config — done, which
/// `stage` announces on stderr; the caller then returns its metadata.
pub fn begin(opts: &RunOptions, stage: &str, effective: &serde_json::Value) -> Result<Start> {
    let start = opts.plan_start(effective)?;
    if let Start::Done(meta) = &start {
        eprintln!(
            "[{stage}] {} is already complete (step {})",
            opts.out.display(),
            meta.step
        );
    }
    Ok(start)
}

/// The sum of the loss terms of examples `mine` (indices into the training set) under the
/// step's model, and the tokens read.
pub type LossFn<'a> = dyn Fn(&Model, &[usize]) -> Result<(Tensor, usize)> + 'a;

/// Held-out evaluation at a step: records its metrics and returns what the log line shows
/// after the training loss, or `None` when there is nothing to evaluate.
pub type EvalFn<'a> = dyn Fn(u64, &mut MetricsLog) -> Result<Option<String>> + 'a;

/// What a stage's loop trains, on what, and where it writes.
pub struct Loop<'a> {
    pub model: &'a Model,
    /// The model and tokenizer each checkpoint writes.
    pub saved: StageModel<'a>,
    pub train: &'a TrainConfig,
    /// Seeds the data order.
    pub seed: u64,
    pub out: &'a Path,
    pub progress: &'a Progress,
    /// The ranks of the run (`Dist::single()` alone); rank 0 evaluates and writes.
    pub dist: &'a Dist,
    /// How many training examples the sampler draws from.
    pub examples: usize,
    /// The loss terms example i brings (its target tokens, its pairs): the mean loss of a
    /// batch divides by their sum.
    pub terms: &'a dyn Fn(usize) -> usize,
    pub loss: &'a LossFn<'a>,
    pub eval: &'a EvalFn<'a>,
}

/// The loop, from `state.step` to `train.steps`: get batch, forward (`t.loss`), backward,
/// clip, step, log (`loss`, `lr`, `grad_norm`, `tokens_per_sec` every `log_every`), eval
/// (`t.eval`, every `eval_every` and at the end), checkpoint (every `save_every`). A loss or
/// gradient norm that is not finite stops the run. The caller writes the final checkpoint.
pub fn train_loop(
    t: &Loop,
    opt: &mut AdamW,
    state: &mut TrainerState,
    metrics: &mut MetricsLog,
    meta: &mut CandorMeta,
) -> Result<()> {
    let (cfg, dist) = (t.train, t.dist);
    dist.sync_start(&named_vars(t.saved.varmap), state.step)?;
    let mut sampler = Sampler::new(t.examples, t.seed, state.cursor.clone());
    let elapsed_before = state.elapsed_sec;
    let clock = Instant::now();
    let mut window = (Instant::now(), 0u64);
    for step in state.step as usize..cfg.steps {
        let lr = lr_at(cfg, step);
        // forward/backward in train.dtype over this rank's shard, gradients summed over the ranks
        let step_model = compute_model(t.model, t.saved.varmap, cfg.dtype)?;
        step_model.set_adapter_training(true); // LoRA dropout, when there is any
        let StepGrads {
            mut grads,
            loss,
            tokens,
        } = sharded_grads(&step_model, opt, &mut sampler, cfg, dist, t.terms, |mine| {
            (t.loss)(&step_model, mine)
        })?;
        step_model.set_adapter_training(false);
        let grad_norm = clip_grad_norm(&mut grads, cfg.grad_clip)?;
        check_finite(loss, grad_norm, step as u64 + 1, t.out)?;
        opt.step(&grads, lr)?;
        state.step = step as u64 + 1;
        state.cursor = sampler.cursor.clone();
        state.tokens += tokens as u64;
        state.elapsed_sec = elapsed_before + clock.elapsed().as_secs_f64();
        window.1 += tokens as u64;
        let tok_s = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
        t.progress.set(
            state.step,
            format!("loss {loss:.3} | {} tok/s", human(tok_s)),
        );
        if cfg.log_due(state.step) {
            metrics.push(record!(state.step; "loss" => loss, "lr" => lr, "grad_norm" => grad_norm, "tokens_per_sec" => tok_s));
            window = (Instant::now(), 0);
        }
        if !dist.is_main() {
            continue; // rank 0 alone evaluates and writes
        }
        if cfg.eval_due(state.step) {
            if let Some(line) = (t.eval)(state.step, metrics)? {
                t.progress
                    .log(&format!("step {} | loss {loss:.4} | {line}", state.step));
            }
        }
        if cfg.save_due(state.step) {
            meta.complete = false;
            t.saved.save(t.out, state, metrics, opt, meta)?;
        }
    }
    meta.step = state.step; // also on the ranks that do not write
    Ok(())
}
