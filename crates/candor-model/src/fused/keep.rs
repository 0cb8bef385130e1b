//! Products kept across gradient checkpointing's recomputation (selective recomputation,
//! Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
//! Models": keep what is costly to compute and cheap to hold, recompute the rest).
//!
//! With LoRA, a block's frozen projections (`x · Wᵀ` plus the adapter's term,
//! [`super::lora_linear`]) are about nine tenths of its forward's multiply-adds, while their
//! outputs are a fraction of what the block's graph holds. So while
//! [`crate::checkpoint`] records a block, each such product's output is kept
//! ([`saving`]); when it recomputes the block, each product hands back its kept output
//! instead of multiplying again ([`replaying`]), in the same order, and the op's backward is
//! unchanged (it reads x, A, B and W, never y). The recomputed block is therefore the
//! recorded one bit for bit, and the gradients are those without the kept products.
//!
//! The scope is per thread: the model's forward runs on the calling thread (the products'
//! own threads never call back into it).

use std::cell::RefCell;

use candle_core::Tensor;

enum Kept {
    Saving(Vec<Tensor>),
    Replaying(std::vec::IntoIter<Tensor>),
}

thread_local! {
    static KEPT: RefCell<Option<Kept>> = const { RefCell::new(None) };
}

/// Ends a scope even when its closure returns early or panics.
struct Scope;

impl Drop for Scope {
    fn drop(&mut self) {
        KEPT.with(|k| k.borrow_mut().take());
    }
}

/// `f()` with `state` as this thread's scope; returns the scope's state at the end.
fn scoped<R>(state: Kept, f: impl FnOnce() -> R) -> (R, Option<Kept>) {
    KEPT.with(|k| *k.borrow_mut() = Some(state));
    let _scope = Scope;
    let r = f();
    (r, KEPT.with(|k| k.borrow_mut().take()))
}

/// `f()`, keeping the output of every product that [`keep`]s its own; returns them in
/// call order.
pub(crate) fn saving<R>(f: impl FnOnce() -> R) -> (R, Vec<Tensor>) {
    match scoped(Kept::Saving(vec![]), f) {
        (r, Some(Kept::Saving(kept))) => (r, kept),
        (r, _) => (r, vec![]),
    }
}

/// `f()`, each product taking its output from `kept` in order ([`next`]); returns also how
/// many were left unused (0 when `f` ran the products it ran while saving).
pub(crate) fn replaying<R>(kept: Vec<Tensor>, f: impl FnOnce() -> R) -> (R, usize) {
    match scoped(Kept::Replaying(kept.into_iter()), f) {
        (r, Some(Kept::Replaying(rest))) => (r, rest.len()),
        (r, _) => (r, 0),
    }
}

/// In a [`replaying`] scope, the next kept output; else `None` (compute it).
pub(crate) fn next() -> Option<Tensor> {
    KEPT.with(|k| match k.borrow_mut().as_mut() {
        Some(Kept::Replaying(rest)) => rest.next(),
        _ => None,
    })
}

/// In a [`saving`] scope, keep `y` (detached: its graph is not held).
pub(crate) fn keep(y: &Tensor) {
    KEPT.with(|k| {
        if let Some(Kept::Saving(v)) = k.borrow_mut().as_mut() {
            v.push(y.detach());
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn replays_what_was_saved_in_order_and_scopes_end() {
        let t = |x: f32| Tensor::new(&[x], &Device::Cpu).unwrap();
        let ((), kept) = saving(|| {
            keep(&t(1.0));
            assert!(next().is_none(), "saving hands nothing back");
            keep(&t(2.0));
        });
        assert_eq!(kept.len(), 2);
        keep(&t(3.0)); // outside a scope: not kept anywhere
        assert!(next().is_none());
        let (got, left) = replaying(kept.clone(), || {
            let a: Vec<f32> = next().unwrap().to_vec1().unwrap();
            keep(&t(9.0)); // replaying keeps nothing
            a
        });
        assert_eq!((got, left), (vec![1.0], 1));
        let (both, left) = replaying(kept, || [next(), next(), next()].map(|x| x.is_some()));
        assert_eq!((both, left), ([true, true, false], 0));
        assert!(next().is_none(), "the scope ended");
    }
}
