//! `candor bench --model`: what a real checkpoint costs on this machine — a training step
//! (full weights or LoRA adapters, each with and without gradient checkpointing) and
//! generation with the KV cache, one [`Row`] each. `scripts/bench/model_twin.py` times the same rows in PyTorch +
//! transformers (+ PEFT) on the same checkpoint, batch and sequence length.
//!
//! A row runs alone in its own process (the CLI starts one per row), so each row's peak
//! resident memory (`VmHWM`) is its own: weights, optimiser state, gradients and the step's
//! activations.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use candor_core::rng::Rng;
use candor_model::generate::{generate, SamplingParams};
use candor_model::io::read_config;
use candor_model::{Head, LoraConfig, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::batch::{LmExample, Sampler};
use crate::bench::{median, peak_rss_bytes, CpuMeter};
use crate::config::TrainConfig;
use crate::dist::Dist;
use crate::error::{err, Result};
use crate::lm::lm_grads;
use crate::lora::load_for_training;
use crate::optim::{clip_grad_norm, named_vars, AdamW};
use crate::precision::{compute_model, load_frozen, Precision};

/// How a training row trains (one field per switch).
#[derive(Clone, Copy, Debug)]
pub struct TrainSetup {
    /// `train.gradient_checkpointing`.
    pub gradient_checkpointing: bool,
    /// Train LoRA adapters ([`bench_lora`]) on the frozen checkpoint instead of every weight.
    pub lora: bool,
}

/// The LoRA rows' adapters, as `scripts/bench/model_twin.py` configures PEFT: rank 16,
/// alpha 32, no dropout, on every linear projection of the blocks (q, k, v, o, gate, up,
/// down; not the head).
pub fn bench_lora() -> LoraConfig {
    LoraConfig {
        rank: 16,
        alpha: 32.0,
        dropout: 0.0,
        target_modules: vec![candor_model::lora::ALL_LINEAR.into()],
    }
}

/// What a row times.
#[derive(Clone, Copy, Debug)]
pub enum Work {
    /// Optimiser steps on `batch` random sequences of `seq_len` predicted tokens: forward,
    /// next-token cross-entropy, backward, clip 1.0, AdamW — the SFT/pretraining step
    /// ([`lm_grads`]). Tokens/s counts `batch × seq_len` per step.
    Train(TrainSetup),
    /// Batched sampling with the KV cache: `batch` prompts of `prompt_len` random tokens,
    /// `new_tokens` new tokens each (no stop token), temperature 1. Tokens/s counts the new
    /// tokens of a whole generation, prefill included.
    Generate,
}

/// One line of the table.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    /// What `--rows` and the JSON call it.
    pub name: &'static str,
    /// What the table says it is.
    pub what: &'static str,
    pub work: Work,
}

/// Every row, in the table's order; a new measurement is one more entry.
pub const ROWS: &[Row] = &[
    Row {
        name: "train",
        what: "training step, full weights",
        work: Work::Train(TrainSetup {
            gradient_checkpointing: false,
            lora: false,
        }),
    },
    Row {
        name: "train-ckpt",
        what: "training step, full weights, gradient checkpointing",
        work: Work::Train(TrainSetup {
            gradient_checkpointing: true,
            lora: false,
        }),
    },
    Row {
        name: "lora",
        what: "training step, LoRA r16 (all linear)",
        work: Work::Train(TrainSetup {
            gradient_checkpointing: false,
            lora: true,
        }),
    },
    Row {
        name: "lora-ckpt",
        what: "training step, LoRA r16, gradient checkpointing",
        work: Work::Train(TrainSetup {
            gradient_checkpointing: true,
            lora: true,
        }),
    },
    Row {
        name: "generate",
        what: "generation, KV cache",
        work: Work::Generate,
    },
];

/// The row called `name`; an error listing the names otherwise.
pub fn row(name: &str) -> Result<&'static Row> {
    ROWS.iter().find(|r| r.name == name).ok_or_else(|| {
        let names: Vec<&str> = ROWS.iter().map(|r| r.name).collect();
        err(format!(
            "--rows: unknown row `{name}`; expected one of {}",
            names.join(", ")
        ))
    })
}

