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
        let weights: Vec<f32> = batch.loss_mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        fused::lm_head_xent(&hidden.reshape((b * t, c))?, model.lm_head_weight()?, &targets, &weights)?
    } else {
        let logits = model.lm_logits(&hidden)?; // (B, T, V)
        let logprobs = token_logprobs(&logits, &batch.targets)?; // (B, T)
        (logprobs * &batch.loss_mask)?.sum_all()?.neg()?
    };
    let mean = (&sum / batch.n_targets.max(1) as f64)?;
    Ok((sum, mean))
}
