//! What an RL stage poses and samples: prompt files tokenised with the chat template, and
//! a batch of responses drawn from the policy with the KV cache until a stop token; and how
//! a policy is measured on held-out prompts ([`evaluate_policy`]: judge score, KL to a
//! reference).

use std::path::Path;

use candle_core::Device;
use candor_core::rng::Rng;
use candor_data::chat::ChatTemplate;
use candor_data::dataset::Columns;
use candor_data::prompts::{read_prompts_with, Fields};
use candor_data::Tokenizer;
use candor_model::generate::{generate, generate_with, sample_row, SamplingParams};
use candor_model::Model;

use crate::seq::{seq_batch, SeqBatch};
use crate::{Error, Result};

/// A prompt ready to pose: its text, the line's other fields (for judges), and its tokens
/// (rendered with the chat template).
#[derive(Clone, Debug)]
pub struct Prompt {
    pub text: String,
    pub fields: Fields,
    pub ids: Vec<u32>,
}

/// Read a prompt file ([`candor_data::prompts::read_prompts`]) and pose each prompt with the chat template. A
/// prompt that leaves fewer than `max_new` tokens of the policy's context `ctx` is refused
/// with its file and line (`max_new_key` names the option that set `max_new`).
pub fn load_prompts(
    path: &Path,
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_new: usize,
    max_new_key: &str,
    ctx: usize,
) -> Result<Vec<Prompt>> {
    load_prompts_with(
        path,
        &Columns::new(),
        tok,
        template,
        max_new,
        max_new_key,
        ctx,
    )
}

/// [`load_prompts`] of a file whose columns are renamed by `columns` (`data.columns`).
pub fn load_prompts_with(
    path: &Path,
    columns: &Columns,
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_new: usize,
    max_new_key: &str,
    ctx: usize,
) -> Result<Vec<Prompt>> {
    let mut out = vec![];
    for (line, p) in read_prompts_with(path, columns)? {
        let ids = tok.encode(&p.render(template)?)?;
        if ids.len() + max_new > ctx {
            return Err(Error::Msg(format!(
                "{}:{line}: prompt is {} tokens; with {max_new_key} {max_new} it exceeds the policy's context of {ctx}",
                path.display(),
                ids.len()
            )));
        }
        out.push(Prompt {
            text: p.prompt,
            fields: p.fields,
            ids,
        });
    }
    Ok(out)
}

/// A batch of sampled responses, row i answering prompt i.
#[derive(Clone, Debug, Default)]
pub struct Responses {
    /// Token ids, including the stop token when one was produced.
    pub tokens: Vec<Vec<u32>>,
    /// Decoded with special tokens dropped (what a judge reads).
    pub texts: Vec<String>,
    /// The response ended on a stop token (not the length limit).
    pub stopped: Vec<bool>,
}

impl Responses {
    /// The prompts and these responses as one [`SeqBatch`] (for log-probs, values, scores).
    pub fn seq_batch(&self, prompts: &[&Prompt], pad: u32, device: &Device) -> Result<SeqBatch> {
        let pr: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
        let rs: Vec<&[u32]> = self.tokens.iter().map(Vec::as_slice).collect();
        seq_batch(&pr, &rs, pad, device)
    }
}

/// Sample one response per prompt from `policy` with the KV cache, in one batch, stopping
/// at any of `stop` (the chat template's end-of-turn tokens) or `params.max_new_tokens`.
pub fn sample_responses(
    policy: &Model,
    tok: &Tokenizer,
    prompts: &[&Prompt],
    params: &SamplingParams,
    stop: &[u32],
    rng: &mut Rng,
) -> Result<Responses> {
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let samples = generate(policy, &ids, params, stop, tok.pad_id(), rng)?;
    responses(tok, samples)
}

/// [`sample_responses`] with row `i`'s tokens drawn from its own stream `rngs[i]`: a row's
/// response depends on its prompt and stream, not on which other rows share the batch (so
/// a batch split over ranks samples what one process samples).
pub fn sample_responses_per_row(
    policy: &Model,
    tok: &Tokenizer,
    prompts: &[&Prompt],
    params: &SamplingParams,
    stop: &[u32],
    rngs: &mut [Rng],
) -> Result<Responses> {
    if rngs.len() != prompts.len() {
        return Err(Error::Msg(format!(
            "{} random streams for {} prompts",
            rngs.len(),
            prompts.len()
        )));
    }
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let draw = |r: usize, logits: &[f32]| sample_row(logits, params, &mut rngs[r]);
    let samples = generate_with(
        policy,
        &ids,
        params,
        stop,
        tok.pad_id(),
        draw,
        &mut |_, _| std::ops::ControlFlow::Continue(()),
    )?;
    responses(tok, samples)
}

