//! Causal softmax attention with its backward, blocked by query rows, on the `(B, T, H, D)`
//! layout the projections produce (no transposes, no (B, H, T, T) tensor kept):
//!
//! ```text
//! forward, per (batch, head, block of BQ queries):
//!   S = Q·Kᵀ·scale + bias           only the keys up to the block's last position when causal
//!   P = softmax(S), lse = log Σ exp  (lse kept: B·H·T floats)
//!   O = P·V
//! backward, per (batch, kv head), over its query heads and blocks:
//!   P  = exp(Q·Kᵀ·scale + bias − lse)        recomputed
//!   dV += Pᵀ·dO;   dP = dO·Vᵀ;   dS = P ⊙ (dP − rowsum(dO ⊙ O))
//!   dQ  = dS·K·scale;   dK += dSᵀ·Q·scale
//! ```
//!
//! Masks: [`AttnMask::Causal`] (key j visible to query i iff j ≤ past + i), or candor's
//! additive bias `(1|B, 1, T, Tk)` (padding, packed segments, generation steps), which the
//! kernel adds as the composed path does. A bias that hides every future key anyway
//! (`causal: true`, what [`crate::mask::Layout::bias`] builds) also lets the kernel skip
//! them; a query that then sees no key at all (a padding query, whose output nothing uses)
//! averages the values of its causal window instead of all keys.
//!
//! Grouped-query attention: query head h reads kv head h / (H / KV).
//!
//! With a [`CacheBuf`] the new keys/values are written into a preallocated buffer and the
//! queries attend over all of it; that path is for inference and has no backward (a
//! backward through it fails with candle's "no backward" error instead of silently dropping
//! gradients).
//!
//! Reference: `ops::softmax(q·kᵀ·scale + bias)·v` on `(B, H, T, D)` with `ops::repeat_kv`.

use std::sync::Mutex;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, DType, InplaceOp2, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::gemm::sgemm_serial;
use super::vmath::{dot_f64, exp_inplace, sum_f64};
use super::{cpu_f32, f32_slice, tensor, uninit, with_f32, SendPtr};

/// Query rows per block.
const BQ: usize = 32;
/// Below this many multiply-adds the whole op runs on the calling thread.
const PAR_WORK: usize = 1 << 18;

/// Which keys each query sees.
#[derive(Clone, Copy)]
pub enum AttnMask<'a> {
    /// Key j is visible to query i iff j ≤ past + i.
    Causal,
    /// Additive bias `(1|B, 1, T, Tk)`; `causal` promises it masks every key after the
    /// query's own position, so the kernel may skip those.
    Bias { bias: &'a Tensor, causal: bool },
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    kv: usize,
    d: usize,
    /// keys: past + t
    tk: usize,
    /// elements between batch rows of the key/value buffers
    kbs: usize,
    /// batch rows of the bias (0 = none, 1 = shared, b = per row)
    bias_rows: usize,
}

impl Dims {
    fn past(&self) -> usize {
        self.tk - self.t
    }
    fn rep(&self) -> usize {
        self.h / self.kv
    }
    /// Keys the rows `qb..qb+nq` may see: all, or up to the block's last position.
    fn key_end(&self, causal: bool, qb: usize, nq: usize) -> usize {
        if causal {
            (self.past() + qb + nq).min(self.tk)
        } else {
            self.tk
        }
    }
    fn work(&self) -> usize {
        self.b * self.h * self.t * self.tk * self.d
    }
}

