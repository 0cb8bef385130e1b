//! The arithmetic of the GRPO family, as pure functions: group advantages, the clipped
//! ratio loss with its aggregations, the k3 KL to the reference, and the soft overlong
//! penalty. Each is checked against TRL 1.16's own code (`GRPOTrainer`, `RLOOTrainer`,
//! `trl.rewards`) through `tests/fixtures/grpo_math.json` (float64 PyTorch,
//! `scripts/grpo_reference.py`), at 1e-6 here and in the gradients too.
//!
//! Conventions (TRL's): completions of one prompt are consecutive (a group is
//! `rewards[g·G .. (g+1)·G]`); a mask selects real completion tokens (right padding);
//! standard deviations are Bessel-corrected; the std guard is `+ 1e-4`.

use candle_core::{DType, Tensor, D};
use candor_train::rl::KlEstimator;
use serde::{Deserialize, Serialize};

use crate::Result;

/// Added to a standard deviation before dividing by it (TRL's `1e-4`).
pub const STD_EPS: f64 = 1e-4;

/// How a completion's advantage is made from its group's rewards.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Advantage {
    /// r − mean(group), scaled as `scale_rewards` says (Shao et al. 2024, DeepSeekMath; TRL
    /// `GRPOTrainer`).
    Grpo,
    /// r − mean(the group's other completions): the leave-one-out baseline (Kool et al.
    /// 2019; Ahmadian et al. 2024; TRL `RLOOTrainer` with `normalize_advantages=False`).
    Rloo,
    /// REINFORCE++-baseline (Hu et al. 2025; OpenRLHF `reinforce_plus_plus_baseline`):
    /// r − mean(group), then whitened over the whole batch, (a − mean)/(std + 1e-4).
    ReinforcePp,
}

/// What a `grpo` advantage is divided by (TRL `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleRewards {
    /// The group's std (GRPO; TRL `"group"` / `true`).
    Group,
    /// The batch's std (Liu et al. 2025, "Tricks or Traps" / PPO Lite; TRL `"batch"`).
    Batch,
    /// Nothing (Dr. GRPO, Liu et al. 2025: the std adds a question-difficulty bias; TRL
    /// `"none"` / `false`).
    None,
}

impl Serialize for ScaleRewards {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            ScaleRewards::Group => "group",
            ScaleRewards::Batch => "batch",
            ScaleRewards::None => "none",
        })
    }
}

impl<'de> Deserialize<'de> for ScaleRewards {
    /// `group`, `batch`, `none`, or TRL's booleans (`true` = group, `false` = none).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(ScaleRewards::Group),
            Raw::Bool(false) => Ok(ScaleRewards::None),
            Raw::Name(n) => match n.as_str() {
                "group" => Ok(ScaleRewards::Group),
                "batch" => Ok(ScaleRewards::Batch),
                "none" => Ok(ScaleRewards::None),
                other => Err(serde::de::Error::custom(format!(
                    "unknown value `{other}`, expected `group`, `batch`, `none`, true or false"
                ))),
            },
        }
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Bessel-corrected standard deviation (0 for fewer than two values).
fn std(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

/// Advantages of a batch of groups, and which completions sit in a group whose rewards are
/// all equal (no learning signal: their advantages are 0; DAPO's dynamic sampling drops them).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupAdvantages {
    pub advantages: Vec<f64>,
    pub zero_spread: Vec<bool>,
}

impl GroupAdvantages {
    /// Share of the groups whose rewards were all equal.
    pub fn zero_spread_share(&self, group_size: usize) -> f64 {
        let groups = self.zero_spread.len() / group_size.max(1);
        let zero = self
            .zero_spread
            .iter()
            .step_by(group_size.max(1))
            .filter(|&&z| z)
            .count();
        zero as f64 / groups.max(1) as f64
    }
}

/// Whether a group's rewards have no spread: its std is within 1e-8 of 0 (TRL's
/// `torch.isclose(std, 0)`).
pub fn no_spread(group: &[f64]) -> bool {
    std(group) <= 1e-8
}

