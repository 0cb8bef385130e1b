//! Rotary embeddings (Hugging Face rotate-half convention) on `x (B, T, H, D)`, the layout
//! the projections produce, so no transpose is needed:
//!
//! ```text
//! y[..half] = x1·cos − x2·sin      dx1 =  dy1·cos + dy2·sin
//! y[half..] = x2·cos + x1·sin      dx2 =  dy2·cos − dy1·sin
//! ```
//!
//! with cos/sin `(1|B, T, D/2)` (per row when positions differ by row). The backward is the
//! rotation by the opposite angle. Reference: [`crate::ops::apply_rope`] on `(B, H, T, D)`.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, tensor, uninit, with_f32, PAR_MIN};

struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// Rotate every (T, H, D) row block of `x` by the angles of its batch row; `sign` −1 undoes.
fn rotate(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    dims: (usize, usize, usize, usize),
    cos_rows: usize,
    sign: f32,
) -> Vec<f32> {
    let (_b, t, h, d) = dims;
    let half = d / 2;
    let mut y = uninit(x.len());
    // one (batch, position) per chunk: H heads of D values
    let work = |(i, (yc, xc)): (usize, (&mut [f32], &[f32]))| {
        let (bi, ti) = (i / t, i % t);
        let cb = if cos_rows == 1 { 0 } else { bi };
        let off = (cb * t + ti) * half;
        let (c, s) = (&cos[off..off + half], &sin[off..off + half]);
        for hh in 0..h {
            let xr = &xc[hh * d..(hh + 1) * d];
            let yr = &mut yc[hh * d..(hh + 1) * d];
            let (x1, x2) = xr.split_at(half);
            let (y1, y2) = yr.split_at_mut(half);
            for j in 0..half {
                let sj = sign * s[j];
                y1[j] = x1[j] * c[j] - x2[j] * sj;
                y2[j] = x2[j] * c[j] + x1[j] * sj;
            }
        }
    };
    if x.len() >= PAR_MIN {
        y.par_chunks_mut(h * d)
            .zip(x.par_chunks(h * d))
            .enumerate()
            .for_each(work);
    } else {
        y.chunks_mut(h * d)
            .zip(x.chunks(h * d))
            .enumerate()
            .for_each(work);
    }
    y
}

impl Rope {
    fn run(&self, x: &[f32], dims: (usize, usize, usize, usize), sign: f32) -> Result<Vec<f32>> {
        let cos_rows = self.cos.dim(0)?;
        with_f32(&self.cos, "rope", |c| {
            with_f32(&self.sin, "rope", |s| rotate(x, c, s, dims, cos_rows, sign))
        })?
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "candor-rope"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "rope")?;
        let dims = xl.shape().dims4()?;
        Ok((CpuStorage::F32(self.run(x, dims, 1.0)?), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        let dx = with_f32(&dy, "rope bwd", |g| self.run(g, x.dims4()?, -1.0))??;
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// Rotary embedding of `x (B, T, H, D)` with `cos`/`sin` of shape `(1|B, T, D/2)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, t, _, d) = x.dims4()?;
    let (cb, ct, half) = cos.dims3()?;
    if ct != t || half * 2 != d || (cb != 1 && cb != b) || sin.dims() != cos.dims() {
        bail!(
            "rope: x {:?} with cos {:?} / sin {:?}: expected (1|B, T, D/2)",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    x.contiguous()?.apply_op1(Rope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
    })
}
