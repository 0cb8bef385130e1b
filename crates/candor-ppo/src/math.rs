//! The RL arithmetic only PPO uses (per-token rewards, GAE, the clipped value loss), as pure
//! functions, each checked against
//! TRL v0.11.4's `PPOTrainer` (the last release with the original PPO) through
//! `tests/fixtures/ppo_math.json` (float64 PyTorch, `scripts/make_ppo_fixtures.py`).
//!
//! What other policy-gradient stages share (masked means, whitening, the clipped policy
//! loss, KL estimators and controller) is `candor_train::rl`.
//!
//! Conventions (TRL's): a mask selects real response tokens (right padding);
//! `masked_mean` is over the whole batch, not per row; variances are Bessel-corrected.

use candle_core::Tensor;
use candor_train::rl::{masked_mean, scalar};

use crate::Result;

/// Per-token rewards (TRL `compute_rewards`, kl_penalty="kl"): −β·(log π − log π_ref) at
/// every real token, plus the sequence's score at its last real token. Returns
/// (rewards, per-token KL).
pub fn per_token_rewards(
    scores: &[f64],
    logprobs: &[Vec<f64>],
    ref_logprobs: &[Vec<f64>],
    mask: &[Vec<bool>],
    kl_coef: f64,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut rewards = vec![];
    let mut kls = vec![];
    for b in 0..scores.len() {
        let kl: Vec<f64> = logprobs[b]
            .iter()
            .zip(&ref_logprobs[b])
            .zip(&mask[b])
            .map(|((l, r), &m)| if m { l - r } else { 0.0 })
            .collect();
        let mut r: Vec<f64> = kl.iter().map(|k| -kl_coef * k).collect();
        if let Some(last) = mask[b].iter().rposition(|&m| m) {
            r[last] += scores[b];
        }
        rewards.push(r);
        kls.push(kl);
    }
    (rewards, kls)
}

/// Generalised advantage estimation (Schulman et al. 2016) backwards over each row, values
/// and rewards zeroed past the end (so the bootstrap after the last real token is 0).
/// Returns (advantages, returns = advantages + values), before whitening.
pub fn gae(
    rewards: &[Vec<f64>],
    values: &[Vec<f64>],
    mask: &[Vec<bool>],
    gamma: f64,
    lam: f64,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut advantages = vec![];
    let mut returns = vec![];
    for b in 0..rewards.len() {
        let t_len = rewards[b].len();
        let v: Vec<f64> = values[b]
            .iter()
            .zip(&mask[b])
            .map(|(x, &m)| if m { *x } else { 0.0 })
            .collect();
        let r: Vec<f64> = rewards[b]
            .iter()
            .zip(&mask[b])
            .map(|(x, &m)| if m { *x } else { 0.0 })
            .collect();
        let mut adv = vec![0.0; t_len];
        let mut last = 0.0;
        for t in (0..t_len).rev() {
            let next = if t + 1 < t_len { v[t + 1] } else { 0.0 };
            let delta = r[t] + gamma * next - v[t];
            last = delta + gamma * lam * last;
            adv[t] = last;
        }
        returns.push(adv.iter().zip(&v).map(|(a, v)| a + v).collect());
        advantages.push(adv);
    }
    (advantages, returns)
}

/// Clipped value loss (TRL): ½·mean over masked tokens of
/// max((v − R)², (clip(v, v_old ± ε) − R)²); returns (loss, clip fraction).
pub fn value_loss(
    vpred: &Tensor,
    values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    cliprange_value: f64,
) -> Result<(Tensor, f64)> {
    let clipped = (values + (vpred - values)?.clamp(-cliprange_value, cliprange_value)?)?;
    let l1 = (vpred - returns)?.sqr()?;
    let l2 = (clipped - returns)?.sqr()?;
    let loss = (masked_mean(&l1.maximum(&l2)?, mask)? * 0.5)?;
    let frac = scalar(&masked_mean(&l2.gt(&l1)?.to_dtype(vpred.dtype())?, mask)?)?;
    Ok((loss, frac))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candor_train::rl::masked_whiten;
    use serde_json::Value;

    fn fixture() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/ppo_math.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }
    fn rows(v: &Value) -> Vec<Vec<f64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    }
    fn mask(v: &Value) -> Vec<Vec<bool>> {
        rows(v)
            .into_iter()
            .map(|r| r.into_iter().map(|x| x != 0.0).collect())
            .collect()
    }
    fn tensor(x: &[Vec<f64>]) -> Tensor {
        let (b, t) = (x.len(), x[0].len());
        Tensor::from_vec(x.concat(), (b, t), &Device::Cpu).unwrap()
    }
    fn close_masked(got: &[Vec<f64>], want: &[Vec<f64>], m: &[Vec<bool>], what: &str) -> f64 {
        let mut worst: f64 = 0.0;
        for b in 0..got.len() {
            for t in 0..got[b].len() {
                if m[b][t] {
                    worst = worst.max((got[b][t] - want[b][t]).abs());
                }
            }
        }
        assert!(worst < 1e-9, "{what}: worst abs error {worst}");
        worst
    }

    #[test]
    fn rewards_gae_and_whitening_match_trl() {
        for case in fixture()["gae"].as_array().unwrap() {
            let i = &case["inputs"];
            let o = &case["outputs"];
            let m = mask(&i["mask"]);
            let scores: Vec<f64> = i["scores"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let (rewards, kl) = per_token_rewards(
                &scores,
                &rows(&i["logprobs"]),
                &rows(&i["ref_logprobs"]),
                &m,
                i["kl_coef"].as_f64().unwrap(),
            );
            close_masked(&kl, &rows(&o["kl_masked"]), &m, "kl");
            close_masked(&rewards, &rows(&o["rewards_masked"]), &m, "rewards");
            let (adv, ret) = gae(
                &rewards,
                &rows(&i["values"]),
                &m,
                i["gamma"].as_f64().unwrap(),
                i["lam"].as_f64().unwrap(),
            );
            close_masked(&adv, &rows(&o["advantages"]), &m, "advantages");
            close_masked(&ret, &rows(&o["returns"]), &m, "returns");
            close_masked(
                &masked_whiten(&adv, &m, true),
                &rows(&o["advantages_whitened"]),
                &m,
                "whitened",
            );
        }
    }

    #[test]
    fn clipped_value_loss_matches_trl() {
        let f = fixture();
        for case in f["value_loss"].as_array().unwrap() {
            let (i, o) = (&case["inputs"], &case["outputs"]);
            let (loss, frac) = value_loss(
                &tensor(&rows(&i["vpred"])),
                &tensor(&rows(&i["values"])),
                &tensor(&rows(&i["returns"])),
                &tensor(&rows(&i["mask"])),
                i["cliprange_value"].as_f64().unwrap(),
            )
            .unwrap();
            assert!((scalar(&loss).unwrap() - o["vf_loss"].as_f64().unwrap()).abs() < 1e-12);
            assert!((frac - o["vf_clipfrac"].as_f64().unwrap()).abs() < 1e-12);
        }
    }
}