/// Group advantages: `rewards` holds consecutive groups of `group_size` completions.
pub fn group_advantages(
    rewards: &[f64],
    group_size: usize,
    estimator: Advantage,
    scale: ScaleRewards,
) -> GroupAdvantages {
    let g = group_size.max(1);
    let batch_std = std(rewards);
    let mut advantages = Vec::with_capacity(rewards.len());
    let mut zero_spread = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(g) {
        let (m, s) = (mean(group), std(group));
        let flat = no_spread(group);
        for &r in group {
            zero_spread.push(flat);
            advantages.push(match estimator {
                Advantage::Grpo => match scale {
                    ScaleRewards::Group => (r - m) / (s + STD_EPS),
                    ScaleRewards::Batch => (r - m) / (batch_std + STD_EPS),
                    ScaleRewards::None => r - m,
                },
                Advantage::Rloo if group.len() > 1 => {
                    let others = (group.iter().sum::<f64>() - r) / (group.len() - 1) as f64;
                    r - others
                }
                Advantage::Rloo => 0.0,
                Advantage::ReinforcePp => r - m,
            });
        }
    }
    if estimator == Advantage::ReinforcePp {
        let (m, s) = (mean(&advantages), std(&advantages));
        for a in &mut advantages {
            *a = (*a - m) / (s + STD_EPS);
        }
    }
    GroupAdvantages {
        advantages,
        zero_spread,
    }
}

/// How per-token losses are reduced to the batch's loss (TRL `loss_type`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over each completion's tokens, then over completions (Shao et al. 2024). Biased
    /// by length: short right answers and long wrong ones weigh more per token.
    Grpo,
    /// Sum over tokens ÷ (completions × `max_new_tokens`), a constant (Liu et al. 2025, Dr. GRPO).
    DrGrpo,
    /// Sum over tokens ÷ the tokens of the whole generation batch (Yu et al. 2025, DAPO;
    /// divided by `steps_per_generation` when the batch is split in several updates).
    Dapo,
    /// Sum over tokens ÷ the tokens of the minibatch of this update (TRL `bnpo`).
    Bnpo,
}

/// The unit an importance ratio is taken over (TRL `importance_sampling_level`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSamplingLevel {
    /// One ratio per token, π(y_t)/π_old(y_t) (PPO, GRPO).
    Token,
    /// One ratio per completion, exp(mean_t log π/π_old), the geometric mean of the token
    /// ratios (Zheng et al. 2025, GSPO).
    Sequence,
}

/// The parts of the config the loss reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossSettings {
    pub loss_type: LossType,
    pub level: ImportanceSamplingLevel,
    /// Ratios are clipped to [1 − epsilon, 1 + epsilon_high].
    pub epsilon: f64,
    pub epsilon_high: f64,
    /// Weight of the k3 KL to the reference in the per-token loss (0: none).
    pub beta: f64,
    /// `rollout.max_new_tokens`: Dr. GRPO's constant.
    pub max_completion_length: usize,
}

/// The sizes a loss is divided by, taken over the whole update's minibatch (every rank's
/// rows), so each rank's share of the loss sums to the minibatch's loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normaliser {
    /// Completions in the minibatch.
    pub rows: usize,
    /// Real completion tokens in the minibatch.
    pub tokens: f64,
    /// Real completion tokens in the generation batch ÷ updates per pass (DAPO's count).
    pub batch_tokens_per_update: f64,
}

impl Normaliser {
    fn denominator(&self, s: &LossSettings) -> f64 {
        match s.loss_type {
            LossType::Grpo => self.rows.max(1) as f64,
            LossType::Bnpo => self.tokens.max(1.0),
            LossType::DrGrpo => (self.rows * s.max_completion_length).max(1) as f64,
            LossType::Dapo => self.batch_tokens_per_update.max(1.0),
        }
    }
}

/// A loss and the sums its logged statistics are made from (a rank sums its rows; the
/// means are taken over the whole minibatch).
pub struct GrpoLoss {
    /// This part's share of the minibatch loss (differentiable in the log-probs).
    pub loss: Tensor,
    /// Σ k3 KL over real tokens, and the number of real tokens.
    pub kl_sum: f64,
    pub tokens: f64,
    /// Clipped ratios (TRL's `clip_ratio/low_mean`, `high_mean`, `region_mean`): counts of
    /// tokens (sequences for `importance_sampling_level: sequence`) and what they are
    /// counted over.
    pub clip_low: f64,
    pub clip_high: f64,
    pub clip_region: f64,
    pub clip_count: f64,
}