/// Fill `s` (nq × kend) with scaled, biased scores of queries `qb..` of head `h`, batch `bi`.
///
/// # Safety
/// `q` addresses the (B, T, H, D) queries and `k` the keys (batch stride `dm.kbs`, rows of
/// KV·D) that `dm` describes; `qb + nq ≤ T`, `kend ≤ Tk`, and `s` holds nq × kend.
#[allow(clippy::too_many_arguments)]
unsafe fn scores(
    s: &mut [f32],
    q: *const f32,
    k: *const f32,
    bias: Option<&[f32]>,
    dm: &Dims,
    scale: f32,
    bi: usize,
    h: usize,
    qb: usize,
    nq: usize,
    kend: usize,
) {
    let (hd, kvd) = (dm.h * dm.d, dm.kv * dm.d);
    let qp = q.add((bi * dm.t + qb) * hd + h * dm.d);
    let kp = k.add(bi * dm.kbs + (h / dm.rep()) * dm.d);
    sgemm_serial(
        false,
        true,
        nq,
        kend,
        dm.d,
        scale,
        qp,
        hd,
        kp,
        kvd,
        0.0,
        s.as_mut_ptr(),
        kend,
    );
    if let Some(bias) = bias {
        let bb = if dm.bias_rows == 1 { 0 } else { bi };
        for i in 0..nq {
            let brow = &bias[(bb * dm.t + qb + i) * dm.tk..][..kend];
            for (x, &bv) in s[i * kend..(i + 1) * kend].iter_mut().zip(brow) {
                *x += bv;
            }
        }
    }
}

/// Number of keys query `qi` sees within the first `kend`.
fn row_limit(causal: bool, dm: &Dims, qi: usize, kend: usize) -> usize {
    if causal {
        (dm.past() + qi + 1).min(kend)
    } else {
        kend
    }
}

struct Fwd<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    bias: Option<&'a [f32]>,
    causal: bool,
    scale: f32,
    dm: Dims,
}

impl Fwd<'_> {
    /// Output (B, T, H, D) and log-sum-exp (B, H, T).
    fn run(&self) -> (Vec<f32>, Vec<f32>) {
        let dm = self.dm;
        let mut out = uninit(dm.b * dm.t * dm.h * dm.d);
        let mut lse = uninit(dm.b * dm.h * dm.t);
        let (op, lp) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
        let task = |task: usize| {
            let (op, lp) = (op, lp);
            let (bi, h) = (task / dm.h, task % dm.h);
            let mut s = vec![0f32; BQ.min(dm.t) * dm.tk];
            let (hd, kvd) = (dm.h * dm.d, dm.kv * dm.d);
            for qb in (0..dm.t).step_by(BQ) {
                let nq = BQ.min(dm.t - qb);
                let kend = dm.key_end(self.causal, qb, nq);
                let s = &mut s[..nq * kend];
                // SAFETY: q, k are the (B, T, H, D) / (B, Tk, KV, D) inputs `dm` describes
                // (checked by `Attention::dims`); qb + nq ≤ T, kend ≤ Tk, s is nq × kend.
                unsafe {
                    scores(
                        s,
                        self.q.as_ptr(),
                        self.k.as_ptr(),
                        self.bias,
                        &dm,
                        self.scale,
                        bi,
                        h,
                        qb,
                        nq,
                        kend,
                    );
                }
                for i in 0..nq {
                    let lim = row_limit(self.causal, &dm, qb + i, kend);
                    let row = &mut s[i * kend..(i + 1) * kend];
                    let max = row[..lim].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    row[..lim].iter_mut().for_each(|x| *x -= max);
                    exp_inplace(&mut row[..lim]);
                    let sum = sum_f64(&row[..lim]);
                    let inv = (1.0 / sum) as f32;
                    row[..lim].iter_mut().for_each(|x| *x *= inv);
                    row[lim..].iter_mut().for_each(|x| *x = 0.0);
                    // SAFETY: lse has B·H·T floats; (bi, h, qb + i) is this task's own row
                    // (task = bi·H + h), written by no other task.
                    unsafe {
                        *lp.0.add((bi * dm.h + h) * dm.t + qb + i) = (max as f64 + sum.ln()) as f32
                    };
                }
                // SAFETY: V rows 0..kend of kv head h / rep lie in v (batch stride kbs);
                // the output rows qb..qb+nq of head h, batch bi (stride hd, d wide) belong
                // to this task (bi, h) alone; s holds nq × kend.
                unsafe {
                    let vp = self.v.as_ptr().add(bi * dm.kbs + (h / dm.rep()) * dm.d);
                    let o = op.0.add((bi * dm.t + qb) * hd + h * dm.d);
                    sgemm_serial(
                        false,
                        false,
                        nq,
                        dm.d,
                        kend,
                        1.0,
                        s.as_ptr(),
                        kend,
                        vp,
                        kvd,
                        0.0,
                        o,
                        hd,
                    );
                }
            }
        };
        if dm.work() >= PAR_WORK {
            (0..dm.b * dm.h).into_par_iter().for_each(task);
        } else {
            (0..dm.b * dm.h).for_each(task);
        }
        (out, lse)
    }
}

