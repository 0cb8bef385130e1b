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

/// Positions a padded forward pass costs beyond its rows (in token positions): what one
/// more, smaller batch must save in padding to be worth running (small products and the
/// per-pass work of every layer).
pub const GROUP_OVERHEAD: usize = 128;

/// Rows of a batch grouped so that each group is padded only to its own widest row.
///
/// `widths[i]` is row i's (prompt, response) lengths; a group of `n` rows costs
/// `n · (widest prompt + widest response) + overhead` positions. The rows are sorted by
/// total length and cut into runs by dynamic programming over that order (O(n²)), so the
/// groups minimise the cost among cuts of the sorted order. A batch of equal rows stays
/// one group. Each group lists row indices in their original order; the groups come
/// shortest first. (Rows are independent in every forward pass here, so grouping changes
/// only which padding is computed, not a row's values.)
pub fn length_groups(widths: &[(usize, usize)], overhead: usize) -> Vec<Vec<usize>> {
    let n = widths.len();
    if n == 0 {
        return vec![];
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (widths[i].0 + widths[i].1, i));
    // best[j]: least cost of the first j sorted rows; cut[j]: where its last group starts
    let mut best = vec![usize::MAX; n + 1];
    let mut cut = vec![0; n + 1];
    best[0] = 0;
    for j in 1..=n {
        let (mut p, mut r) = (0, 0);
        for i in (0..j).rev() {
            let (pi, ri) = widths[order[i]];
            (p, r) = (p.max(pi), r.max(ri));
            let cost = best[i] + (j - i) * (p + r) + overhead;
            // on a tie the larger group (fewer passes) wins
            if cost <= best[j] {
                (best[j], cut[j]) = (cost, i);
            }
        }
    }
    let mut groups = vec![];
    let mut j = n;
    while j > 0 {
        let mut g = order[cut[j]..j].to_vec();
        g.sort_unstable();
        groups.push(g);
        j = cut[j];
    }
    groups.reverse();
    groups
}

/// [`logprobs`] of each response (detached, as f64, `responses[i].len()` of them), the
/// rows run in [`length_groups`] so short responses are not padded to the longest.
pub fn response_logprobs(
    model: &Model,
    prompts: &[&[u32]],
    responses: &[&[u32]],
    temperature: f64,
    pad: u32,
) -> Result<Vec<Vec<f64>>> {
    let mut out = vec![vec![]; prompts.len()];
    for (group, sb) in grouped_batches(prompts, responses, pad, model.device())? {
        let lp = rows(&logprobs(model, &sb, temperature)?.0.detach())?;
        for (mut row, &i) in lp.into_iter().zip(&group) {
            row.truncate(responses[i].len());
            out[i] = row;
        }
    }
    Ok(out)
}

/// [`sequence_scores`] of prompt + response sequences, run in [`length_groups`].
pub fn grouped_sequence_scores(
    reward_model: &Model,
    prompts: &[&[u32]],
    responses: &[&[u32]],
    pad: u32,
) -> Result<Vec<f64>> {
    let mut out = vec![0.0; prompts.len()];
    for (group, sb) in grouped_batches(prompts, responses, pad, reward_model.device())? {
        for (s, &i) in sequence_scores(reward_model, &sb)?.into_iter().zip(&group) {
            out[i] = s;
        }
    }
    Ok(out)
}

