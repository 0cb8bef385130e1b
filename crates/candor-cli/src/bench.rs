//! `candor bench`: how fast this machine trains and samples a named model shape, or
//! (`--model`) a real checkpoint.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use candor_train::bench::{bench_sample, bench_train, shape};
use candor_train::model_bench::{row, run_row, Row, RowResult, Sizes, ROWS};
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
    /// Time a real checkpoint instead (a directory or `hf:ORG/NAME` in the local Hugging Face
    /// cache): a training step with full weights, the same with gradient checkpointing, and
    /// generation with the KV cache, each row in its own process (its peak memory its own);
    /// prints a table. `scripts/bench/model_twin.py` runs the same rows in PyTorch.
    #[arg(long, value_name = "DIR|hf:ORG/NAME", conflicts_with_all = ["sample", "matmul"])]
    pub model: Option<String>,
    /// With --model: sequences per training step and prompts per generation.
    #[arg(long, requires = "model", default_value_t = 4)]
    pub batch: usize,
    /// With --model: predicted tokens per training sequence.
    #[arg(long, requires = "model", default_value_t = 256)]
    pub seq_len: usize,
    /// With --model: prompt tokens per generation.
    #[arg(long, requires = "model", default_value_t = 32)]
    pub prompt_len: usize,
    /// With --model: new tokens per prompt.
    #[arg(long, requires = "model", default_value_t = 64)]
    pub new_tokens: usize,
    /// With --model: the rows to run, comma-separated (default: all of train, train-ckpt,
    /// lora, lora-ckpt, generate).
    #[arg(long, requires = "model", value_delimiter = ',')]
    pub rows: Vec<String>,
    /// With --model: also write the results as one JSON object to this file.
    #[arg(long, requires = "model")]
    pub out: Option<PathBuf>,
    /// Run one row in this process and print its JSON (what --model starts per row).
    #[arg(long, requires = "model", hide = true)]
    pub row: Option<String>,
    /// Timed steps (training) or generations (sampling), after warm-up; the median counts.
    /// Default 10 (--model: 3).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Untimed steps first. Default 3 (--model: 1).
    #[arg(long)]
    pub warmup: Option<usize>,
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
    if let Some(model) = &args.model {
        return model_bench(&args, model);
    }
    let dev = device(&args.device)?;
    shape(&args.shape)?;
    let precision = Precision::parse(&args.dtype, "--dtype")?;
    let steps = args.steps.unwrap_or(10);
    let steps = if args.sample {
        steps.clamp(1, 3)
    } else {
        steps.max(1)
    };
    let r = if args.sample {
        bench_sample(&args.shape, &dev, precision, 1, steps)?
    } else {
        bench_train(
            &args.shape,
            &dev,
            precision,
            args.warmup.unwrap_or(3),
            steps,
        )?
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

/// `candor bench --model`: each row in a child process of this binary (`--row`), then the
/// table (or JSON) and `--out`.
fn model_bench(args: &BenchArgs, spec: &str) -> Result<()> {
    let dir = candor_model::resolve_model_dir(spec).with_context(|| format!("--model {spec}"))?;
    let precision = Precision::parse(&args.dtype, "--dtype")?;
    let sizes = Sizes {
        batch: args.batch,
        seq_len: args.seq_len,
        steps: args.steps.unwrap_or(3),
        warmup: args.warmup.unwrap_or(1),
        prompt_len: args.prompt_len,
        new_tokens: args.new_tokens,
    };
    let rows: Vec<&Row> = if args.rows.is_empty() {
        ROWS.iter().collect()
    } else {
        args.rows.iter().map(|n| row(n)).collect::<Result<_, _>>()?
    };
    let config = candor_model::io::read_config(&dir)?;
    sizes.check(&config)?;
    if let Some(name) = &args.row {
        let dev = device(&args.device)?;
        let r = run_row(&dir, row(name)?, &sizes, precision, &dev)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    if let Some(out) = &args.out {
        candor_core::output::probe_output(out)
            .with_context(|| format!("--out {}", out.display()))?;
    }
    let device_name = candor_core::device::device_name(&device(&args.device)?);
    let params = config.param_count(candor_model::Head::Lm);
    let threads = candor_train::bench::threads();
    use candor_model::fused::{gemm, isa};
    if !args.json {
        println!(
            "candor bench --model {spec}: {:.1}M params, training {} × {} tokens, generation {} × ({} + {} new) tokens, {}, {}, {threads} threads, {}",
            params as f64 / 1e6,
            sizes.batch,
            sizes.seq_len,
            sizes.batch,
            sizes.prompt_len,
            sizes.new_tokens,
            precision.name(),
            device_name,
            isa::cpu_model()
        );
        println!(
            "{:<11} {:<52} {:>10} {:>9} {:>13} {:>14}",
            "row", "what", "tokens/s", "step s", "peak RSS MiB", "loaded RSS MiB"
        );
    }
    let mut results = vec![];
    for r in rows {
        let res = run_child(args, &dir, r).with_context(|| format!("row {}", r.name))?;
        if !args.json {
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            println!(
                "{:<11} {:<52} {:>10.1} {:>9.3} {:>13.0} {:>14.0}",
                res.row,
                res.what,
                res.tokens_per_sec,
                res.step_sec_median,
                mib(res.peak_rss_bytes),
                mib(res.loaded_rss_bytes)
            );
        }
        results.push(res);
    }
    let out = serde_json::json!({
        "impl": "candor",
        "model": spec,
        "dir": dir.display().to_string(),
        "params": params,
        "sizes": sizes,
        "dtype": precision.name(),
        "device": device_name,
        "threads": threads,
        "cpu_model": isa::cpu_model(),
        "isa": isa::isa().name(),
        "gemm": format!("{:?}", gemm::backend()),
        "rows": results,
    });
    if args.json {
        println!("{out}");
    }
    if let Some(path) = &args.out {
        let text = serde_json::to_string_pretty(&out)? + "\n";
        candor_core::output::write_atomic(path, text.as_bytes())
            .with_context(|| format!("--out {}", path.display()))?;
    }
    Ok(())
}

/// Run `row` in a child process of this binary. Its stderr is passed on; when it fails, its
/// error line becomes this process's.
fn run_child(args: &BenchArgs, dir: &Path, row: &Row) -> Result<RowResult> {
    let exe = std::env::current_exe().context("finding the candor binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("bench")
        .arg("--model")
        .arg(dir)
        .args(["--row", row.name]);
    for (flag, v) in [
        ("--batch", args.batch),
        ("--seq-len", args.seq_len),
        ("--prompt-len", args.prompt_len),
        ("--new-tokens", args.new_tokens),
    ] {
        cmd.args([flag, &v.to_string()]);
    }
    for (flag, v) in [("--steps", args.steps), ("--warmup", args.warmup)] {
        if let Some(v) = v {
            cmd.args([flag, &v.to_string()]);
        }
    }
    cmd.args(["--device", &args.device, "--dtype", &args.dtype]);
    let out = cmd.stderr(Stdio::piped()).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let line = stderr.lines().rev().find_map(|l| l.strip_prefix("error: "));
        bail!(
            "{}",
            line.unwrap_or(&format!("its process failed ({})", out.status))
        );
    }
    eprint!("{stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .last()
        .ok_or_else(|| anyhow!("its process printed nothing"))?;
    Ok(serde_json::from_str(line)?)
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