struct Attention {
    scale: f32,
    causal: bool,
    /// (1|B, T, Tk), contiguous
    bias: Option<Tensor>,
    lse: Mutex<Vec<f32>>,
}

impl Attention {
    fn dims(&self, ql: &Layout, kl: &Layout) -> Result<Dims> {
        let (b, t, h, d) = ql.shape().dims4()?;
        let (kb, tk, kv, kd) = kl.shape().dims4()?;
        if kb != b || kd != d || kv == 0 || h % kv != 0 || tk < t {
            bail!(
                "attention: q {:?} and k {:?} do not fit",
                ql.shape(),
                kl.shape()
            );
        }
        let bias_rows = match &self.bias {
            Some(bias) => {
                let (br, bt, btk) = bias.dims3()?;
                if (br != 1 && br != b) || bt != t || btk != tk {
                    bail!(
                        "attention: bias {:?} does not fit q {:?} and k {:?}",
                        bias.dims(),
                        ql.shape(),
                        kl.shape()
                    );
                }
                br
            }
            None => 0,
        };
        Ok(Dims {
            b,
            t,
            h,
            kv,
            d,
            tk,
            kbs: tk * kv * d,
            bias_rows,
        })
    }

    fn with_bias<R>(&self, f: impl FnOnce(Option<&[f32]>) -> R) -> Result<R> {
        match &self.bias {
            Some(b) => with_f32(b, "attention", |s| f(Some(s))),
            None => Ok(f(None)),
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "candor-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = self.dims(ql, kl)?;
        if vl.shape() != kl.shape() {
            bail!(
                "attention: v {:?} differs from k {:?}",
                vl.shape(),
                kl.shape()
            );
        }
        let (q, k, v) = (
            f32_slice(qs, ql, "attention")?,
            f32_slice(ks, kl, "attention")?,
            f32_slice(vs, vl, "attention")?,
        );
        let (out, lse) = self.with_bias(|bias| {
            Fwd {
                q,
                k,
                v,
                bias,
                causal: self.causal,
                scale: self.scale,
                dm,
            }
            .run()
        })?;
        *self.lse.lock().unwrap() = lse;
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = self.dims(q.layout(), k.layout())?;
        let dout = dout.contiguous()?;
        let lse = std::mem::take(&mut *self.lse.lock().unwrap());
        if lse.len() != dm.b * dm.h * dm.t {
            bail!("attention: backward without a forward's saved state (backward run twice?)");
        }
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = o.storage_and_layout();
        let (gs, gl) = dout.storage_and_layout();
        let op = "attention bwd";
        let (dq, dk, dv) = self.with_bias(|bias| -> Result<_> {
            Ok(Bwd {
                q: cpu_f32(&qs, ql, op)?,
                k: cpu_f32(&ks, kl, op)?,
                v: cpu_f32(&vs, vl, op)?,
                o: cpu_f32(&os, ol, op)?,
                g: cpu_f32(&gs, gl, op)?,
                bias,
                lse: &lse,
                causal: self.causal,
                scale: self.scale,
                dm,
            }
            .run())
        })??;
        Ok((
            Some(tensor(dq, q.shape())?),
            Some(tensor(dk, k.shape())?),
            Some(tensor(dv, v.shape())?),
        ))
    }
}

/// The backward pass's inputs: the forward's, its output `o`, the output's gradient `g`,
/// and the forward's log-sum-exp per query row.
struct Bwd<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    g: &'a [f32],
    bias: Option<&'a [f32]>,
    lse: &'a [f32],
    causal: bool,
    scale: f32,
    dm: Dims,
}

/// Where the backward writes dQ (B, T, H, D), dK and dV (B, Tk, KV, D).
#[derive(Clone, Copy)]
struct GradOut {
    dq: SendPtr,
    dk: SendPtr,
    dv: SendPtr,
}

/// One (batch, kv head)'s scratch: its dK/dV accumulated over its query heads, and the
/// probabilities and their gradient for one query block.
struct Scratch {
    dk: Vec<f32>,
    dv: Vec<f32>,
    p: Vec<f32>,
    dp: Vec<f32>,
}

