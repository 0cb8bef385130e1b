//! candor's own packed single-precision GEMM, `C = α·op(A)·op(B) + β·C` (row-major, cblas
//! conventions), in the BLIS layout:
//!
//! ```text
//! for each NC-wide block of columns:
//! for each KC-deep slice of k:            pack op(B)[kc × nc] into NR-wide panels (shared)
//!   for each MC-tall block of rows (the parallel tasks, also split by columns when few):
//!     pack op(A)[mc × kc] into MR-tall panels (per task)
//!     for each NR panel, for each MR panel:  micro-kernel: MR × NR tile of C += A·B
//! ```
//!
//! The micro-kernels hold the MR × NR tile in registers and stream both packed panels
//! (one broadcast of A and NR/lanes loads of B per multiply-add row):
//! AVX-512 14 × 32 (28 of 32 zmm registers), AVX2+FMA 6 × 16 (12 of 16 ymm), and a portable
//! 4 × 16 kernel the compiler vectorises for the baseline target. [`super::isa::isa`] picks
//! one per process; edge tiles run the same kernel into a scratch tile.
//!
//! Every element of C is summed in the same order (KC slices in order, k within a slice in
//! order, one fused multiply-add chain per element) whatever the thread count or how the
//! tasks are split, so results repeat bit for bit on one machine and ISA.

use std::cell::Cell;

use super::isa::Isa;

/// Depth of one packed slice of k (A panel MR·KC and B panel NR·KC stay in L1/L2).
const KC: usize = 256;
/// Columns of C per packed block of B (KC·NC floats = 2 MiB: bounds the buffer).
const NC: usize = 2048;
/// Rows of C per task (a multiple of every MR; the packed A block MC·KC fits in L2).
const MC_TILES: usize = 8;

/// One micro-kernel: the MR × NR tile at `c` (row stride `ldc`) gets
/// `α·Σ_p a[p·MR + i]·b[p·NR + j] + β·c` (`β = 0`: C is not read).
type KernelFn = unsafe fn(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta: f32,
);

#[derive(Clone, Copy)]
pub(crate) struct Kernel {
    mr: usize,
    nr: usize,
    run: KernelFn,
}

/// The micro-kernel for an instruction-set level.
pub(crate) fn kernel(isa: Isa) -> Kernel {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Kernel {
            mr: 14,
            nr: 32,
            run: x86::kernel_avx512,
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Kernel {
            mr: 6,
            nr: 16,
            run: x86::kernel_avx2,
        },
        _ => Kernel {
            mr: SCALAR_MR,
            nr: SCALAR_NR,
            run: kernel_scalar,
        },
    }
}

const SCALAR_MR: usize = 4;
const SCALAR_NR: usize = 16;

