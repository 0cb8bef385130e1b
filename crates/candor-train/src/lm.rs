//! Next-token training, which pretraining and SFT share — they differ only in their
//! examples (SFT's targets are the assistant's tokens): the loss closure and evaluation
//! they hand to the stages' common loop ([`crate::train_loop`]), the gradients of one
//! optimiser step over its micro-batches, and the loss on held-out examples.

use std::path::Path;

use candle_core::Tensor;
use candor_core::checkpoint::CandorMeta;
use candor_core::metrics::MetricsLog;
use candor_core::record;
use candor_model::Model;

use crate::batch::{lm_batch, LmExample, Sampler};
use crate::ckpt::{StageModel, TrainerState};
use crate::config::TrainConfig;
use crate::dist::Dist;
use crate::error::Result;
use crate::loss::lm_loss;
use crate::optim::AdamW;
use crate::precision::compute_model;
use crate::progress::Progress;
use crate::step::{sharded_grads, StepGrads};
use crate::train_loop::{train_loop, Loop};

/// What a next-token stage trains, on what, and where it writes.
pub struct LmTraining<'a> {
    pub model: &'a Model,
    /// The model and tokenizer each checkpoint writes.
    pub saved: StageModel<'a>,
    pub train_set: &'a [LmExample],
    /// Held-out examples for `eval_loss` / `eval_ppl` (none: no evaluation).
    pub heldout: &'a [LmExample],
    pub train: &'a TrainConfig,
    /// Seeds the data order.
    pub seed: u64,
    pub out: &'a Path,
    pub progress: &'a Progress,
    /// The ranks of the run (`Dist::single()` alone); rank 0 evaluates and writes.
    pub dist: &'a Dist,
}

impl LmTraining<'_> {
    /// The held-out loss before the first step: `None` when resuming, without held-out
    /// examples, or on a rank other than 0 (which neither evaluates nor logs).
    pub fn eval_before_training(&self, state: &TrainerState) -> Result<Option<f64>> {
        if state.step > 0 || self.heldout.is_empty() || !self.dist.is_main() {
            return Ok(None);
        }
        self.eval().map(Some)
    }

    /// Mean loss per target token on the held-out examples (the first `eval_batches`), in
    /// `train.dtype`.
    pub fn eval(&self) -> Result<f64> {
        let pad = self.saved.tokenizer.pad_id();
        let model = compute_model(self.model, self.saved.varmap, self.train.dtype)?;
        Ok(evaluate(
            &model,
            self.heldout,
            self.train.batch_size,
            self.train.eval_batches,
            pad,
        )?
        .loss)
    }
}

/// The next-token loop ([`train_loop`]): the loss of a batch is the masked next-token
/// cross-entropy summed over its target tokens; evaluation logs `eval_loss` and `eval_ppl`.
/// The caller writes the final checkpoint.
pub fn train_lm(
    t: &LmTraining,
    opt: &mut AdamW,
    state: &mut TrainerState,
    metrics: &mut MetricsLog,
    meta: &mut CandorMeta,
) -> Result<()> {
    let pad = t.saved.tokenizer.pad_id();
    let loss = |model: &Model, mine: &[usize]| -> Result<(Tensor, usize)> {
        let batch: Vec<&LmExample> = mine.iter().map(|&i| &t.train_set[i]).collect();
        let batch = lm_batch(&batch, pad, model.device())?;
        let (sum, _) = lm_loss(model, &batch)?;
        Ok((sum, batch.n_targets))
    };
    let eval = |step: u64, metrics: &mut MetricsLog| -> Result<Option<String>> {
        if t.heldout.is_empty() {
            return Ok(None);
        }
        let eval = t.eval()?;
        metrics.push(record!(step; "eval_loss" => eval, "eval_ppl" => eval.exp()));
        Ok(Some(format!(
            "eval_loss {eval:.4} | eval_ppl {:.2}",
            eval.exp()
        )))
    };
    let l = Loop {
        model: t.model,
        saved: StageModel { ..t.saved },
        train: t.train,
        seed: t.seed,
        out: t.out,
        progress: t.progress,
        dist: t.dist,
        examples: t.train_set.len(),
        terms: &|i| t.train_set[i].n_targets(),
        loss: &loss,
        eval: &eval,
    };
    train_loop(&l, opt, state, metrics, meta)
}

/// Forward and backward over `train.grad_accum` micro-batches of `train.batch_size`
/// examples drawn by `sampler`, this rank's shard of each ([`sharded_grads`]): the
/// gradients of the mean loss per target token of each micro-batch, averaged over the
/// micro-batches, summed over the ranks.
pub fn lm_grads(
    model: &Model,
    opt: &AdamW,
    examples: &[LmExample],
    sampler: &mut Sampler,
    train: &TrainConfig,
    pad: u32,
    dist: &Dist,
) -> Result<StepGrads> {
    sharded_grads(
        model,
        opt,
        sampler,
        train,
        dist,
        |i| examples[i].n_targets(),
        |mine| {
            let batch: Vec<&LmExample> = mine.iter().map(|&i| &examples[i]).collect();
            let batch = lm_batch(&batch, pad, model.device())?;
            let (sum, _) = lm_loss(model, &batch)?;
            Ok((sum, batch.n_targets))
        },
    )
}