/// The clipped surrogate of a batch of completions, as TRL's `GRPOTrainer._compute_loss`:
/// ratio w (per token, or per sequence with GSPO), per-token loss
/// −min(w·A, clip(w, 1 − ε, 1 + ε_high)·A) + β·k3 (Schulman's k3 estimator of KL(π ‖ π_ref),
/// e^(ref − lp) − (ref − lp) − 1, `candor_train::rl::KlEstimator::K3`), reduced as
/// `loss_type` says.
///
/// Shapes: `logprobs`, `old_logprobs`, `ref_logprobs`, `mask`: (B, T); `advantages`: (B,).
/// `ref_logprobs` is read only when `beta ≠ 0`.
pub fn grpo_loss(
    logprobs: &Tensor,
    old_logprobs: &Tensor,
    ref_logprobs: Option<&Tensor>,
    advantages: &Tensor,
    mask: &Tensor,
    s: &LossSettings,
    norm: &Normaliser,
) -> Result<GrpoLoss> {
    let mask = mask.to_dtype(logprobs.dtype())?;
    let lengths = mask.sum_keepdim(D::Minus1)?; // (B, 1)
    let log_ratio = (logprobs - old_logprobs)?; // (B, T)
    let log_w = match s.level {
        ImportanceSamplingLevel::Token => log_ratio,
        ImportanceSamplingLevel::Sequence => (&log_ratio * &mask)?
            .sum_keepdim(D::Minus1)?
            .broadcast_div(&lengths.clamp(1.0, f64::INFINITY)?)?, // (B, 1)
    };
    let w = log_w.exp()?;
    let w_clipped = w.clamp(1.0 - s.epsilon, 1.0 + s.epsilon_high)?;
    let adv = advantages.unsqueeze(1)?.to_dtype(logprobs.dtype())?; // (B, 1)
    let surrogate = w.broadcast_mul(&adv)?;
    let clipped = w_clipped.broadcast_mul(&adv)?;
    let mut per_token = surrogate.minimum(&clipped)?.neg()?; // (B, T) or (B, 1)
    let mut kl_sum = 0.0;
    if s.beta != 0.0 {
        let reference = ref_logprobs.ok_or_else(|| {
            candor_train::Error::Msg("grpo_loss: beta ≠ 0 needs the reference log-probs".into())
        })?;
        let kl = KlEstimator::K3.per_token(logprobs, reference)?; // (B, T), ≥ 0
        kl_sum = to_f64(&(kl.detach() * &mask)?.sum_all()?)?;
        per_token = per_token.broadcast_add(&(kl * s.beta)?)?;
    }
    let masked = per_token.broadcast_mul(&mask)?; // (B, T)
    let total = match s.loss_type {
        LossType::Grpo => masked
            .sum_keepdim(D::Minus1)?
            .div(&lengths.clamp(1.0, f64::INFINITY)?)?
            .sum_all()?,
        _ => masked.sum_all()?,
    };
    let loss = (total / norm.denominator(s))?;

    // what TRL logs: ratios clipped on the side where the clip binds (its advantage's sign)
    let (w, adv) = (w.detach(), adv.detach());
    let zeros = adv.zeros_like()?;
    let low = w
        .lt(1.0 - s.epsilon)?
        .broadcast_mul(&adv.lt(&zeros)?)?
        .to_dtype(DType::F64)?;
    let high = w
        .gt(1.0 + s.epsilon_high)?
        .broadcast_mul(&adv.gt(&zeros)?)?
        .to_dtype(DType::F64)?;
    let region = (&low + &high)?;
    let (count_over, clip_count) = match s.level {
        ImportanceSamplingLevel::Token => {
            let m = mask.to_dtype(DType::F64)?;
            let n = to_f64(&m.sum_all()?)?;
            (Some(m), n)
        }
        ImportanceSamplingLevel::Sequence => (None, w.dim(0)? as f64),
    };
    let count = |x: &Tensor| -> Result<f64> {
        match &count_over {
            Some(m) => to_f64(&(x * m)?.sum_all()?),
            None => to_f64(&x.sum_all()?),
        }
    };
    Ok(GrpoLoss {
        loss,
        kl_sum,
        tokens: to_f64(&mask.sum_all()?)?,
        clip_low: count(&low)?,
        clip_high: count(&high)?,
        clip_region: count(&region)?,
        clip_count,
    })
}

