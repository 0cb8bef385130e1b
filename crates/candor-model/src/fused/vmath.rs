//! `exp` over a slice, eight lanes at a time with AVX2/FMA where the CPU has them (the
//! Cephes single-precision polynomial, within 2 ulp of libm's `expf` on [−87, 88]; 0 below),
//! else libm's `expf` element by element ([`super::isa::isa`] decides). Softmax, the SwiGLU sigmoid and the cross-entropy
//! spent ~5% of a training step in scalar `expf`.

#[cfg(target_arch = "x86_64")]
use super::isa::{isa, Isa};

/// `Σ x[i]` accumulated in f64 over 8 fixed lanes (the compiler vectorises it; the order
/// is fixed, so results repeat). Long f32 reductions (a softmax over a 49k vocabulary) lose
/// ~1e-4 summed left to right in f32; this keeps them at f32 rounding of the exact sum.
pub fn sum_f64(x: &[f32]) -> f64 {
    const L: usize = 8;
    let mut acc = [0f64; L];
    let chunks = x.chunks_exact(L);
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for c in chunks {
        for l in 0..L {
            acc[l] += c[l] as f64;
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// `Σ x[i]·y[i]` accumulated in f64 over 8 fixed lanes.
pub fn dot_f64(x: &[f32], y: &[f32]) -> f64 {
    const L: usize = 8;
    let mut acc = [0f64; L];
    let (xc, yc) = (x.chunks_exact(L), y.chunks_exact(L));
    let tail: f64 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum();
    for (a, b) in xc.zip(yc) {
        for l in 0..L {
            acc[l] += a[l] as f64 * b[l] as f64;
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// `x[i] = exp(x[i])`.
pub fn exp_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() >= Isa::Avx2 {
        // SAFETY: `isa() ≥ Avx2` only when the CPU has AVX2 and FMA.
        unsafe { exp_avx2(x) };
        return;
    }
    x.iter_mut().for_each(|v| *v = v.exp());
}

/// # Safety
/// The CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let n8 = x.len() / 8 * 8;
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i < n8 {
        // SAFETY: i + 8 ≤ n8 ≤ x.len(): eight floats of x.
        unsafe { _mm256_storeu_ps(p.add(i), exp8(_mm256_loadu_ps(p.add(i)))) };
        i += 8;
    }
    if i < x.len() {
        let mut tail = [0f32; 8];
        tail[..x.len() - i].copy_from_slice(&x[i..]);
        // SAFETY: `tail` is an 8-float local.
        unsafe {
            let y = exp8(_mm256_loadu_ps(tail.as_ptr()));
            _mm256_storeu_ps(tail.as_mut_ptr(), y);
        }
        let rest = x.len() - i;
        x[i..].copy_from_slice(&tail[..rest]);
    }
}

/// # Safety
/// The CPU supports AVX2 and FMA (register-only arithmetic otherwise).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let hi = _mm256_set1_ps(88.376_26);
    let lo = _mm256_set1_ps(-88.376_26);
    let underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3), _CMP_LT_OQ);
    let x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    // x = n·ln2 + r, |r| ≤ ln2/2
    let fx = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
    let z = _mm256_mul_ps(r, r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.398_199_9e-3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.333_452e-3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.166_579_6e-2));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.666_666_5e-1));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5e-1));
    y = _mm256_fmadd_ps(y, z, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    // 2^n
    let n = _mm256_cvtps_epi32(fx);
    let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(n, _mm256_set1_epi32(127)),
        23,
    ));
    _mm256_andnot_ps(underflow, _mm256_mul_ps(y, pow2n))
}

#[cfg(test)]
mod tests {
    /// The AVX2 path (where the CPU has it) against the portable one, element by element.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_exp_matches_the_portable_path() {
        use super::super::isa::Isa;
        if !Isa::Avx2.supported() {
            return;
        }
        let xs: Vec<f32> = (0..4099).map(|i| -90.0 + i as f32 * 0.0434).collect(); // up to 87.9
        let mut simd = xs.clone();
        // SAFETY: AVX2 and FMA were just checked.
        unsafe { super::exp_avx2(&mut simd) };
        for (&x, &g) in xs.iter().zip(&simd) {
            let want = x.exp();
            let ok = if x < -87.3 {
                g == 0.0 || (g - want).abs() < 1e-37
            } else {
                ((g - want) / want).abs() < 3e-7
            };
            assert!(ok, "exp({x}): avx2 {g}, portable {want}");
        }
    }

    #[test]
    fn matches_libm_exp_within_a_few_ulp() {
        let xs: Vec<f32> = (0..20_001)
            .map(|i| -100.0 + i as f32 * 0.0094)
            .chain([0.0, -0.0, 1e-8, -1e9, 88.0])
            .collect();
        let mut got = xs.clone();
        super::exp_inplace(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            let want = x.exp();
            if x < -87.3 {
                assert!(
                    g == 0.0 || (g - want).abs() < 1e-37,
                    "exp({x}) = {g}, want {want}"
                );
                continue;
            }
            let rel = ((g - want) / want).abs();
            assert!(rel < 3e-7, "exp({x}) = {g}, want {want} (rel {rel:.1e})");
        }
    }
}