/// The sizes every row shares (`--batch`, `--seq-len`, `--steps`, ...).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Sizes {
    /// Sequences per training step; prompts per generation.
    pub batch: usize,
    /// Predicted tokens per training sequence.
    pub seq_len: usize,
    /// Timed steps (training) or generations, after `warmup`; the median counts.
    pub steps: usize,
    pub warmup: usize,
    /// Prompt tokens per generation.
    pub prompt_len: usize,
    /// New tokens per prompt.
    pub new_tokens: usize,
}

impl Sizes {
    /// Every size at least 1, and the sequences within the model's context.
    pub fn check(&self, config: &ModelConfig) -> Result<()> {
        for (flag, v) in [
            ("--batch", self.batch),
            ("--seq-len", self.seq_len),
            ("--steps", self.steps),
            ("--prompt-len", self.prompt_len),
            ("--new-tokens", self.new_tokens),
        ] {
            if v == 0 {
                return Err(err(format!("{flag}: must be at least 1")));
            }
        }
        let max_pos = config.max_position_embeddings;
        if self.seq_len > max_pos {
            return Err(err(format!(
                "--seq-len {}: longer than the model's max_position_embeddings {max_pos}",
                self.seq_len
            )));
        }
        if self.prompt_len + self.new_tokens > max_pos {
            return Err(err(format!(
                "--prompt-len {} + --new-tokens {}: longer than the model's max_position_embeddings {max_pos}",
                self.prompt_len, self.new_tokens
            )));
        }
        Ok(())
    }
}

/// One row's measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RowResult {
    pub row: String,
    pub what: String,
    /// Training: `batch × seq_len` per step; generation: new tokens.
    pub tokens_per_sec: f64,
    /// Median seconds per step (generation: per whole generation).
    pub step_sec_median: f64,
    /// CPU time (user + system, all threads) per timed step: steadier than wall time when
    /// other processes share the machine.
    pub cpu_sec_per_step: f64,
    /// Share of the machine's CPU time other processes used while timing.
    pub background_cpu_frac: f64,
    /// Peak resident memory of the row's process (`VmHWM`), bytes.
    pub peak_rss_bytes: u64,
    /// Resident memory once the weights were loaded, before the first step, bytes.
    pub loaded_rss_bytes: u64,
    /// The first step's training loss (`None` for generation): a real checkpoint on random
    /// tokens gives about ln(vocab) or more.
    pub first_loss: Option<f64>,
}

