//! Gradient checkpointing (activation recomputation; Chen et al. 2016, "Training Deep Nets
//! with Sublinear Memory Cost"; transformers' `gradient_checkpointing_enable()`, TRL's
//! `gradient_checkpointing`): a training forward keeps only each transformer block's input,
//! and the backward recomputes one block at a time.
//!
//! candle has no checkpointing and its backward is one `Tensor::backward()` over the whole
//! graph, so the recomputation is spelled out here, as a drop-in for `loss.backward()`:
//!
//! 1. While a [`Recording`] is open, [`Model::forward_hidden`] (without a KV cache) runs the
//!    blocks on *detached* inputs, keeps those inputs, drops each block's graph, and hands
//!    the final norm a fresh variable `h` holding the last block's output.
//! 2. [`Recording::backward`] runs `loss.backward()`: the head, the final norm and the loss
//!    get their gradients, and `h` its gradient `g`.
//! 3. Then, block by block in reverse, the block's forward is recomputed from its saved input
//!    (as a variable `x`) with the graph, and `(block(x) · g).sum()` is backpropagated: its
//!    gradient is `g` at the block's output, so this gives the block's parameter gradients
//!    and `g ← ∂/∂x` for the block below. Last, the embeddings get theirs from `g` at the
//!    first block's input.
//!
//! Each backward's `GradStore` goes to the caller's sink (an optimiser's `accumulate`), so
//! the sum is the gradient `loss.backward()` would give. The recomputation repeats the
//! forward bit for bit (the same kernels on the same inputs; the model has no dropout), so
//! the gradients differ from the plain backward only in the order a tied weight's two
//! gradients are added. Peak memory holds the blocks' inputs (layers × B × T × C) and one
//! block's activations instead of every block's; the price is one more forward of the blocks.
//!
//! With LoRA, the frozen projections' outputs are kept too ([`crate::fused::keep`]:
//! selective recomputation), so the recomputation is the attention core, the norms and the
//! element-wise work, not the products, for (layers × B × T × the projections' widths) more
//! memory: for SmolLM2-135M, 4 × 256 tokens, about 0.6 GB more and the recomputation's
//! cost a fraction of a forward.

use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::fused::keep;
use crate::model::{Context, Model};

/// One checkpointed forward pass: what it takes to recompute its blocks.
struct Segment {
    ids: Tensor,
    positions: Option<Tensor>,
    bias: Option<Tensor>,
    /// Each block's input (B, T, C), detached.
    inputs: Vec<Tensor>,
    /// Each block's kept products ([`crate::fused::keep`]: with LoRA, its projections'
    /// outputs), in call order.
    kept: Vec<Vec<Tensor>>,
    /// The last block's output as a variable, which the final norm and head read: the
    /// loss's backward gives its gradient.
    hidden: Var,
}

/// A model's saved segments: `None` while no [`Recording`] is open.
#[derive(Default)]
pub(crate) struct Tape(Mutex<Option<Vec<Segment>>>);

/// A copy of a model (e.g. the policy with its LoRA adapters off, as the reference) shares
/// the weights but not a recording: it starts with none open.
impl Clone for Tape {
    fn clone(&self) -> Self {
        Tape::default()
    }
}

impl Tape {
    pub(crate) fn is_recording(&self) -> bool {
        self.0.lock().unwrap().is_some()
    }
    fn open(&self) {
        let mut tape = self.0.lock().unwrap();
        if tape.is_none() {
            *tape = Some(vec![]);
        }
    }
    /// The segments so far, closing the tape.
    fn close(&self) -> Vec<Segment> {
        self.0.lock().unwrap().take().unwrap_or_default()
    }
    fn push(&self, segment: Segment) {
        if let Some(tape) = self.0.lock().unwrap().as_mut() {
            tape.push(segment);
        }
    }
}

