//! `candor bench`: how fast this machine trains and samples a named model shape.

use anyhow::Result;
use candor_train::bench::{bench_sample, bench_train, shape};
use candor_train::precision::Precision;
use clap::Args;

use crate::device;

#[derive(Args)]
pub struct BenchArgs {
    /// tiny (4×128, ctx 128, vocab 512, batch 16), medium (6×384, ctx 256, vocab 4096,
    /// batch 8) or small (the small config: 8×256, ctx 256, vocab 8192, batch 8).
    #[arg(long, default_value = "tiny")]
    pub shape: String,
    /// Benchmark batched KV-cache generation instead of the training step.
    #[arg(long)]
    pub sample: bool,
    /// Timed steps (training) or generations (sampling), after warm-up; the median counts.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Time candor's fp32 matrix products instead (GFLOP/s on the benchmark models' shapes,
    /// with the threads of `RAYON_NUM_THREADS`), to compare with the machine's peak.
    #[arg(long, conflicts_with = "sample")]
    pub matmul: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, or bf16: mixed precision for training (f32 master weights, as `train.dtype`),
    /// bf16 weights and KV cache for sampling.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.matmul {
        return matmul(args.json);
    }
    let dev = device(&args.device)?;
    shape(&args.shape)?;
    let precision = Precision::parse(&args.dtype, "--dtype")?;
    let steps = if args.sample {
        args.steps.clamp(1, 3)
    } else {
        args.steps.max(1)
    };
    let r = if args.sample {
        bench_sample(&args.shape, &dev, precision, 1, steps)?
    } else {
        bench_train(&args.shape, &dev, precision, args.warmup, steps)?
    };
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "candor {} {} {} on {}: {:.0} tokens/s, {} params, {:.2} GFLOP/s, peak RSS {:.0} MiB, {} threads",
            r.shape,
            r.mode,
            r.dtype,
            r.device,
            r.tokens_per_sec,
            r.params,
            r.flops_per_sec / 1e9,
            r.peak_rss_bytes as f64 / (1 << 20) as f64,
            r.threads
        );
    }
    Ok(())
}

/// `candor bench --matmul`: GFLOP/s of each product shape and the best.
fn matmul(json: bool) -> Result<()> {
    use candor_model::fused::{gemm, isa};
    let speeds = gemm::measure();
    let best = speeds.iter().map(|s| s.gflops).fold(0.0, f64::max);
    let threads = gemm::threads();
    if json {
        let shapes: serde_json::Map<String, serde_json::Value> = speeds
            .iter()
            .map(|s| {
                (
                    s.shape.to_string(),
                    ((s.gflops * 10.0).round() / 10.0).into(),
                )
            })
            .collect();
        let out = serde_json::json!({
            "impl": "candor",
            "mode": "matmul",
            "threads": threads,
            "best_gflops": (best * 10.0).round() / 10.0,
            "gflops": shapes,
            "isa": isa::isa().name(),
            "gemm": format!("{:?}", gemm::backend()),
            "cpu_model": isa::cpu_model(),
            "cpu_simd": isa::cpu_simd_flags(),
        });
        println!("{out}");
    } else {
        for s in &speeds {
            println!("{:>22}  {:7.1} GFLOP/s", s.shape, s.gflops);
        }
        println!(
            "best {best:.1} GFLOP/s ({:?} backend, {}, {threads} threads, {})",
            gemm::backend(),
            isa::isa().name(),
            isa::cpu_model()
        );
    }
    Ok(())
}
