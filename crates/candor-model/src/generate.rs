//! Batched sampling with the KV cache.
//!
//! Prompts are left-padded to one length so every row's next token sits in the last
//! column; position ids count only real tokens, and the attention bias hides the padding.
//! Each sampled token's log-probability under the tempered distribution (before top-k/top-p
//! truncation) is recorded, so PPO can use it as the rollout policy's log-prob.

use std::ops::ControlFlow;

use candle_core::{DType, Tensor};
use candor_core::rng::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::mask::{step_bias, Layout};
use crate::model::Model;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Most tokens to generate per prompt.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = off).
    pub top_p: f64,
}

/// A sampling setting out of its range: which one (`temperature`, `top_p`, `top_k`,
/// `max_new_tokens`), the value given, and what was expected. [`option`](Self::option) and
/// [`key`](Self::key) name it the way the user wrote it.
#[derive(Clone, Debug, PartialEq)]
pub struct BadSetting {
    pub field: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl BadSetting {
    /// As a command-line option: `--top-p 1.5: expected a probability in (0, 1]`.
    pub fn option(&self) -> String {
        format!(
            "--{} {}: expected {}",
            self.field.replace('_', "-"),
            self.value,
            self.expected
        )
    }

    /// As a config key under `section`: `rollout.top_p: 1.5: expected ...`.
    pub fn key(&self, section: &str) -> String {
        format!(
            "{section}.{}: {}: expected {}",
            self.field, self.value, self.expected
        )
    }
}

impl std::fmt::Display for BadSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}: expected {}",
            self.field, self.value, self.expected
        )
    }
}

impl SamplingParams {
    /// The one check of sampling settings, wherever they come from (`generate`, `sample`,
    /// RL rollouts): temperature finite and ≥ 0 (0 = greedy), top-p in (0, 1], at least
    /// one new token. (top-k is unsigned; 0 = off.)
    pub fn check(&self) -> std::result::Result<(), BadSetting> {
        let bad = |field, value: String, expected| {
            Err(BadSetting {
                field,
                value,
                expected,
            })
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                self.temperature.to_string(),
                "a finite number >= 0 (0 = greedy)",
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                self.top_p.to_string(),
                "a probability in (0, 1] (1 = off)",
            );
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", "0".into(), "at least 1");
        }
        Ok(())
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

/// One generated continuation.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Generated tokens, including the stop token if one was produced.
    pub tokens: Vec<u32>,
    /// log p(token) under softmax(logits / temperature) (temperature 1 when greedy).
    pub logprobs: Vec<f32>,
    /// Whether generation ended on a stop token (else on the length limit).
    pub stopped: bool,
}

/// Sample one token from a row of logits; returns (token, log-prob).
pub fn sample_row(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> (u32, f32) {
    let t = if params.temperature > 0.0 {
        params.temperature as f32
    } else {
        1.0
    };
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    // exp((l − max)/t) for the whole row at once (vectorised), then its log-sum
    let mut e: Vec<f32> = logits.iter().map(|&l| (l - max) / t).collect();
    crate::fused::vmath::exp_inplace(&mut e);
    let lse = e.iter().sum::<f32>().ln();
    let logprob = |i: usize| (logits[i] - max) / t - lse;
    if params.temperature <= 0.0 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return (best as u32, logprob(best));
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let truncate = params.top_k > 0 || params.top_p < 1.0;
    if truncate {
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if params.top_k > 0 {
            idx.truncate(params.top_k);
        }
        if params.top_p < 1.0 {
            let mut cum = 0.0f32;
            let mut keep = 0;
            for &i in &idx {
                cum += logprob(i).exp();
                keep += 1;
                if cum >= params.top_p as f32 {
                    break;
                }
            }
            idx.truncate(keep.max(1));
        }
    }
    let inv = (-lse).exp();
    let probs: Vec<f32> = idx.iter().map(|&i| e[i] * inv).collect();
    let total: f32 = probs.iter().sum();
    let mut u = rng.uniform() as f32 * total;
    let mut choice = *idx.last().unwrap();
    for (&i, &p) in idx.iter().zip(&probs) {
        if u < p {
            choice = i;
            break;
        }
        u -= p;
    }
    (choice as u32, logprob(choice))
}

fn last_logits(model: &Model, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = hidden.dim(1)?;
    let logits = model.lm_logits(&hidden.narrow(1, t - 1, 1)?)?; // (B, 1, V)
    Ok(logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec2()?)
}

/// Generate a continuation of each prompt, all in one batch.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    stop_tokens: &[u32],
    pad_id: u32,
    rng: &mut Rng,
) -> Result<Vec<Sample>> {
    let draw = |_: usize, logits: &[f32]| sample_row(logits, params, rng);
    generate_with(
        model,
        prompts,
        params,
        stop_tokens,
        pad_id,
        draw,
        &mut |_, _| ControlFlow::Continue(()),
    )
}

