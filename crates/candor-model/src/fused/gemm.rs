//! Row-major single-precision matrix products, `C = α·op(A)·op(B) + β·C`, with cblas'
//! argument conventions (`lda`, `ldb`, `ldc` are row strides).
//!
//! Backends: OpenBLAS' `cblas_sgemm` when the build found the library (see `build.rs`),
//! else the `gemm` crate (what candle uses). `CANDOR_GEMM=gemm` picks the `gemm` crate even
//! with OpenBLAS linked. [`sgemm`] splits the product across the rayon threads itself, each
//! part a single-threaded call, so the split (and the result) depends only on the shapes
//! and the thread count, and no second thread pool competes with rayon's for the cores.

use std::sync::OnceLock;

#[cfg(candor_openblas)]
mod blas {
    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn cblas_sgemm(
            layout: i32,
            transa: i32,
            transb: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        pub fn openblas_set_num_threads(n: i32);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The `gemm` crate.
    Gemm,
    /// OpenBLAS through cblas.
    OpenBlas,
}

/// The backend in use (fixed for the process).
pub fn backend() -> Backend {
    static B: OnceLock<Backend> = OnceLock::new();
    *B.get_or_init(|| {
        let forced_gemm = std::env::var("CANDOR_GEMM").is_ok_and(|v| v == "gemm");
        if cfg!(candor_openblas) && !forced_gemm {
            #[cfg(candor_openblas)]
            unsafe {
                blas::openblas_set_num_threads(1); // rayon does the splitting
            }
            Backend::OpenBlas
        } else {
            Backend::Gemm
        }
    })
}

/// One single-threaded product on raw pointers.
///
/// # Safety
/// `a`, `b`, `c` must address matrices of the given sizes and strides; `c` must not overlap
/// `a` or `b`.
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
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let p = c.add(i * ldc + j);
                *p = if beta == 0.0 { 0.0 } else { beta * *p };
            }
        }
        return;
    }
    // a few rows (one query attending over the KV cache): no packing
    if !ta && m <= 4 {
        if tb {
            small_m_abt(m, k, alpha, a, lda, b, ldb, beta, c, ldc, 0, n);
        } else {
            small_m_ab(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        }
        return;
    }
    sgemm_serial_on(
        backend(),
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

/// `C = α·A·B + β·C` for few rows of A: each row of C accumulates rows of B, in order.
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
        let ci = std::slice::from_raw_parts_mut(c.add(i * ldc), n);
        if beta == 0.0 {
            ci.iter_mut().for_each(|x| *x = 0.0);
        } else if beta != 1.0 {
            ci.iter_mut().for_each(|x| *x *= beta);
        }
        for p in 0..k {
            let w = alpha * *a.add(i * lda + p);
            let bp = std::slice::from_raw_parts(b.add(p * ldb), n);
            for (x, &y) in ci.iter_mut().zip(bp) {
                *x += w * y;
            }
        }
    }
}

/// [`sgemm_serial`] on a given backend.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_serial_on(
    backend: Backend,
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
    match backend {
        #[cfg(candor_openblas)]
        Backend::OpenBlas => blas::cblas_sgemm(
            101, // row major
            if ta { 112 } else { 111 },
            if tb { 112 } else { 111 },
            m as i32,
            n as i32,
            k as i32,
            alpha,
            a,
            lda as i32,
            b,
            ldb as i32,
            beta,
            c,
            ldc as i32,
        ),
        _ => {
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
                gemm::Parallelism::None,
            )
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
        let bj = std::slice::from_raw_parts(b.add(j * ldb), k);
        for i in 0..m {
            let ai = std::slice::from_raw_parts(a.add(i * lda), k);
            let d = alpha * dot_lanes(ai, bj);
            let p = c.add(i * ldc + j);
            *p = if beta == 0.0 { d } else { d + beta * *p };
        }
    }
}