/// The portable micro-kernel (4 × 16 accumulators the compiler keeps in vector registers).
///
/// # Safety
/// `a` holds `kc·4` and `b` `kc·16` readable floats; `c` addresses a 4 × 16 tile with row
/// stride `ldc`, writable (and readable when `beta ≠ 0`), overlapping neither.
unsafe fn kernel_scalar(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta: f32,
) {
    const MR: usize = SCALAR_MR;
    const NR: usize = SCALAR_NR;
    // SAFETY: the caller guarantees kc·MR floats at `a` and kc·NR at `b`.
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(a, kc * MR),
            std::slice::from_raw_parts(b, kc * NR),
        )
    };
    let mut acc = [[0f32; NR]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for i in 0..MR {
            for j in 0..NR {
                acc[i][j] += ap[i] * bp[j];
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: row i of the tile is NR writable floats at c + i·ldc (caller's contract).
        let ci = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), NR) };
        for (x, &v) in ci.iter_mut().zip(row) {
            *x = if beta == 0.0 {
                alpha * v
            } else {
                alpha * v + beta * *x
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX-512 micro-kernel, 14 × 32.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F; `a` holds `kc·14` and `b` `kc·32` readable floats; `c`
    /// addresses a 14 × 32 tile with row stride `ldc`, writable (and readable when
    /// `beta ≠ 0`), overlapping neither.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn kernel_avx512(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
    ) {
        const MR: usize = 14;
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            // SAFETY: each step reads MR floats of `a` and 32 of `b`, kc steps in all.
            unsafe {
                let b0 = _mm512_loadu_ps(b);
                let b1 = _mm512_loadu_ps(b.add(16));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*a.add(i));
                    acc[0] = _mm512_fmadd_ps(ai, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(ai, b1, acc[1]);
                }
                a = a.add(MR);
                b = b.add(32);
            }
        }
        let (va, vb) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
        for (i, acc) in acc.iter().enumerate() {
            for (h, &v) in acc.iter().enumerate() {
                // SAFETY: row i, columns 16h..16h+16 lie in the caller's 14 × 32 tile.
                unsafe {
                    let p = c.add(i * ldc + 16 * h);
                    let r = if beta == 0.0 {
                        _mm512_mul_ps(va, v)
                    } else {
                        _mm512_fmadd_ps(vb, _mm512_loadu_ps(p), _mm512_mul_ps(va, v))
                    };
                    _mm512_storeu_ps(p, r);
                }
            }
        }
    }

    /// AVX2 + FMA micro-kernel, 6 × 16.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `a` holds `kc·6` and `b` `kc·16` readable floats; `c`
    /// addresses a 6 × 16 tile with row stride `ldc`, writable (and readable when
    /// `beta ≠ 0`), overlapping neither.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel_avx2(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
    ) {
        const MR: usize = 6;
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            // SAFETY: each step reads MR floats of `a` and 16 of `b`, kc steps in all.
            unsafe {
                let b0 = _mm256_loadu_ps(b);
                let b1 = _mm256_loadu_ps(b.add(8));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let ai = _mm256_broadcast_ss(&*a.add(i));
                    acc[0] = _mm256_fmadd_ps(ai, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(ai, b1, acc[1]);
                }
                a = a.add(MR);
                b = b.add(16);
            }
        }
        let (va, vb) = (_mm256_set1_ps(alpha), _mm256_set1_ps(beta));
        for (i, acc) in acc.iter().enumerate() {
            for (h, &v) in acc.iter().enumerate() {
                // SAFETY: row i, columns 8h..8h+8 lie in the caller's 6 × 16 tile.
                unsafe {
                    let p = c.add(i * ldc + 8 * h);
                    let r = if beta == 0.0 {
                        _mm256_mul_ps(va, v)
                    } else {
                        _mm256_fmadd_ps(vb, _mm256_loadu_ps(p), _mm256_mul_ps(va, v))
                    };
                    _mm256_storeu_ps(p, r);
                }
            }
        }
    }
}

/// A read-only strided view of `op(X)`: element (r, c) is `x[r·rs + c·cs]`.
#[derive(Clone, Copy)]
struct View {
    p: *const f32,
    rs: usize,
    cs: usize,
}

impl View {
    fn new(p: *const f32, ld: usize, trans: bool) -> View {
        if trans {
            View { p, rs: 1, cs: ld }
        } else {
            View { p, rs: ld, cs: 1 }
        }
    }
}

// SAFETY: a View only reads, and the caller of `gemm` keeps the matrix alive and unchanged
// for the whole call; the tasks that share it run inside that call.
unsafe impl Send for View {}
unsafe impl Sync for View {}

/// Pack rows `r0..r0+rows` × columns `p0..p0+kc` of `a` into `rows.div_ceil(mr)` panels of
/// `kc × mr` (zero rows past `rows`).
///
/// # Safety
/// Every element of that block lies in the matrix `a` views; `out` has room for the panels.
unsafe fn pack_a(
    out: &mut [f32],
    a: View,
    r0: usize,
    rows: usize,
    p0: usize,
    kc: usize,
    mr: usize,
) {
    for (t, panel) in out
        .chunks_exact_mut(kc * mr)
        .take(rows.div_ceil(mr))
        .enumerate()
    {
        let i0 = t * mr;
        let live = mr.min(rows - i0);
        if a.rs == 1 {
            // op(A) = a transposed matrix: the panel's rows of one column are contiguous
            for (p, dst) in panel.chunks_exact_mut(mr).enumerate() {
                // SAFETY: (r0+i0 .. r0+i0+live, p0+p) is inside the block the caller vouched
                // for, and with a row stride of 1 those elements are adjacent.
                let src =
                    unsafe { std::slice::from_raw_parts(a.p.add(r0 + i0 + (p0 + p) * a.cs), live) };
                dst[..live].copy_from_slice(src);
                dst[live..].fill(0.0);
            }
        } else {
            // rows of A are contiguous (View::new makes one of the strides 1): each row's kc
            // elements go to its lane of the panel
            debug_assert_eq!(a.cs, 1);
            for i in 0..live {
                // SAFETY: row r0+i0+i, columns p0..p0+kc are inside the block, adjacent.
                let src =
                    unsafe { std::slice::from_raw_parts(a.p.add((r0 + i0 + i) * a.rs + p0), kc) };
                for (dst, &x) in panel.chunks_exact_mut(mr).zip(src) {
                    dst[i] = x;
                }
            }
            if live < mr {
                for dst in panel.chunks_exact_mut(mr) {
                    dst[live..].fill(0.0);
                }
            }
        }
    }
}