/// [`generate`] with each token drawn by `draw(row, logits)` (e.g. from a random stream of
/// the row's own, so a row's sample does not depend on the other rows of the batch), and
/// `on_token(row, token)` called as each token is sampled (a stop token included), before
/// the next forward pass: what streams a reply to a terminal. `Break` ends the generation
/// of every row there; the samples hold the tokens drawn so far.
pub fn generate_with(
    model: &Model,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    stop_tokens: &[u32],
    pad_id: u32,
    mut draw: impl FnMut(usize, &[f32]) -> (u32, f32),
    on_token: &mut dyn FnMut(usize, u32) -> ControlFlow<()>,
) -> Result<Vec<Sample>> {
    params
        .check()
        .map_err(|e| Error::Msg(format!("sampling settings: {e}")))?;
    let device = model.device().clone();
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    let max_pos = model.config.max_position_embeddings;
    let len = prompts.iter().map(Vec::len).max().unwrap();
    if prompts.iter().any(Vec::is_empty) {
        return Err(Error::Msg("cannot generate from an empty prompt".into()));
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    if longest + params.max_new_tokens > max_pos {
        return Err(Error::Msg(format!(
            "a prompt of {longest} tokens plus max_new_tokens {} exceeds the model's context of {max_pos} positions",
            params.max_new_tokens
        )));
    }
    // 1. prefill the left-padded prompts
    let mut ids = vec![pad_id; b * len];
    let mut valid = vec![false; b * len];
    for (r, p) in prompts.iter().enumerate() {
        let off = r * len + len - p.len();
        ids[off..off + p.len()].copy_from_slice(p);
        valid[off..off + p.len()].iter_mut().for_each(|v| *v = true);
    }
    let layout = Layout {
        batch: b,
        len,
        valid: valid.clone(),
        segments: None,
    };
    let ids_t = Tensor::from_vec(ids, (b, len), &device)?;
    let mut cache = model.new_cache();
    let hidden = model.forward_hidden(
        &ids_t,
        Some(&layout.positions_tensor(&device)?),
        Some(&layout.bias(&device)?),
        Some(&mut cache),
    )?;
    let mut logits = last_logits(model, &hidden)?;
    let mut key_valid: Vec<Vec<bool>> = valid.chunks(len).map(<[bool]>::to_vec).collect();
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut out: Vec<Sample> = vec![
        Sample {
            tokens: vec![],
            logprobs: vec![],
            stopped: false
        };
        b
    ];
    // 2. sample, feed back, repeat
    for step in 0..params.max_new_tokens {
        let mut feed = vec![pad_id; b];
        let mut interrupted = false;
        for r in 0..b {
            if out[r].stopped {
                continue;
            }
            let (tok, lp) = draw(r, &logits[r]);
            out[r].tokens.push(tok);
            out[r].logprobs.push(lp);
            if stop_tokens.contains(&tok) {
                out[r].stopped = true;
            } else {
                feed[r] = tok;
            }
            interrupted |= on_token(r, tok).is_break();
        }
        if interrupted || step + 1 == params.max_new_tokens || out.iter().all(|s| s.stopped) {
            break;
        }
        for (r, kv) in key_valid.iter_mut().enumerate() {
            kv.push(!out[r].stopped);
        }
        let positions = Tensor::from_vec(next_pos.clone(), (b, 1), &device)?;
        for (r, p) in next_pos.iter_mut().enumerate() {
            if !out[r].stopped {
                *p += 1;
            }
        }
        let ids_t = Tensor::from_vec(feed, (b, 1), &device)?;
        let hidden = model.forward_hidden(
            &ids_t,
            Some(&positions),
            Some(&step_bias(&key_valid, &device)?),
            Some(&mut cache),
        )?;
        logits = last_logits(model, &hidden)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_refuses_each_out_of_range_setting() {
        let ok = SamplingParams::default();
        assert_eq!(ok.check(), Ok(()));
        let with = |f: &dyn Fn(&mut SamplingParams)| {
            let mut p = ok.clone();
            f(&mut p);
            p.check().err().map(|e| e.option())
        };
        for t in [-1.0, f64::NAN, f64::INFINITY] {
            let e = with(&|p| p.temperature = t).unwrap();
            assert!(e.starts_with("--temperature "), "{e}");
        }
        assert_eq!(with(&|p| p.temperature = 0.0), None);
        for top_p in [1.5, 0.0, -0.5, f64::NAN] {
            let e = with(&|p| p.top_p = top_p).unwrap();
            assert!(e.starts_with("--top-p "), "{e}");
        }
        assert_eq!(with(&|p| p.top_p = 1e-9), None);
        assert_eq!(
            with(&|p| p.max_new_tokens = 0).unwrap(),
            "--max-new-tokens 0: expected at least 1"
        );
        let mut p = ok.clone();
        p.top_p = 2.0;
        assert_eq!(
            p.check().unwrap_err().key("rollout"),
            "rollout.top_p: 2: expected a probability in (0, 1] (1 = off)"
        );
    }

    /// The callback sees every sampled token of every row, in order, and changes nothing
    /// drawn; `Break` ends the generation at that token.
    #[test]
    fn the_token_callback_streams_what_generate_returns_and_can_stop_it() {
        let config = crate::ModelConfig::llama(50, 32, 2, 4, 2, 64, 64, 1e4, true);
        let (model, _) = crate::io::build_trainable(
            &config,
            crate::Head::Lm,
            None,
            &[],
            &mut Rng::new(1),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let prompts = vec![vec![1, 2, 3], vec![4, 5]];
        let params = SamplingParams {
            max_new_tokens: 12,
            ..Default::default()
        };
        let stop = [7u32];
        let plain = generate(&model, &prompts, &params, &stop, 0, &mut Rng::new(9)).unwrap();
        let mut seen: Vec<Vec<u32>> = vec![vec![]; 2];
        let streamed = generate_with(
            &model,
            &prompts,
            &params,
            &stop,
            0,
            {
                let (mut rng, p) = (Rng::new(9), &params);
                move |_: usize, l: &[f32]| sample_row(l, p, &mut rng)
            },
            &mut |r, t| {
                seen[r].push(t);
                ControlFlow::Continue(())
            },
        )
        .unwrap();
        assert_eq!(streamed, plain);
        assert_eq!(seen, vec![plain[0].tokens.clone(), plain[1].tokens.clone()]);
        assert!(plain.iter().any(|s| s.tokens.len() > 3));
        let mut n = 0;
        let cut = generate_with(
            &model,
            &prompts[..1],
            &params,
            &[],
            0,
            {
                let (mut rng, p) = (Rng::new(9), &params);
                move |_: usize, l: &[f32]| sample_row(l, p, &mut rng)
            },
            &mut |_, _| {
                n += 1;
                if n == 3 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .unwrap();
        assert_eq!(cut[0].tokens.len(), 3);
        assert!(!cut[0].stopped);
    }

    #[test]
    fn greedy_takes_argmax_and_reports_its_logprob() {
        let mut rng = Rng::new(0);
        let p = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let (tok, lp) = sample_row(&[0.0, 2.0, 1.0], &p, &mut rng);
        let z = 1.0f32 + 2f32.exp() + 1f32.exp();
        assert_eq!(tok, 1);
        assert!((lp - (2f32.exp() / z).ln()).abs() < 1e-6);
    }

    #[test]
    fn top_k_one_is_greedy_and_sampling_follows_probabilities() {
        let mut rng = Rng::new(3);
        let p = SamplingParams {
            top_k: 1,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(sample_row(&[0.0, 0.5, 3.0], &p, &mut rng).0, 2);
        }
        // probabilities 0.2 / 0.8
        let logits = [0.0f32, (4.0f32).ln()];
        let p = SamplingParams::default();
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| sample_row(&logits, &p, &mut rng).0 == 1)
            .count();
        assert!((ones as f64 / n as f64 - 0.8).abs() < 0.015, "{ones}");
        // top_p 0.5 keeps only the 0.8 token
        let p = SamplingParams {
            top_p: 0.5,
            ..Default::default()
        };
        assert!((0..100).all(|_| sample_row(&logits, &p, &mut rng).0 == 1));
    }
}
