//! Chat prompts in, K distinct candidate responses out (`candor sample`, for ranking); and
//! how a reward model reads a batch of whole exchanges.
//!
//! A prompt is posed as one user turn followed by the assistant header
//! ([`candor_data::chat::encode_prompts`]); generation stops at the template's end-of-turn
//! tokens ([`stop_tokens`]). A reward model reads the whole exchange, the prompt as posed
//! followed by the response and its end-of-turn token
//! ([`candor_data::chat::encode_exchanges`]); its reward is the score at that last token
//! ([`last_token_scores`]).

use candle_core::{Tensor, D};
use candor_core::rng::Rng;
use candor_data::chat::stop_tokens;
use candor_data::Tokenizer;
use candor_model::generate::{generate, SamplingParams};
use candor_model::{Head, Model, ModelConfig};

use crate::error::{Error, Result};

/// The score-head output at the last token of each sequence, (N,): a reward model's reward.
///
/// The sequences are right-padded with the plain causal mask: a real token never attends to
/// the padding after it, so positions and attention are exactly those of the sequence
/// alone. Sequences of very different lengths run as separate batches
/// ([`crate::seq::length_groups`]), each padded to its own longest, and the scores come back
/// in the order given. Differentiable (training uses it).
pub fn last_token_scores(model: &Model, seqs: &[&[u32]], pad_id: u32) -> Result<Tensor> {
    if seqs.is_empty() || seqs.iter().any(|s| s.is_empty()) {
        return Err(Error::Msg(
            "cannot score an empty batch or an empty sequence".into(),
        ));
    }
    let widths: Vec<(usize, usize)> = seqs.iter().map(|s| (s.len(), 0)).collect();
    let groups = crate::seq::length_groups(&widths, crate::seq::GROUP_OVERHEAD);
    if groups.len() == 1 {
        return padded_last_token_scores(model, seqs, pad_id);
    }
    let mut parts = Vec::with_capacity(groups.len());
    let mut place = vec![0u32; seqs.len()]; // where each sequence's score lands in `parts`
    let mut at = 0;
    for group in &groups {
        let members: Vec<&[u32]> = group.iter().map(|&i| seqs[i]).collect();
        parts.push(padded_last_token_scores(model, &members, pad_id)?);
        for &i in group {
            place[i] = at;
            at += 1;
        }
    }
    let all = Tensor::cat(&parts, 0)?;
    let place = Tensor::from_vec(place, seqs.len(), model.device())?;
    Ok(all.index_select(&place, 0)?)
}

/// [`last_token_scores`] of one right-padded (N, T) batch.
fn padded_last_token_scores(model: &Model, seqs: &[&[u32]], pad_id: u32) -> Result<Tensor> {
    let (n, t) = (seqs.len(), seqs.iter().map(|s| s.len()).max().unwrap_or(0));
    let mut ids = vec![pad_id; n * t];
    let mut last = Vec::with_capacity(n);
    for (r, s) in seqs.iter().enumerate() {
        ids[r * t..r * t + s.len()].copy_from_slice(s);
        last.push((s.len() - 1) as u32);
    }
    let device = model.device();
    let ids = Tensor::from_vec(ids, (n, t), device)?;
    let last = Tensor::from_vec(last, (n, 1), device)?;
    let hidden = model.forward_hidden(&ids, None, None, None)?; // (N, T, C)
    let scores = model.scores(&hidden)?; // (N, T)
                                         // (N,), f32 whatever the model's dtype (the losses over scores reduce in f32)
    Ok(scores
        .gather(&last, D::Minus1)?
        .squeeze(D::Minus1)?
        .to_dtype(candle_core::DType::F32)?)
}

/// How to draw K distinct candidates per prompt.
#[derive(Clone, Debug)]
pub struct CandidateParams {
    /// Distinct responses wanted per prompt.
    pub k: usize,
    pub sampling: SamplingParams,
    /// Sequences per `generate` call.
    pub batch_size: usize,
    /// Extra rounds that redraw only the missing responses of prompts that got duplicates.
    pub max_resample_rounds: usize,
}