/// Loss on held-out examples: the mean over all their target tokens, and how many.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LmEval {
    pub loss: f64,
    pub tokens: usize,
}

/// Mean loss per target token over the first `max_batches` batches of `batch_size`
/// examples, in order (0 = all).
pub fn evaluate(
    model: &Model,
    examples: &[LmExample],
    batch_size: usize,
    max_batches: usize,
    pad: u32,
) -> Result<LmEval> {
    let (mut sum, mut tokens) = (0.0, 0usize);
    for (i, chunk) in examples.chunks(batch_size.max(1)).enumerate() {
        if max_batches > 0 && i >= max_batches {
            break;
        }
        let refs: Vec<&LmExample> = chunk.iter().collect();
        let batch = lm_batch(&refs, pad, model.device())?;
        let (s, _) = lm_loss(model, &batch)?;
        sum += s.detach().to_scalar::<f32>()? as f64;
        tokens += batch.n_targets;
    }
    Ok(LmEval {
        loss: sum / tokens.max(1) as f64,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::pack_examples;
    use candle_core::Device;
    use candor_core::rng::Rng;
    use candor_model::io::build_trainable;
    use candor_model::{Head, ModelConfig};

    /// Grouped-query attention (4 heads, 2 kv heads), untied head; weights scaled up from
    /// the initialisation so that predictions depend strongly on the context (at init they
    /// are nearly uniform, and a leak would hardly show).
    fn tiny_model() -> Model {
        let config = ModelConfig::llama(50, 32, 2, 4, 2, 64, 32, 10000.0, false);
        let (model, varmap) =
            build_trainable(&config, Head::Lm, None, &[], &mut Rng::new(7), &Device::Cpu).unwrap();
        for (_, v) in crate::optim::named_vars(&varmap) {
            v.set(&(v.as_tensor() * 6.0).unwrap()).unwrap();
        }
        model
    }

    fn example(rng: &mut Rng, len: usize, prompt: usize) -> LmExample {
        let tokens: Vec<u32> = (0..len).map(|_| rng.below(50) as u32).collect();
        LmExample {
            tokens,
            targets: (0..len).map(|i| i >= prompt).collect(),
            segments: None,
        }
    }

    /// Mean loss of one example alone, or of segment `k` of a packed row (only its targets).
    fn loss_of(model: &Model, e: &LmExample, segment: Option<u32>) -> f64 {
        let mut e = e.clone();
        if let (Some(k), Some(segs)) = (segment, e.segments.clone()) {
            e.targets = e
                .targets
                .iter()
                .zip(&segs)
                .map(|(&t, &s)| t && s == k)
                .collect();
        }
        evaluate(model, &[e], 1, 0, 0).unwrap().loss
    }

    /// Packing several examples into one row leaks nothing between them: each example's
    /// loss in the packed row equals its loss alone (block-diagonal attention, positions
    /// restarting per segment), with padding in the batch too.
    #[test]
    fn packed_examples_have_their_unpacked_losses() {
        let model = tiny_model();
        let mut rng = Rng::new(3);
        let examples = vec![
            example(&mut rng, 9, 4),
            example(&mut rng, 12, 5),
            example(&mut rng, 6, 2),
            example(&mut rng, 14, 7),
        ];
        let rows = pack_examples(&examples, 30);
        assert_eq!(
            rows.len(),
            2,
            "three examples in the first row, one in the second"
        );
        let mut worst = 0.0f64;
        let mut k = 0;
        for row in &rows {
            for seg in 0..=*row.segments.as_ref().unwrap().last().unwrap() {
                let alone = loss_of(&model, &examples[k], None);
                let packed = loss_of(&model, row, Some(seg));
                worst = worst.max((alone - packed).abs());
                k += 1;
            }
        }
        assert_eq!(k, examples.len());
        // the whole padded two-row batch: the same total as the examples one by one
        let all = evaluate(&model, &rows, 2, 0, 0).unwrap();
        let sum_alone: f64 = examples
            .iter()
            .map(|e| evaluate(&model, std::slice::from_ref(e), 1, 0, 0).unwrap())
            .map(|e| e.loss * e.tokens as f64)
            .sum();
        println!("packed vs unpacked: worst per-example loss difference {worst:.2e}; batch {:.6} vs {:.6}", all.loss, sum_alone / all.tokens as f64);
        assert!(
            (all.loss - (50f64).ln()).abs() > 0.5,
            "the model's predictions are nearly uniform: {}",
            all.loss
        );
        assert!(
            worst < 1e-5,
            "packed losses differ from unpacked by {worst}"
        );
        assert!((all.loss - sum_alone / all.tokens as f64).abs() < 1e-5);
        // without segments the same row leaks (the later examples see the earlier ones)
        let mut leaky = rows[0].clone();
        let segs = leaky.segments.take().unwrap();
        leaky.targets = leaky
            .targets
            .iter()
            .zip(&segs)
            .map(|(&t, &s)| t && s == 1)
            .collect();
        let leaked = evaluate(&model, &[leaky], 1, 0, 0).unwrap().loss;
        let alone = loss_of(&model, &examples[1], None);
        println!("the same row without segments: {leaked:.4} vs {alone:.4} alone");
        assert!((leaked - alone).abs() > 1e-2, "the test cannot tell a leak");
    }
}
