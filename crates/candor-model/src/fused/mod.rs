//! Fused CPU kernels with hand-written backward passes, for the hot paths of training and
//! sampling in f32 on the CPU.
//!
//! Each kernel is a candle `CustomOp` whose forward and backward sit side by side in one
//! file, and each keeps its composed reference in [`crate::ops`] (or plain candle ops):
//! `tests/fused.rs` checks that the two agree in value and gradient on random inputs.
//! The model uses a kernel when [`enabled`] says so (f32 on the CPU); everything else
//! (f64 for finite differences, bf16, CUDA, Metal) takes the composed path.
//!
//! - [`gemm`]: the matrix products, candor's own packed GEMM (`packed`: per-ISA
//!   micro-kernels) split across the rayon threads, or the `gemm` crate (`CANDOR_GEMM=gemm`).
//! - [`isa`]: which SIMD level the kernels use (AVX-512, AVX2+FMA, portable), chosen at run
//!   time and capped by `CANDOR_ISA`.
//! - [`linear`]: `x · Wᵀ` with its own backward (two more products).
//! - [`lora_linear`]: a frozen `x · Wᵀ` plus its LoRA adapter's term in one op.
//! - [`keep`]: those products' outputs kept across gradient checkpointing's recomputation.
//! - [`rmsnorm`], [`rope`], [`swiglu`]: row-wise and element-wise kernels.
//! - [`attention`]: causal attention over (B, T, H, D) queries blocked by query rows, with
//!   candor's additive bias (padding, packed segments) and the KV cache.
//! - [`xent`]: LM head + softmax cross-entropy over the vocabulary, chunked so the full
//!   logits tensor never exists.
//!
//! - [`runtime`]: process-wide thread-pool and allocator settings the binary applies.
//!
//! Determinism: every reduction runs in an order fixed by the shapes and the thread count
//! (rayon's `RAYON_NUM_THREADS`), so a run repeats bit for bit on the same machine.

pub mod attention;
pub mod gemm;
pub mod isa;
pub(crate) mod keep;
pub mod linear;
pub mod lora_linear;
mod packed;
pub mod rmsnorm;
pub mod rope;
pub mod runtime;
pub mod swiglu;
pub mod vmath;
pub mod xent;

use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};

pub use attention::{attention, AttnMask};
pub use linear::linear;
pub use lora_linear::lora_linear;
pub use rmsnorm::rms_norm;
pub use rope::rope;
pub use swiglu::swiglu;
pub use xent::lm_head_xent;

/// Whether the fused kernels serve tensor `t`: f32 on the CPU, unless the environment
/// sets `CANDOR_FUSED=0` (to compare with the composed path).
pub fn enabled(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && !disabled()
}

fn disabled() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| std::env::var("CANDOR_FUSED").is_ok_and(|v| v == "0"))
}

/// Below this many elements a kernel runs on the calling thread: rayon's fork/join costs
/// more than it saves.
pub(crate) const PAR_MIN: usize = 1 << 15;

/// The contiguous f32 data of a CPU storage seen through `layout`.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => bail!("{op}: expected f32 input"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// The contiguous f32 data of a tensor's storage (from `Tensor::storage_and_layout`, whose
/// guard the caller holds while it reads).
pub(crate) fn cpu_f32<'a>(s: &'a Storage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => f32_slice(c, l, op),
        _ => bail!("{op}: CPU tensors only"),
    }
}

/// Run `f` on the contiguous f32 data of a CPU tensor.
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => Ok(f(f32_slice(c, l, op)?)),
        _ => bail!("{op}: CPU tensors only"),
    }
}

/// A vector for an output that is written in full before anything reads it (skips the
/// zeroing pass, and the page faults it would take, of `vec![0.0; n]`).
/// (Zeroing instead measured ~10% slower on the tiny training step: 16.0k vs 14.2k tokens/s,
/// 3 alternating runs of `candor bench --shape tiny`.)
#[allow(clippy::uninit_vec)]
pub(crate) fn uninit(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns and every caller overwrites all n elements
    unsafe { v.set_len(n) };
    v
}

/// A CPU f32 tensor from a vector.
pub(crate) fn tensor(v: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// A raw pointer that rayon tasks may share when each writes a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: a SendPtr is only created for an output buffer that outlives the parallel section
// using it, and every task writes a part no other task touches (each use site says which).
unsafe impl Send for SendPtr {}
// SAFETY: as for Send: shared between tasks that write disjoint parts, nobody reads.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so a closure captures the whole `SendPtr`, not its field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Run `f(part, rows)` over `n` rows split into one contiguous range per thread (fewer when
/// the work is small), returning the results in part order. The split depends only on `n`,
/// `min_rows` and the thread count, so per-part reductions are deterministic.
pub(crate) fn par_parts<R: Send>(
    n: usize,
    min_rows: usize,
    f: impl Fn(std::ops::Range<usize>) -> R + Sync,
) -> Vec<R> {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads().max(1);
    let parts = (n / min_rows.max(1)).clamp(1, threads);
    let ranges: Vec<_> = (0..parts)
        .map(|p| (p * n / parts)..((p + 1) * n / parts))
        .collect();
    if parts == 1 {
        return ranges.into_iter().map(&f).collect();
    }
    ranges.into_par_iter().map(&f).collect()
}