/// Step 1: the blocks of `model` on the embeddings `x` (B, T, C), keeping their inputs only;
/// returns the variable holding the last block's output.
pub(crate) fn record(
    model: &Model,
    ids: &Tensor,
    positions: Option<&Tensor>,
    bias: Option<&Tensor>,
    x: &Tensor,
    ctx: &Context,
) -> Result<Var> {
    let mut inputs = Vec::with_capacity(model.n_layers());
    let mut kept = Vec::with_capacity(model.n_layers());
    let mut x = x.detach();
    for i in 0..model.n_layers() {
        let (y, products) = keep::saving(|| model.block(i, &x, ctx, None));
        let y = y?.detach(); // the block's graph is dropped here
        inputs.push(x);
        kept.push(products);
        x = y;
    }
    let hidden = Var::from_tensor(&x)?;
    model.tape.push(Segment {
        ids: ids.clone(),
        positions: positions.cloned(),
        bias: bias.cloned(),
        inputs,
        kept,
        hidden: hidden.clone(),
    });
    Ok(hidden)
}

/// Gradient checkpointing over one loss: open it before the forward passes whose
/// activations should be recomputed, and call [`Recording::backward`] instead of
/// `loss.backward()`. Off (`on == false`), it is exactly `loss.backward()`.
///
/// Forwards with a KV cache (generation) are never recorded. Recordings of one model do
/// not nest: the first to end closes the model's tape.
pub struct Recording<'m> {
    models: Vec<&'m Model>,
}

impl<'m> Recording<'m> {
    /// Record the forward passes of `models` (a policy and its critic) from now on, when
    /// `on`.
    pub fn start(models: &[&'m Model], on: bool) -> Self {
        let models = if on { models.to_vec() } else { vec![] };
        for m in &models {
            m.tape.open();
        }
        Recording { models }
    }

    /// The gradients of `loss`, in pieces: `sink` gets the loss's own `GradStore`, then,
    /// with checkpointing on, one per recomputed block and one for the embeddings of each
    /// recorded forward. Summed (an optimiser's `accumulate` does) they are
    /// `loss.backward()`. `loss` is taken so that its graph (logits, the head's
    /// activations) is freed before the blocks are recomputed.
    pub fn backward<E: From<Error>>(
        self,
        loss: Tensor,
        mut sink: impl FnMut(&GradStore) -> Result<(), E>,
    ) -> Result<(), E> {
        let store = loss.backward().map_err(Error::from)?;
        drop(loss);
        // each recorded forward whose output the loss reached, with the gradient there
        let mut pending = vec![];
        for model in &self.models {
            for segment in model.tape.close() {
                if let Some(g) = store.get(segment.hidden.as_tensor()).cloned() {
                    pending.push((*model, segment, g));
                }
            }
        }
        sink(&store)?;
        drop(store);
        while let Some((model, segment, grad)) = pending.pop() {
            recompute(model, segment, grad, &mut sink)?;
        }
        Ok(())
    }
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        for m in &self.models {
            m.tape.close();
        }
    }
}

/// Step 3: the blocks of one recorded forward in reverse, from the gradient `grad` at the
/// last block's output; then the embeddings.
fn recompute<E: From<Error>>(
    model: &Model,
    segment: Segment,
    mut grad: Tensor,
    sink: &mut impl FnMut(&GradStore) -> Result<(), E>,
) -> Result<(), E> {
    let Segment {
        ids,
        positions,
        bias,
        mut inputs,
        mut kept,
        hidden,
    } = segment;
    drop(hidden);
    let ctx = model.context(&ids, positions.as_ref(), bias.as_ref(), 0)?;
    for i in (0..model.n_layers()).rev() {
        let input = inputs.pop().expect("one saved input per block");
        let x = Var::from_tensor(&input).map_err(Error::from)?;
        drop(input);
        let products = kept.pop().expect("one list of kept products per block");
        let (y, left) = keep::replaying(products, || model.block(i, x.as_tensor(), &ctx, None));
        let y = y?;
        if left != 0 {
            return Err(Error::Msg(format!(
                "gradient checkpointing: block {i}'s recomputation left {left} kept products unused"
            ))
            .into());
        }
        let store = pull(&y, &grad)?;
        grad = store.get(x.as_tensor()).cloned().ok_or_else(|| {
            Error::Msg(format!(
                "gradient checkpointing: block {i} input got no gradient"
            ))
        })?;
        sink(&store)?;
    }
    let x = model.embed(&ids, &ctx)?;
    sink(&pull(&x, &grad)?)
}

/// The backward of `y` given the gradient `grad` at `y`: `(y · grad).sum()`'s, whose gradient
/// with respect to `y` is `grad` exactly.
fn pull(y: &Tensor, grad: &Tensor) -> Result<GradStore> {
    Ok((y * grad)?.sum_all()?.backward()?)
}
