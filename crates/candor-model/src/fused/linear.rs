//! `y = x · Wᵀ` (a bias-free `Linear`) with its own backward:
//! `dx = dy · W`, `dW = dyᵀ · x`, each one [`sgemm`](super::gemm::sgemm) call.
//!
//! Reference: `x.broadcast_matmul(&w.t())` (what `candle_nn::Linear` computes).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::gemm::sgemm;
use super::{f32_slice, tensor, uninit, with_f32};

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "candor-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "linear")?;
        let w = f32_slice(ws, wl, "linear")?;
        let (n, k) = wl.shape().dims2()?;
        let m = x.len() / k;
        let mut y = uninit(m * n);
        sgemm(false, true, m, n, k, 1.0, x, k, w, k, 0.0, &mut y, n);
        Ok((CpuStorage::F32(y), out_shape(xl, n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k;
        let dy = dy.contiguous()?;
        with_f32(&dy, "linear bwd", |g| {
            let dx = if x.track_op() {
                let mut dx = uninit(m * k);
                with_f32(w, "linear bwd", |w| {
                    sgemm(false, false, m, k, n, 1.0, g, n, w, k, 0.0, &mut dx, k)
                })?;
                Some(tensor(dx, x.shape())?)
            } else {
                None
            };
            let dw = if w.track_op() {
                let mut dw = uninit(n * k);
                with_f32(x, "linear bwd", |x| {
                    sgemm(true, false, n, k, m, 1.0, g, n, x, k, 0.0, &mut dw, k)
                })?;
                Some(tensor(dw, (n, k))?)
            } else {
                None
            };
            Ok((dx, dw))
        })?
    }
}

/// The shape of a projection's output: x's (..., K) with the last dimension N.
pub(crate) fn out_shape(x: &Layout, n: usize) -> Shape {
    let mut dims = x.shape().dims().to_vec();
    *dims.last_mut().unwrap() = n;
    Shape::from(dims)
}

/// `x (..., K) · wᵀ` for `w (N, K)`: (..., N), on contiguous f32 CPU tensors.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}
