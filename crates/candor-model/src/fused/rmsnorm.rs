//! RMSNorm over the last dimension, `y = x · rstd · w` with `rstd = 1/√(mean(x²) + ε)`,
//! and its backward (rstd is recomputed, one pass over the row):
//!
//! ```text
//! x̂ = x·rstd,  g = dy·w
//! dx = rstd · (g − x̂ · mean(g·x̂))
//! dw = Σ_rows dy·x̂
//! ```
//!
//! Reference: [`crate::ops::rms_norm`].

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::vmath::dot_f64;
use super::{f32_slice, par_parts, tensor, uninit, with_f32, SendPtr, PAR_MIN};

struct RmsNorm {
    eps: f32,
}

/// `1/√(mean(x²) + ε)`, the mean accumulated in f64.
fn rstd(row: &[f32], eps: f32) -> f32 {
    let ss = dot_f64(row, row);
    (1.0 / (ss / row.len() as f64 + eps as f64).sqrt()) as f32
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "candor-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "rms_norm")?;
        let w = f32_slice(ws, wl, "rms_norm")?;
        let c = w.len();
        let mut y = uninit(x.len());
        let row = |(yr, xr): (&mut [f32], &[f32])| {
            let r = rstd(xr, self.eps);
            for ((o, &v), &wv) in yr.iter_mut().zip(xr).zip(w) {
                *o = v * r * wv;
            }
        };
        if x.len() >= PAR_MIN {
            y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(row);
        } else {
            y.chunks_mut(c).zip(x.chunks(c)).for_each(row);
        }
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = w.elem_count();
        let dy = dy.contiguous()?;
        let mut dx = uninit(x.elem_count());
        let dxp = SendPtr(dx.as_mut_ptr());
        let dw_parts = with_f32(x, "rms_norm bwd", |x| {
            with_f32(w, "rms_norm bwd", |w| {
                with_f32(&dy, "rms_norm bwd", |g| {
                    let rows = x.len() / c;
                    // one contiguous block of rows per thread; each returns its partial dw
                    par_parts(rows, (PAR_MIN / c).max(1), |range| {
                        let mut dw = vec![0f32; c];
                        for r in range {
                            let (xr, gr) = (&x[r * c..(r + 1) * c], &g[r * c..(r + 1) * c]);
                            // SAFETY: dx has rows·c floats; row r belongs to this part's
                            // range alone (par_parts gives disjoint ranges).
                            let dxr =
                                unsafe { std::slice::from_raw_parts_mut(dxp.get().add(r * c), c) };
                            let rs = rstd(xr, self.eps);
                            let mut dot = 0f32;
                            for i in 0..c {
                                dot += gr[i] * w[i] * xr[i] * rs;
                            }
                            let mean = dot / c as f32;
                            for i in 0..c {
                                let xh = xr[i] * rs;
                                dxr[i] = rs * (gr[i] * w[i] - xh * mean);
                                dw[i] += gr[i] * xh;
                            }
                        }
                        dw
                    })
                })
            })
        })???;
        let mut dw = vec![0f32; c];
        for part in dw_parts {
            for (a, b) in dw.iter_mut().zip(part) {
                *a += b;
            }
        }
        let dx = if x.track_op() {
            Some(tensor(dx, x.shape())?)
        } else {
            None
        };
        Ok((dx, Some(tensor(dw, c)?)))
    }
}

/// RMSNorm of `x (..., C)` with weight `w (C)`, on contiguous f32 CPU tensors.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}
