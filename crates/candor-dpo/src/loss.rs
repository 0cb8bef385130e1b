//! The preference losses of direct preference optimisation, as pure functions of sequence
//! log-probs, each checked against TRL's own code (tests/fixtures/dpo_losses.json, written by
//! scripts/make_dpo_fixtures.py).
//!
//! For a pair (y_w better than y_l) of a prompt x, with log π(y|x) the sum of the response's
//! token log-probs (response and end-of-turn token) and |y| its token count:
//!
//! ```text
//! log-ratio      ρ(y)  = log π(y|x) − log π_ref(y|x)
//! implicit reward r(y) = β·ρ(y)                         (DPO, eq. 5; TRL `rewards/chosen`)
//! Δ = ρ(y_w) − ρ(y_l)
//! sigmoid  −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)               (DPO; ε > 0: conservative DPO)
//! ipo      (ρ(y_w)/|y_w| − ρ(y_l)/|y_l| − 1/(2β))²       (IPO eq. 17, TRL's per-token form)
//! hinge    max(0, 1 − βΔ)                                 (SLiC)
//! simpo    −(1−ε)·log σ(βz) − ε·log σ(−βz),  z = log π(y_w)/|y_w| − log π(y_l)/|y_l| − γ/β
//!          reward r(y) = β·log π(y)/|y|                   (SimPO; TRL CPOTrainer)
//! RPO      + sft_coef · (−Σ_pairs log π(y_w) / Σ_pairs |y_w|)
//! ```
//!
//! The loss of a batch is the mean over its pairs (plus the RPO term). All functions take
//! (P,) tensors, one entry per pair, and are differentiable in the policy's log-probs.

use candle_core::Tensor;

use crate::config::{DpoAlgo, LossType};
use crate::Result;

/// One batch of pairs: sequence log-probs (sums over each response's tokens) and lengths,
/// all (P,) in one dtype.
pub struct PairLogps<'a> {
    /// log π(y_w|x), log π(y_l|x) under the policy being trained.
    pub chosen: &'a Tensor,
    pub rejected: &'a Tensor,
    /// The same under the frozen reference (`None` for SimPO, which has none).
    pub reference: Option<(&'a Tensor, &'a Tensor)>,
    /// |y_w|, |y_l|: the responses' token counts (≥ 1), as floats.
    pub len_chosen: &'a Tensor,
    pub len_rejected: &'a Tensor,
}

/// Per-pair loss and implicit rewards, all (P,).
pub struct PairLoss {
    pub per_pair: Tensor,
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// softplus(x) = log(1 + eˣ), as max(x, 0) + log(1 + e^−|x|): no overflow, and the gradient
/// survives large |x|. −log σ(x) = softplus(−x).
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// −(1−ε)·log σ(z) − ε·log σ(−z): DPO's loss on z = βΔ, label-smoothed (cDPO).
pub fn sigmoid_loss(z: &Tensor, label_smoothing: f64) -> Result<Tensor> {
    let clean = softplus(&z.neg()?)?;
    if label_smoothing == 0.0 {
        return Ok(clean);
    }
    Ok(((clean * (1.0 - label_smoothing))? + (softplus(z)? * label_smoothing)?)?)
}

/// max(0, 1 − z): SLiC's hinge on z = βΔ.
pub fn hinge_loss(z: &Tensor) -> Result<Tensor> {
    Ok(z.neg()?.affine(1.0, 1.0)?.relu()?)
}

/// (d − 1/(2β))²: IPO's squared loss on the length-averaged log-ratio difference d.
pub fn ipo_loss(d: &Tensor, beta: f64) -> Result<Tensor> {
    Ok(d.affine(1.0, -1.0 / (2.0 * beta))?.sqr()?)
}

/// The loss of every pair and the implicit rewards, for `cfg.loss_type`.
pub fn pair_loss(cfg: &DpoAlgo, x: &PairLogps) -> Result<PairLoss> {
    let beta = cfg.beta;
    if cfg.loss_type == LossType::Simpo {
        let avg_c = (x.chosen / x.len_chosen)?; // (P,)
        let avg_r = (x.rejected / x.len_rejected)?;
        let z = ((&avg_c - &avg_r)? - cfg.simpo_gamma / beta)?;
        return Ok(PairLoss {
            per_pair: sigmoid_loss(&(z * beta)?, cfg.label_smoothing)?,
            chosen_rewards: (avg_c * beta)?,
            rejected_rewards: (avg_r * beta)?,
        });
    }
    let (ref_c, ref_r) = x.reference.ok_or_else(|| {
        crate::Error::Msg(format!(
            "dpo.loss_type {} needs reference log-probs",
            cfg.loss_type.name()
        ))
    })?;
    let rho_c = (x.chosen - ref_c)?; // (P,) log-ratio of the better response
    let rho_r = (x.rejected - ref_r)?;
    let per_pair = match cfg.loss_type {
        LossType::Sigmoid => sigmoid_loss(&((&rho_c - &rho_r)? * beta)?, cfg.label_smoothing)?,
        LossType::Hinge => hinge_loss(&((&rho_c - &rho_r)? * beta)?)?,
        LossType::Ipo => ipo_loss(
            &((&rho_c / x.len_chosen)? - (&rho_r / x.len_rejected)?)?,
            beta,
        )?,
        LossType::Simpo => unreachable!("handled above"),
    };
    Ok(PairLoss {
        per_pair,
        chosen_rewards: (rho_c * beta)?,
        rejected_rewards: (rho_r * beta)?,
    })
}

/// This rank's share of a batch's training loss: Σ_mine loss(pair) / P + sft_coef ·
/// (−Σ_mine log π(y_w)) / Σ|y_w|, where P and Σ|y_w| count the pairs and better-response
/// tokens of the whole batch (all ranks). Summed over the ranks it is [`batch_loss`].
pub fn sharded_loss(
    cfg: &DpoAlgo,
    pairs: &PairLoss,
    x: &PairLogps,
    batch_pairs: usize,
    batch_chosen_tokens: f64,
) -> Result<Tensor> {
    let mut loss = (pairs.per_pair.sum_all()? / batch_pairs.max(1) as f64)?;
    if cfg.sft_coef != 0.0 {
        let nll = (x.chosen.sum_all()?.neg()? * (cfg.sft_coef / batch_chosen_tokens.max(1.0)))?;
        loss = (loss + nll)?;
    }
    Ok(loss)
}

/// The training loss of a batch of pairs: the mean per-pair loss, plus `sft_coef` times the
/// NLL term (RPO's, a token mean as TRL's `sft` loss type); and the per-pair terms for the
/// metrics.
pub fn batch_loss(cfg: &DpoAlgo, x: &PairLogps) -> Result<(Tensor, PairLoss)> {
    let pairs = pair_loss(cfg, x)?;
    let tokens = x
        .len_chosen
        .to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    let loss = sharded_loss(cfg, &pairs, x, pairs.per_pair.dim(0)?, tokens)?;
    Ok((loss, pairs))
}

/// Means over a set of pairs, in the project's metric names.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairStats {
    /// Fraction of pairs whose better response has the higher implicit reward (strictly).
    pub accuracy: f64,
    /// Mean reward(better) − reward(worse).
    pub margin: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
}

