//! Process-wide CPU settings for training and sampling speed; the `candor` binary applies
//! them first thing in `main` (before any thread starts).
//!
//! - candle 0.11 runs its element-wise ops on a second thread pool of its own whose
//!   workers spin between ops. On a small machine they compete with rayon's (which runs
//!   the fused kernels and the matrix products) and the waits cost more than the split
//!   saves: with `CANDLE_NUM_THREADS` unset, candor sets it to 1 (the element-wise ops left
//!   are the residual adds and gradient sums, memory-bound anyway).
//! - glibc returns freed blocks of more than 128 KiB to the kernel and faults fresh zeroed
//!   pages in on the next allocation; a training step frees and reallocates the same large
//!   activations every step, so that churn showed as ~15% of the step in kernel time.
//!   candor raises the mmap and trim thresholds so those blocks are reused.

/// Apply the settings above. Call before any other thread exists.
pub fn init() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // SAFETY: `mallopt` is glibc's documented setter of two integer allocator parameters,
    // called with valid parameter numbers before other threads allocate.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        mallopt(M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum
        mallopt(M_TRIM_THRESHOLD, 512 << 20);
    }
}