/// Resident memory now (`VmRSS`), bytes.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(String::from)
        })
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Time `row` on the checkpoint in `dir` (an `lm` head), the pass in `precision`.
pub fn run_row(
    dir: &Path,
    row: &Row,
    sizes: &Sizes,
    precision: Precision,
    device: &Device,
) -> Result<RowResult> {
    let config = read_config(dir)?;
    sizes.check(&config)?;
    let mut rng = Rng::new(0);
    let random = |rng: &mut Rng, n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| rng.below(config.vocab_size) as u32)
            .collect()
    };
    let mut times = vec![];
    let mut first_loss = None;
    let (loaded, meter) = match row.work {
        Work::Train(setup) => {
            let examples: Vec<LmExample> = (0..sizes.batch)
                .map(|_| LmExample::dense(random(&mut rng, sizes.seq_len + 1)))
                .collect();
            let train = TrainConfig {
                batch_size: sizes.batch,
                lr: 1e-5,
                dtype: precision,
                gradient_checkpointing: setup.gradient_checkpointing,
                lora: setup.lora.then(bench_lora),
                ..Default::default()
            };
            // every weight trainable, or (LoRA) the adapters on the checkpoint frozen
            let (model, varmap, _) =
                load_for_training(dir, dir, None, Head::Lm, &train, &mut rng, device)?;
            model.set_adapter_training(true);
            let mut opt = AdamW::new(named_vars(&varmap), &train)?;
            let mut sampler = Sampler::new(examples.len(), 0, Default::default());
            let loaded = rss_bytes();
            let mut meter = None;
            for i in 0..sizes.warmup + sizes.steps {
                if i == sizes.warmup {
                    meter = Some(CpuMeter::start());
                }
                let t0 = Instant::now();
                let step_model = compute_model(&model, &varmap, precision)?;
                let single = Dist::single();
                let mut step = lm_grads(
                    &step_model,
                    &opt,
                    &examples,
                    &mut sampler,
                    &train,
                    0,
                    &single,
                )?;
                clip_grad_norm(&mut step.grads, train.grad_clip)?;
                opt.step(&step.grads, train.lr)?;
                device.synchronize()?;
                first_loss.get_or_insert(step.loss);
                if i >= sizes.warmup {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            (loaded, meter)
        }
        Work::Generate => {
            let model = load_frozen(dir, precision, device)?;
            let prompts: Vec<Vec<u32>> = (0..sizes.batch)
                .map(|_| random(&mut rng, sizes.prompt_len))
                .collect();
            let params = SamplingParams {
                max_new_tokens: sizes.new_tokens,
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
            };
            let loaded = rss_bytes();
            let mut meter = None;
            for i in 0..sizes.warmup + sizes.steps {
                if i == sizes.warmup {
                    meter = Some(CpuMeter::start());
                }
                let t0 = Instant::now();
                let out = generate(&model, &prompts, &params, &[], 0, &mut rng)?;
                device.synchronize()?;
                if out.iter().any(|o| o.tokens.len() != sizes.new_tokens) {
                    return Err(err("generation stopped early without a stop token"));
                }
                if i >= sizes.warmup {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            (loaded, meter)
        }
    };
    let (cpu, background) = meter.map_or((0.0, 0.0), |m| m.stop());
    let med = median(times);
    let tokens = match row.work {
        Work::Train(_) => sizes.batch * sizes.seq_len,
        Work::Generate => sizes.batch * sizes.new_tokens,
    };
    Ok(RowResult {
        row: row.name.into(),
        what: row.what.into(),
        tokens_per_sec: tokens as f64 / med,
        step_sec_median: med,
        cpu_sec_per_step: cpu / sizes.steps as f64,
        background_cpu_frac: background,
        peak_rss_bytes: peak_rss_bytes(),
        loaded_rss_bytes: loaded,
        first_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candor_model::io::{build_trainable, save_model};

    /// Every row runs on a small checkpoint and reports sane figures (the LoRA rows start
    /// from the checkpoint's own loss: B is zero); an unknown row name and a sequence
    /// longer than the model's context are one-line errors.
    #[test]
    fn every_row_runs_on_a_checkpoint() {
        let dir = std::env::temp_dir().join(format!("candor-model-bench-{}", std::process::id()));
        let config = ModelConfig::llama(50, 32, 2, 4, 2, 64, 64, 10000.0, true);
        let (_, varmap) =
            build_trainable(&config, Head::Lm, None, &[], &mut Rng::new(1), &Device::Cpu).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        save_model(&dir, &config, Head::Lm, &varmap).unwrap();
        let sizes = Sizes {
            batch: 2,
            seq_len: 16,
            steps: 1,
            warmup: 1,
            prompt_len: 4,
            new_tokens: 8,
        };
        let mut full_loss = None;
        for r in ROWS {
            let res = run_row(&dir, r, &sizes, Precision::F32, &Device::Cpu).unwrap();
            assert!(
                res.tokens_per_sec > 0.0 && res.step_sec_median > 0.0,
                "{res:?}"
            );
            assert!(res.peak_rss_bytes >= res.loaded_rss_bytes && res.loaded_rss_bytes > 0);
            if let Work::Train(_) = r.work {
                // random weights on random tokens: about ln(vocab)
                let l = res.first_loss.unwrap();
                assert!((l - 50f64.ln()).abs() < 1.0, "loss {l}");
                // same tokens, same weights (LoRA adds zero at first): the same loss
                let first = *full_loss.get_or_insert(l);
                assert!((l - first).abs() < 1e-5, "{}: loss {l} vs {first}", r.name);
            }
        }
        let e = row("qlora").unwrap_err().to_string();
        assert!(
            e.contains("unknown row `qlora`") && e.contains("lora-ckpt"),
            "{e}"
        );
        let long = Sizes {
            seq_len: 100,
            ..sizes
        };
        let e = run_row(&dir, &ROWS[0], &long, Precision::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_position_embeddings 64"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
