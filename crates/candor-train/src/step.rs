//! One optimiser step's gradients over its micro-batches, on every rank of a data-parallel
//! run: each rank takes its shard of every global micro-batch ([`crate::dist`]), scales its
//! summed loss by the global number of loss terms, and the gradients are summed over the
//! ranks. The stages' steps ([`crate::lm::lm_grads`], the reward model's pairs) are this
//! with their own loss.

use candle_core::Tensor;
use candor_model::{Model, Recording};

use crate::batch::Sampler;
use crate::config::TrainConfig;
use crate::dist::Dist;
use crate::error::Result;
use crate::optim::{AdamW, Grads};

/// One optimiser step's gradients (summed over the ranks), loss and tokens (global).
pub struct StepGrads {
    pub grads: Grads,
    /// Mean loss per term (target token, pair) of each global micro-batch, averaged over
    /// the micro-batches.
    pub loss: f64,
    /// Tokens the step saw, all ranks and micro-batches together.
    pub tokens: usize,
}

/// Forward and backward over `train.grad_accum` global micro-batches of `train.batch_size`
/// examples drawn by `sampler` (identically on every rank), of which this rank takes its
/// [`shard_range`]. Example `i` brings `terms(i)` terms to the loss (its target tokens, its
/// pairs); `summed_loss(mine)` returns the *sum* of the loss terms of this rank's examples
/// and the tokens it read. Each sum is divided by the global micro-batch's number of terms
/// (every rank knows the whole micro-batch, so no exchange is needed) and by `grad_accum`,
/// and the gradients are summed over the ranks: the result is the gradient of the mean
/// loss of the whole batch, whatever the world size and however the terms fall into the
/// shards. With [`Dist::single`] it is plain gradient accumulation.
///
/// `model` is the one `summed_loss` runs: with `train.gradient_checkpointing` its forwards
/// keep only the blocks' inputs and the backward recomputes the blocks
/// ([`candor_model::checkpoint`]).
pub fn sharded_grads(
    model: &Model,
    opt: &AdamW,
    sampler: &mut Sampler,
    train: &TrainConfig,
    dist: &Dist,
    terms: impl Fn(usize) -> usize,
    mut summed_loss: impl FnMut(&[usize]) -> Result<(Tensor, usize)>,
) -> Result<StepGrads> {
    let mut grads = opt.zero_grads();
    let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
    for _ in 0..train.grad_accum {
        let idx = sampler.next(train.batch_size);
        let n_global: usize = idx.iter().map(|&i| terms(i)).sum();
        let mine = dist.shard(&idx);
        if mine.is_empty() {
            continue;
        }
        let recording = Recording::start(&[model], train.gradient_checkpointing);
        let (sum, n_tokens) = summed_loss(mine)?;
        let scaled = (sum / (n_global.max(1) * train.grad_accum) as f64)?;
        loss_sum += scaled.to_scalar::<f32>()? as f64;
        tokens += n_tokens;
        recording.backward(scaled, |store| opt.accumulate(store, &mut grads))?;
    }
    dist.all_reduce_grads(&mut grads, opt)?;
    let totals = dist.all_reduce_f64(&[loss_sum, tokens as f64])?;
    Ok(StepGrads {
        grads,
        loss: totals[0],
        tokens: totals[1] as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::LmExample;
    use crate::dist::tests::on_threads;
    use crate::dist::LocalGroup;
    use crate::optim::named_vars;
    use candle_core::Device;
    use candor_core::rng::Rng;
    use candor_model::io::build_trainable;
    use candor_model::{Head, ModelConfig};
    use std::sync::Arc;

    /// The SFT/pretraining step (`lm_grads`: padded examples with prompt tokens masked out,
    /// two micro-batches) with `train.gradient_checkpointing`, in f32 (fused kernels) and
    /// bf16 (over casts of the f32 master weights, `compute_model`): the gradients without,
    /// every one non-zero.
    #[test]
    fn checkpointing_gives_the_same_step_gradients() {
        use crate::precision::{compute_model, Precision};
        let config = ModelConfig::llama(40, 32, 3, 4, 2, 64, 32, 10000.0, true);
        let mut rng = Rng::new(12);
        let examples: Vec<LmExample> = (0..6)
            .map(|i| {
                let len = 5 + (i * 5) % 11;
                LmExample {
                    tokens: (0..len).map(|_| rng.below(40) as u32).collect(),
                    targets: (0..len).map(|t| t >= 3).collect(),
                    segments: None,
                }
            })
            .collect();
        for (precision, tol) in [(Precision::F32, 1e-6f32), (Precision::Bf16, 2e-2)] {
            let grads = |checkpointing: bool| -> (f64, Vec<Vec<f32>>) {
                let (model, varmap) =
                    build_trainable(&config, Head::Lm, None, &[], &mut Rng::new(4), &Device::Cpu)
                        .unwrap();
                let train = TrainConfig {
                    batch_size: 3,
                    grad_accum: 2,
                    gradient_checkpointing: checkpointing,
                    ..Default::default()
                };
                let opt = AdamW::new(named_vars(&varmap), &train).unwrap();
                let mut sampler = Sampler::new(examples.len(), 2, Default::default());
                let step_model = compute_model(&model, &varmap, precision).unwrap();
                let step = crate::lm::lm_grads(
                    &step_model,
                    &opt,
                    &examples,
                    &mut sampler,
                    &train,
                    0,
                    &Dist::single(),
                )
                .unwrap();
                let g = step.grads.0.iter().map(|g| {
                    g.as_ref()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                });
                (step.loss, g.collect())
            };
            let ((l0, plain), (l1, ckpt)) = (grads(false), grads(true));
            assert_eq!(l0, l1, "{precision:?}: the loss");
            let mut worst = 0f32;
            for (a, b) in plain.iter().zip(&ckpt) {
                let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(
                    scale > 0.0 && b.iter().any(|&x| x != 0.0),
                    "a zero gradient"
                );
                let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
                worst = worst.max(err);
            }
            println!(
                "{precision:?} step, checkpointed: worst relative gradient difference {worst:.2e}"
            );
            assert!(worst < tol, "{precision:?}: {worst}");
        }
    }

    /// Gradients: world size 2 on half batches, summed, equal world size 1 on the whole
    /// batch — with padding and uneven shards (5 examples of different lengths), where
    /// averaging per-rank means would not.
    #[test]
    fn world_of_two_on_half_batches_gives_the_full_batch_gradient() {
        let config = ModelConfig::llama(40, 32, 2, 4, 2, 64, 32, 10000.0, false);
        let mut rng = Rng::new(11);
        let examples: Vec<LmExample> = (0..10)
            .map(|i| {
                let len = 6 + (i * 7) % 13;
                let tokens: Vec<u32> = (0..len).map(|_| rng.below(40) as u32).collect();
                LmExample {
                    targets: (0..len).map(|t| t >= 2).collect(),
                    tokens,
                    segments: None,
                }
            })
            .collect();
        let examples = Arc::new(examples);
        let train = TrainConfig {
            batch_size: 5,
            grad_accum: 2,
            ..Default::default()
        };
        let grads_of = move |d: Dist, examples: Arc<Vec<LmExample>>, train: TrainConfig| {
            let (model, varmap) =
                build_trainable(&config, Head::Lm, None, &[], &mut Rng::new(4), &Device::Cpu)
                    .unwrap();
            let opt = AdamW::new(named_vars(&varmap), &train).unwrap();
            let mut sampler = Sampler::new(examples.len(), 2, Default::default());
            let step =
                crate::lm::lm_grads(&model, &opt, &examples, &mut sampler, &train, 0, &d).unwrap();
            let g: Vec<Vec<f32>> = step
                .grads
                .0
                .iter()
                .map(|g| {
                    g.as_ref()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            (step.loss, step.tokens, g)
        };
        let (l1, n1, g1) = grads_of(Dist::single(), examples.clone(), train.clone());
        let ex2 = examples.clone();
        let t2 = train.clone();
        let two = on_threads(LocalGroup::new(2), move |d| {
            grads_of(d, ex2.clone(), t2.clone())
        });
        let mut worst = 0.0f32;
        for (l2, n2, g2) in &two {
            assert_eq!(*n2, n1);
            assert!((l2 - l1).abs() < 1e-6, "loss {l2} vs {l1}");
            for (a, b) in g1.iter().zip(g2) {
                for (x, y) in a.iter().zip(b) {
                    worst = worst.max((x - y).abs());
                }
            }
        }
        println!("world 2 vs world 1: loss {l1:.6}, worst gradient difference {worst:.2e}");
        assert!(worst < 1e-5, "gradients differ by {worst}");
    }
}
