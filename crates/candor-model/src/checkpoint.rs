//! Gradient checkpointing (activation recomputation; Chen et al. 2016, "Training Deep Nets
//! with Sublinear Memory Cost"; transformers' `gradient_checkpointing_enable()`, TRL's
//! `gradient_checkpointing`): a training forward keeps only each transformer block's input,
//! and the backward recomputes one block at a time. Without checkpointing, the same
//! machinery backpropagates block by block through graphs kept from the forward, freeing
//! each block's activations as soon as its gradients exist.
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
//!
//! Without checkpointing (a [`Recording`] started with `on == false`; full-weight models
//! only, see [`Recording::start`]), step 1 keeps each
//! block's graph instead (its input a variable of its own, its output with the graph), and
//! step 3 backpropagates through the kept graph instead of a recomputed one, dropping it
//! right after. One `loss.backward()` would hold every block's activations until the
//! weights' gradients all exist; block by block, the activations of the blocks above are
//! gone by the time those below get their gradients, so the peak holds the activations or
//! most of the gradients, not both. The gradients are the same as with recomputation: each
//! block's are its own graph's, bit for bit.

use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::fused::keep;
use crate::model::{Context, Model};

/// One recorded forward pass: what it takes to backpropagate through its blocks.
struct Segment {
    ids: Tensor,
    positions: Option<Tensor>,
    bias: Option<Tensor>,
    blocks: Blocks,
    /// The last block's output as a variable, which the final norm and head read: the
    /// loss's backward gives its gradient.
    hidden: Var,
}

/// What a recorded forward kept of its blocks.
enum Blocks {
    /// Gradient checkpointing: what recomputes them.
    Recompute {
        /// Each block's input (B, T, C), detached.
        inputs: Vec<Tensor>,
        /// Each block's kept products ([`crate::fused::keep`]: with LoRA, its projections'
        /// outputs), in call order.
        kept: Vec<Vec<Tensor>>,
    },
    /// No checkpointing: the graphs themselves.
    Graphs {
        /// The embeddings (B, T, C) with their graph.
        embedded: Tensor,
        /// The variable each block read (a copy of the output below it).
        inputs: Vec<Var>,
        /// Each block's output with its graph, which holds the block's activations.
        outputs: Vec<Tensor>,
    },
}

/// A model's saved segments, and whether they recompute: `None` while no [`Recording`] is
/// open.
#[derive(Default)]
pub(crate) struct Tape(Mutex<Option<(bool, Vec<Segment>)>>);

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
    /// Whether the open recording recomputes (checkpointing); `None` when none is open.
    fn recomputes(&self) -> Option<bool> {
        self.0.lock().unwrap().as_ref().map(|(r, _)| *r)
    }
    fn open(&self, recompute: bool) {
        let mut tape = self.0.lock().unwrap();
        if tape.is_none() {
            *tape = Some((recompute, vec![]));
        }
    }
    /// The segments so far, closing the tape.
    fn close(&self) -> Vec<Segment> {
        self.0
            .lock()
            .unwrap()
            .take()
            .map(|(_, s)| s)
            .unwrap_or_default()
    }
    fn push(&self, segment: Segment) {
        if let Some((_, tape)) = self.0.lock().unwrap().as_mut() {
            tape.push(segment);
        }
    }
}

/// Step 1: the blocks of `model` on the embeddings `x` (B, T, C), keeping their inputs only
/// (checkpointing) or each block's graph; returns the variable holding the last block's
/// output.
pub(crate) fn record(
    model: &Model,
    ids: &Tensor,
    positions: Option<&Tensor>,
    bias: Option<&Tensor>,
    x: &Tensor,
    ctx: &Context,
) -> Result<Var> {
    let n = model.n_layers();
    let (blocks, last) = if model.tape.recomputes() == Some(false) {
        let (mut inputs, mut outputs) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut y = x.clone();
        for i in 0..n {
            // a variable of the block's own, so its backward stops at the block's input
            let input = Var::from_tensor(&y.detach())?;
            y = model.block(i, input.as_tensor(), ctx, None)?;
            inputs.push(input);
            outputs.push(y.clone());
        }
        let embedded = x.clone();
        (
            Blocks::Graphs {
                embedded,
                inputs,
                outputs,
            },
            y.detach(),
        )
    } else {
        let (mut inputs, mut kept) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut x = x.detach();
        for i in 0..n {
            let (y, products) = keep::saving(|| model.block(i, &x, ctx, None));
            let y = y?.detach(); // the block's graph is dropped here
            inputs.push(x);
            kept.push(products);
            x = y;
        }
        (Blocks::Recompute { inputs, kept }, x)
    };
    let hidden = Var::from_tensor(&last)?;
    model.tape.push(Segment {
        ids: ids.clone(),
        positions: positions.cloned(),
        bias: bias.cloned(),
        blocks,
        hidden: hidden.clone(),
    });
    Ok(hidden)
}

