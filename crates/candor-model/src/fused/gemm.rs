//! Row-major single-precision matrix products, `C = α·op(A)·op(B) + β·C`, with cblas'
//! argument conventions (`lda`, `ldb`, `ldc` are row strides).
//!
//! Backends: candor's own packed GEMM ([`super::packed`]: cache-blocked, with AVX-512,
//! AVX2+FMA or portable micro-kernels picked at run time by [`super::isa::isa`]), no system
//! library needed; `CANDOR_GEMM=gemm` picks the `gemm` crate (candle's) instead, to compare.
//! [`sgemm`] splits a product across the rayon threads itself, so no second thread pool
//! competes with rayon's for the cores. Products of a few rows (sampling: one token per
//! sequence) skip packing: each row of B is read once, as dot products or row updates.

use std::sync::OnceLock;

use super::isa::{isa, Isa};
use super::packed;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// candor's packed GEMM ([`super::packed`]).
    Packed,
    /// The `gemm` crate.
    Gemm,
}

/// The backend in use (fixed for the process).
pub fn backend() -> Backend {
    static B: OnceLock<Backend> = OnceLock::new();
    *B.get_or_init(|| {
        if std::env::var("CANDOR_GEMM").is_ok_and(|v| v == "gemm") {
            Backend::Gemm
        } else {
            Backend::Packed
        }
    })
}

/// One single-threaded product on raw pointers.
///
/// # Safety
/// `a`, `b`, `c` must address matrices of the given sizes and strides (`op(A)` m × k,
/// `op(B)` k × n, C m × n with `ldc ≥ n`); `c` must be writable and overlap neither `a`
/// nor `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_serial(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY: forwarded under the caller's contract, one thread.
    unsafe {
        sgemm_on(
            backend(),
            isa(),
            1,
            ta,
            tb,
            m,
            n,
            k,
            alpha,
            a,
            lda,
            b,
            ldb,
            beta,
            c,
            ldc,
        )
    }
}

/// `C = β·C` (a product with k = 0).
///
/// # Safety
/// `c` addresses m × n writable floats with row stride `ldc`.
unsafe fn scale_c(m: usize, n: usize, beta: f32, c: *mut f32, ldc: usize) {
    for i in 0..m {
        // SAFETY: row i of C, n floats (caller's contract).
        let ci = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) };
        ci.iter_mut()
            .for_each(|x| *x = if beta == 0.0 { 0.0 } else { beta * *x });
    }
}

/// A product on the given backend and ISA over `threads` rayon tasks (1 = this thread).
///
/// # Safety
/// As [`sgemm_serial`].
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_on(
    backend: Backend,
    isa: Isa,
    threads: usize,
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // SAFETY: C is m × n at stride ldc (caller's contract).
        unsafe { scale_c(m, n, beta, c, ldc) };
        return;
    }
    // a few rows (one query attending over the KV cache): no packing
    if !ta && m <= 4 && threads == 1 {
        // SAFETY: same matrices, caller's contract.
        unsafe {
            if tb {
                small_m_abt(isa, m, k, alpha, a, lda, b, ldb, beta, c, ldc, 0, n);
            } else {
                small_m_ab(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
            }
        }
        return;
    }
    match backend {
        // SAFETY: caller's contract, forwarded.
        Backend::Packed => unsafe {
            packed::gemm(
                isa, threads, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
            )
        },
        Backend::Gemm => {
            // gemm crate: dst = α_g·dst + β_g·lhs·rhs, with column/row strides per operand
            let (a_rs, a_cs) = if ta {
                (1, lda as isize)
            } else {
                (lda as isize, 1)
            };
            let (b_rs, b_cs) = if tb {
                (1, ldb as isize)
            } else {
                (ldb as isize, 1)
            };
            let par = if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: the strides describe the caller's matrices; C does not overlap A or B.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c,
                    1,
                    ldc as isize,
                    beta != 0.0,
                    a,
                    a_cs,
                    a_rs,
                    b,
                    b_cs,
                    b_rs,
                    beta,
                    alpha,
                    false,
                    false,
                    false,
                    par,
                )
            }
        }
    }
}

