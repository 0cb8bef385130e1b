//! The policy's (or the reference's) log-probs of every response of a batch of prompts, each
//! response scored once however many pairs it is in, in one of two layouts:
//!
//! - **one row per response** (`candor_train::seq::seq_batch`): the prompt left-padded, the
//!   response right-padded; a prompt with K responses is run K times;
//! - **one row per prompt** (shared prefix): the prompt once, then its K responses one after
//!   another, each response seeing the prompt and its own earlier tokens (a tree-shaped
//!   attention mask) with positions that continue the prompt's, so the prompt's forward is
//!   shared by its responses. The last prompt token's logits predict every response's first
//!   token.
//!
//! The log-probs are the same either way (tested); [`response_logps`] picks the layout that
//! costs less: fewer tokens through the projections and MLPs, against longer rows in the
//! attention.

use candle_core::{DType, Tensor};
use candor_model::mask::MASKED;
use candor_model::ops::token_logprobs;
use candor_model::Model;
use candor_train::seq::{logprobs, seq_batch};

use crate::Result;

/// One prompt and the responses to score after it.
pub struct Group<'a> {
    pub prompt: &'a [u32],
    pub responses: Vec<&'a [u32]>,
}

/// Which layout a batch runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    PerResponse,
    SharedPrompt,
}

/// The relative cost of `rows` rows of `len` tokens for a model of width `hidden`: the
/// projections and MLP grow with the tokens (~24·C² flops each), attention with the square
/// of the row (~4·T·C per token).
fn cost(rows: usize, len: usize, hidden: usize) -> f64 {
    let tokens = (rows * len) as f64;
    tokens * (24.0 * hidden as f64 + 4.0 * len as f64)
}

/// The cheaper layout for these groups.
pub fn choose(groups: &[Group], hidden: usize) -> Layout {
    let n: usize = groups.iter().map(|g| g.responses.len()).sum();
    let p = groups.iter().map(|g| g.prompt.len()).max().unwrap_or(0);
    let r = groups
        .iter()
        .flat_map(|g| g.responses.iter().map(|x| x.len()))
        .max()
        .unwrap_or(0);
    let shared = groups
        .iter()
        .map(|g| g.prompt.len() + g.responses.iter().map(|x| x.len()).sum::<usize>())
        .max()
        .unwrap_or(0);
    if cost(groups.len(), shared, hidden) < cost(n, p + r, hidden) {
        Layout::SharedPrompt
    } else {
        Layout::PerResponse
    }
}

/// Σ_t log π(y_t | x, y_<t) of every response, in the groups' order, (N,) f32; differentiable.
pub fn response_logps(model: &Model, groups: &[Group], pad: u32) -> Result<Tensor> {
    match choose(groups, model.config.hidden_size) {
        Layout::PerResponse => per_response(model, groups, pad),
        Layout::SharedPrompt => shared_prompt(model, groups, pad),
    }
}

/// One row per response (prompt left-padded, response right-padded).
pub fn per_response(model: &Model, groups: &[Group], pad: u32) -> Result<Tensor> {
    let (mut prompts, mut responses) = (vec![], vec![]);
    for g in groups {
        for r in &g.responses {
            prompts.push(g.prompt);
            responses.push(*r);
        }
    }
    let sb = seq_batch(&prompts, &responses, pad, model.device())?;
    let (lp, _) = logprobs(model, &sb, 1.0)?; // (N, R)
    Ok((lp.to_dtype(DType::F32)? * &sb.mask)?.sum(1)?) // (N,)
}

