//! Batches of prompt+response sequences and the forward passes RL and preference stages
//! need on them: the policy's (and the reference's) log-probs of the response tokens, a
//! critic's values, a reward model's score of each whole sequence.
//!
//! Layout: each row is its prompt left-padded to the batch's widest prompt, then its
//! response right-padded to the longest response, so every response starts in the same
//! column `P` and the logits that predict response token t sit at column `P − 1 + t`.

use crate::Result;
use candle_core::{DType, Device, Tensor};
use candor_model::mask::Layout;
use candor_model::ops::token_logprobs;
use candor_model::Model;

/// A batch of prompt + response sequences, laid out for one forward pass.
pub struct SeqBatch {
    pub ids: Tensor,
    pub positions: Tensor,
    pub bias: Tensor,
    /// Width of the prompt block (`P`) and of the response block (`R`).
    pub prompt_width: usize,
    pub response_width: usize,
    /// Response token ids (B, R), padding where the mask is 0.
    pub responses: Tensor,
    /// (B, R): 1.0 for real response tokens.
    pub mask: Tensor,
    pub mask_rows: Vec<Vec<bool>>,
    /// Column of each row's last real token (where a reward model reads its score).
    pub last: Vec<usize>,
}

/// Lay out prompts (left-padded) and their responses (right-padded) with `pad`; the bias
/// masks the padding, positions count real tokens only.
pub fn seq_batch(
    prompts: &[&[u32]],
    responses: &[&[u32]],
    pad: u32,
    device: &Device,
) -> Result<SeqBatch> {
    let b = prompts.len();
    let p = prompts.iter().map(|x| x.len()).max().unwrap_or(1);
    let r = responses.iter().map(|x| x.len()).max().unwrap_or(1).max(1);
    let len = p + r;
    let mut ids = vec![pad; b * len];
    let mut valid = vec![false; b * len];
    let mut resp = vec![pad; b * r];
    let mut mask = vec![0f32; b * r];
    let mut mask_rows = vec![vec![false; r]; b];
    let mut last = vec![0; b];
    for i in 0..b {
        let (pr, rs) = (prompts[i], responses[i]);
        for (j, &t) in pr.iter().enumerate() {
            ids[i * len + p - pr.len() + j] = t;
            valid[i * len + p - pr.len() + j] = true;
        }
        for (j, &t) in rs.iter().enumerate() {
            ids[i * len + p + j] = t;
            valid[i * len + p + j] = true;
            resp[i * r + j] = t;
            mask[i * r + j] = 1.0;
            mask_rows[i][j] = true;
        }
        last[i] = p + rs.len() - 1;
    }
    let layout = Layout {
        batch: b,
        len,
        valid,
        segments: None,
    };
    Ok(SeqBatch {
        ids: Tensor::from_vec(ids, (b, len), device)?,
        positions: layout.positions_tensor(device)?,
        bias: layout.bias(device)?,
        prompt_width: p,
        response_width: r,
        responses: Tensor::from_vec(resp, (b, r), device)?,
        mask: Tensor::from_vec(mask, (b, r), device)?,
        mask_rows,
        last,
    })
}

/// Hidden states of the columns that predict the response tokens: (B, R, C).
fn response_hidden(model: &Model, sb: &SeqBatch) -> Result<Tensor> {
    let hidden = model.forward_hidden(&sb.ids, Some(&sb.positions), Some(&sb.bias), None)?;
    Ok(hidden.narrow(1, sb.prompt_width - 1, sb.response_width)?)
}

/// Log-probabilities (B, R) of the response tokens under softmax(logits / temperature), and
/// those logits (B, R, V) for the entropy.
pub fn logprobs(model: &Model, sb: &SeqBatch, temperature: f64) -> Result<(Tensor, Tensor)> {
    let logits = model.lm_logits(&response_hidden(model, sb)?)?;
    let logits = if temperature > 0.0 && temperature != 1.0 {
        (logits / temperature)?
    } else {
        logits
    };
    Ok((token_logprobs(&logits, &sb.responses)?, logits))
}

/// Critic values (B, R) for the states before each response token, in f32 whatever the
/// critic's dtype (the value loss is reduced in f32).
pub fn values(critic: &Model, sb: &SeqBatch) -> Result<Tensor> {
    Ok(critic
        .scores(&response_hidden(critic, sb)?)?
        .to_dtype(DType::F32)?)
}

/// A reward model's score of each whole sequence, read at its last real token.
pub fn sequence_scores(reward_model: &Model, sb: &SeqBatch) -> Result<Vec<f64>> {
    let hidden = reward_model.forward_hidden(&sb.ids, Some(&sb.positions), Some(&sb.bias), None)?;
    let scores: Vec<Vec<f32>> = reward_model
        .scores(&hidden)?
        .to_dtype(DType::F32)?
        .to_vec2()?;
    Ok(scores
        .iter()
        .zip(&sb.last)
        .map(|(row, &j)| row[j] as f64)
        .collect())
}

/// Rows of a (B, R) tensor as f64.
pub fn rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.to_dtype(DType::F64)?.to_vec2()?)
}

/// (B, R) f32 tensor of plain rows (all of the same width).
pub fn tensor(rows: &[Vec<f64>], device: &Device) -> Result<Tensor> {
    let (b, r) = (rows.len(), rows.first().map_or(0, Vec::len));
    let flat: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(flat, (b, r), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candor_core::rng::Rng;
    use candor_model::generate::{generate, SamplingParams};
    use candor_model::io::build_trainable;
    use candor_model::{Head, ModelConfig};

    /// The log-probs PPO recomputes with a full forward pass over the left-padded prompt +
    /// right-padded response layout equal those recorded while sampling with the KV cache.
    #[test]
    fn recomputed_logprobs_equal_sampled_ones() {
        let cfg = ModelConfig::llama(50, 32, 2, 4, 2, 48, 64, 10000.0, true);
        let dev = Device::Cpu;
        let (model, _) =
            build_trainable(&cfg, Head::Lm, None, &[], &mut Rng::new(7), &dev).unwrap();
        let prompts: Vec<Vec<u32>> = vec![vec![5, 6, 7, 8, 9], vec![3], vec![10, 11, 12]];
        for temperature in [1.0, 0.7] {
            let params = SamplingParams {
                max_new_tokens: 12,
                temperature,
                top_k: 0,
                top_p: 1.0,
            };
            let samples =
                generate(&model, &prompts, &params, &[49, 48], 0, &mut Rng::new(11)).unwrap();
            let pr: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            let rs: Vec<&[u32]> = samples.iter().map(|s| s.tokens.as_slice()).collect();
            let sb = seq_batch(&pr, &rs, 0, &dev).unwrap();
            let lp = rows(&logprobs(&model, &sb, temperature).unwrap().0).unwrap();
            let mut worst = 0.0f64;
            for (i, s) in samples.iter().enumerate() {
                for (t, &want) in s.logprobs.iter().enumerate() {
                    worst = worst.max((lp[i][t] - want as f64).abs());
                }
                assert!(sb.mask_rows[i].iter().filter(|&&m| m).count() == s.tokens.len());
            }
            assert!(
                worst < 1e-4,
                "temperature {temperature}: worst |Δ log p| {worst}"
            );
        }
    }
}
