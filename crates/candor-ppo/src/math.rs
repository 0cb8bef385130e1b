//! The RL arithmetic of PPO for language models, as pure functions, each checked against
//! TRL v0.11.4's `PPOTrainer` (the last release with the original PPO) through
//! `tests/fixtures/ppo_math.json` (float64 PyTorch, `scripts/make_ppo_fixtures.py`).
//!
//! Conventions (TRL's): a mask selects real response tokens (right padding);
//! `masked_mean` is over the whole batch, not per row; variances are Bessel-corrected.

use candle_core::{DType, Tensor};

use crate::Result;

/// Σ(x·m)/Σm over all entries, as a scalar tensor (differentiable in x).
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(x.dtype())?;
    Ok(((x * &mask)?.sum_all()? / mask.sum_all()?.to_scalar_f64()?.max(1.0))?)
}

trait ScalarF64 {
    fn to_scalar_f64(&self) -> candle_core::Result<f64>;
}
impl ScalarF64 for Tensor {
    fn to_scalar_f64(&self) -> candle_core::Result<f64> {
        self.to_dtype(DType::F64)?.to_scalar::<f64>()
    }
}

/// Value of a scalar tensor as f64.
pub fn scalar(x: &Tensor) -> Result<f64> {
    Ok(x.to_scalar_f64()?)
}

/// Masked mean of plain rows.
pub fn masked_mean_rows(x: &[Vec<f64>], mask: &[Vec<bool>]) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for (r, m) in x.iter().zip(mask) {
        for (v, &keep) in r.iter().zip(m) {
            if keep {
                s += v;
                n += 1;
            }
        }
    }
    s / n.max(1) as f64
}

/// (x − mean)/√(var + 1e-8) over masked entries (unbiased var); with `shift_mean = false`
/// the mean is added back (TRL's `masked_whiten`). Unmasked entries are whitened too (as in
/// TRL) and must be ignored downstream.
pub fn masked_whiten(x: &[Vec<f64>], mask: &[Vec<bool>], shift_mean: bool) -> Vec<Vec<f64>> {
    let mean = masked_mean_rows(x, mask);
    let n = mask.iter().flatten().filter(|&&m| m).count() as f64;
    let sq: Vec<Vec<f64>> = x
        .iter()
        .map(|r| r.iter().map(|v| (v - mean) * (v - mean)).collect())
        .collect();
    let var = if n > 1.0 {
        masked_mean_rows(&sq, mask) * n / (n - 1.0)
    } else {
        0.0
    };
    let inv = 1.0 / (var + 1e-8).sqrt();
    x.iter()
        .map(|r| {
            r.iter()
                .map(|v| (v - mean) * inv + if shift_mean { 0.0 } else { mean })
                .collect()
        })
        .collect()
}

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

/// What the clipped policy objective reports besides its loss.
pub struct PolicyLoss {
    pub loss: Tensor,
    pub clip_frac: f64,
    /// ½·E[(log π − log π_old)²] (TRL's approxkl).
    pub approx_kl: f64,
    /// E[log π_old − log π].
    pub policy_kl: f64,
}

/// Clipped surrogate (Schulman et al. 2017, eq. 7) as TRL computes it:
/// mean over masked tokens of max(−A·r, −A·clip(r, 1−ε, 1+ε)), r = exp(log π − log π_old).
pub fn policy_loss(
    logprobs: &Tensor,
    old_logprobs: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    cliprange: f64,
) -> Result<PolicyLoss> {
    let diff = (logprobs - old_logprobs)?;
    let ratio = diff.exp()?;
    let pg1 = (advantages.neg()? * &ratio)?;
    let pg2 = (advantages.neg()? * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)?)?;
    let loss = masked_mean(&pg1.maximum(&pg2)?, mask)?;
    let clipped = pg2.gt(&pg1)?.to_dtype(logprobs.dtype())?;
    let clip_frac = scalar(&masked_mean(&clipped, mask)?)?;
    let d = diff.detach();
    let approx_kl = 0.5 * scalar(&masked_mean(&d.sqr()?, mask)?)?;
    let policy_kl = -scalar(&masked_mean(&d, mask)?)?;
    Ok(PolicyLoss {
        loss,
        clip_frac,
        approx_kl,
        policy_kl,
    })
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

/// The KL coefficient β: fixed, or adapted toward a target KL by a proportional controller
/// (Ziegler et al. 2019, sec. 2.2; TRL `AdaptiveKLController`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct KlController {
    pub value: f64,
    /// `Some(target)` adapts; `None` keeps β fixed.
    pub target: Option<f64>,
    pub horizon: f64,
}