/// Pack rows `p0..p0+kc` × columns `0..n` of `b` into `n.div_ceil(nr)` panels of `kc × nr`
/// (zero columns past `n`).
///
/// # Safety
/// Every element of that block lies in the matrix `b` views; `out` has room for the panels.
unsafe fn pack_b(out: &mut [f32], b: View, p0: usize, kc: usize, j0: usize, n: usize, nr: usize) {
    for (t, panel) in out
        .chunks_exact_mut(kc * nr)
        .take(n.div_ceil(nr))
        .enumerate()
    {
        let jt = t * nr;
        let live = nr.min(n - jt);
        for p in 0..kc {
            let dst = &mut panel[p * nr..(p + 1) * nr];
            // SAFETY: row p0+p, columns j0+jt..j0+jt+live are inside the block.
            let row = unsafe { b.p.add((p0 + p) * b.rs + (j0 + jt) * b.cs) };
            if b.cs == 1 {
                // SAFETY: `live` contiguous elements of that row.
                let src = unsafe { std::slice::from_raw_parts(row, live) };
                dst[..live].copy_from_slice(src);
            } else {
                for (j, d) in dst[..live].iter_mut().enumerate() {
                    // SAFETY: as above, column j0+jt+j of row p0+p.
                    *d = unsafe { *row.add(j * b.cs) };
                }
            }
            dst[live..].iter_mut().for_each(|x| *x = 0.0);
        }
    }
}

thread_local! {
    /// Per-thread packing buffers, taken out while in use (a thread that steals another
    /// product's task while waiting then allocates its own instead of aliasing this one).
    static PACK_A: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static PACK_B: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Floats of slack so a buffer can start on a 64-byte boundary.
const ALIGN: usize = 16;

/// Run `f` on this thread's buffer `key` grown to `len` floats, 64-byte aligned.
fn with_buf<R>(
    key: &'static std::thread::LocalKey<Cell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut v = key.with(|c| c.take());
    if v.len() < len + ALIGN {
        v = vec![0f32; len + ALIGN];
    }
    let off = v.as_ptr().align_offset(64).min(ALIGN);
    let r = f(&mut v[off..off + len]);
    key.with(|c| c.set(v));
    r
}

/// Raw C pointer for tasks that each write their own tile range.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks of one product write disjoint tiles of C (see `gemm`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `OutPtr`, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `C = α·op(A)·op(B) + β·C` with the micro-kernel of `isa`, over `threads` rayon tasks
/// (1 = on the calling thread).
///
/// # Safety
/// `a`, `b` address matrices of `m × k` and `k × n` (after `ta`/`tb`) with row strides
/// `lda`, `ldb`; `c` addresses `m × n` with row stride `ldc ≥ n`, writable, overlapping
/// neither `a` nor `b`. (`k = 0` leaves C as it is: the caller scales it.)
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
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
    let kern = kernel(isa);
    let (av, bv) = (View::new(a, lda, ta), View::new(b, ldb, tb));
    let mut j0 = 0;
    while j0 < n {
        let nc = NC.min(n - j0);
        // SAFETY: columns j0..j0+nc of op(B) and C are within the caller's matrices.
        unsafe {
            column_block(
                &kern,
                threads,
                m,
                nc,
                k,
                alpha,
                av,
                bv,
                j0,
                beta,
                OutPtr(c.add(j0)),
                ldc,
            )
        };
        j0 += nc;
    }
}