/// One row per prompt: the prompt, then each response in turn (see the module doc).
pub fn shared_prompt(model: &Model, groups: &[Group], pad: u32) -> Result<Tensor> {
    let device = model.device();
    let b = groups.len();
    let t = groups
        .iter()
        .map(|g| g.prompt.len() + g.responses.iter().map(|r| r.len()).sum::<usize>())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ids = vec![pad; b * t];
    let mut positions = vec![0u32; b * t];
    let mut bias = vec![MASKED; b * t * t];
    // per response token: the flat (row, column) whose logits predict it, and the token
    let (mut predict, mut targets, mut owner) = (vec![], vec![], vec![]);
    let mut n_responses = 0usize;
    for (row, g) in groups.iter().enumerate() {
        let p = g.prompt.len();
        let at = |col: usize| row * t + col;
        for (j, &tok) in g.prompt.iter().enumerate() {
            ids[at(j)] = tok;
            positions[at(j)] = j as u32;
            for k in 0..=j {
                bias[at(j) * t + k] = 0.0;
            }
        }
        let mut start = p;
        for r in &g.responses {
            for (j, &tok) in r.iter().enumerate() {
                let col = start + j;
                ids[at(col)] = tok;
                positions[at(col)] = (p + j) as u32;
                for k in 0..p {
                    bias[at(col) * t + k] = 0.0; // the prompt
                }
                for k in start..=col {
                    bias[at(col) * t + k] = 0.0; // its own response so far
                }
                predict.push(at(if j == 0 { p - 1 } else { col - 1 }) as u32);
                targets.push(tok);
                owner.push(n_responses);
            }
            start += r.len();
            n_responses += 1;
        }
    }
    // padding queries see themselves only (a row that sees nothing is harmless but wasteful)
    for row in 0..b {
        for col in 0..t {
            let q = row * t + col;
            if bias[q * t..(q + 1) * t].iter().all(|&x| x <= MASKED) {
                bias[q * t + col] = 0.0;
            }
        }
    }
    let ids = Tensor::from_vec(ids, (b, t), device)?;
    let positions = Tensor::from_vec(positions, (b, t), device)?;
    let bias = Tensor::from_vec(bias, (b, 1, t, t), device)?;
    let hidden = model.forward_hidden(&ids, Some(&positions), Some(&bias), None)?; // (B, T, C)
    let c = hidden.dim(2)?;
    let n = predict.len();
    let picked = hidden
        .reshape((b * t, c))?
        .index_select(&Tensor::new(predict, device)?, 0)?
        .reshape((1, n, c))?; // (1, N, C)
    let logits = model.lm_logits(&picked)?; // (1, N, V)
    let lp = token_logprobs(&logits, &Tensor::from_vec(targets, (1, n), device)?)?
        .to_dtype(DType::F32)?; // (1, N)
                                // Σ over each response's tokens: (S, N) ones-where-owned · (N, 1)
    let mut sum = vec![0f32; n_responses * n];
    for (i, &o) in owner.iter().enumerate() {
        sum[o * n + i] = 1.0;
    }
    let sum = Tensor::from_vec(sum, (n_responses, n), device)?;
    Ok(sum.matmul(&lp.t()?)?.squeeze(1)?) // (S,)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candor_core::rng::Rng;
    use candor_model::io::build_trainable;
    use candor_model::{Head, ModelConfig};

    /// Both layouts' sums as f64.
    fn both_layouts(model: &Model, groups: &[Group], pad: u32) -> Result<(Vec<f64>, Vec<f64>)> {
        let v = |t: Tensor| -> Result<Vec<f64>> {
            Ok(t.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.to_vec1()?)
        };
        Ok((
            v(per_response(model, groups, pad)?)?,
            v(shared_prompt(model, groups, pad)?)?,
        ))
    }

    /// The shared-prompt layout gives each response the log-probs of the one-row-per-response
    /// layout, and the gradients of their sum reach every parameter the same.
    #[test]
    fn shared_prompt_layout_equals_one_row_per_response() {
        let cfg = ModelConfig::llama(50, 32, 2, 4, 2, 48, 64, 10000.0, false);
        let (model, varmap) =
            build_trainable(&cfg, Head::Lm, None, &[], &mut Rng::new(3), &Device::Cpu).unwrap();
        let (p1, p2) = (vec![5u32, 6, 7, 8, 9], vec![3u32, 4]);
        let rs: Vec<Vec<u32>> = vec![
            vec![10, 11, 12],
            vec![13],
            vec![14, 15, 16, 17, 18],
            vec![19, 20],
            vec![21],
        ];
        let groups = [
            Group {
                prompt: &p1,
                responses: vec![&rs[0], &rs[1], &rs[2]],
            },
            Group {
                prompt: &p2,
                responses: vec![&rs[3], &rs[4]],
            },
        ];
        let (a, b) = both_layouts(&model, &groups, 0).unwrap();
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        eprintln!("per-response {a:?}\nshared-prompt {b:?}\nworst |Δ| {worst:e}");
        assert!(worst < 1e-4, "{worst}");
        let grads = |f: fn(&Model, &[Group], u32) -> Result<Tensor>| -> Vec<f32> {
            let g = f(&model, &groups, 0)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut out = vec![];
            for (_, v) in candor_train::optim::named_vars(&varmap) {
                let t = g
                    .get(v.as_tensor())
                    .expect("every parameter gets a gradient");
                out.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            out
        };
        let (ga, gb) = (grads(per_response), grads(shared_prompt));
        let scale = ga.iter().fold(0f32, |m, x| m.max(x.abs()));
        let gworst = ga
            .iter()
            .zip(&gb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(gworst < 1e-4 * scale.max(1.0), "{gworst} (scale {scale})");
        // long prompts, short responses: sharing saves work; the reverse does not
        let long: Vec<u32> = (1..40).collect();
        let short = vec![1u32, 2];
        assert_eq!(
            choose(
                &[Group {
                    prompt: &long,
                    responses: vec![&short; 6]
                }],
                32
            ),
            Layout::SharedPrompt
        );
        assert_eq!(
            choose(
                &[Group {
                    prompt: &short,
                    responses: vec![&long; 6]
                }],
                32
            ),
            Layout::PerResponse
        );
    }

    /// The sequence log-probs DPO uses — the prompt rendered with the chat template, the
    /// response and its end-of-turn token — equal transformers' on the same checkpoint
    /// (tests/fixtures/dpo_logps.json, scripts/make_dpo_fixtures.py: TRL's tokenisation of
    /// conversational data, `LlamaForCausalLM`'s logits), in both layouts.
    #[test]
    fn sequence_logprobs_match_transformers() {
        use candor_data::chat::{encode_exchange_parts, ChatTemplate};
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
        let fx: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{root}/dpo_logps.json")).unwrap(),
        )
        .unwrap();
        let dir = std::path::Path::new(root).join("parity/candor-lm");
        let model = candor_model::io::load_frozen(&dir, &Device::Cpu).unwrap();
        let tok = candor_data::Tokenizer::from_dir(&dir).unwrap();
        let template = ChatTemplate::for_tokenizer(&tok);
        let ex = fx["exchanges"].as_array().unwrap();
        let pairs: Vec<(&str, &str)> = ex
            .iter()
            .map(|e| {
                (
                    e["prompt"].as_str().unwrap(),
                    e["response"].as_str().unwrap(),
                )
            })
            .collect();
        let parts = encode_exchange_parts(&tok, &template, &pairs).unwrap();
        for (e, (prompt, turn)) in ex.iter().zip(&parts) {
            let ids = |k: &str| -> Vec<u32> { serde_json::from_value(e[k].clone()).unwrap() };
            let eot = e["end_of_turn_index"].as_u64().unwrap() as usize;
            assert_eq!(prompt, &ids("prompt_ids"), "{}", e["prompt"]);
            assert_eq!(turn, &ids("completion_ids")[..=eot], "{}", e["prompt"]);
        }
        let groups: Vec<Group> = parts
            .iter()
            .map(|(p, r)| Group {
                prompt: p,
                responses: vec![r],
            })
            .collect();
        let (a, b) = both_layouts(&model, &groups, tok.pad_id()).unwrap();
        let mut worst = 0.0f64;
        for (i, e) in ex.iter().enumerate() {
            let want = e["logp_through_end_of_turn"].as_f64().unwrap();
            worst = worst.max((a[i] - want).abs()).max((b[i] - want).abs());
        }
        eprintln!(
            "sequence log-probs vs transformers: worst |Δ| {worst:e} over {} exchanges",
            ex.len()
        );
        assert!(worst < 1e-3, "{worst}");
    }
}
