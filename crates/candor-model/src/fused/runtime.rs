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
//! - rayon's global pool counts the calling (main) thread as one of its
//!   `RAYON_NUM_THREADS` workers instead of starting that many more beside it: the main
//!   thread runs the serial parts of a step (candle's ops, sampling) and then its share
//!   of every parallel kernel, so a 2-thread run has 2 threads on 2 cores instead of 3
//!   (whose idle workers spun and yielded against the main thread: about 13% of a GRPO
//!   step's `perf` samples were in the scheduler on a 2-vCPU Zen 3). The split of every kernel depends only on the thread count, which is
//!   unchanged, so results are the same bit for bit. With one thread the pool keeps its
//!   own worker (work handed to a pool whose only worker is the main thread would wait
//!   until the main thread looked for it).

/// The rayon threads `RAYON_NUM_THREADS` asks for (rayon's rule: unset, 0 or not a number
/// means one per CPU).
fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Apply the settings above. Call before any other thread exists, from the thread that
/// will run the work (the main thread).
pub fn init() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let threads = rayon_threads();
    if threads >= 2 {
        // fails only if the global pool already exists (then it is left as it is)
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .use_current_thread()
            .build_global();
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
