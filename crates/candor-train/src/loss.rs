//! Next-token cross-entropy over the targets a mask selects.

use candle_core::{DType, Tensor};
use candor_model::ops::token_logprobs;
use candor_model::{fused, Model};

use crate::batch::LmBatch;
use crate::error::Result;

/// Sum of −log p(target) over masked targets, and the mean (sum / count). Dense batches use
/// the plain causal mask; padded or packed ones their layout's bias and position ids.
/// For f32 on the CPU the LM head and the cross-entropy run as one chunked kernel
/// ([`fused::lm_head_xent`]); elsewhere the logits are formed in full.
pub fn lm_loss(model: &Model, batch: &LmBatch) -> Result<(Tensor, Tensor)> {
    let device = model.device();
    let hidden = if batch.layout.is_dense() {
        model.forward_hidden(&batch.inputs, None, None, None)?
    } else {
        let pos = batch.layout.positions_tensor(device)?;
        let bias = batch.layout.bias(device)?;
        model.forward_hidden(&batch.inputs, Some(&pos), Some(&bias), None)?
    };
    let sum = if fused::enabled(&hidden) {
        let (b, t, c) = hidden.dims3()?;
        let targets: Vec<u32> = batch.targets.flatten_all()?.to_vec1()?;
        let weights: Vec<f32> = batch
            .loss_mask
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        fused::lm_head_xent(
            &hidden.reshape((b * t, c))?,
            model.lm_head_weight()?,
            &targets,
            &weights,
        )?
    } else {
        let logits = model.lm_logits(&hidden)?; // (B, T, V)
        let logprobs = token_logprobs(&logits, &batch.targets)?; // (B, T)
        (logprobs * &batch.loss_mask)?.sum_all()?.neg()?
    };
    let mean = (&sum / batch.n_targets.max(1) as f64)?;
    Ok((sum, mean))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{lm_batch, LmExample};
    use candle_core::Device;
    use candor_core::rng::Rng;
    use candor_model::io::build_trainable;
    use candor_model::{Head, ModelConfig};

    /// An SFT-shaped example (5 prompt tokens, 4 response tokens) on a small random model.
    fn setup() -> (Model, LmBatch) {
        let config = ModelConfig::llama(40, 32, 1, 2, 2, 64, 16, 10000.0, true);
        let (model, _) =
            build_trainable(&config, Head::Lm, None, &[], &mut Rng::new(1), &Device::Cpu).unwrap();
        let tokens = vec![3, 17, 8, 22, 5, 30, 11, 2, 9];
        let targets = (0..tokens.len()).map(|i| i >= 5).collect();
        let e = LmExample {
            tokens,
            targets,
            segments: None,
        };
        let batch = lm_batch(&[&e], 0, &Device::Cpu).unwrap();
        (model, batch)
    }

    fn mean_with_label(model: &Model, batch: &LmBatch, pos: usize, label: u32) -> f32 {
        let mut targets = batch.targets.to_vec2::<u32>().unwrap();
        targets[0][pos] = label;
        let b = LmBatch {
            inputs: batch.inputs.clone(),
            targets: Tensor::new(targets, &Device::Cpu).unwrap(),
            loss_mask: batch.loss_mask.clone(),
            layout: batch.layout.clone(),
            n_targets: batch.n_targets,
        };
        lm_loss(model, &b).unwrap().1.to_scalar::<f32>().unwrap()
    }

    /// SFT trains on response tokens only: a prompt token's label (what position i is
    /// asked to predict) has no effect on the loss; a response token's label does. The
    /// loss itself matches −mean log softmax over the response positions, computed in f64
    /// from the logits.
    #[test]
    fn loss_ignores_prompt_labels_and_counts_response_labels() {
        let (model, batch) = setup();
        assert_eq!(batch.n_targets, 4);
        let base = lm_loss(&model, &batch)
            .unwrap()
            .1
            .to_scalar::<f32>()
            .unwrap();
        // inputs 0..3 predict prompt tokens 1..4 (masked); inputs 4..7 predict the response
        for pos in 0..4 {
            for label in [0, 1, 39] {
                assert_eq!(
                    mean_with_label(&model, &batch, pos, label),
                    base,
                    "prompt label at {pos} changed the loss"
                );
            }
        }
        for pos in 4..8 {
            let changed = mean_with_label(&model, &batch, pos, 1);
            assert!(
                (changed - base).abs() > 1e-4,
                "response label at {pos} did not change the loss"
            );
        }
        // reference: the same mean from the logits, in f64
        let logits = model.logits(&batch.inputs).unwrap().squeeze(0).unwrap(); // (T, V)
        let logits: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        let targets = batch.targets.squeeze(0).unwrap().to_vec1::<u32>().unwrap();
        let mut nll = 0.0f64;
        for pos in 4..8 {
            let row: Vec<f64> = logits[pos].iter().map(|&x| x as f64).collect();
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            nll += lse - row[targets[pos] as usize];
        }
        let reference = nll / 4.0;
        assert!(
            (base as f64 - reference).abs() < 1e-5,
            "lm_loss {base} vs reference {reference}"
        );
    }
}