/// `C = α·A·B + β·C` for few rows of A: each row of C accumulates rows of B, in order.
///
/// # Safety
/// As [`sgemm_serial`] with `ta = tb = false`.
#[allow(clippy::too_many_arguments)]
unsafe fn small_m_ab(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    for i in 0..m {
        // SAFETY: row i of C (n floats at stride ldc), caller's contract.
        let ci = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) };
        if beta == 0.0 {
            ci.iter_mut().for_each(|x| *x = 0.0);
        } else if beta != 1.0 {
            ci.iter_mut().for_each(|x| *x *= beta);
        }
        for p in 0..k {
            // SAFETY: A(i, p) and row p of B (n floats) lie in the caller's matrices.
            let (w, bp) = unsafe {
                (
                    alpha * *a.add(i * lda + p),
                    std::slice::from_raw_parts(b.add(p * ldb), n),
                )
            };
            for (x, &y) in ci.iter_mut().zip(bp) {
                *x += w * y;
            }
        }
    }
}

/// Below this many multiply-adds a product runs on the calling thread.
const PAR_FLOPS: usize = 1 << 18;

/// Up to this many rows, `A·Bᵀ` (a linear layer's forward on a few tokens: sampling) runs as
/// dot products that read each row of B once, instead of a GEMM that packs all of B first.
const SMALL_M: usize = 16;

/// Dot product over 16 fixed lanes (the same order on every call, so results repeat).
#[inline(always)]
fn dot_lanes(x: &[f32], y: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (xc, yc) = (x.chunks_exact(L), y.chunks_exact(L));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..L {
            acc[l] += a[l] * b[l];
        }
    }
    let mut tail = 0f32;
    for (a, b) in xr.iter().zip(yr) {
        tail += a * b;
    }
    acc.iter().sum::<f32>() + tail
}

/// `C[:, j0..j1] = α·A·Bᵀ + β·C` for few rows of A, column by column.
///
/// # Safety
/// As [`sgemm_serial`] with `ta = false`, `tb = true`, and `j0 ≤ j1 ≤ n`.
#[allow(clippy::too_many_arguments)]
unsafe fn small_m_abt_generic(
    m: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
    j0: usize,
    j1: usize,
) {
    for j in j0..j1 {
        // SAFETY: row j of B and row i of A are k floats each; C(i, j) is in C.
        unsafe {
            let bj = std::slice::from_raw_parts(b.add(j * ldb), k);
            for i in 0..m {
                let ai = std::slice::from_raw_parts(a.add(i * lda), k);
                let d = alpha * dot_lanes(ai, bj);
                let p = c.add(i * ldc + j);
                *p = if beta == 0.0 { d } else { d + beta * *p };
            }
        }
    }
}

