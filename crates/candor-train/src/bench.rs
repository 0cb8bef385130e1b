//! `candor bench`: training-step and sampling throughput of a named model shape on random
//! tokens, the same measurements `scripts/bench/torch_twin.py` makes for PyTorch.

use std::time::Instant;

use candle_core::{Device, Tensor};
use candor_core::rng::Rng;
use candor_model::generate::{generate, SamplingParams};
use candor_model::io::build_trainable;
use candor_model::{Head, ModelConfig};
use serde::Serialize;

use crate::batch::{lm_batch, LmExample};
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::loss::lm_loss;
use crate::optim::{clip_grad_norm, named_vars, AdamW};
use crate::precision::{compute_model, frozen_model, Precision};

/// A benchmark shape (the twin script's `SHAPES`).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Shape {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub ctx: usize,
    pub vocab: usize,
    pub batch: usize,
}

/// tiny and medium are the two shapes of the speed issue; small is `configs/small/pretrain.yaml`.
pub fn shape(name: &str) -> Result<Shape> {
    let s = |layers, hidden, heads, kv_heads, intermediate, ctx, vocab, batch| Shape {
        layers,
        hidden,
        heads,
        kv_heads,
        intermediate,
        ctx,
        vocab,
        batch,
    };
    Ok(match name {
        "tiny" => s(4, 128, 4, 4, 352, 128, 512, 16),
        "medium" => s(6, 384, 6, 6, 1024, 256, 4096, 8),
        "small" => s(8, 256, 4, 4, 704, 256, 8192, 8),
        _ => {
            return Err(Error::Msg(format!(
                "--shape `{name}`: expected tiny, medium or small"
            )))
        }
    })
}

/// Sampling benchmark sizes (as in the twin): batch 8, a 16-token prompt, 128 new tokens.
pub const SAMPLE_BATCH: usize = 8;
pub const SAMPLE_PROMPT: usize = 16;
pub const SAMPLE_NEW: usize = 128;

impl Shape {
    pub fn config(&self) -> ModelConfig {
        let max_pos = self.ctx.max(SAMPLE_PROMPT + SAMPLE_NEW);
        ModelConfig::llama(
            self.vocab,
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.intermediate,
            max_pos,
            10000.0,
            true,
        )
    }
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub shape: String,
    pub mode: &'static str,
    /// Forward/backward (training) or weights/activations (sampling) precision.
    pub dtype: &'static str,
    /// Where it ran (`cpu`, `cuda:0`, …).
    pub device: String,
    pub params: usize,
    pub tokens_per_sec: f64,
    pub flops_per_sec: f64,
    pub peak_rss_bytes: u64,
    pub threads: usize,
    pub step_sec_median: f64,
    /// CPU time (user + system, all threads) per timed step or generation: steadier than
    /// wall time when other processes share the machine.
    pub cpu_sec_per_step: f64,
    /// Share of the machine's CPU time other processes used while timing (as the twin's).
    pub background_cpu_frac: f64,
    /// The CPU's model name (`/proc/cpuinfo`).
    pub cpu_model: String,
    /// The CPU's SIMD flags that candor's kernels care about.
    pub cpu_simd: Vec<&'static str>,
    /// The instruction set candor's CPU kernels run (`CANDOR_ISA` caps it).
    pub isa: &'static str,
    /// The matrix-product backend (`Packed`: candor's own; `Gemm`: the gemm crate).
    pub gemm: String,
}

impl BenchResult {
    /// The machine fields every result carries.
    fn machine() -> (String, Vec<&'static str>, &'static str, String) {
        use candor_model::fused::{gemm, isa};
        (
            isa::cpu_model(),
            isa::cpu_simd_flags(),
            isa::isa().name(),
            format!("{:?}", gemm::backend()),
        )
    }
}

/// CPU time of this process so far (user + system, all threads), seconds.
fn process_cpu_sec() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // fields after the command name, which may contain spaces: utime is field 14, stime 15
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() == 2 {
        (f[0] + f[1]) / 100.0
    } else {
        0.0
    }
}

/// Busy CPU time of the whole machine so far (all cores, /proc/stat), seconds.
fn machine_busy_sec() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        0.0
    } else {
        (v.iter().sum::<f64>() - v[3] - v[4]) / 100.0
    }
}

/// Measures own CPU time and other processes' share of the machine over an interval.
pub(crate) struct CpuMeter {
    t0: Instant,
    own0: f64,
    busy0: f64,
}

impl CpuMeter {
    pub(crate) fn start() -> Self {
        CpuMeter {
            t0: Instant::now(),
            own0: process_cpu_sec(),
            busy0: machine_busy_sec(),
        }
    }
    /// (own CPU seconds, background fraction of all cores).
    pub(crate) fn stop(&self) -> (f64, f64) {
        let wall = self.t0.elapsed().as_secs_f64();
        let own = process_cpu_sec() - self.own0;
        let others = (machine_busy_sec() - self.busy0 - own).max(0.0);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        (
            own,
            if wall > 0.0 {
                others / (wall * cores)
            } else {
                0.0
            },
        )
    }
}

/// Peak resident set size of this process (VmHWM), bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(String::from)
        })
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

