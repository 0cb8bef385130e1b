//! Next-token cross-entropy over the targets a mask selects.

use candle_core::Tensor;
use candor_model::ops::token_logprobs;
use candor_model::Model;

use crate::batch::LmBatch;
use crate::error::Result;

/// Sum of −log p(target) over masked targets, and the mean (sum / count). Dense batches use
/// the plain causal mask; padded or packed ones their layout's bias and position ids.
pub fn lm_loss(model: &Model, batch: &LmBatch) -> Result<(Tensor, Tensor)> {
    let device = model.device();
    let hidden = if batch.layout.is_dense() {
        model.forward_hidden(&batch.inputs, None, None, None)?
    } else {
        let pos = batch.layout.positions_tensor(device)?;
        let bias = batch.layout.bias(device)?;
        model.forward_hidden(&batch.inputs, Some(&pos), Some(&bias), None)?
    };
    let logits = model.lm_logits(&hidden)?; // (B, T, V)
    let logprobs = token_logprobs(&logits, &batch.targets)?; // (B, T)
    let sum = (logprobs * &batch.loss_mask)?.sum_all()?.neg()?;
    let mean = (&sum / batch.n_targets.max(1) as f64)?;
    Ok((sum, mean))
}