fn responses(tok: &Tokenizer, samples: Vec<candor_model::generate::Sample>) -> Result<Responses> {
    let texts = samples
        .iter()
        .map(|s| tok.decode(&s.tokens, true))
        .collect::<candor_data::Result<_>>()?;
    Ok(Responses {
        stopped: samples.iter().map(|s| s.stopped).collect(),
        tokens: samples.into_iter().map(|s| s.tokens).collect(),
        texts,
    })
}

/// What a policy does on held-out prompts: its responses, a judge's mean score of them, and
/// its KL to a reference on them (how PPO and DPO report a policy, and `candor eval` on a
/// prompt file).
#[derive(Clone, Debug)]
pub struct PolicyEval {
    pub responses: Responses,
    /// Mean judge score of the responses (with a judge).
    pub judge_score: Option<f64>,
    /// Mean over the responses of Σ_t log π(y_t) − log π_ref(y_t), on the policy's own
    /// samples (the k1 estimate of KL(π‖π_ref) per sequence, PPO's `kl`), both models'
    /// log-probs at the sampling temperature (with a reference).
    pub kl: Option<f64>,
    /// Mean response length in tokens.
    pub response_len: f64,
}

/// Sample one response per prompt from `policy` ([`sample_responses`]), score them with
/// `judge` and measure the KL to `reference`; `rng` drives the sampling.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_policy(
    policy: &Model,
    reference: Option<&Model>,
    judge: Option<&dyn candor_judge::Judge>,
    tok: &Tokenizer,
    prompts: &[&Prompt],
    params: &SamplingParams,
    stop: &[u32],
    rng: &mut Rng,
) -> Result<PolicyEval> {
    let responses = sample_responses(policy, tok, prompts, params, stop, rng)?;
    let n = responses.tokens.len().max(1) as f64;
    let judge_score = match judge {
        Some(j) => Some(
            crate::score::judge_scores(j, prompts, &responses.texts)?
                .iter()
                .sum::<f64>()
                / n,
        ),
        None => None,
    };
    let kl = match reference {
        Some(reference) => {
            let temperature = if params.temperature > 0.0 {
                params.temperature
            } else {
                1.0
            };
            let sb = responses.seq_batch(prompts, tok.pad_id(), policy.device())?;
            let lp = crate::seq::rows(&crate::seq::logprobs(policy, &sb, temperature)?.0)?;
            let ref_lp = crate::seq::rows(&crate::seq::logprobs(reference, &sb, temperature)?.0)?;
            let mut total = 0.0;
            for (i, mask) in sb.mask_rows.iter().enumerate() {
                for (t, &real) in mask.iter().enumerate() {
                    if real {
                        total += lp[i][t] - ref_lp[i][t];
                    }
                }
            }
            Some(total / n)
        }
        None => None,
    };
    let response_len = responses.tokens.iter().map(Vec::len).sum::<usize>() as f64 / n;
    Ok(PolicyEval {
        responses,
        judge_score,
        kl,
        response_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candor_model::io::build_trainable;
    use candor_model::{Head, ModelConfig};

    /// A policy measured against itself has a KL of exactly 0; against another model the KL
    /// is the mean summed log-ratio of the tokens it sampled, recomputed here by hand.
    #[test]
    fn evaluate_policy_kl_is_the_summed_log_ratio_of_its_samples() {
        let text = "the cat sat on the mat and the dog ate the log ".repeat(30);
        let tok = Tokenizer::train(std::iter::once(text.as_str()), 300).unwrap();
        let template = ChatTemplate::for_tokenizer(&tok);
        let cfg = ModelConfig::llama(tok.vocab_size(), 32, 2, 4, 2, 48, 64, 10000.0, false);
        let dev = Device::Cpu;
        let (policy, _) =
            build_trainable(&cfg, Head::Lm, None, &[], &mut Rng::new(1), &dev).unwrap();
        let (other, _) =
            build_trainable(&cfg, Head::Lm, None, &[], &mut Rng::new(2), &dev).unwrap();
        let prompts: Vec<Prompt> = ["the cat", "the dog ate"]
            .iter()
            .map(|p| Prompt {
                text: p.to_string(),
                fields: Fields::new(),
                ids: tok.encode(&template.render_prompt(p).unwrap()).unwrap(),
            })
            .collect();
        let ps: Vec<&Prompt> = prompts.iter().collect();
        let params = SamplingParams {
            max_new_tokens: 6,
            temperature: 0.8,
            top_k: 0,
            top_p: 1.0,
        };
        let stop = candor_data::chat::stop_tokens(&tok);
        let judge = crate::score::judge("sentiment").unwrap();
        let run = |reference: &Model| {
            evaluate_policy(
                &policy,
                Some(reference),
                Some(judge.as_ref()),
                &tok,
                &ps,
                &params,
                &stop,
                &mut Rng::new(5),
            )
            .unwrap()
        };
        let same = run(&policy);
        assert_eq!(same.kl, Some(0.0));
        assert!(same.judge_score.is_some() && same.response_len > 0.0);
        let e = run(&other);
        // the same samples (same seed), their log-ratio summed token by token
        assert_eq!(e.responses.tokens, same.responses.tokens);
        let sb = e.responses.seq_batch(&ps, tok.pad_id(), &dev).unwrap();
        let lp = crate::seq::rows(&crate::seq::logprobs(&policy, &sb, 0.8).unwrap().0).unwrap();
        let lq = crate::seq::rows(&crate::seq::logprobs(&other, &sb, 0.8).unwrap().0).unwrap();
        let mut want = 0.0;
        for (i, r) in e.responses.tokens.iter().enumerate() {
            want += (0..r.len()).map(|t| lp[i][t] - lq[i][t]).sum::<f64>();
        }
        want /= 2.0;
        assert!((e.kl.unwrap() - want).abs() < 1e-9, "{:?} vs {want}", e.kl);
    }

    /// With a stream per row, a row samples the same response alone as in a batch with
    /// other rows of other lengths (what lets GRPO split a batch over ranks).
    #[test]
    fn per_row_streams_make_a_row_independent_of_its_batch() {
        let text = "the cat sat on the mat and the dog ate the log ".repeat(30);
        let tok = Tokenizer::train(std::iter::once(text.as_str()), 300).unwrap();
        let template = ChatTemplate::for_tokenizer(&tok);
        let cfg = ModelConfig::llama(tok.vocab_size(), 32, 2, 4, 2, 48, 64, 10000.0, false);
        let (policy, _) =
            build_trainable(&cfg, Head::Lm, None, &[], &mut Rng::new(1), &Device::Cpu).unwrap();
        let prompts: Vec<Prompt> = ["the cat", "the dog ate the", "a"]
            .iter()
            .map(|p| Prompt {
                text: p.to_string(),
                fields: Fields::new(),
                ids: tok.encode(&template.render_prompt(p).unwrap()).unwrap(),
            })
            .collect();
        let ps: Vec<&Prompt> = prompts.iter().collect();
        let params = SamplingParams {
            max_new_tokens: 8,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let stop = candor_data::chat::stop_tokens(&tok);
        let streams = |rows: std::ops::Range<usize>| -> Vec<Rng> {
            rows.map(|r| Rng::derive(9, &format!("row-{r}"))).collect()
        };
        let all = sample_responses_per_row(&policy, &tok, &ps, &params, &stop, &mut streams(0..3))
            .unwrap();
        let tail =
            sample_responses_per_row(&policy, &tok, &ps[1..], &params, &stop, &mut streams(1..3))
                .unwrap();
        assert_eq!(all.tokens[1..], tail.tokens[..]);
        // the streams differ, and so (at temperature 1, 8 tokens) do two rows of one prompt
        let twice = [ps[0], ps[0]];
        let two =
            sample_responses_per_row(&policy, &tok, &twice, &params, &stop, &mut streams(0..2))
                .unwrap();
        assert_eq!(two.tokens[0], all.tokens[0]);
        assert_ne!(two.tokens[0], two.tokens[1]);
        assert!(
            sample_responses_per_row(&policy, &tok, &ps, &params, &stop, &mut streams(0..2))
                .is_err()
        );
    }
}