pub fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Time training steps (forward, cross-entropy, backward, clip 1.0, AdamW) on random tokens,
/// the pass in `precision` (bf16: f32 master weights and AdamW state, as `train.dtype`).
pub fn bench_train(
    name: &str,
    device: &Device,
    precision: Precision,
    warmup: usize,
    steps: usize,
) -> Result<BenchResult> {
    let s = shape(name)?;
    let cfg = s.config();
    let mut rng = Rng::new(0);
    let (model, varmap) = build_trainable(&cfg, Head::Lm, None, &[], &mut rng, device)?;
    let train = TrainConfig {
        lr: 3e-4,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        ..Default::default()
    };
    let mut opt = AdamW::new(named_vars(&varmap), &train)?;
    let examples: Vec<LmExample> = (0..s.batch)
        .map(|_| LmExample::dense((0..=s.ctx).map(|_| rng.below(s.vocab) as u32).collect()))
        .collect();
    let refs: Vec<&LmExample> = examples.iter().collect();
    let batch = lm_batch(&refs, 0, device)?;
    let mut times = vec![];
    let mut meter = None;
    for i in 0..warmup + steps {
        if i == warmup {
            meter = Some(CpuMeter::start());
        }
        let t0 = Instant::now();
        let step_model = compute_model(&model, &varmap, precision)?;
        let (_, mean) = lm_loss(&step_model, &batch)?;
        let store = mean.backward()?;
        let mut grads = opt.zero_grads();
        opt.accumulate(&store, &mut grads)?;
        clip_grad_norm(&mut grads, 1.0)?;
        opt.step(&grads, 3e-4)?;
        device.synchronize()?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let (cpu, background) = meter.map_or((0.0, 0.0), |m| m.stop());
    let med = median(times);
    let (cpu_model, cpu_simd, isa, gemm) = BenchResult::machine();
    let params = cfg.param_count(Head::Lm);
    let tokens = (s.batch * s.ctx) as f64;
    let flops = 6.0 * params as f64 * tokens + 12.0 * (s.layers * s.hidden * s.ctx) as f64 * tokens;
    Ok(BenchResult {
        implementation: "candor",
        shape: name.into(),
        mode: "train",
        dtype: precision.name(),
        device: candor_core::device::device_name(device),
        params,
        tokens_per_sec: tokens / med,
        flops_per_sec: flops / med,
        peak_rss_bytes: peak_rss_bytes(),
        threads: threads(),
        step_sec_median: med,
        cpu_sec_per_step: cpu / steps as f64,
        background_cpu_frac: background,
        cpu_model,
        cpu_simd,
        isa,
        gemm,
    })
}

/// Time batched generation with the KV cache: 8 prompts of 16 random tokens, 128 new tokens
/// each (no stop token), temperature 1; weights, activations and cache in `precision`.
pub fn bench_sample(
    name: &str,
    device: &Device,
    precision: Precision,
    warmup: usize,
    reps: usize,
) -> Result<BenchResult> {
    let s = shape(name)?;
    let cfg = s.config();
    let mut rng = Rng::new(0);
    let model = frozen_model(
        &cfg,
        Head::Lm,
        &build_trainable(&cfg, Head::Lm, None, &[], &mut rng, device)?.1,
        precision.dtype(),
        device,
    )?;
    let prompts: Vec<Vec<u32>> = (0..SAMPLE_BATCH)
        .map(|_| {
            (0..SAMPLE_PROMPT)
                .map(|_| rng.below(s.vocab) as u32)
                .collect()
        })
        .collect();
    let params_s = SamplingParams {
        max_new_tokens: SAMPLE_NEW,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    };
    let mut times = vec![];
    let mut meter = None;
    for i in 0..warmup + reps {
        if i == warmup {
            meter = Some(CpuMeter::start());
        }
        let t0 = Instant::now();
        let out = generate(&model, &prompts, &params_s, &[], 0, &mut rng)?;
        device.synchronize()?;
        debug_assert!(out.iter().all(|o| o.tokens.len() == SAMPLE_NEW));
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let (cpu, background) = meter.map_or((0.0, 0.0), |m| m.stop());
    let med = median(times);
    let (cpu_model, cpu_simd, isa, gemm) = BenchResult::machine();
    let params = cfg.param_count(Head::Lm);
    let new_tokens = (SAMPLE_BATCH * SAMPLE_NEW) as f64;
    // forward flops: 2·params per processed token + 4·layers·hidden·kv_len for attention
    let processed = (SAMPLE_PROMPT + SAMPLE_NEW - 1) as f64;
    let attn: f64 = (1..=SAMPLE_PROMPT)
        .chain(SAMPLE_PROMPT + 1..SAMPLE_PROMPT + SAMPLE_NEW)
        .map(|kv| 4.0 * (s.layers * s.hidden * kv) as f64)
        .sum();
    let flops = SAMPLE_BATCH as f64 * (2.0 * params as f64 * processed + attn);
    let _ = Tensor::zeros(1, candle_core::DType::F32, device)?;
    Ok(BenchResult {
        implementation: "candor",
        shape: name.into(),
        mode: "sample",
        dtype: precision.name(),
        device: candor_core::device::device_name(device),
        params,
        tokens_per_sec: new_tokens / med,
        flops_per_sec: flops / med,
        peak_rss_bytes: peak_rss_bytes(),
        threads: threads(),
        step_sec_median: med,
        cpu_sec_per_step: cpu / reps as f64,
        background_cpu_frac: background,
        cpu_model,
        cpu_simd,
        isa,
        gemm,
    })
}