/// The same with AVX2/FMA: four rows of A against one row of B per pass, two 8-lane
/// accumulators each, lanes summed in a fixed order.
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
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
    let k16 = k / 16 * 16;
    let finish = |acc: __m256, i: usize, bj: *const f32, j: usize| {
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
        let bj = b.add(j * ldb);
        let mut i = 0;
        while i + 4 <= m {
            let (a0, a1, a2, a3) = (
                a.add(i * lda),
                a.add((i + 1) * lda),
                a.add((i + 2) * lda),
                a.add((i + 3) * lda),
            );
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
            finish(_mm256_add_ps(s0, t0), i, bj, j);
            finish(_mm256_add_ps(s1, t1), i + 1, bj, j);
            finish(_mm256_add_ps(s2, t2), i + 2, bj, j);
            finish(_mm256_add_ps(s3, t3), i + 3, bj, j);
            i += 4;
        }
        while i < m {
            let a0 = a.add(i * lda);
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
            finish(_mm256_add_ps(s0, t0), i, bj, j);
            i += 1;
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn small_m_abt(
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
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        return small_m_abt_avx2(m, k, alpha, a, lda, b, ldb, beta, c, ldc, j0, j1);
    }
    small_m_abt_generic(m, k, alpha, a, lda, b, ldb, beta, c, ldc, j0, j1)
}

/// `C = α·op(A)·op(B) + β·C` over slices, split across the rayon threads: by rows of C
/// when it has enough of them, else by columns.
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
    // bounds: the last element each operand's layout reaches
    let need = |rows: usize, cols: usize, ld: usize, t: bool| {
        let (r, cc) = if t { (cols, rows) } else { (rows, cols) };
        if r == 0 || cc == 0 {
            0
        } else {
            (r - 1) * ld + cc
        }
    };
    assert!(a.len() >= need(m, k, lda, ta), "sgemm: A too short");
    assert!(b.len() >= need(k, n, ldb, tb), "sgemm: B too short");
    assert!(c.len() >= need(m, n, ldc, false), "sgemm: C too short");
    let threads = rayon::current_num_threads().max(1);
    let (a, b, cp) = (
        a.as_ptr() as usize,
        b.as_ptr() as usize,
        c.as_mut_ptr() as usize,
    );
    if !ta && tb && m <= SMALL_M && k > 0 {
        // split the columns (rows of B) across threads when there is enough work
        let parts = if m * n * k >= 4 * PAR_FLOPS {
            threads.min(n)
        } else {
            1
        };
        let run = |p: usize| unsafe {
            let (j0, j1) = (p * n / parts, (p + 1) * n / parts);
            small_m_abt(
                m, k, alpha, a as _, lda, b as _, ldb, beta, cp as _, ldc, j0, j1,
            )
        };
        if parts == 1 {
            run(0);
        } else {
            rayon::scope(|s| (0..parts).for_each(|p| s.spawn(move |_| run(p))));
        }
        return;
    }
    if threads == 1 || m * n * k < PAR_FLOPS {
        unsafe {
            sgemm_serial(
                ta, tb, m, n, k, alpha, a as _, lda, b as _, ldb, beta, cp as _, ldc,
            )
        };
        return;
    }
    if backend() == Backend::Gemm {
        // the gemm crate splits one product across rayon's threads better than separate calls
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
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                cp as *mut f32,
                1,
                ldc as isize,
                beta != 0.0,
                a as *const f32,
                a_cs,
                a_rs,
                b as *const f32,
                b_cs,
                b_rs,
                beta,
                alpha,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            )
        };
        return;
    }
    let by_rows = m >= 16 * threads || m >= n;
    let len = if by_rows { m } else { n };
    let parts = threads.min(len.max(1));
    // part boundaries on multiples of 16 (whole register tiles) where possible
    let bound = |p: usize| {
        let x = p * len / parts;
        if p == parts || len < 16 * parts {
            x
        } else {
            x / 16 * 16
        }
    };
    rayon::scope(|s| {
        for p in 0..parts {
            let (lo, hi) = (bound(p), bound(p + 1));
            if lo == hi {
                continue;
            }
            s.spawn(move |_| unsafe {
                let (a, b, c) = (a as *const f32, b as *const f32, cp as *mut f32);
                if by_rows {
                    let a_off = if ta { lo } else { lo * lda };
                    sgemm_serial(
                        ta,
                        tb,
                        hi - lo,
                        n,
                        k,
                        alpha,
                        a.add(a_off),
                        lda,
                        b,
                        ldb,
                        beta,
                        c.add(lo * ldc),
                        ldc,
                    );
                } else {
                    let b_off = if tb { lo * ldb } else { lo };
                    sgemm_serial(
                        ta,
                        tb,
                        m,
                        hi - lo,
                        k,
                        alpha,
                        a,
                        lda,
                        b.add(b_off),
                        ldb,
                        beta,
                        c.add(lo),
                        ldc,
                    );
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

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
    ) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let x = if ta { a[p * lda + i] } else { a[i * lda + p] };
                    let y = if tb { b[j * ldb + p] } else { b[p * ldb + j] };
                    s += x as f64 * y as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn all_transpose_cases_match_a_naive_product() {
        for &(m, n, k) in &[
            (3, 5, 7),
            (70, 33, 129),
            (300, 17, 40),
            (5, 300, 64),
            (8, 2000, 300),
            (16, 40, 3),
            (1, 64, 145),
            (4, 9, 33),
        ] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let a: Vec<f32> = (0..m * k)
                        .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                        .collect();
                    let b: Vec<f32> = (0..k * n)
                        .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
                        .collect();
                    let lda = if ta { m } else { k };
                    let ldb = if tb { k } else { n };
                    let want = naive(ta, tb, m, n, k, &a, lda, &b, ldb);
                    let mut c = vec![1f32; m * n];
                    sgemm(ta, tb, m, n, k, 2.0, &a, lda, &b, ldb, 0.5, &mut c, n);
                    for (g, w) in c.iter().zip(&want) {
                        assert!(
                            (g - (2.0 * w + 0.5)).abs() < 1e-3,
                            "{m}x{n}x{k} ta={ta} tb={tb}: {g} vs {}",
                            2.0 * w + 0.5
                        );
                    }
                    // both backends, whichever the process uses
                    let backends: &[Backend] = if cfg!(candor_openblas) {
                        &[Backend::Gemm, Backend::OpenBlas]
                    } else {
                        &[Backend::Gemm]
                    };
                    for &bk in backends {
                        let mut c = vec![1f32; m * n];
                        unsafe {
                            sgemm_serial_on(
                                bk,
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
                                0.5,
                                c.as_mut_ptr(),
                                n,
                            )
                        };
                        for (g, w) in c.iter().zip(&want) {
                            assert!(
                                (g - (2.0 * w + 0.5)).abs() < 1e-3,
                                "{bk:?} {m}x{n}x{k} ta={ta} tb={tb}: {g} vs {}",
                                2.0 * w + 0.5
                            );
                        }
                    }
                }
            }
        }
    }
}