impl Bwd<'_> {
    /// dQ, dK, dV: one task per (batch, kv head), each writing only its own rows/heads.
    fn run(&self) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let dm = self.dm;
        let mut dq = uninit(dm.b * dm.t * dm.h * dm.d);
        let mut dk = uninit(dm.b * dm.tk * dm.kv * dm.d);
        let mut dv = uninit(dm.b * dm.tk * dm.kv * dm.d);
        let out = GradOut {
            dq: SendPtr(dq.as_mut_ptr()),
            dk: SendPtr(dk.as_mut_ptr()),
            dv: SendPtr(dv.as_mut_ptr()),
        };
        let task = |task: usize| self.kv_head(task / dm.kv, task % dm.kv, out);
        if dm.work() >= PAR_WORK {
            (0..dm.b * dm.kv).into_par_iter().for_each(task);
        } else {
            (0..dm.b * dm.kv).for_each(task);
        }
        (dq, dk, dv)
    }

    /// Batch row `bi`, kv head `kvh`: every query head reading it, every query block; then
    /// its dK/dV rows written out.
    fn kv_head(&self, bi: usize, kvh: usize, out: GradOut) {
        let dm = self.dm;
        let (kvd, d) = (dm.kv * dm.d, dm.d);
        let mut sc = Scratch {
            dk: vec![0f32; dm.tk * d],
            dv: vec![0f32; dm.tk * d],
            p: vec![0f32; BQ.min(dm.t) * dm.tk],
            dp: vec![0f32; BQ.min(dm.t) * dm.tk],
        };
        for h in kvh * dm.rep()..(kvh + 1) * dm.rep() {
            for qb in (0..dm.t).step_by(BQ) {
                self.block(bi, kvh, h, qb, &mut sc, out);
            }
        }
        for j in 0..dm.tk {
            let off = bi * dm.kbs + j * kvd + kvh * d;
            // SAFETY: element `off..off + d` is row j, kv head kvh of batch bi in dK and dV
            // (B·Tk·KV·D floats each; kbs = Tk·KV·D here): only this task (bi, kvh) writes it,
            // and the scratch rows are d floats.
            unsafe {
                std::ptr::copy_nonoverlapping(sc.dk[j * d..].as_ptr(), out.dk.0.add(off), d);
                std::ptr::copy_nonoverlapping(sc.dv[j * d..].as_ptr(), out.dv.0.add(off), d);
            }
        }
    }

    /// Query head `h`, queries `qb..qb+BQ`: recompute P, then dV += Pᵀ·dO, dS, dQ, dK += dSᵀ·Q.
    fn block(&self, bi: usize, kvh: usize, h: usize, qb: usize, sc: &mut Scratch, out: GradOut) {
        let (dm, causal, scale) = (self.dm, self.causal, self.scale);
        let (hd, kvd, d) = (dm.h * dm.d, dm.kv * dm.d, dm.d);
        let nq = BQ.min(dm.t - qb);
        let kend = dm.key_end(causal, qb, nq);
        let (p, dp) = (&mut sc.p[..nq * kend], &mut sc.dp[..nq * kend]);
        let row0 = (bi * dm.t + qb) * hd + h * d;
        let kv0 = bi * dm.kbs + kvh * d;
        // SAFETY: q and k hold (B, T, H, D) and (B, Tk, KV, D) as `dm` describes (checked
        // by `Attention::dims`), p has room for nq × kend.
        unsafe {
            scores(
                p,
                self.q.as_ptr(),
                self.k.as_ptr(),
                self.bias,
                &dm,
                scale,
                bi,
                h,
                qb,
                nq,
                kend,
            );
        }
        for i in 0..nq {
            let lim = row_limit(causal, &dm, qb + i, kend);
            let l = self.lse[(bi * dm.h + h) * dm.t + qb + i];
            let row = &mut p[i * kend..(i + 1) * kend];
            row[..lim].iter_mut().for_each(|x| *x -= l);
            exp_inplace(&mut row[..lim]);
            row[lim..].iter_mut().for_each(|x| *x = 0.0);
        }
        let (gp, vp) = (self.g[row0..].as_ptr(), self.v[kv0..].as_ptr());
        // SAFETY: dO rows qb..qb+nq of head h (stride hd, d wide) and V rows 0..kend of kv
        // head kvh (stride kvd) lie in g and v; dv and dp have room for kend × d and
        // nq × kend; no output overlaps an input.
        unsafe {
            // dV += Pᵀ·dO
            sgemm_serial(
                true,
                false,
                kend,
                d,
                nq,
                1.0,
                p.as_ptr(),
                kend,
                gp,
                hd,
                1.0,
                sc.dv.as_mut_ptr(),
                d,
            );
            // dP = dO·Vᵀ
            sgemm_serial(
                false,
                true,
                nq,
                kend,
                d,
                1.0,
                gp,
                hd,
                vp,
                kvd,
                0.0,
                dp.as_mut_ptr(),
                kend,
            );
        }
        // dS = P ⊙ (dP − rowsum(dO ⊙ O))
        for i in 0..nq {
            let off = row0 + i * hd;
            let di = dot_f64(&self.g[off..off + d], &self.o[off..off + d]) as f32;
            let (pr, dr) = (
                &p[i * kend..(i + 1) * kend],
                &mut dp[i * kend..(i + 1) * kend],
            );
            for (x, &pv) in dr.iter_mut().zip(pr.iter()) {
                *x = pv * (*x - di);
            }
        }
        let (kp, qp) = (self.k[kv0..].as_ptr(), self.q[row0..].as_ptr());
        // SAFETY: K rows 0..kend (stride kvd) and Q rows qb..qb+nq of head h (stride hd)
        // lie in k and q; the dQ rows written (row0 + i·hd, d wide) belong to query head h
        // of batch bi, which only this task (bi, kvh = h / rep) writes; dk has kend × d.
        unsafe {
            // dQ = dS·K·scale
            sgemm_serial(
                false,
                false,
                nq,
                d,
                kend,
                scale,
                dp.as_ptr(),
                kend,
                kp,
                kvd,
                0.0,
                out.dq.0.add(row0),
                hd,
            );
            // dK += dSᵀ·Q·scale
            sgemm_serial(
                true,
                false,
                kend,
                d,
                nq,
                scale,
                dp.as_ptr(),
                kend,
                qp,
                hd,
                1.0,
                sc.dk.as_mut_ptr(),
                d,
            );
        }
    }
}