fn to_f64(x: &Tensor) -> Result<f64> {
    Ok(x.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; TRL
/// `get_soft_overlong_punishment`): 0 up to `max_len − buffer` tokens, then falling
/// linearly to −1 at `max_len`, −1 beyond. `buffer = 0` is off.
pub fn soft_overlong_penalty(len: usize, max_len: usize, buffer: usize) -> f64 {
    if buffer == 0 {
        return 0.0;
    }
    let free = max_len.saturating_sub(buffer);
    if len <= free {
        0.0
    } else if len <= max_len {
        (free as f64 - len as f64) / buffer as f64
    } else {
        -1.0
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
            "/../../tests/fixtures/grpo_math.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }
    fn vec1(v: &Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    }
    fn rows(v: &Value) -> Vec<Vec<f64>> {
        v.as_array().unwrap().iter().map(vec1).collect()
    }
    fn tensor(x: &[Vec<f64>]) -> Tensor {
        Tensor::from_vec(x.concat(), (x.len(), x[0].len()), &Device::Cpu).unwrap()
    }
    fn worst(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn group_advantages_match_trl() {
        for case in fixture()["advantages"].as_array().unwrap() {
            let r = vec1(&case["rewards"]);
            let g = case["group_size"].as_u64().unwrap() as usize;
            for (key, est, scale) in [
                ("grpo_group", Advantage::Grpo, ScaleRewards::Group),
                ("grpo_batch", Advantage::Grpo, ScaleRewards::Batch),
                ("grpo_none", Advantage::Grpo, ScaleRewards::None),
                ("rloo", Advantage::Rloo, ScaleRewards::Group),
                ("reinforce_pp", Advantage::ReinforcePp, ScaleRewards::Group),
            ] {
                let got = group_advantages(&r, g, est, scale);
                let w = worst(&got.advantages, &vec1(&case[key]));
                println!("G={g} {key}: worst |Δ| {w:.2e}");
                assert!(w < 1e-6, "{key}: worst |Δ| {w}");
                let want: Vec<bool> = case["zero_spread"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_bool().unwrap())
                    .collect();
                assert_eq!(got.zero_spread, want);
            }
        }
    }

    #[test]
    fn zero_spread_share_counts_groups() {
        let a = group_advantages(
            &[1.0, 1.0, 0.0, 1.0, 2.0, 2.0],
            2,
            Advantage::Grpo,
            ScaleRewards::Group,
        );
        assert_eq!(a.zero_spread_share(2), 2.0 / 3.0);
        assert_eq!(a.advantages[0], 0.0);
    }

    #[test]
    fn every_loss_type_level_clip_higher_and_k3_kl_match_trl() {
        let f = fixture();
        let i = &f["loss_inputs"];
        let mask = rows(&i["mask"]);
        let tokens: f64 = mask.iter().flatten().sum();
        let (old, reference, adv) = (
            tensor(&rows(&i["old_logprobs"])),
            tensor(&rows(&i["ref_logprobs"])),
            Tensor::new(vec1(&i["advantages"]), &Device::Cpu).unwrap(),
        );
        let mask_t = tensor(&mask);
        let mut worst_all: f64 = 0.0;
        for case in f["losses"].as_array().unwrap() {
            let lp = Var::from_tensor(&tensor(&rows(&i["logprobs"]))).unwrap();
            let s = LossSettings {
                loss_type: serde_json::from_value(case["loss_type"].clone()).unwrap(),
                level: serde_json::from_value(case["importance_sampling_level"].clone()).unwrap(),
                epsilon: case["epsilon"].as_f64().unwrap(),
                epsilon_high: case["epsilon_high"].as_f64().unwrap(),
                beta: case["beta"].as_f64().unwrap(),
                max_completion_length: case["max_completion_length"].as_u64().unwrap() as usize,
            };
            let norm = Normaliser {
                rows: mask.len(),
                tokens,
                batch_tokens_per_update: tokens,
            };
            let out = grpo_loss(
                lp.as_tensor(),
                &old,
                Some(&reference),
                &adv,
                &mask_t,
                &s,
                &norm,
            )
            .unwrap();
            let loss = to_f64(&out.loss).unwrap();
            let grad: Vec<Vec<f64>> = out
                .loss
                .backward()
                .unwrap()
                .get(lp.as_tensor())
                .unwrap()
                .to_vec2()
                .unwrap();
            let what = format!("{s:?}");
            let dl = (loss - case["loss"].as_f64().unwrap()).abs();
            let dg = worst(&grad.concat(), &rows(&case["grad_logprobs"]).concat());
            assert!(dl < 1e-6, "{what}: loss {loss} vs TRL {}", case["loss"]);
            assert!(dg < 1e-6, "{what}: gradient off by {dg}");
            if s.beta != 0.0 {
                let kl = out.kl_sum / out.tokens;
                assert!(
                    (kl - case["kl"].as_f64().unwrap()).abs() < 1e-6,
                    "{what}: kl {kl}"
                );
            }
            for (got, key) in [
                (out.clip_low, "clip_low"),
                (out.clip_high, "clip_high"),
                (out.clip_region, "clip_region"),
            ] {
                let got = got / out.clip_count;
                assert!(
                    (got - case[key].as_f64().unwrap()).abs() < 1e-9,
                    "{what}: {key} {got} vs {}",
                    case[key]
                );
            }
            worst_all = worst_all.max(dl).max(dg);
        }
        println!(
            "{} loss cases: worst |Δ| of loss and gradient vs TRL {worst_all:.2e}",
            f["losses"].as_array().unwrap().len()
        );
        // the cases exercise clipping on both sides
        assert!(f["losses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["clip_high"].as_f64().unwrap() > 0.0));
    }

    /// Shares of a minibatch computed apart (as ranks do) sum to the loss of the whole.
    #[test]
    fn row_shares_of_a_loss_sum_to_the_whole() {
        let f = fixture();
        let i = &f["loss_inputs"];
        let pick = |key: &str, r: std::ops::Range<usize>| tensor(&rows(&i[key])[r]);
        let adv = vec1(&i["advantages"]);
        let mask = rows(&i["mask"]);
        let tokens: f64 = mask.iter().flatten().sum();
        for loss_type in [
            LossType::Grpo,
            LossType::DrGrpo,
            LossType::Dapo,
            LossType::Bnpo,
        ] {
            let s = LossSettings {
                loss_type,
                level: ImportanceSamplingLevel::Sequence,
                epsilon: 0.2,
                epsilon_high: 0.28,
                beta: 0.04,
                max_completion_length: 7,
            };
            let norm = Normaliser {
                rows: 6,
                tokens,
                batch_tokens_per_update: tokens,
            };
            let part = |r: std::ops::Range<usize>| {
                let a = Tensor::new(&adv[r.clone()], &Device::Cpu).unwrap();
                let out = grpo_loss(
                    &pick("logprobs", r.clone()),
                    &pick("old_logprobs", r.clone()),
                    Some(&pick("ref_logprobs", r.clone())),
                    &a,
                    &pick("mask", r),
                    &s,
                    &norm,
                )
                .unwrap();
                to_f64(&out.loss).unwrap()
            };
            let whole = part(0..6);
            let split = part(0..2) + part(2..5) + part(5..6);
            assert!(
                (whole - split).abs() < 1e-12,
                "{loss_type:?}: {whole} vs {split}"
            );
        }
    }

    #[test]
    fn soft_overlong_penalty_matches_trl() {
        let o = &fixture()["soft_overlong"];
        let (max_len, buffer) = (
            o["max_completion_len"].as_u64().unwrap() as usize,
            o["soft_punish_cache"].as_u64().unwrap() as usize,
        );
        for (len, want) in vec1(&o["lengths"]).iter().zip(vec1(&o["penalty"])) {
            let got = soft_overlong_penalty(*len as usize, max_len, buffer);
            assert!((got - want).abs() < 1e-12, "length {len}: {got} vs {want}");
        }
        assert_eq!(soft_overlong_penalty(100, 20, 0), 0.0);
    }

    #[test]
    fn scale_rewards_reads_trl_spellings() {
        for (yaml, want) in [
            ("group", ScaleRewards::Group),
            ("batch", ScaleRewards::Batch),
            ("none", ScaleRewards::None),
            ("true", ScaleRewards::Group),
            ("false", ScaleRewards::None),
        ] {
            assert_eq!(serde_yaml::from_str::<ScaleRewards>(yaml).unwrap(), want);
        }
        let e = serde_yaml::from_str::<ScaleRewards>("sometimes")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("expected `group`, `batch`, `none`"), "{e}");
    }
}