/// The backward of one loss, block by block: open it before the forward passes of the
/// models that are trained, and call [`Recording::backward`] instead of `loss.backward()`.
/// With checkpointing (`on`), the blocks' activations are recomputed; off, the blocks'
/// graphs are kept and each freed once backpropagated (a LoRA model's: see
/// [`Recording::start`]).
///
/// Forwards with a KV cache (generation) are never recorded. Recordings of one model do
/// not nest: the first to end closes the model's tape.
pub struct Recording<'m> {
    models: Vec<&'m Model>,
}

impl<'m> Recording<'m> {
    /// Record the forward passes of `models` (a policy and its critic) from now on,
    /// recomputing their blocks in the backward when `on` (gradient checkpointing).
    ///
    /// Off, a model with LoRA adapters is not recorded and its backward is one
    /// `loss.backward()`: its blocks' gradients are the adapters' (a few MiB), so freeing
    /// the blocks' activations one by one would lower no peak, while the blocks' own input
    /// variables would add a copy of every block's input.
    pub fn start(models: &[&'m Model], on: bool) -> Self {
        let models: Vec<&Model> = models
            .iter()
            .copied()
            .filter(|m| on || m.adapters().is_empty())
            .collect();
        for m in &models {
            m.tape.open(on);
        }
        Recording { models }
    }

    /// The gradients of `loss`, in pieces: `sink` gets the loss's own `GradStore`, then one
    /// per block and one for the embeddings of each recorded forward. Summed (an
    /// optimiser's `accumulate` does) they are `loss.backward()`. `loss` is taken so that
    /// its graph (logits, the head's activations) is freed before the blocks'.
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
            through_blocks(model, segment, grad, &mut sink)?;
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
fn through_blocks<E: From<Error>>(
    model: &Model,
    segment: Segment,
    mut grad: Tensor,
    sink: &mut impl FnMut(&GradStore) -> Result<(), E>,
) -> Result<(), E> {
    let Segment {
        ids,
        positions,
        bias,
        blocks,
        hidden,
    } = segment;
    drop(hidden);
    match blocks {
        Blocks::Graphs {
            embedded,
            mut inputs,
            mut outputs,
        } => {
            for i in (0..model.n_layers()).rev() {
                let (x, y) = (inputs.pop(), outputs.pop());
                let (x, y) = x.zip(y).expect("one input and output per block");
                // `y` is moved in: its graph, and with it the block's activations, is
                // freed there
                grad = through_block(i, y, &x, &grad, sink)?;
            }
            sink(&pull(&embedded, &grad)?)
        }
        Blocks::Recompute {
            mut inputs,
            mut kept,
        } => {
            let ctx = model.context(&ids, positions.as_ref(), bias.as_ref(), 0)?;
            for i in (0..model.n_layers()).rev() {
                let input = inputs.pop().expect("one saved input per block");
                let x = Var::from_tensor(&input).map_err(Error::from)?;
                drop(input);
                let products = kept.pop().expect("one list of kept products per block");
                let (y, left) =
                    keep::replaying(products, || model.block(i, x.as_tensor(), &ctx, None));
                let y = y?;
                if left != 0 {
                    return Err(Error::Msg(format!(
                        "gradient checkpointing: block {i}'s recomputation left {left} kept products unused"
                    ))
                    .into());
                }
                grad = through_block(i, y, &x, &grad, sink)?;
            }
            let x = model.embed(&ids, &ctx)?;
            sink(&pull(&x, &grad)?)
        }
    }
}

/// Block `i`'s backward from the gradient `grad` at its output `y` (taken, so that its graph
/// is freed before `sink` gets the block's `GradStore`); returns the gradient at its input
/// variable `x`.
fn through_block<E: From<Error>>(
    i: usize,
    y: Tensor,
    x: &Var,
    grad: &Tensor,
    sink: &mut impl FnMut(&GradStore) -> Result<(), E>,
) -> Result<Tensor, E> {
    let store = pull(&y, grad)?;
    drop(y);
    let input_grad = store.get(x.as_tensor()).cloned().ok_or_else(|| {
        Error::Msg(format!(
            "block-by-block backward: block {i} input got no gradient"
        ))
    })?;
    sink(&store)?;
    Ok(input_grad)
}

/// The backward of `y` given the gradient `grad` at `y`: `(y · grad).sum()`'s, whose gradient
/// with respect to `y` is `grad` exactly.
fn pull(y: &Tensor, grad: &Tensor) -> Result<GradStore> {
    Ok((y * grad)?.sum_all()?.backward()?)
}