impl PairStats {
    pub fn of(chosen: &[f64], rejected: &[f64]) -> PairStats {
        let n = chosen.len().max(1) as f64;
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / n;
        PairStats {
            accuracy: chosen.iter().zip(rejected).filter(|(c, r)| c > r).count() as f64 / n,
            margin: chosen.iter().zip(rejected).map(|(c, r)| c - r).sum::<f64>() / n,
            reward_chosen: mean(chosen),
            reward_rejected: mean(rejected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use serde_json::Value;

    fn fixture() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/dpo_losses.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn vec_of(v: &Value) -> Vec<f64> {
        serde_json::from_value(v.clone()).unwrap()
    }

    fn t(xs: &[f64]) -> Tensor {
        Tensor::new(xs, &Device::Cpu).unwrap()
    }

    fn algo(c: &Value) -> DpoAlgo {
        DpoAlgo {
            loss_type: serde_json::from_value(c["loss_type"].clone()).unwrap(),
            beta: c["beta"].as_f64().unwrap(),
            label_smoothing: c["label_smoothing"].as_f64().unwrap(),
            simpo_gamma: c["simpo_gamma"].as_f64().unwrap(),
            sft_coef: c["sft_coef"].as_f64().unwrap(),
        }
    }

    /// Every loss type's per-pair loss, rewards, batch loss (with RPO's NLL term), accuracy,
    /// margin and mean log-probs equal TRL's on the fixture (float64, 1e-6; TRL keeps its
    /// accuracy in float32).
    #[test]
    fn every_loss_type_matches_trl() {
        let fx = fixture();
        let cases = fx["cases"].as_array().unwrap();
        assert!(cases.len() >= 11);
        let mut seen = std::collections::BTreeSet::new();
        let mut worst = 0.0f64;
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let cfg = algo(&case["config"]);
            cfg.check().unwrap();
            seen.insert((
                cfg.loss_type.name(),
                cfg.label_smoothing > 0.0,
                cfg.sft_coef > 0.0,
            ));
            let i = &case["inputs"];
            let (pc, pr) = (
                t(&vec_of(&i["policy_chosen"])),
                t(&vec_of(&i["policy_rejected"])),
            );
            let (rc, rr) = (
                t(&vec_of(&i["reference_chosen"])),
                t(&vec_of(&i["reference_rejected"])),
            );
            let (lc, lr) = (t(&vec_of(&i["len_chosen"])), t(&vec_of(&i["len_rejected"])));
            let x = PairLogps {
                chosen: &pc,
                rejected: &pr,
                reference: cfg.loss_type.needs_reference().then_some((&rc, &rr)),
                len_chosen: &lc,
                len_rejected: &lr,
            };
            let (loss, pairs) = batch_loss(&cfg, &x).unwrap();
            let o = &case["outputs"];
            let mut check = |what: &str, got: f64, want: f64| {
                let err = (got - want).abs();
                worst = worst.max(err / want.abs().max(1.0));
                assert!(
                    err <= 1e-6 * want.abs().max(1.0),
                    "{name}: {what}: candor {got} TRL {want}"
                );
            };
            check(
                "loss",
                loss.to_scalar::<f64>().unwrap(),
                o["loss"].as_f64().unwrap(),
            );
            let sc = pairs.chosen_rewards.to_vec1::<f64>().unwrap();
            let sr = pairs.rejected_rewards.to_vec1::<f64>().unwrap();
            let per = pairs.per_pair.to_vec1::<f64>().unwrap();
            for (p, (want_l, (want_c, want_r))) in vec_of(&o["per_pair_loss"])
                .into_iter()
                .zip(
                    vec_of(&o["chosen_rewards"])
                        .into_iter()
                        .zip(vec_of(&o["rejected_rewards"])),
                )
                .enumerate()
            {
                check(&format!("pair {p} loss"), per[p], want_l);
                check(&format!("pair {p} chosen reward"), sc[p], want_c);
                check(&format!("pair {p} rejected reward"), sr[p], want_r);
            }
            let s = PairStats::of(&sc, &sr);
            check("accuracy", s.accuracy, o["accuracy"].as_f64().unwrap());
            check("margin", s.margin, o["margin"].as_f64().unwrap());
            check(
                "reward_chosen",
                s.reward_chosen,
                o["reward_chosen"].as_f64().unwrap(),
            );
            check(
                "reward_rejected",
                s.reward_rejected,
                o["reward_rejected"].as_f64().unwrap(),
            );
            let used = |sum: &[f64], len: &[f64]| -> f64 {
                let v: Vec<f64> = if cfg.loss_type == LossType::Simpo {
                    sum.iter().zip(len).map(|(s, l)| s / l).collect()
                } else {
                    sum.to_vec()
                };
                v.iter().sum::<f64>() / v.len() as f64
            };
            check(
                "logps_chosen",
                used(&vec_of(&i["policy_chosen"]), &vec_of(&i["len_chosen"])),
                o["logps_chosen"].as_f64().unwrap(),
            );
            check(
                "logps_rejected",
                used(&vec_of(&i["policy_rejected"]), &vec_of(&i["len_rejected"])),
                o["logps_rejected"].as_f64().unwrap(),
            );
        }
        eprintln!(
            "dpo losses vs TRL {}: worst relative error {worst:e}",
            fx["meta"]["trl"]
        );
        for want in [
            ("sigmoid", false, false),
            ("sigmoid", true, false),
            ("sigmoid", false, true),
            ("ipo", false, false),
            ("hinge", false, false),
            ("simpo", false, false),
            ("simpo", true, false),
        ] {
            assert!(seen.contains(&want), "fixture lacks {want:?}");
        }
    }

    /// d loss / d log π(y_w) of the sigmoid loss is −β·σ(−βΔ)·(1−ε) + β·σ(βΔ)·ε per pair, over
    /// P; finite for margins far outside exp's range.
    #[test]
    fn sigmoid_gradient_is_analytic_and_finite_for_huge_margins() {
        let dev = Device::Cpu;
        let (beta, eps) = (0.5, 0.1);
        let chosen = Var::new(&[-3.0f64, 400.0, -900.0], &dev).unwrap();
        let rejected = t(&[-4.0, -400.0, 900.0]);
        let zero = t(&[0.0, 0.0, 0.0]);
        let one = t(&[1.0, 1.0, 1.0]);
        let cfg = DpoAlgo {
            beta,
            label_smoothing: eps,
            ..DpoAlgo::default()
        };
        let x = PairLogps {
            chosen: chosen.as_tensor(),
            rejected: &rejected,
            reference: Some((&zero, &zero)),
            len_chosen: &one,
            len_rejected: &one,
        };
        let (loss, _) = batch_loss(&cfg, &x).unwrap();
        assert!(loss.to_scalar::<f64>().unwrap().is_finite());
        let g: Vec<f64> = loss
            .backward()
            .unwrap()
            .get(chosen.as_tensor())
            .unwrap()
            .to_vec1()
            .unwrap();
        for (p, d) in [1.0f64, 800.0, -1800.0].iter().enumerate() {
            let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
            let want = (-beta * sig(-beta * d) * (1.0 - eps) + beta * sig(beta * d) * eps) / 3.0;
            assert!((g[p] - want).abs() < 1e-12, "pair {p}: {} vs {want}", g[p]);
        }
    }
}
