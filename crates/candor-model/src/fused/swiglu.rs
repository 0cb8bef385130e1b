//! SwiGLU's gate, `y = silu(g) · u` with `silu(g) = g·σ(g)`, and its backward:
//! `dg = dy · u · σ(g) · (1 + g·(1 − σ(g)))`, `du = dy · silu(g)`.
//!
//! Reference: `(g.silu()? * u)?`.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::vmath::exp_inplace;
use super::{f32_slice, tensor, uninit, with_f32, PAR_MIN};

struct SwiGlu;

/// One chunk of the backward: ((dg, du) outputs, (g, u) inputs), dy.
type ChunkPair<'a> = (
    ((&'a mut [f32], &'a mut [f32]), (&'a [f32], &'a [f32])),
    &'a [f32],
);

const CHUNK: usize = 4096;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "candor-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(gs, gl, "swiglu")?;
        let u = f32_slice(us, ul, "swiglu")?;
        let mut y = uninit(g.len());
        let f = |((yc, gc), uc): ((&mut [f32], &[f32]), &[f32])| {
            // yc ← exp(−g), then silu(g)·u = g·u / (1 + exp(−g))
            yc.iter_mut().zip(gc).for_each(|(o, &a)| *o = -a);
            exp_inplace(yc);
            for ((o, &a), &b) in yc.iter_mut().zip(gc).zip(uc) {
                *o = a / (1.0 + *o) * b;
            }
        };
        if g.len() >= PAR_MIN {
            y.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(u.par_chunks(CHUNK))
                .for_each(f);
        } else {
            y.chunks_mut(CHUNK)
                .zip(g.chunks(CHUNK))
                .zip(u.chunks(CHUNK))
                .for_each(f);
        }
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let n = g.elem_count();
        let (mut dg, mut du) = (uninit(n), uninit(n));
        with_f32(g, "swiglu bwd", |g| {
            with_f32(u, "swiglu bwd", |u| {
                with_f32(&dy, "swiglu bwd", |d| {
                    let f = |(((dgc, duc), (gc, uc)), dc): ChunkPair<'_>| {
                        // dgc ← exp(−g) first
                        dgc.iter_mut().zip(gc).for_each(|(o, &a)| *o = -a);
                        exp_inplace(dgc);
                        for i in 0..dgc.len() {
                            let (a, b, e) = (gc[i], uc[i], dc[i]);
                            let s = 1.0 / (1.0 + dgc[i]);
                            dgc[i] = e * b * s * (1.0 + a * (1.0 - s));
                            duc[i] = e * a * s;
                        }
                    };
                    if n >= PAR_MIN {
                        dg.par_chunks_mut(CHUNK)
                            .zip(du.par_chunks_mut(CHUNK))
                            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                            .zip(d.par_chunks(CHUNK))
                            .for_each(f);
                    } else {
                        dg.chunks_mut(CHUNK)
                            .zip(du.chunks_mut(CHUNK))
                            .zip(g.chunks(CHUNK).zip(u.chunks(CHUNK)))
                            .zip(d.chunks(CHUNK))
                            .for_each(f);
                    }
                })
            })
        })???;
        Ok((Some(tensor(dg, g.shape())?), Some(tensor(du, u.shape())?)))
    }
}

/// `silu(g) · u` for two contiguous f32 CPU tensors of one shape.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            g.dims(),
            u.dims()
        );
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}