/// The same with AVX2/FMA, column by column: four rows of A against one row of B per pass,
/// two 8-lane accumulators each (`s` for lanes p mod 16 < 8, `t` for the rest), each
/// element's `s + t` summed horizontally on its own. [`small_m_abt_avx2`] runs the columns
/// left over from its blocks of eight here; the tests compare the two bit for bit.
///
/// # Safety
/// As [`small_m_abt_generic`], and the CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn small_m_abt_avx2_columns(
    m: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
    j0: usize,
    j1: usize,
) {
    use std::arch::x86_64::*;
    #[inline(always)]
    fn hsum(v: __m256) -> f32 {
        // SAFETY: register-only intrinsics; this helper is only inlined into the AVX2
        // function above.
        unsafe {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }
    let k16 = k / 16 * 16;
    // SAFETY (all blocks below): row i of A and row j of B are k floats each (every load is
    // at an offset < k16 ≤ k, or < k in the tails), and C(i, j) lies in C — the caller's
    // contract; j ranges over j0..j1 ≤ n, i over 0..m.
    let finish = |acc: __m256, i: usize, bj: *const f32, j: usize| unsafe {
        let ar = a.add(i * lda);
        let mut d = hsum(acc);
        for q in k16..k {
            d += *ar.add(q) * *bj.add(q);
        }
        let d = alpha * d;
        let out = c.add(i * ldc + j);
        *out = if beta == 0.0 { d } else { d + beta * *out };
    };
    for j in j0..j1 {
        // SAFETY: row j < n of B (see the comment above `finish`).
        let bj = unsafe { b.add(j * ldb) };
        let mut i = 0;
        while i + 4 <= m {
            // SAFETY: rows i..i+4 ≤ m of A, loads below k16 (see above `finish`).
            unsafe {
                let rows = [
                    a.add(i * lda),
                    a.add((i + 1) * lda),
                    a.add((i + 2) * lda),
                    a.add((i + 3) * lda),
                ];
                for (r, sum) in dots4_avx2(rows, bj, k16).into_iter().enumerate() {
                    finish(sum, i + r, bj, j);
                }
            }
            i += 4;
        }
        while i < m {
            // SAFETY: row i < m of A, loads below k16 (see above `finish`).
            unsafe {
                finish(dot1_avx2(a.add(i * lda), bj, k16), i, bj, j);
            }
            i += 1;
        }
    }
}

/// Rows `a0..a3` of A against row `bj` of B over the first `k16` (a multiple of 16)
/// elements: per row the two 8-lane accumulators `s` (offsets p) and `t` (p + 8), then
/// `s + t` — the partial dot products both AVX2 decoding kernels finish.
///
/// # Safety
/// The CPU supports AVX2 and FMA; every row holds at least `k16` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dots4_avx2(
    [a0, a1, a2, a3]: [*const f32; 4],
    bj: *const f32,
    k16: usize,
) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    let (mut s0, mut s1, mut s2, mut s3) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    let (mut t0, mut t1, mut t2, mut t3) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    let mut p = 0;
    while p < k16 {
        let b0 = _mm256_loadu_ps(bj.add(p));
        let b1 = _mm256_loadu_ps(bj.add(p + 8));
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0.add(p)), b0, s0);
        t0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0.add(p + 8)), b1, t0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1.add(p)), b0, s1);
        t1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1.add(p + 8)), b1, t1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2.add(p)), b0, s2);
        t2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2.add(p + 8)), b1, t2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3.add(p)), b0, s3);
        t3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3.add(p + 8)), b1, t3);
        p += 16;
    }
    [
        _mm256_add_ps(s0, t0),
        _mm256_add_ps(s1, t1),
        _mm256_add_ps(s2, t2),
        _mm256_add_ps(s3, t3),
    ]
}

/// [`dots4_avx2`] for one row.
///
/// # Safety
/// As [`dots4_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot1_avx2(a0: *const f32, bj: *const f32, k16: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let (mut s0, mut t0) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut p = 0;
    while p < k16 {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0.add(p)), _mm256_loadu_ps(bj.add(p)), s0);
        t0 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a0.add(p + 8)),
            _mm256_loadu_ps(bj.add(p + 8)),
            t0,
        );
        p += 16;
    }
    _mm256_add_ps(s0, t0)
}

/// The horizontal sums of eight 8-lane vectors at once: lane c of the result is
/// `((v[c]₀ + v[c]₄) + (v[c]₂ + v[c]₆)) + ((v[c]₁ + v[c]₅) + (v[c]₃ + v[c]₇))`, the very
/// additions, operand for operand, of [`small_m_abt_avx2_columns`]'s one-vector sum
/// (halves, then `movehl`, then the last pair), so every result is its bit for bit — in 21
/// instructions for eight sums instead of eight for each.
///
/// # Safety
/// The CPU supports AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum8_avx2(v: &[std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // [lo(a) + hi(a), lo(b) + hi(b)]: lane i of each half is a_i + a_{i+4}
    let halves = |a: __m256, b: __m256| {
        _mm256_add_ps(
            _mm256_permute2f128_ps(a, b, 0x20),
            _mm256_permute2f128_ps(a, b, 0x31),
        )
    };
    let w04 = halves(v[0], v[4]);
    let w15 = halves(v[1], v[5]);
    let w26 = halves(v[2], v[6]);
    let w37 = halves(v[3], v[7]);
    // per 128-bit half: [x₀ + x₂, x₁ + x₃, y₀ + y₂, y₁ + y₃] (the `movehl` step)
    let pairs = |x: __m256, y: __m256| {
        _mm256_add_ps(_mm256_shuffle_ps(x, y, 0x44), _mm256_shuffle_ps(x, y, 0xEE))
    };
    let y01 = pairs(w04, w15); // columns 0, 1 | 4, 5
    let y23 = pairs(w26, w37); // columns 2, 3 | 6, 7
                               // per half: [u₀ + u₁, u₂ + u₃, z₀ + z₁, z₂ + z₃]: columns 0, 1, 2, 3 | 4, 5, 6, 7
    _mm256_add_ps(
        _mm256_shuffle_ps(y01, y23, 0x88),
        _mm256_shuffle_ps(y01, y23, 0xDD),
    )
}

