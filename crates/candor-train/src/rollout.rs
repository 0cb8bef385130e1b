//! What an RL stage poses and samples: prompt files tokenised with the chat template, and
//! a batch of responses drawn from the policy with the KV cache until a stop token.

use std::path::Path;

use candle_core::Device;
use candor_core::rng::Rng;
use candor_data::chat::ChatTemplate;
use candor_data::dataset::Columns;
use candor_data::prompts::{read_prompts_with, Fields};
use candor_data::Tokenizer;
use candor_model::generate::{generate, SamplingParams};
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