impl CandidateParams {
    /// The settings' one check (see [`SamplingParams::check`]), plus what drawing distinct
    /// candidates needs: K ≥ 2 (a ranking compares), a temperature above 0 (greedy decoding
    /// gives one response every time), a batch of at least one. Messages name the options
    /// of `candor sample` (`--k`, `--temperature`, ...).
    pub fn check(&self) -> Result<()> {
        self.sampling.check().map_err(|e| Error::Msg(e.option()))?;
        if self.k < 2 {
            return Err(Error::Msg(format!(
                "--k {}: a ranking needs at least 2 responses per prompt",
                self.k
            )));
        }
        if self.sampling.temperature == 0.0 {
            return Err(Error::Msg("--temperature 0: greedy decoding gives the same response every time; expected a temperature above 0".into()));
        }
        if self.batch_size == 0 {
            return Err(Error::Msg("--batch-size 0: expected at least 1".into()));
        }
        Ok(())
    }

    /// Bytes [`sample_candidates`] needs for `n_prompts` prompts of at most `longest`
    /// tokens from a model of `config` (f32), weights included: an upper estimate, in
    /// checked arithmetic (`None` = more than a u64 can count). Parts: the weights; each
    /// generate batch's KV cache, prefill attention scores and activations, and logits;
    /// the list of n·K draws and the n·K responses kept (at most `max_new_tokens` tokens of
    /// at most [`BYTES_PER_TOKEN`] bytes of text each, plus a `String`).
    pub fn memory_needed(
        &self,
        n_prompts: usize,
        longest: usize,
        config: &ModelConfig,
    ) -> Option<u64> {
        let m = |a: u64, b: u64| a.checked_mul(b);
        let u = |x: usize| x as u64;
        let f32s = 4u64;
        let draws = m(u(n_prompts), u(self.k))?;
        let batch = draws.min(u(self.batch_size));
        let len = u(longest).checked_add(u(self.sampling.max_new_tokens))?;
        let weights = m(u(config.param_count(Head::Lm)), f32s)?;
        let kv_per_token = m(
            m(u(config.num_hidden_layers), 2)?,
            m(u(config.kv_heads()), u(config.head_dim()))?,
        )?;
        let kv_cache = m(m(m(kv_per_token, len)?, batch)?, f32s)?;
        let scores = m(
            m(m(batch, u(config.num_attention_heads))?, m(len, len)?)?,
            f32s,
        )?;
        let width = u(config.hidden_size.max(config.intermediate_size));
        let activations = m(m(m(batch, len)?, width)?, 4 * f32s)?;
        let logits = m(m(batch, u(config.vocab_size))?, 3 * f32s)?;
        let per_response = u(std::mem::size_of::<String>() + std::mem::size_of::<usize>())
            .checked_add(m(u(self.sampling.max_new_tokens), BYTES_PER_TOKEN)?)?;
        let kept = m(draws, per_response)?;
        [kv_cache, scores, activations, logits, kept]
            .into_iter()
            .try_fold(weights, u64::checked_add)
    }
}

/// Most bytes of text a sampled token decodes to, for [`CandidateParams::memory_needed`]
/// (byte-level BPE tokens of English average about 4).
pub const BYTES_PER_TOKEN: u64 = 16;

/// The candidates drawn, and how much resampling it took.
#[derive(Clone, Debug)]
pub struct Candidates {
    /// Distinct responses per prompt, in the order drawn; fewer than K where resampling
    /// ran out of rounds.
    pub responses: Vec<Vec<String>>,
    /// Responses drawn that repeated an earlier one of the same prompt (and were redrawn).
    pub duplicates: usize,
    /// Resampling rounds run after the first draw.
    pub resample_rounds: usize,
}

/// A generated response as text: special tokens (the stop token) dropped, ends trimmed.
pub fn response_text(tok: &Tokenizer, tokens: &[u32]) -> Result<String> {
    Ok(tok.decode(tokens, true)?.trim().to_string())
}