impl KlController {
    /// `current`: mean per-sequence KL of the batch; `n_steps`: sequences in it.
    pub fn update(&mut self, current: f64, n_steps: usize) {
        if let Some(target) = self.target {
            let err = (current / target - 1.0).clamp(-0.2, 0.2);
            self.value *= 1.0 + err * n_steps as f64 / self.horizon;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
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
    fn masked_whiten_matches_trl() {
        let case = &fixture()["masked_whiten"][0];
        let m = mask(&case["inputs"]["mask"]);
        let x = rows(&case["inputs"]["values"]);
        let o = &case["outputs"];
        assert!((masked_mean_rows(&x, &m) - o["mean"].as_f64().unwrap()).abs() < 1e-12);
        close_masked(
            &masked_whiten(&x, &m, true),
            &rows(&o["whitened"]),
            &m,
            "whitened",
        );
        close_masked(
            &masked_whiten(&x, &m, false),
            &rows(&o["whitened_keep_mean"]),
            &m,
            "keep_mean",
        );
    }

    #[test]
    fn clipped_policy_and_value_losses_match_trl() {
        let f = fixture();
        for case in f["policy_loss"].as_array().unwrap() {
            let (i, o) = (&case["inputs"], &case["outputs"]);
            let out = policy_loss(
                &tensor(&rows(&i["logprobs_new"])),
                &tensor(&rows(&i["logprobs_old"])),
                &tensor(&rows(&i["advantages"])),
                &tensor(&rows(&i["mask"])),
                i["cliprange"].as_f64().unwrap(),
            )
            .unwrap();
            assert!((scalar(&out.loss).unwrap() - o["pg_loss"].as_f64().unwrap()).abs() < 1e-12);
            assert!((out.clip_frac - o["clipfrac"].as_f64().unwrap()).abs() < 1e-12);
            assert!((out.approx_kl - o["approx_kl"].as_f64().unwrap()).abs() < 1e-12);
            assert!((out.policy_kl - o["policy_kl"].as_f64().unwrap()).abs() < 1e-12);
        }
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

    #[test]
    fn policy_loss_gradient_is_zero_where_clipped() {
        // A > 0 and ratio above 1+ε: the clipped branch is constant, so no gradient
        let dev = Device::Cpu;
        let lp = candle_core::Var::new(&[[0.5f64, 0.0]], &dev).unwrap();
        let old = Tensor::new(&[[0.0f64, 0.0]], &dev).unwrap();
        let adv = Tensor::new(&[[1.0f64, 1.0]], &dev).unwrap();
        let m = Tensor::new(&[[1.0f64, 1.0]], &dev).unwrap();
        let out = policy_loss(lp.as_tensor(), &old, &adv, &m, 0.2).unwrap();
        let g: Vec<Vec<f64>> = out
            .loss
            .backward()
            .unwrap()
            .get(lp.as_tensor())
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(g[0][0], 0.0);
        assert!((g[0][1] + 0.5).abs() < 1e-12); // d/dlp of −A·e^{lp}/2 at lp=0
    }

    #[test]
    fn entropy_matches_trl() {
        let case = &fixture()["entropy"][0];
        let logits: Vec<Vec<Vec<f64>>> = case["inputs"]["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(rows)
            .collect();
        let (b, t, v) = (logits.len(), logits[0].len(), logits[0][0].len());
        let flat: Vec<f64> = logits.iter().flatten().flatten().copied().collect();
        let lt = Tensor::from_vec(flat, (b, t, v), &Device::Cpu).unwrap();
        let h = candor_model::ops::entropy(&lt).unwrap();
        let m = tensor(&rows(&case["inputs"]["mask"]));
        let got = scalar(&masked_mean(&h, &m).unwrap()).unwrap();
        assert!(
            (got - case["outputs"]["entropy_masked_mean"].as_f64().unwrap()).abs() < 1e-12,
            "{got}"
        );
    }

    #[test]
    fn adaptive_kl_controller_matches_trl() {
        let case = &fixture()["adaptive_kl"][0];
        let (i, o) = (&case["inputs"], &case["outputs"]);
        let mut c = KlController {
            value: i["init_kl_coef"].as_f64().unwrap(),
            target: Some(i["target"].as_f64().unwrap()),
            horizon: i["horizon"].as_f64().unwrap(),
        };
        let n = i["n_steps"].as_u64().unwrap() as usize;
        for (kl, want) in i["current_kl"]
            .as_array()
            .unwrap()
            .iter()
            .zip(o["kl_coef_after_each_update"].as_array().unwrap())
        {
            c.update(kl.as_f64().unwrap(), n);
            assert!(
                (c.value - want.as_f64().unwrap()).abs() < 1e-12,
                "{} vs {want}",
                c.value
            );
        }
        let mut fixed = KlController {
            value: 0.1,
            target: None,
            horizon: 1e4,
        };
        fixed.update(100.0, 256);
        assert_eq!(fixed.value, 0.1);
    }
}