/// [`small_m_abt_avx2_columns`] on blocks of eight columns: each row's eight accumulators
/// (the same fused multiply-adds in the same order) are summed horizontally together by
/// [`hsum8_avx2`] and the eight results written at once, so every element is the
/// column-by-column kernel's bit for bit; the columns past the last block of eight run
/// there. (At k = 32, attention's head width in decoding, one element's
/// sum took more instructions than its four multiply-adds.)
///
/// # Safety
/// As [`small_m_abt_generic`], and the CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn small_m_abt_avx2(
    m: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
    j0: usize,
    j1: usize,
) {
    use std::arch::x86_64::*;
    let k16 = k / 16 * 16;
    // SAFETY (every block below): rows i < m of A and rows j < j1 ≤ n of B hold k floats
    // (vector loads at offsets < k16 ≤ k, the tail's below k), and C(i, j..j + 8) lies in C
    // for j + 8 ≤ j1 — the caller's contract.
    let finish = |sums: __m256, i: usize, j: usize| unsafe {
        let mut d = sums;
        if k16 < k {
            let mut e = [0f32; 8];
            _mm256_storeu_ps(e.as_mut_ptr(), d);
            let ar = a.add(i * lda);
            for (col, x) in e.iter_mut().enumerate() {
                let bj = b.add((j + col) * ldb);
                for q in k16..k {
                    *x += *ar.add(q) * *bj.add(q);
                }
            }
            d = _mm256_loadu_ps(e.as_ptr());
        }
        // α·d, then d + β·c: separate products and sums, as the scalar code rounds them
        let d = _mm256_mul_ps(_mm256_set1_ps(alpha), d);
        let out = c.add(i * ldc + j);
        let r = if beta == 0.0 {
            d
        } else {
            _mm256_add_ps(d, _mm256_mul_ps(_mm256_set1_ps(beta), _mm256_loadu_ps(out)))
        };
        _mm256_storeu_ps(out, r);
    };
    let mut j = j0;
    while j + 8 <= j1 {
        let mut i = 0;
        while i + 4 <= m {
            // SAFETY: rows i..i + 4 ≤ m of A, columns j..j + 8 ≤ j1 (see above `finish`).
            unsafe {
                let rows = [
                    a.add(i * lda),
                    a.add((i + 1) * lda),
                    a.add((i + 2) * lda),
                    a.add((i + 3) * lda),
                ];
                let mut acc = [[_mm256_setzero_ps(); 8]; 4];
                for col in 0..8 {
                    let sums = dots4_avx2(rows, b.add((j + col) * ldb), k16);
                    for (row, sum) in acc.iter_mut().zip(sums) {
                        row[col] = sum;
                    }
                }
                for (r, row) in acc.iter().enumerate() {
                    finish(hsum8_avx2(row), i + r, j);
                }
            }
            i += 4;
        }
        while i < m {
            // SAFETY: row i < m of A, columns j..j + 8 ≤ j1 (see above `finish`).
            unsafe {
                let a0 = a.add(i * lda);
                let mut acc = [_mm256_setzero_ps(); 8];
                for (col, sum) in acc.iter_mut().enumerate() {
                    *sum = dot1_avx2(a0, b.add((j + col) * ldb), k16);
                }
                finish(hsum8_avx2(&acc), i, j);
            }
            i += 1;
        }
        j += 8;
    }
    // SAFETY: the caller's contract, on the columns j..j1 left.
    unsafe { small_m_abt_avx2_columns(m, k, alpha, a, lda, b, ldb, beta, c, ldc, j, j1) }
}