/// Prompt + response rows in [`length_groups`] (an empty response takes one column, as in
/// [`seq_batch`]): each group's row indices and its [`seq_batch`].
pub fn grouped_batches(
    prompts: &[&[u32]],
    responses: &[&[u32]],
    pad: u32,
    device: &Device,
) -> Result<Vec<(Vec<usize>, SeqBatch)>> {
    let widths: Vec<(usize, usize)> = prompts
        .iter()
        .zip(responses)
        .map(|(p, r)| (p.len(), r.len().max(1)))
        .collect();
    length_groups(&widths, GROUP_OVERHEAD)
        .into_iter()
        .map(|group| {
            let pr: Vec<&[u32]> = group.iter().map(|&i| prompts[i]).collect();
            let rs: Vec<&[u32]> = group.iter().map(|&i| responses[i]).collect();
            let sb = seq_batch(&pr, &rs, pad, device)?;
            Ok((group, sb))
        })
        .collect()
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

    /// Hand-worked cuts: with no overhead every distinct length is its own group; with a
    /// large one everything is one group; in between, the cut falls where the padding saved
    /// pays for the extra pass.
    #[test]
    fn length_groups_cut_where_padding_pays_for_a_pass() {
        let w = |l: &[usize]| l.iter().map(|&x| (x, 0)).collect::<Vec<_>>();
        // lengths 10, 10, 50, 12: sorted 10 (0), 10 (1), 12 (3), 50 (2)
        let widths = w(&[10, 10, 50, 12]);
        assert_eq!(
            length_groups(&widths, 0),
            vec![vec![0, 1], vec![3], vec![2]]
        );
        assert_eq!(length_groups(&widths, 1000), vec![vec![0, 1, 2, 3]]);
        // one pass costs 4·50 + 30 = 230; cutting after the 12: 3·12 + 30 + 50 + 30 = 146
        assert_eq!(length_groups(&widths, 30), vec![vec![0, 1, 3], vec![2]]);
        // two-part widths: a group pads to its widest prompt plus its widest response
        let widths = [(5, 1), (1, 5), (1, 1), (1, 1)];
        // all four: 4·(5 + 5) = 40 + o; {2,3} then {0,1}: 2·2 + 2·10 + 2o = 24 + 2o
        assert_eq!(length_groups(&widths, 10), vec![vec![2, 3], vec![0, 1]]);
        assert_eq!(length_groups(&widths, 20), vec![vec![0, 1, 2, 3]]);
        assert!(length_groups(&[], 5).is_empty());
    }

    /// Grouped log-probs and reward-model scores equal those of the whole batch at once.
    #[test]
    fn grouped_passes_equal_one_padded_pass() {
        let dev = Device::Cpu;
        let cfg = ModelConfig::llama(50, 32, 2, 4, 2, 48, 96, 10000.0, true);
        let (model, _) =
            build_trainable(&cfg, Head::Lm, None, &[], &mut Rng::new(3), &dev).unwrap();
        let (scorer, _) =
            build_trainable(&cfg, Head::Score, None, &[], &mut Rng::new(4), &dev).unwrap();
        let mut rng = Rng::new(5);
        let mut draw =
            |n: usize| -> Vec<u32> { (0..n).map(|_| 1 + rng.below(48) as u32).collect() };
        let prompts: Vec<Vec<u32>> = [3, 9, 4, 4, 12, 2].iter().map(|&n| draw(n)).collect();
        let responses: Vec<Vec<u32>> = [40, 2, 3, 1, 35, 0].iter().map(|&n| draw(n)).collect();
        let pr: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let rs: Vec<&[u32]> = responses.iter().map(Vec::as_slice).collect();
        assert!(
            grouped_batches(&pr, &rs, 0, &dev).unwrap().len() > 1,
            "the test batch must split"
        );
        let sb = seq_batch(&pr, &rs, 0, &dev).unwrap();
        let whole = rows(&logprobs(&model, &sb, 0.7).unwrap().0).unwrap();
        let parts = response_logprobs(&model, &pr, &rs, 0.7, 0).unwrap();
        for (i, r) in responses.iter().enumerate() {
            assert_eq!(parts[i].len(), r.len());
            for (t, &x) in parts[i].iter().enumerate() {
                assert!((x - whole[i][t]).abs() < 1e-5, "row {i} token {t}");
            }
        }
        let whole = sequence_scores(&scorer, &sb).unwrap();
        let parts = grouped_sequence_scores(&scorer, &pr, &rs, 0).unwrap();
        for (a, b) in whole.iter().zip(&parts) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

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
