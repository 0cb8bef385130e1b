//! RL arithmetic shared by the policy-gradient stages (PPO, GRPO and kin), as pure
//! functions, each checked against TRL through `tests/fixtures/ppo_math.json` (float64
//! PyTorch, `scripts/make_ppo_fixtures.py`; TRL v0.11.4's `PPOTrainer`) or hand-computed
//! values: masked means and whitening, the clipped ratio (policy) loss, the KL estimators
//! k1/k2/k3, and the adaptive KL controller. What only PPO uses (per-token rewards, GAE, the
//! clipped value loss) lives in `candor-ppo`.
//!
//! Conventions (TRL's): a mask selects real response tokens (right padding);
//! `masked_mean` is over the whole batch, not per row; variances are Bessel-corrected.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

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

/// How the per-token KL between the policy π and the reference π_ref is estimated from
/// samples of π (Schulman, "Approximating KL Divergence", 2020), with
/// d = log π − log π_ref at each sampled token:
/// - `k1` = d: unbiased, high variance, can be negative (TRL `kl_penalty: kl`, PPO's
///   per-token penalty);
/// - `k2` = ½·d²: biased, low variance, ≥ 0 (TRL `mse`);
/// - `k3` = e^(−d) − 1 + d: unbiased, low variance, ≥ 0 (GRPO's per-token KL, TRL
///   `GRPOTrainer`, DeepSeekMath eq. 4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    K1,
    K2,
    #[default]
    K3,
}

impl KlEstimator {
    /// The estimate at each token (same shape as the inputs; differentiable in both).
    pub fn per_token(self, logprobs: &Tensor, ref_logprobs: &Tensor) -> Result<Tensor> {
        let d = (logprobs - ref_logprobs)?;
        Ok(match self {
            KlEstimator::K1 => d,
            KlEstimator::K2 => (d.sqr()? * 0.5)?,
            KlEstimator::K3 => ((d.neg()?.exp()? - 1.0)? + d)?,
        })
    }

    /// The estimate of one token's log-ratio d, as a plain number.
    pub fn of(self, d: f64) -> f64 {
        match self {
            KlEstimator::K1 => d,
            KlEstimator::K2 => 0.5 * d * d,
            KlEstimator::K3 => (-d).exp() - 1.0 + d,
        }
    }
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
    fn clipped_policy_loss_matches_trl() {
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

    #[test]
    fn kl_estimators_match_hand_computed_values_and_k1_k3_are_unbiased() {
        // d = 0.5: k1 = 0.5, k2 = 0.125, k3 = e^−0.5 − 1 + 0.5 = 0.10653065971263342
        let dev = Device::Cpu;
        let lp = Tensor::new(&[[0.5f64, -0.25]], &dev).unwrap();
        let zero = Tensor::new(&[[0.0f64, 0.0]], &dev).unwrap();
        let want = [
            (KlEstimator::K1, [0.5, -0.25]),
            (KlEstimator::K2, [0.125, 0.03125]),
            // e^0.25 − 1 − 0.25 = 0.03402541668774148
            (KlEstimator::K3, [0.10653065971263342, 0.03402541668774148]),
        ];
        for (k, w) in want {
            let got: Vec<Vec<f64>> = k.per_token(&lp, &zero).unwrap().to_vec2().unwrap();
            for j in 0..2 {
                assert!((got[0][j] - w[j]).abs() < 1e-15, "{k:?}: {got:?}");
                assert!((k.of([0.5, -0.25][j]) - w[j]).abs() < 1e-15);
            }
        }
        // exact expectations over a 3-token distribution: E_p[k1] = E_p[k3] = KL(p‖q)
        let (p, q) = ([0.5f64, 0.3, 0.2], [0.2f64, 0.5, 0.3]);
        let kl: f64 = p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum();
        for k in [KlEstimator::K1, KlEstimator::K3] {
            let e: f64 = p
                .iter()
                .zip(&q)
                .map(|(a, b)| a * k.of(a.ln() - b.ln()))
                .sum();
            assert!((e - kl).abs() < 1e-15, "{k:?}: {e} vs {kl}");
        }
        assert_eq!(
            serde_json::from_str::<KlEstimator>("\"k3\"").unwrap(),
            KlEstimator::K3
        );
    }
}