/// Attention over cached keys: forward only.
struct CachedAttention {
    inner: Attention,
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl CustomOp1 for CachedAttention {
    fn name(&self) -> &'static str {
        "candor-attention-kv-cache"
    }

    fn cpu_fwd(&self, qs: &CpuStorage, ql: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, cap, kv, d) = self.k.dims4()?;
        let kshape = Layout::contiguous((b, self.len, kv, d));
        let mut dm = self.inner.dims(ql, &kshape)?;
        dm.kbs = cap * kv * d;
        let q = f32_slice(qs, ql, "attention")?;
        let out = with_f32(&self.k, "attention", |k| {
            with_f32(&self.v, "attention", |v| {
                self.inner.with_bias(|bias| {
                    Fwd {
                        q,
                        k,
                        v,
                        bias,
                        causal: self.inner.causal,
                        scale: self.inner.scale,
                        dm,
                    }
                    .run()
                    .0
                })
            })
        })???;
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
}

/// Keys and values seen so far, in preallocated buffers `(B, capacity, KV, D)` that grow by
/// doubling; appending writes in place.
pub struct CacheBuf {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl Clone for CacheBuf {
    /// A deep copy: two caches never share a buffer they would both append to.
    fn clone(&self) -> Self {
        CacheBuf {
            k: self.k.copy().expect("copy a CPU tensor"),
            v: self.v.copy().expect("copy a CPU tensor"),
            len: self.len,
        }
    }
}

struct WriteRows {
    at: usize,
}

impl InplaceOp2 for WriteRows {
    fn name(&self) -> &'static str {
        "candor-kv-write"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let (b, cap, kv, d) = dl.shape().dims4()?;
        let (_, t, _, _) = sl.shape().dims4()?;
        let src = f32_slice(src, sl, "kv write")?;
        let CpuStorage::F32(dst) = dst else {
            bail!("kv write: f32 only")
        };
        let row = kv * d;
        for bi in 0..b {
            let to = (bi * cap + self.at) * row;
            dst[to..to + t * row].copy_from_slice(&src[bi * t * row..(bi + 1) * t * row]);
        }
        Ok(())
    }
}

