//! `y = x · Wᵀ + s · (x · Aᵀ) · Bᵀ`: a frozen `Linear` with its LoRA adapter in one op, with
//! its own backward. W (out, in) is frozen and captured by the op; x (..., in), A (r, in)
//! and B (out, r) are its inputs. With `h = x · Aᵀ` (rows × r) and `g = s · dy · B` (rows × r):
//! `dx = dy · W + g · A`, `dA = gᵀ · x`, `dB = s · dyᵀ · h`.
//!
//! Why: composed from candle ops, the adapter's term costs an element-wise scale and add
//! over (rows × out) in the forward, their backward, and an add of the two `dx` over
//! (rows × in), each on candle's single-threaded element-wise path, and keeps a
//! (rows × out) tensor alive for the backward, on every adapted projection. Here the term
//! lands in y through the product's β = 1 and `dx`'s two products share one output;
//! nothing is kept but the op's inputs (h is recomputed in the backward: rows·in·r
//! multiply-adds, 1/(out/r) of the base product's).
//!
//! Reference: the composed path of [`Adapter::add_to`](crate::lora::Adapter::add_to)
//! (`tests/fused.rs` compares values and gradients).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::gemm::sgemm;
use super::linear::out_shape;
use super::{cpu_f32, f32_slice, tensor, uninit, with_f32};

struct LoraLinear {
    /// The frozen base weight (out, in), contiguous f32.
    weight: Tensor,
    /// `alpha / rank` (or `/ √rank`, rsLoRA).
    scale: f32,
    /// The output this product gave when its block was recorded, while gradient
    /// checkpointing recomputes the block ([`super::keep`]): the forward copies it instead
    /// of multiplying.
    kept: Option<Tensor>,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "candor-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "lora linear")?;
        let a = f32_slice(a_s, al, "lora linear")?;
        let b = f32_slice(bs, bl, "lora linear")?;
        let (r, k) = al.shape().dims2()?;
        let n = bl.shape().dims2()?.0;
        let m = x.len() / k;
        if let Some(kept) = &self.kept {
            if kept.elem_count() != m * n {
                candle_core::bail!(
                    "gradient checkpointing: a kept product has {} elements, the recomputed one {m}×{n}",
                    kept.elem_count()
                );
            }
            let y = with_f32(kept, "lora linear", <[f32]>::to_vec)?;
            return Ok((CpuStorage::F32(y), out_shape(xl, n)));
        }
        let mut h = uninit(m * r);
        sgemm(false, true, m, r, k, 1.0, x, k, a, k, 0.0, &mut h, r);
        let mut y = uninit(m * n);
        with_f32(&self.weight, "lora linear", |w| {
            sgemm(false, true, m, n, k, 1.0, x, k, w, k, 0.0, &mut y, n)
        })?;
        sgemm(
            false, true, m, n, r, self.scale, &h, r, b, r, 1.0, &mut y, n,
        );
        Ok((CpuStorage::F32(y), out_shape(xl, n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (r, k) = a.dims2()?;
        let n = b.dims2()?.0;
        let m = x.elem_count() / k;
        let dy = dy.contiguous()?;
        let s = self.scale;
        let op = "lora linear bwd";
        // the storages stay read-locked (the guards) while the products read them
        let (dys, dyl) = dy.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (a_s, al) = a.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (ws, wl) = self.weight.storage_and_layout();
        let (dy_, x_) = (cpu_f32(&dys, dyl, op)?, cpu_f32(&xs, xl, op)?);
        let (a_, b_, w) = (
            cpu_f32(&a_s, al, op)?,
            cpu_f32(&bs, bl, op)?,
            cpu_f32(&ws, wl, op)?,
        );
        // g = s · dy · B (rows × r): the gradient reaching h, scaled
        let mut g = uninit(m * r);
        sgemm(false, false, m, r, n, s, dy_, n, b_, r, 0.0, &mut g, r);
        let dx = if x.track_op() {
            let mut dx = uninit(m * k);
            sgemm(false, false, m, k, n, 1.0, dy_, n, w, k, 0.0, &mut dx, k);
            sgemm(false, false, m, k, r, 1.0, &g, r, a_, k, 1.0, &mut dx, k);
            Some(tensor(dx, x.shape())?)
        } else {
            None
        };
        let da = if a.track_op() {
            let mut da = uninit(r * k);
            sgemm(true, false, r, k, m, 1.0, &g, r, x_, k, 0.0, &mut da, k);
            Some(tensor(da, (r, k))?)
        } else {
            None
        };
        let db = if b.track_op() {
            let mut h = uninit(m * r);
            sgemm(false, true, m, r, k, 1.0, x_, k, a_, k, 0.0, &mut h, r);
            let mut db = uninit(n * r);
            sgemm(true, false, n, r, m, s, dy_, n, &h, r, 0.0, &mut db, r);
            Some(tensor(db, (n, r))?)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

/// `x (..., in) · Wᵀ + scale · (x · Aᵀ) · Bᵀ` for a frozen `weight` (out, in), adapters
/// `a` (r, in) and `b` (out, r), on f32 CPU tensors; no gradient flows to `weight`. Under
/// gradient checkpointing its output is kept and handed back when the block is recomputed
/// ([`super::keep`]).
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let op = LoraLinear {
        weight: weight.contiguous()?.detach(),
        scale: scale as f32,
        kept: super::keep::next(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?;
    super::keep::keep(&y);
    Ok(y)
}