/// Draw `params.k` distinct responses for each prompt (token ids from
/// [`candor_data::chat::encode_prompts`]),
/// batched through the KV-cache sampler. A response that repeats one already drawn for
/// its prompt is dropped and redrawn, for at most `max_resample_rounds` extra rounds;
/// `on_progress(done, total)` is called after each batch with the sequences drawn so far.
pub fn sample_candidates(
    model: &Model,
    tok: &Tokenizer,
    prompt_ids: &[Vec<u32>],
    params: &CandidateParams,
    rng: &mut Rng,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<Candidates> {
    if params.k == 0 || params.batch_size == 0 {
        return Err(Error::Msg("k and batch_size must be at least 1".into()));
    }
    prompt_ids.len().checked_mul(params.k).ok_or_else(|| {
        Error::Msg(format!(
            "{} prompts x --k {} draws overflow",
            prompt_ids.len(),
            params.k
        ))
    })?;
    let stop = stop_tokens(tok);
    let pad = tok.pad_id();
    let mut out: Vec<Vec<String>> = vec![vec![]; prompt_ids.len()];
    let mut duplicates = 0;
    let mut drawn = 0;
    let mut round = 0;
    loop {
        // one job per missing response, prompt by prompt
        let jobs: Vec<usize> = out
            .iter()
            .enumerate()
            .flat_map(|(i, r)| std::iter::repeat_n(i, params.k - r.len()))
            .collect();
        if jobs.is_empty() || round > params.max_resample_rounds {
            break;
        }
        let total = drawn + jobs.len();
        for chunk in jobs.chunks(params.batch_size) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompt_ids[i].clone()).collect();
            let samples = generate(model, &batch, &params.sampling, &stop, pad, rng)?;
            for (&i, s) in chunk.iter().zip(&samples) {
                let text = response_text(tok, &s.tokens)?;
                if out[i].contains(&text) {
                    duplicates += 1;
                } else {
                    out[i].push(text);
                }
            }
            drawn += chunk.len();
            on_progress(drawn, total);
        }
        round += 1;
    }
    Ok(Candidates {
        responses: out,
        duplicates,
        resample_rounds: round.saturating_sub(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candor_data::chat::{encode_prompts, ChatTemplate};
    use candor_model::io::{build_trainable, frozen_copy};

    fn tiny() -> (Model, Tokenizer) {
        let text =
            "Call me Ishmael. Some years ago, never mind how long precisely, having little money. "
                .repeat(20);
        let tok = Tokenizer::train(std::iter::once(text), 300).unwrap();
        let cfg = ModelConfig::llama(tok.vocab_size(), 32, 1, 2, 2, 64, 64, 10000.0, true);
        let dev = candle_core::Device::Cpu;
        let (_, vm) = build_trainable(&cfg, Head::Lm, None, &[], &mut Rng::new(0), &dev).unwrap();
        (frozen_copy(&cfg, Head::Lm, &vm, &dev).unwrap(), tok)
    }

    #[test]
    fn last_token_scores_equal_each_sequence_scored_alone() {
        let (_, tok) = tiny();
        let cfg = ModelConfig::llama(tok.vocab_size(), 32, 2, 2, 2, 64, 64, 10000.0, true);
        let dev = candle_core::Device::Cpu;
        let (_, vm) =
            build_trainable(&cfg, Head::Score, None, &[], &mut Rng::new(0), &dev).unwrap();
        let model = frozen_copy(&cfg, Head::Score, &vm, &dev).unwrap();
        let a: Vec<u32> = vec![5, 9, 33, 7, 120, 8];
        let b: Vec<u32> = vec![40, 2];
        let batch: Vec<f32> = last_token_scores(&model, &[&a, &b], 0)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, s) in [&a, &b].iter().enumerate() {
            let ids = Tensor::new(s.as_slice(), &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let alone: Vec<f32> = model
                .scores(&model.forward_hidden(&ids, None, None, None).unwrap())
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                (batch[i] - alone[s.len() - 1]).abs() < 1e-5,
                "row {i}: {} vs {}",
                batch[i],
                alone[s.len() - 1]
            );
        }
        // a different pad id changes nothing
        let other: Vec<f32> = last_token_scores(&model, &[&a, &b], 77)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((other[1] - batch[1]).abs() < 1e-6);
    }

    /// Sequences of very different lengths run as separate batches; their scores, in the
    /// order given, and every parameter's gradient equal one padded batch's.
    #[test]
    fn grouped_scores_and_gradients_equal_one_padded_batch() {
        let cfg = ModelConfig::llama(300, 32, 2, 2, 2, 64, 256, 10000.0, true);
        let dev = candle_core::Device::Cpu;
        let (model, vm) =
            build_trainable(&cfg, Head::Score, None, &[], &mut Rng::new(2), &dev).unwrap();
        let mut rng = Rng::new(9);
        let seqs: Vec<Vec<u32>> = [3, 200, 5, 190, 4]
            .iter()
            .map(|&n| (0..n).map(|_| 1 + rng.below(290) as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let widths: Vec<(usize, usize)> = seqs.iter().map(|s| (s.len(), 0)).collect();
        let groups = crate::seq::length_groups(&widths, crate::seq::GROUP_OVERHEAD);
        assert_eq!(groups, vec![vec![0, 2, 4], vec![1, 3]]);
        let grouped = last_token_scores(&model, &refs, 0).unwrap();
        let whole = padded_last_token_scores(&model, &refs, 0).unwrap();
        let (g, w): (Vec<f32>, Vec<f32>) = (grouped.to_vec1().unwrap(), whole.to_vec1().unwrap());
        for (a, b) in g.iter().zip(&w) {
            assert!((a - b).abs() < 1e-5, "{g:?} vs {w:?}");
        }
        // a loss that weighs each sequence differently, so a mix-up of the order shows
        let weights = Tensor::new(&[1.0f32, -2.0, 3.0, 0.5, -1.5], &dev).unwrap();
        let gg = (&grouped * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gw = (&whole * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let max_abs = |t: &Tensor| -> f32 {
            let t = t.abs().and_then(|t| t.max_all()).unwrap();
            t.to_scalar::<f32>().unwrap()
        };
        for (name, var) in vm.data().lock().unwrap().iter() {
            let (a, b) = (gg.get(var).unwrap(), gw.get(var).unwrap());
            let (diff, size) = (max_abs(&(a - b).unwrap()), max_abs(b));
            assert!(
                diff <= 1e-4 * size.max(1e-3),
                "{name}: {diff} (max |grad| {size})"
            );
        }
    }

    #[test]
    fn draws_k_distinct_responses_per_prompt() {
        let (model, tok) = tiny();
        let t = ChatTemplate::for_tokenizer(&tok);
        let ids = encode_prompts(
            &tok,
            &t,
            &["Say one thing.", "Say another thing, at more length."],
        )
        .unwrap();
        let params = CandidateParams {
            k: 4,
            sampling: SamplingParams {
                max_new_tokens: 6,
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
            },
            batch_size: 3,
            max_resample_rounds: 3,
        };
        let mut calls = vec![];
        let c = sample_candidates(
            &model,
            &tok,
            &ids,
            &params,
            &mut Rng::new(1),
            &mut |d, n| calls.push((d, n)),
        )
        .unwrap();
        for r in &c.responses {
            assert_eq!(r.len(), 4);
            let mut s = r.clone();
            s.sort();
            s.dedup();
            assert_eq!(s.len(), 4, "{r:?}");
        }
        assert_eq!(calls.first(), Some(&(3, 8)));
        // same seed, same candidates
        let again = sample_candidates(
            &model,
            &tok,
            &ids,
            &params,
            &mut Rng::new(1),
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(again.responses, c.responses);
    }

    #[test]
    fn memory_estimate_counts_draws_and_overflows_to_none() {
        let cfg = ModelConfig::llama(300, 32, 1, 2, 2, 64, 64, 10000.0, true);
        let mut p = CandidateParams {
            k: 4,
            sampling: SamplingParams {
                max_new_tokens: 8,
                ..Default::default()
            },
            batch_size: 64,
            max_resample_rounds: 4,
        };
        let small = p.memory_needed(10, 12, &cfg).unwrap();
        // at least the weights, and more draws need more
        assert!(small >= cfg.param_count(Head::Lm) as u64 * 4);
        p.k = 100_000_000;
        let big = p.memory_needed(10, 12, &cfg).unwrap();
        assert!(big > 1_000_000_000 * (8 * BYTES_PER_TOKEN), "{big}");
        p.k = usize::MAX;
        assert_eq!(p.memory_needed(10, 12, &cfg), None);
        assert!(p.check().is_ok());
        p.k = 1;
        assert!(p.check().unwrap_err().to_string().starts_with("--k 1:"));
    }

    #[test]
    fn resampling_is_bounded_when_the_model_repeats_itself() {
        let (model, tok) = tiny();
        let t = ChatTemplate::for_tokenizer(&tok);
        let ids = encode_prompts(&tok, &t, &["Say one thing."]).unwrap();
        // greedy decoding gives the same response every time
        let params = CandidateParams {
            k: 3,
            sampling: SamplingParams {
                max_new_tokens: 5,
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
            },
            batch_size: 8,
            max_resample_rounds: 2,
        };
        let c = sample_candidates(
            &model,
            &tok,
            &ids,
            &params,
            &mut Rng::new(0),
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(c.responses[0].len(), 1);
        assert_eq!(c.resample_rounds, 2);
        assert_eq!(c.duplicates, 2 + 2 + 2); // first draw 3 (1 kept), then 2 redrawn twice
    }
}