impl CacheBuf {
    /// Cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append `k`, `v` of shape (B, T, KV, D).
    fn append(slot: &mut Option<CacheBuf>, k: &Tensor, v: &Tensor) -> Result<()> {
        let (b, t, kv, d) = k.dims4()?;
        let len = slot.as_ref().map_or(0, |c| c.len);
        let cap = slot.as_ref().map_or(0, |c| c.k.dim(1).unwrap_or(0));
        if len + t > cap {
            let new_cap = (2 * cap).max(len + t).max(64);
            let grow = |old: Option<&Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((b, new_cap, kv, d), DType::F32, k.device())?;
                if let Some(old) = old {
                    if len > 0 {
                        buf.inplace_op2(
                            &old.narrow(1, 0, len)?.contiguous()?,
                            &WriteRows { at: 0 },
                        )?;
                    }
                }
                Ok(buf)
            };
            let nk = grow(slot.as_ref().map(|c| &c.k))?;
            let nv = grow(slot.as_ref().map(|c| &c.v))?;
            *slot = Some(CacheBuf { k: nk, v: nv, len });
        }
        let c = slot.as_mut().unwrap();
        if c.k.dim(0)? != b {
            bail!("kv cache holds {} rows, got {b}", c.k.dim(0)?);
        }
        c.k.inplace_op2(&k.contiguous()?, &WriteRows { at: len })?;
        c.v.inplace_op2(&v.contiguous()?, &WriteRows { at: len })?;
        c.len = len + t;
        Ok(())
    }

    /// Keep only the given batch rows.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        self.k = self.k.index_select(rows, 0)?;
        self.v = self.v.index_select(rows, 0)?;
        Ok(())
    }
}

/// Softmax attention of `q (B, T, H, D)` over `k`, `v (B, T, KV, D)`: (B, T, H, D), with
/// scores scaled by `1/√D`. With `cache`, `k`/`v` are appended to it first and the queries
/// attend over every cached position (inference only).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: AttnMask,
    cache: Option<&mut Option<CacheBuf>>,
) -> Result<Tensor> {
    let d = q.dim(3)?;
    let (bias, causal) = match mask {
        AttnMask::Causal => (None, true),
        AttnMask::Bias { bias, causal } => {
            let (br, one, t, tk) = bias.dims4()?;
            if one != 1 {
                bail!(
                    "attention: bias {:?}: expected (1|B, 1, T, Tk)",
                    bias.dims()
                );
            }
            (
                Some(
                    bias.to_dtype(DType::F32)?
                        .reshape((br, t, tk))?
                        .contiguous()?,
                ),
                causal,
            )
        }
    };
    let op = Attention {
        scale: 1.0 / (d as f32).sqrt(),
        causal,
        bias,
        lse: Mutex::new(vec![]),
    };
    match cache {
        None => q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op),
        Some(slot) => {
            CacheBuf::append(slot, k, v)?;
            let c = slot.as_ref().unwrap();
            let op = CachedAttention {
                inner: op,
                k: c.k.clone(),
                v: c.v.clone(),
                len: c.len,
            };
            q.contiguous()?.apply_op1(op)
        }
    }
}

/// Whether an additive bias `(B|1, 1, T, Tk)` masks every key after each query's own
/// position (`j > Tk − T + i`), so a causal kernel may skip them.
pub fn bias_is_causal(bias: &Tensor) -> Result<bool> {
    let (br, _, t, tk) = bias.dims4()?;
    if tk < t {
        return Ok(false);
    }
    let past = tk - t;
    let bias = bias.to_dtype(DType::F32)?.contiguous()?;
    with_f32(&bias, "bias_is_causal", |b| {
        (0..br * t).all(|r| {
            let i = r % t;
            b[r * tk + past + i + 1..(r + 1) * tk]
                .iter()
                .all(|&x| x <= crate::mask::MASKED)
        })
    })
}