/// [`gemm`] on columns `j0..j0 + n` of op(B) and C (`c` points at C's column j0).
///
/// # Safety
/// As [`gemm`], for that column block.
#[allow(clippy::too_many_arguments)]
unsafe fn column_block(
    kern: &Kernel,
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    av: View,
    bv: View,
    j0: usize,
    beta: f32,
    cp: OutPtr,
    ldc: usize,
) {
    let kern = *kern;
    let (mr, nr) = (kern.mr, kern.nr);
    let mc = mr * MC_TILES;
    let n_panels = n.div_ceil(nr);
    let m_blocks = m.div_ceil(mc);
    // tasks: row blocks, each cut into column ranges (whole panels) when there are too few
    // row blocks to keep the threads busy
    let col_parts = if threads > 1 && m_blocks < 2 * threads {
        (2 * threads).div_ceil(m_blocks).min(n_panels).max(1)
    } else {
        1
    };
    let tasks = m_blocks * col_parts;
    let mut p0 = 0;
    while p0 < k {
        let kc = KC.min(k - p0);
        // later slices add to what the earlier ones wrote
        let beta_s = if p0 == 0 { beta } else { 1.0 };
        with_buf(&PACK_B, n_panels * kc * nr, |bpack| {
            // SAFETY: rows p0..p0+kc, columns j0..j0+n of op(B) are in the caller's matrix.
            unsafe { pack_b(bpack, bv, p0, kc, j0, n, nr) };
            let bpack: &[f32] = bpack;
            let task = |t: usize| {
                let (ib, cpart) = (t / col_parts, t % col_parts);
                let i0 = ib * mc;
                let rows = mc.min(m - i0);
                let (q0, q1) = (
                    cpart * n_panels / col_parts,
                    (cpart + 1) * n_panels / col_parts,
                );
                with_buf(&PACK_A, mc * kc, |apack| {
                    // SAFETY: rows i0..i0+rows, columns p0..p0+kc of op(A) are in the matrix.
                    unsafe { pack_a(apack, av, i0, rows, p0, kc, mr) };
                    for q in q0..q1 {
                        let jq = q * nr;
                        let cols = nr.min(n - jq);
                        let bp = &bpack[q * kc * nr..(q + 1) * kc * nr];
                        for (s, ap) in apack
                            .chunks_exact(kc * mr)
                            .take(rows.div_ceil(mr))
                            .enumerate()
                        {
                            let ii = i0 + s * mr;
                            let live = mr.min(m - ii);
                            // SAFETY: the tile rows ii..ii+live, columns jq..jq+cols (of this
                            // column block) lie in C and belong to this task alone (row block
                            // ib, panels q0..q1); the packed panels hold kc·mr and kc·nr floats.
                            unsafe {
                                let ct = cp.get().add(ii * ldc + jq);
                                if live == mr && cols == nr {
                                    (kern.run)(
                                        kc,
                                        ap.as_ptr(),
                                        bp.as_ptr(),
                                        ct,
                                        ldc,
                                        alpha,
                                        beta_s,
                                    );
                                } else {
                                    edge_tile(
                                        &kern, kc, ap, bp, ct, ldc, live, cols, alpha, beta_s,
                                    );
                                }
                            }
                        }
                    }
                });
            };
            if threads > 1 && tasks > 1 {
                use rayon::prelude::*;
                (0..tasks).into_par_iter().for_each(task);
            } else {
                (0..tasks).for_each(task);
            }
        });
        p0 += kc;
    }
}

/// A partial tile: the kernel writes a scratch tile, then its live part is merged into C.
///
/// # Safety
/// `c` addresses `live × cols` writable floats with row stride `ldc`; `ap`, `bp` are packed
/// panels of depth `kc` for `kern`.
#[allow(clippy::too_many_arguments)]
unsafe fn edge_tile(
    kern: &Kernel,
    kc: usize,
    ap: &[f32],
    bp: &[f32],
    c: *mut f32,
    ldc: usize,
    live: usize,
    cols: usize,
    alpha: f32,
    beta: f32,
) {
    let mut tile = [0f32; 14 * 32];
    debug_assert!(kern.mr * kern.nr <= tile.len());
    // SAFETY: the scratch tile has room for mr × nr at row stride nr; the panels hold
    // kc·mr and kc·nr floats.
    unsafe {
        (kern.run)(
            kc,
            ap.as_ptr(),
            bp.as_ptr(),
            tile.as_mut_ptr(),
            kern.nr,
            alpha,
            0.0,
        )
    };
    for i in 0..live {
        // SAFETY: row i of the live part of the tile, `cols` floats (caller's contract).
        let ci = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), cols) };
        for (x, &v) in ci.iter_mut().zip(&tile[i * kern.nr..]) {
            *x = if beta == 0.0 { v } else { v + beta * *x };
        }
    }
}