/// [`small_m_abt_avx2`] with 16-lane accumulators, eight rows of A against one row of B per
/// pass. Lane l of a row's accumulator holds what lane l of the AVX2 kernel's `s` (l < 8)
/// or lane l − 8 of its `t` (l ≥ 8) holds — the same fused multiply-adds in the same order
/// — and its two halves are added before the same horizontal sum, so every result is the
/// AVX2 kernel's bit for bit, in half the instructions (one-token decoding runs on this).
///
/// # Safety
/// As [`small_m_abt_generic`], and the CPU supports AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn small_m_abt_avx512(
    m: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
    j0: usize,
    j1: usize,
) {
    use std::arch::x86_64::*;
    /// The AVX2 kernel's horizontal sum of `s + t`, from the 16 lanes holding both.
    #[inline(always)]
    fn hsum(v: __m512) -> f32 {
        // SAFETY: register-only intrinsics; this helper is only inlined into the AVX-512
        // function above.
        unsafe {
            let lo = _mm512_castps512_ps256(v);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
            let v = _mm256_add_ps(lo, hi);
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }
    /// Rows i..i + R of A against row `bj` of B into column j of C.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows<const R: usize>(
        i: usize,
        j: usize,
        bj: *const f32,
        k: usize,
        alpha: f32,
        a: *const f32,
        lda: usize,
        beta: f32,
        c: *mut f32,
        ldc: usize,
    ) {
        let k16 = k / 16 * 16;
        // SAFETY: rows i..i+R < m of A and row j of B hold k floats (loads below k16 ≤ k,
        // tails below k); C(i + r, j) lies in C — the caller's contract.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            let mut p = 0;
            while p < k16 {
                let bv = _mm512_loadu_ps(bj.add(p));
                for (r, s) in acc.iter_mut().enumerate() {
                    *s = _mm512_fmadd_ps(_mm512_loadu_ps(a.add((i + r) * lda + p)), bv, *s);
                }
                p += 16;
            }
            for (r, s) in acc.iter().enumerate() {
                let ar = a.add((i + r) * lda);
                let mut d = hsum(*s);
                for q in k16..k {
                    d += *ar.add(q) * *bj.add(q);
                }
                let d = alpha * d;
                let out = c.add((i + r) * ldc + j);
                *out = if beta == 0.0 { d } else { d + beta * *out };
            }
        }
    }
    for j in j0..j1 {
        // SAFETY: row j < n of B; rows of A below m (the caller's contract).
        unsafe {
            let bj = b.add(j * ldb);
            let mut i = 0;
            while i + 8 <= m {
                rows::<8>(i, j, bj, k, alpha, a, lda, beta, c, ldc);
                i += 8;
            }
            if i + 4 <= m {
                rows::<4>(i, j, bj, k, alpha, a, lda, beta, c, ldc);
                i += 4;
            }
            while i < m {
                rows::<1>(i, j, bj, k, alpha, a, lda, beta, c, ldc);
                i += 1;
            }
        }
    }
}

/// [`small_m_abt_generic`] on the best kernel `isa` allows.
///
/// # Safety
/// As [`small_m_abt_generic`]; `isa` is supported by the CPU.
#[allow(clippy::too_many_arguments)]
unsafe fn small_m_abt(
    isa: Isa,
    m: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
    j0: usize,
    j1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512 {
        // SAFETY: `isa = Avx512` was chosen only if the CPU has AVX-512F (and AVX2, FMA);
        // the rest is the caller's contract.
        return unsafe { small_m_abt_avx512(m, k, alpha, a, lda, b, ldb, beta, c, ldc, j0, j1) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `isa ≥ Avx2` was chosen only if the CPU has AVX2 and FMA; the rest is
        // the caller's contract.
        return unsafe { small_m_abt_avx2(m, k, alpha, a, lda, b, ldb, beta, c, ldc, j0, j1) };
    }
    let _ = isa;
    // SAFETY: the caller's contract.
    unsafe { small_m_abt_generic(m, k, alpha, a, lda, b, ldb, beta, c, ldc, j0, j1) }
}

/// `C = α·op(A)·op(B) + β·C` over slices, split across the rayon threads.
///
/// Panics if a slice is too short for the sizes and strides given.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    sgemm_with(
        backend(),
        isa(),
        ta,
        tb,
        m,
        n,
        k,
        alpha,
        a,
        lda,
        b,
        ldb,
        beta,
        c,
        ldc,
    )
}

