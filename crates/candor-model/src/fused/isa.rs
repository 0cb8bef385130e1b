//! Which SIMD instruction set the CPU kernels use, chosen once per process at run time.
//!
//! The binary is built for plain x86-64 (or aarch64); the kernels that have SIMD versions
//! (`#[target_feature]` functions) are called only after [`isa`] has checked the CPU has
//! those features. `CANDOR_ISA=avx512|avx2|scalar` caps the choice (to compare the paths,
//! or to run the tests on each): the cap never selects an instruction set the CPU lacks.
//!
//! - [`Isa::Avx512`]: AVX-512 F (16 f32 lanes, 32 registers), with AVX2 + FMA.
//! - [`Isa::Avx2`]: AVX2 + FMA (8 lanes, 16 registers).
//! - [`Isa::Scalar`]: portable Rust the compiler vectorises for the baseline target (SSE2
//!   on x86-64, NEON on aarch64).

use std::sync::OnceLock;

/// An instruction-set level, ordered from the portable fallback up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    /// The name `CANDOR_ISA` takes (and `candor bench --json` reports).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "portable" | "none" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" | "avx-512" => Some(Isa::Avx512),
            _ => None,
        }
    }

    /// Whether this CPU can run the kernels of this level.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Isa::Avx2.supported() && is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// Every level this CPU supports, fallback first.
pub fn supported() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|i| i.supported())
        .collect()
}

/// The best level the CPU supports, capped by `CANDOR_ISA` (fixed for the process).
/// An unknown `CANDOR_ISA` value is reported once on stderr and ignored.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = *supported().last().unwrap_or(&Isa::Scalar);
        match std::env::var("CANDOR_ISA") {
            Ok(v) if !v.is_empty() => match Isa::parse(&v) {
                Some(cap) => best.min(cap),
                None => {
                    eprintln!(
                        "warning: CANDOR_ISA={v:?} is not one of avx512, avx2, scalar; using {}",
                        best.name()
                    );
                    best
                }
            },
            _ => best,
        }
    })
}

/// The CPU's SIMD feature flags that matter to candor's kernels (for benchmark records).
pub fn cpu_simd_flags() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut flags = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if is_x86_feature_detected!($f) {
                    flags.push($f);
                }
            )*};
        }
        probe!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            flags.push("neon");
        }
    }
    flags
}

/// The CPU's model name (`/proc/cpuinfo`'s `model name`), or `unknown`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_order() {
        assert_eq!(Isa::parse("AVX512"), Some(Isa::Avx512));
        assert_eq!(Isa::parse("avx2"), Some(Isa::Avx2));
        assert_eq!(Isa::parse("scalar"), Some(Isa::Scalar));
        assert_eq!(Isa::parse("sse"), None);
        assert!(Isa::Scalar < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        assert!(supported().contains(&Isa::Scalar));
        assert!(isa().supported());
    }
}
