//! Finds OpenBLAS (Debian/Ubuntu: `apt-get install libopenblas-dev`) and, when it is there,
//! links it so `fused::gemm` can route the CPU matrix products through `cblas_sgemm`.
//! Without it candor builds and runs the same, on the `gemm` crate (candle's own).
//! `CANDOR_BLAS=off` skips the search. After installing OpenBLAS into an existing build,
//! `cargo clean -p candor-model` makes the next build pick it up.

use std::path::Path;

fn main() {
    println!("cargo:rustc-check-cfg=cfg(candor_openblas)");
    println!("cargo:rerun-if-env-changed=CANDOR_BLAS");
    println!("cargo:rerun-if-changed=build.rs");
    if matches!(std::env::var("CANDOR_BLAS").as_deref(), Ok("off") | Ok("0")) {
        return;
    }
    if std::env::var("TARGET").ok() != std::env::var("HOST").ok() {
        return; // cross builds: the host's libraries say nothing about the target's
    }
    let dirs = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
        "/opt/homebrew/opt/openblas/lib",
        "/usr/local/opt/openblas/lib",
    ];
    for dir in dirs {
        for file in ["libopenblas.so", "libopenblas.dylib"] {
            let path = Path::new(dir).join(file);
            if path.exists() {
                println!("cargo:rustc-link-search=native={dir}");
                println!("cargo:rustc-link-lib=dylib=openblas");
                println!("cargo:rustc-cfg=candor_openblas");
                println!("cargo:rerun-if-changed={}", path.display());
                return;
            }
        }
    }
}
