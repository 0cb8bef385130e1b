//! The LM head and softmax cross-entropy in one pass over row chunks, so the (N, V) logits
//! never exist at once:
//!
//! ```text
//! per chunk of rows:  L = H·Wᵀ;  lse = log Σ_j exp L_j;  loss_i = −w_i·(L_i[t_i] − lse_i)
//!                     dL = w_i·(softmax(L_i) − onehot(t_i))          (in place of L)
//!                     dH_chunk = dL·W;   dW += dLᵀ·H_chunk
//! ```
//!
//! The output is the scalar `Σ_i −w_i·log p(t_i)`, so the gradient for an upstream gradient
//! g is `g·(dH, dW)`: each is computed in the forward pass (when its input tracks
//! gradients) and only scaled by the backward, which saves recomputing the logits.
//!
//! Reference: `−(ops::token_logprobs(h·Wᵀ, t) · w).sum()` (what `candor_train::loss::lm_loss`
//! computes from `Model::lm_logits`).

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::sgemm;
use super::vmath::{exp_inplace, sum_f64};
use super::{f32_slice, tensor, uninit, PAR_MIN};

/// Logits per chunk (floats, 64 MiB): bounds the chunk's rows as V grows. Each chunk packs
/// the whole (V, C) head weight for its products again, so chunks of few rows spend their
/// time copying it: SmolLM2's V = 49152 gave 42-row chunks at 1 << 21 and its LoRA step
/// 93.5 tokens/s, 341-row chunks at 1 << 24 and 111.8 (4 × 256 tokens, Zen 3 2 vCPUs,
/// 2026-12-02; 1 << 25 113.6 for 67 MiB more peak memory).
const CHUNK_FLOATS: usize = 1 << 24;

struct Xent {
    targets: Vec<u32>,
    weights: Vec<f32>,
    /// Which gradients to compute: the hidden states', the head weight's (a frozen head,
    /// as under LoRA, needs none).
    want_dh: bool,
    want_dw: bool,
    grads: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl CustomOp2 for Xent {
    fn name(&self) -> &'static str {
        "candor-lm-head-xent"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = f32_slice(hs, hl, "lm_head_xent")?;
        let w = f32_slice(ws, wl, "lm_head_xent")?;
        let (n, c) = hl.shape().dims2()?;
        let (v, wc) = wl.shape().dims2()?;
        if wc != c || self.targets.len() != n || self.weights.len() != n {
            bail!(
                "lm_head_xent: hidden {:?}, weight {:?}, {} targets, {} weights",
                hl.shape(),
                wl.shape(),
                self.targets.len(),
                self.weights.len()
            );
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= v) {
            bail!("lm_head_xent: target token {t} is outside the vocabulary of {v}");
        }
        let rows = (CHUNK_FLOATS / v).clamp(16, n.max(16));
        let mut logits = uninit(rows.min(n) * v);
        let mut loss = vec![0f32; n];
        let want_grad = self.want_dh || self.want_dw;
        let mut dh = if self.want_dh { uninit(n * c) } else { vec![] };
        let mut dw = if self.want_dw { uninit(v * c) } else { vec![] };
        for start in (0..n).step_by(rows) {
            let r = rows.min(n - start);
            let l = &mut logits[..r * v];
            let hc = &h[start * c..(start + r) * c];
            sgemm(false, true, r, v, c, 1.0, hc, c, w, c, 0.0, l, v);
            let row = |(i, (lr, out)): (usize, (&mut [f32], &mut f32))| {
                let (t, wi) = (self.targets[start + i] as usize, self.weights[start + i]);
                let max = lr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lt = lr[t];
                lr.iter_mut().for_each(|x| *x -= max);
                exp_inplace(lr);
                // the sum and the log-sum-exp in f64: over a large vocabulary an f32 sum
                // drifts by ~1e-4 (see vmath::sum_f64)
                let sum = sum_f64(lr);
                let lse = max as f64 + sum.ln();
                *out = (-(wi as f64) * (lt as f64 - lse)) as f32;
                if want_grad {
                    let scale = (wi as f64 / sum) as f32;
                    lr.iter_mut().for_each(|x| *x *= scale);
                    lr[t] -= wi;
                }
            };
            let lossc = &mut loss[start..start + r];
            if r * v >= PAR_MIN {
                l.par_chunks_mut(v)
                    .zip(lossc.par_iter_mut())
                    .enumerate()
                    .for_each(row);
            } else {
                l.chunks_mut(v)
                    .zip(lossc.iter_mut())
                    .enumerate()
                    .for_each(row);
            }
            if self.want_dh {
                sgemm(
                    false,
                    false,
                    r,
                    c,
                    v,
                    1.0,
                    l,
                    v,
                    w,
                    c,
                    0.0,
                    &mut dh[start * c..(start + r) * c],
                    c,
                );
            }
            if self.want_dw {
                let beta = if start == 0 { 0.0 } else { 1.0 };
                sgemm(true, false, v, c, r, 1.0, l, v, hc, c, beta, &mut dw, c);
            }
        }
        if want_grad {
            *self.grads.lock().unwrap() = Some((dh, dw));
        }
        let total: f64 = loss.iter().map(|&x| x as f64).sum();
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some((mut dh, mut dw)) = self.grads.lock().unwrap().take() else {
            bail!("lm_head_xent: backward without the forward's gradients (run twice?)");
        };
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        if g != 1.0 {
            let scale = |x: &mut Vec<f32>| x.par_iter_mut().for_each(|v| *v *= g);
            scale(&mut dh);
            scale(&mut dw);
        }
        let dh = self.want_dh.then(|| tensor(dh, h.shape())).transpose()?;
        let dw = self.want_dw.then(|| tensor(dw, w.shape())).transpose()?;
        Ok((dh, dw))
    }
}

/// `Σ_i −w_i · log softmax(hidden_i · weightᵀ)[targets_i]` for `hidden (N, C)` and the LM
/// head `weight (V, C)`: a scalar, with gradients for the inputs that track them (a frozen
/// head, as under LoRA, gets none, and none is computed).
pub fn lm_head_xent(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    row_weights: &[f32],
) -> Result<Tensor> {
    let op = Xent {
        targets: targets.to_vec(),
        weights: row_weights.to_vec(),
        want_dh: hidden.track_op(),
        want_dw: weight.track_op(),
        grads: Mutex::new(None),
    };
    hidden.contiguous()?.apply_op2(&weight.contiguous()?, op)
}