/// [`sgemm`] on a given backend and ISA (the tests run every one the CPU supports).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_with(
    backend: Backend,
    isa: Isa,
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    // bounds: the last element each operand's layout reaches
    let need = |rows: usize, cols: usize, ld: usize, t: bool| {
        let (r, cc) = if t { (cols, rows) } else { (rows, cols) };
        if r == 0 || cc == 0 {
            0
        } else {
            (r - 1) * ld + cc
        }
    };
    assert!(isa.supported(), "sgemm: {isa:?} not supported by this CPU");
    assert!(a.len() >= need(m, k, lda, ta), "sgemm: A too short");
    assert!(b.len() >= need(k, n, ldb, tb), "sgemm: B too short");
    assert!(c.len() >= need(m, n, ldc, false), "sgemm: C too short");
    assert!(ldc >= n || m <= 1, "sgemm: ldc < n");
    assert!(ta || lda >= k || m <= 1, "sgemm: lda < k");
    assert!(!ta || lda >= m || k <= 1, "sgemm: lda < m");
    assert!(tb || ldb >= n || k <= 1, "sgemm: ldb < n");
    assert!(!tb || ldb >= k || n <= 1, "sgemm: ldb < k");
    let threads = rayon::current_num_threads().max(1);
    let (ap, bp, cp) = (
        a.as_ptr() as usize,
        b.as_ptr() as usize,
        c.as_mut_ptr() as usize,
    );
    if !ta && tb && m <= SMALL_M && k > 0 && n > 0 {
        // split the columns (rows of B) across threads when there is enough work
        let parts = if m * n * k >= 4 * PAR_FLOPS {
            threads.min(n)
        } else {
            1
        };
        // SAFETY: the asserts above bound A, B and C; part p writes only columns
        // j0..j1 of C, disjoint from every other part's.
        let run = |p: usize| unsafe {
            let (j0, j1) = (p * n / parts, (p + 1) * n / parts);
            small_m_abt(
                isa, m, k, alpha, ap as _, lda, bp as _, ldb, beta, cp as _, ldc, j0, j1,
            )
        };
        if parts == 1 {
            run(0);
        } else {
            rayon::scope(|s| (0..parts).for_each(|p| s.spawn(move |_| run(p))));
        }
        return;
    }
    let threads = if m * n * k < PAR_FLOPS { 1 } else { threads };
    // SAFETY: the asserts above bound A, B and C; C is a &mut slice, so it overlaps neither.
    unsafe {
        sgemm_on(
            backend, isa, threads, ta, tb, m, n, k, alpha, ap as _, lda, bp as _, ldb, beta,
            cp as _, ldc,
        )
    }
}

/// The threads [`sgemm`] splits a product over (rayon's pool: `RAYON_NUM_THREADS`).
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// One measured product shape: `(name, m, k, n, ta, tb)` and its best GFLOP/s.
#[derive(Clone, Debug)]
pub struct Speed {
    pub shape: &'static str,
    pub gflops: f64,
}

/// The shapes [`measure`] times: a square product and the linear layers of the benchmark
/// models as training runs them (rows = batch·context = 2048; forward `x·Wᵀ`, backward
/// `dy·W` and `dyᵀ·x`).
pub const SPEED_SHAPES: &[(&str, usize, usize, usize, bool, bool)] = &[
    ("2048x2048x2048", 2048, 2048, 2048, false, false),
    ("fwd 2048x384x1536", 2048, 384, 1536, false, true),
    ("fwd 2048x384x4096", 2048, 384, 4096, false, true),
    ("fwd 2048x256x8192", 2048, 256, 8192, false, true),
    ("bwd-dx 2048x1024x384", 2048, 1024, 384, false, false),
    ("bwd-dW 384x2048x1024", 384, 2048, 1024, true, false),
    ("fwd 2048x128x384", 2048, 128, 384, false, true),
    // SmolLM2-135M (hidden 576, MLP 1536): a LoRA training row of 4×256 tokens, and
    // decoding 64 and 16 sequences at once
    ("fwd 1024x576x1536", 1024, 576, 1536, false, true),
    ("bwd-dx 1024x1536x576", 1024, 1536, 576, false, false),
    ("decode 64x576x1536", 64, 576, 1536, false, true),
    ("decode 64x1536x576", 64, 1536, 576, false, true),
    ("decode 16x576x1536", 16, 576, 1536, false, true),
];

/// Best-of-several GFLOP/s of [`sgemm`] (the process's backend, ISA and rayon threads) on
/// each of [`SPEED_SHAPES`] (`m×k×n`), after two warm-up products.
pub fn measure() -> Vec<Speed> {
    SPEED_SHAPES
        .iter()
        .map(|&(shape, m, k, n, ta, tb)| {
            let a: Vec<f32> = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
            let mut c = vec![0f32; m * n];
            let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
            let flops = 2.0 * (m * n * k) as f64;
            let reps = ((40e9 / flops) as usize).clamp(3, 100);
            let mut best = f64::INFINITY;
            for r in 0..reps + 2 {
                let t = std::time::Instant::now();
                sgemm(ta, tb, m, n, k, 1.0, &a, lda, &b, ldb, 0.0, &mut c, n);
                if r >= 2 {
                    best = best.min(t.elapsed().as_secs_f64());
                }
            }
            Speed {
                shape,
                gflops: flops / best / 1e9,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn naive(
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let x = if ta { a[p * lda + i] } else { a[i * lda + p] };
                    let y = if tb { b[j * ldb + p] } else { b[p * ldb + j] };
                    s += x as f64 * y as f64;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    /// Every backend × ISA the CPU supports × transpose case, on odd shapes and padded
    /// strides (lda, ldb, ldc larger than the matrix), against an f64 product; C starts
    /// with NaN where β = 0 (it must not be read) and with values where β ≠ 0.
    #[test]
    fn every_path_matches_a_naive_product() {
        let shapes = [
            (3, 5, 7),
            (70, 33, 129),
            (300, 17, 40),
            (5, 300, 64),
            (8, 2000, 300),
            (16, 40, 3),
            (1, 64, 145),
            (4, 9, 33),
            (29, 65, 600),
            (200, 130, 270),
            (0, 5, 3),
            (5, 0, 3),
            (6, 7, 0),
        ];
        let mut backends = vec![Backend::Packed, Backend::Gemm];
        backends.dedup();
        let isas = crate::fused::isa::supported();
        for &(m, n, k) in &shapes {
            for ta in [false, true] {
                for tb in [false, true] {
                    // row strides padded by 3 to catch stride mix-ups
                    let lda = if ta { m } else { k } + 3;
                    let ldb = if tb { k } else { n } + 3;
                    let ldc = n + 2;
                    let (ar, br) = (if ta { k } else { m }, if tb { n } else { k });
                    let a: Vec<f32> = (0..ar * lda)
                        .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                        .collect();
                    let b: Vec<f32> = (0..br * ldb)
                        .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
                        .collect();
                    let want = naive(ta, tb, m, n, k, &a, lda, &b, ldb);
                    for &bk in &backends {
                        for &is in &isas {
                            for beta in [0.0f32, 0.5] {
                                let init = if beta == 0.0 { f32::NAN } else { 1.0 };
                                let mut c = vec![init; m * ldc];
                                sgemm_with(
                                    bk, is, ta, tb, m, n, k, 2.0, &a, lda, &b, ldb, beta, &mut c,
                                    ldc,
                                );
                                let mut serial = vec![init; m * ldc];
                                // SAFETY: a, b, serial are sized for these shapes and strides.
                                unsafe {
                                    sgemm_on(
                                        bk,
                                        is,
                                        1,
                                        ta,
                                        tb,
                                        m,
                                        n,
                                        k,
                                        2.0,
                                        a.as_ptr(),
                                        lda,
                                        b.as_ptr(),
                                        ldb,
                                        beta,
                                        serial.as_mut_ptr(),
                                        ldc,
                                    )
                                };
                                for i in 0..m {
                                    for j in 0..n {
                                        let prior = if beta == 0.0 {
                                            0.0
                                        } else {
                                            (beta * init) as f64
                                        };
                                        let w = 2.0 * want[i * n + j] + prior;
                                        for (what, got) in [
                                            ("parallel", c[i * ldc + j]),
                                            ("serial", serial[i * ldc + j]),
                                        ] {
                                            assert!(
                                                (got as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                                                "{bk:?}/{is:?} {what} {m}x{n}x{k} ta={ta} tb={tb} \
                                                 beta={beta} ({i},{j}): {got} vs {w}"
                                            );
                                        }
                                    }
                                    // the padding columns of C are left alone
                                    for j in n..ldc {
                                        let (g, s) = (c[i * ldc + j], serial[i * ldc + j]);
                                        assert!(
                                            g.to_bits() == init.to_bits()
                                                && s.to_bits() == init.to_bits(),
                                            "{bk:?}/{is:?} wrote padding"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The packed GEMM's result does not depend on the thread count or the task split.
    #[test]
    fn packed_results_repeat_across_thread_counts() {
        let (m, n, k) = (301, 257, 530);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.013)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 17 % 89) as f32 - 44.0) * 0.011)
            .collect();
        for is in crate::fused::isa::supported() {
            let mut outs = vec![];
            for threads in [1, 2, 3, 8] {
                let mut c = vec![0f32; m * n];
                // SAFETY: a is m × k, b is n × k (transposed), c is m × n.
                unsafe {
                    packed::gemm(
                        is,
                        threads,
                        false,
                        true,
                        m,
                        n,
                        k,
                        1.0,
                        a.as_ptr(),
                        k,
                        b.as_ptr(),
                        k,
                        0.0,
                        c.as_mut_ptr(),
                        n,
                    )
                };
                outs.push(c);
            }
            assert!(outs.windows(2).all(|w| w[0] == w[1]), "{is:?}");
        }
    }

    /// The AVX2 few-rows kernel that sums eight columns' accumulators at once gives the
    /// column-by-column kernel's results bit for bit (so decoding samples what it sampled
    /// before), at every row count, for k with and without a tail, α ≠ 1, β = 0 and β ≠ 0,
    /// and column ranges that start anywhere and leave columns over for the old path.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn few_rows_avx2_blocked_equals_column_by_column_bit_for_bit() {
        if !Isa::Avx2.supported() {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        for (k, n) in [
            (128, 40),
            (512, 19),
            (32, 77),
            (37, 21),
            (16, 8),
            (7, 11),
            (3, 9),
        ] {
            for m in 1..=SMALL_M {
                let (lda, ldb, ldc) = (k + 3, k + 1, n + 2);
                let a: Vec<f32> = (0..m * lda)
                    .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1.3e-3)
                    .collect();
                let b: Vec<f32> = (0..n * ldb)
                    .map(|i| ((i * 104729 % 997) as f32 - 498.0) * 0.7e-3)
                    .collect();
                for beta in [0.0f32, 0.5] {
                    for (j0, j1) in [(0, n), (3, n), (1, n - 2)] {
                        let run = |blocked: bool| {
                            let mut c: Vec<f32> =
                                (0..m * ldc).map(|i| (i % 7) as f32 * 0.125).collect();
                            // SAFETY: a, b, c are sized for these shapes and strides, j1 ≤ n;
                            // the CPU has AVX2 and FMA (checked above).
                            unsafe {
                                let f = if blocked {
                                    small_m_abt_avx2
                                } else {
                                    small_m_abt_avx2_columns
                                };
                                f(
                                    m,
                                    k,
                                    1.5,
                                    a.as_ptr(),
                                    lda,
                                    b.as_ptr(),
                                    ldb,
                                    beta,
                                    c.as_mut_ptr(),
                                    ldc,
                                    j0,
                                    j1,
                                )
                            };
                            c.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
                        };
                        assert_eq!(run(true), run(false), "m {m} k {k} n {n} {j0}..{j1}");
                    }
                }
            }
        }
    }

    /// The AVX-512 few-rows kernel gives the AVX2 kernel's results bit for bit (so decoding
    /// samples what it sampled before the kernel existed), at every row count and for k
    /// with and without a tail.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn few_rows_avx512_equals_avx2_bit_for_bit() {
        if !crate::fused::isa::supported().contains(&Isa::Avx512) {
            eprintln!("no AVX-512 on this CPU: nothing to compare");
            return;
        }
        for (k, n) in [(128, 40), (512, 9), (37, 5), (16, 3), (7, 2)] {
            for m in 1..=SMALL_M {
                let (lda, ldb, ldc) = (k + 3, k + 1, n + 2);
                let a: Vec<f32> = (0..m * lda)
                    .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1.3e-3)
                    .collect();
                let b: Vec<f32> = (0..n * ldb)
                    .map(|i| ((i * 104729 % 997) as f32 - 498.0) * 0.7e-3)
                    .collect();
                for beta in [0.0f32, 0.5] {
                    let run = |kernel: Isa| {
                        let mut c = vec![0.25f32; m * ldc];
                        // SAFETY: a, b, c are sized for these shapes and strides; the CPU has
                        // the ISA (checked above for AVX-512, which implies AVX2 here).
                        unsafe {
                            small_m_abt(
                                kernel,
                                m,
                                k,
                                1.5,
                                a.as_ptr(),
                                lda,
                                b.as_ptr(),
                                ldb,
                                beta,
                                c.as_mut_ptr(),
                                ldc,
                                0,
                                n,
                            )
                        };
                        c.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
                    };
                    assert_eq!(run(Isa::Avx512), run(Isa::Avx2), "m {m} k {k} n {n}");
                }
            }
        }
    }
}
