//! Run health: early warnings for an RL run going wrong, the ones RLHF users ask every
//! tool for — entropy collapse, runaway KL, response-length drift, reward hacking (the
//! reward rising while the held-out judge falls), a clip fraction that stays high, gradient
//! spikes; and the failures particular to one stage: GRPO groups that all score alike (no
//! learning signal), DPO's held-out margin collapsing or its chosen responses losing
//! likelihood. Each signal is a pure function of the run's metric history;
//! [`HealthMonitor`] keeps the history and says which signals trip at each logged
//! iteration. PPO, GRPO and DPO give it the observations they have (a missing one is
//! skipped).
//!
//! A tripped signal is logged as `health_<name>` (its value) in `metrics.jsonl`; nothing
//! is logged while a run is healthy, so a healthy run's log is what it was before.

use candor_core::metrics::MetricsLog;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Thresholds (a stage config's `health:` section). A threshold of 0 turns its signal off.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Entropy collapse: warn when the policy's mean token entropy falls below this
    /// fraction of its first logged value (default 0.25).
    pub entropy_floor: f64,
    /// Runaway KL: warn when the KL to the reference grows faster than this many nats per
    /// iteration (least-squares slope over the last `window` logged iterations) while
    /// already above `kl_min` (default 1.5; the shipped tiny PPO's KL climbs to ~8 at
    /// under 1 nat per iteration).
    pub kl_growth: f64,
    /// KL below this never trips `kl_growth` (default 5 nats).
    pub kl_min: f64,
    /// Response-length drift: warn when the mean response length moves more than this
    /// fraction away from its first value, up or down (default 0.75: ±75 %).
    pub length_drift: f64,
    /// Reward hacking: warn when, between two held-out evaluations, the training reward
    /// rose while the held-out judge score fell by more than this (default 0.05; needs a
    /// judge).
    pub judge_drop: f64,
    /// Warn when the policy clip fraction stays above this for `window` logged iterations
    /// in a row (default 0.4; too large a step each update).
    pub clip_frac: f64,
    /// Warn when the gradient norm exceeds this multiple of the median of the previous
    /// `window` logged values (default 10).
    pub grad_spike: f64,
    /// GRPO, no learning signal: warn when at least this share of a step's groups had
    /// rewards all equal (zero advantages) for `window` logged steps in a row (default
    /// 1.0: every group).
    pub zero_spread: f64,
    /// DPO, margin collapse: warn when the held-out chosen − rejected margin
    /// (`eval_margin`) falls more than this fraction below its best value so far, once that
    /// best exceeded `margin_min` (default 0.5).
    pub margin_drop: f64,
    /// A best held-out margin below this never trips `margin_drop` (default 0.1).
    pub margin_min: f64,
    /// DPO, likelihood displacement: warn when the chosen responses' implicit reward
    /// β·log π/π_ref (`reward_chosen`) falls below −this: the policy makes the preferred
    /// responses less likely too (Razin et al. 2024; Pal et al. 2024, DPOP) (default 2.0).
    pub chosen_floor: f64,
    /// Logged iterations a rate, persistence or baseline looks back over (default 5).
    pub window: usize,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            entropy_floor: 0.25,
            kl_growth: 1.5,
            kl_min: 5.0,
            length_drift: 0.75,
            judge_drop: 0.05,
            clip_frac: 0.4,
            grad_spike: 10.0,
            zero_spread: 1.0,
            margin_drop: 0.5,
            margin_min: 0.1,
            chosen_floor: 2.0,
            window: 5,
        }
    }
}

impl HealthConfig {
    /// Check ranges; `origin` names the config file in errors.
    pub fn validate(&self, origin: &str) -> crate::Result<()> {
        let fields = [
            ("entropy_floor", self.entropy_floor),
            ("kl_growth", self.kl_growth),
            ("kl_min", self.kl_min),
            ("length_drift", self.length_drift),
            ("judge_drop", self.judge_drop),
            ("clip_frac", self.clip_frac),
            ("grad_spike", self.grad_spike),
            ("zero_spread", self.zero_spread),
            ("margin_drop", self.margin_drop),
            ("margin_min", self.margin_min),
            ("chosen_floor", self.chosen_floor),
        ];
        for (key, v) in fields {
            if !(v.is_finite() && v >= 0.0) {
                return Err(crate::Error::Msg(format!(
                    "{origin}: health.{key}: {v}: expected a finite number >= 0 (0 = off)"
                )));
            }
        }
        if self.zero_spread > 1.0 || self.margin_drop > 1.0 {
            let (key, v) = if self.zero_spread > 1.0 {
                ("zero_spread", self.zero_spread)
            } else {
                ("margin_drop", self.margin_drop)
            };
            return Err(crate::Error::Msg(format!(
                "{origin}: health.{key}: {v}: expected a fraction in [0, 1] (0 = off)"
            )));
        }
        if self.window < 2 {
            return Err(crate::Error::Msg(format!(
                "{origin}: health.window: {}: expected at least 2",
                self.window
            )));
        }
        Ok(())
    }
}

/// Mean policy entropy now as a fraction of its first value (`None` before two values or
/// from a first value of 0).
pub fn entropy_ratio(entropy: &[f64]) -> Option<f64> {
    let (&first, &last) = (entropy.first()?, entropy.last()?);
    (entropy.len() >= 2 && first > 0.0).then(|| last / first)
}

/// Least-squares slope of the last `window` values per step (`None` with fewer).
pub fn growth_rate(values: &[f64], window: usize) -> Option<f64> {
    if window < 2 || values.len() < window {
        return None;
    }
    let ys = &values[values.len() - window..];
    let n = window as f64;
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = ys.iter().sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        let dx = i as f64 - mean_x;
        num += dx * (y - mean_y);
        den += dx * dx;
    }
    Some(num / den)
}

/// Relative change of the last value from the first: 0.5 = half again as long (`None`
/// before two values or from a first value of 0).
pub fn relative_drift(values: &[f64]) -> Option<f64> {
    let (&first, &last) = (values.first()?, values.last()?);
    (values.len() >= 2 && first > 0.0).then(|| last / first - 1.0)
}

/// Between the last two evaluations: the judge's fall when the reward rose meanwhile
/// (`Some(drop > 0)`), else `Some(0)`; `None` before two evaluations. `evals` holds
/// (training reward, held-out judge score) at each evaluation.
pub fn judge_drop_while_reward_rises(evals: &[(f64, f64)]) -> Option<f64> {
    let [.., (r0, j0), (r1, j1)] = evals else {
        return None;
    };
    Some(if r1 > r0 && j1 < j0 { j0 - j1 } else { 0.0 })
}

/// How far the last value fell below the best (largest) before it, as a fraction of that
/// best: 0.25 = a quarter lower (`None` before two values, or while the best is ≤ 0).
pub fn fall_from_best(values: &[f64]) -> Option<f64> {
    let (&last, before) = values.split_last()?;
    let best = before.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    (best > 0.0).then(|| (best - last) / best)
}

/// Whether each of the last `window` values is at least `threshold`.
pub fn persistently_at_least(values: &[f64], threshold: f64, window: usize) -> bool {
    window > 0
        && values.len() >= window
        && values[values.len() - window..]
            .iter()
            .all(|&v| v >= threshold)
}

/// Whether each of the last `window` values exceeds `threshold`.
pub fn persistently_above(values: &[f64], threshold: f64, window: usize) -> bool {
    window > 0
        && values.len() >= window
        && values[values.len() - window..]
            .iter()
            .all(|&v| v > threshold)
}

/// The last value as a multiple of the median of the `window` values before it (`None`
/// until there are that many, or from a median of 0).
pub fn spike_ratio(values: &[f64], window: usize) -> Option<f64> {
    if window == 0 || values.len() < window + 1 {
        return None;
    }
    let (&last, before) = values.split_last()?;
    let mut prev: Vec<f64> = before[before.len() - window..].to_vec();
    prev.sort_by(f64::total_cmp);
    let median = if window % 2 == 1 {
        prev[window / 2]
    } else {
        (prev[window / 2 - 1] + prev[window / 2]) / 2.0
    };
    (median > 0.0).then(|| last / median)
}

/// What one logged iteration of an RL stage observed; `None` where the stage has no such
/// quantity (DPO has no rollouts, a run without a judge has no judge score).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    pub entropy: Option<f64>,
    /// KL to the reference policy (nats per sequence).
    pub kl: Option<f64>,
    /// Mean response length in tokens.
    pub response_len: Option<f64>,
    /// Mean training reward (score).
    pub reward: Option<f64>,
    /// Held-out judge score, at the iterations that evaluate.
    pub judge: Option<f64>,
    pub clip_frac: Option<f64>,
    pub grad_norm: Option<f64>,
    /// GRPO: share of the step's groups whose rewards were all equal.
    pub zero_spread: Option<f64>,
    /// DPO: held-out chosen − rejected margin, at the iterations that evaluate.
    pub margin: Option<f64>,
    /// DPO: the chosen responses' implicit reward β·log π/π_ref on the training batch.
    pub reward_chosen: Option<f64>,
}

/// A signal that tripped: its `health_*` name, value, threshold and a one-line warning.
#[derive(Debug, Clone, PartialEq)]
pub struct Tripped {
    /// One of [`HEALTH_KEYS`].
    pub key: &'static str,
    pub value: f64,
    pub message: String,
}

/// Every `health_*` key a [`Tripped`] may carry.
pub const HEALTH_KEYS: [&str; 9] = [
    "health_entropy",
    "health_kl_growth",
    "health_length_drift",
    "health_reward_hacking",
    "health_clip_frac",
    "health_grad_spike",
    "health_zero_spread",
    "health_margin_collapse",
    "health_chosen_falls",
];

/// The metric history of a run and the thresholds it is held to.
#[derive(Debug, Clone, Default)]
pub struct HealthMonitor {
    pub config: HealthConfig,
    /// Signals already warned about (each warns once; it is logged each time it trips).
    warned: std::collections::BTreeSet<&'static str>,
    entropy: Vec<f64>,
    kl: Vec<f64>,
    response_len: Vec<f64>,
    clip_frac: Vec<f64>,
    grad_norm: Vec<f64>,
    zero_spread: Vec<f64>,
    margin: Vec<f64>,
    /// (reward, judge) at each evaluation.
    evals: Vec<(f64, f64)>,
}

impl HealthMonitor {
    pub fn new(config: HealthConfig) -> Self {
        HealthMonitor {
            config,
            ..Default::default()
        }
    }

    /// A monitor that has seen a run's logged records, in order (`metrics.jsonl` read
    /// back on resume), under the names PPO logs: `entropy`, `kl`, `response_len`,
    /// `reward_mean`, `judge_score`, `clip_frac`, `grad_norm`. The records of one step
    /// (training metrics, an evaluation) count as one observation, as they did live.
    pub fn replay(config: HealthConfig, records: &[Map<String, Value>]) -> Self {
        let mut m = HealthMonitor::new(config);
        let mut steps: Vec<u64> = records.iter().map(step_of).collect();
        steps.dedup();
        for step in steps {
            for t in m.observe(&observation_of(&merged_step(records, step))) {
                m.warned.insert(t.key);
            }
        }
        m
    }

    /// Whether `key` trips for the first time in this run (then it is worth a warning line).
    pub fn first_warning(&mut self, key: &'static str) -> bool {
        self.warned.insert(key)
    }

    /// Add one logged iteration and return the signals that trip at it.
    pub fn observe(&mut self, o: &Observation) -> Vec<Tripped> {
        let c = self.config.clone();
        let w = c.window;
        let mut out = vec![];
        let mut trip = |key, value, message: String| {
            out.push(Tripped {
                key,
                value,
                message,
            })
        };
        if let Some(e) = o.entropy {
            self.entropy.push(e);
            if let Some(r) = entropy_ratio(&self.entropy) {
                if c.entropy_floor > 0.0 && r < c.entropy_floor {
                    trip("health_entropy", r, format!(
                        "entropy collapse: policy entropy is {:.0}% of its start ({:.3} -> {e:.3}; threshold health.entropy_floor {})",
                        r * 100.0, self.entropy[0], c.entropy_floor
                    ));
                }
            }
        }
        if let Some(kl) = o.kl {
            self.kl.push(kl);
            if let Some(g) = growth_rate(&self.kl, w) {
                if c.kl_growth > 0.0 && kl > c.kl_min && g > c.kl_growth {
                    trip("health_kl_growth", g, format!(
                        "runaway KL: KL to the reference is {kl:.2} and growing {g:.2} per iteration over the last {w} (threshold health.kl_growth {})",
                        c.kl_growth
                    ));
                }
            }
        }
        if let Some(len) = o.response_len {
            self.response_len.push(len);
            if let Some(d) = relative_drift(&self.response_len) {
                if c.length_drift > 0.0 && d.abs() > c.length_drift {
                    trip("health_length_drift", d, format!(
                        "response-length drift: mean response length {:.1} -> {len:.1} tokens ({:+.0}%; threshold health.length_drift {})",
                        self.response_len[0], d * 100.0, c.length_drift
                    ));
                }
            }
        }
        if let (Some(r), Some(j)) = (o.reward, o.judge) {
            self.evals.push((r, j));
            if let Some(drop) = judge_drop_while_reward_rises(&self.evals) {
                if c.judge_drop > 0.0 && drop > c.judge_drop {
                    let [.., (r0, j0), _] = self.evals[..] else {
                        unreachable!("two evaluations")
                    };
                    trip("health_reward_hacking", drop, format!(
                        "reward hacking? training reward rose {r0:.3} -> {r:.3} while the held-out judge fell {j0:.3} -> {j:.3} (threshold health.judge_drop {})",
                        c.judge_drop
                    ));
                }
            }
        }
        if let Some(f) = o.clip_frac {
            self.clip_frac.push(f);
            if c.clip_frac > 0.0 && persistently_above(&self.clip_frac, c.clip_frac, w) {
                trip("health_clip_frac", f, format!(
                    "clip fraction above {} for {w} iterations in a row (now {f:.2}): updates are too large; lower train.lr (threshold health.clip_frac)",
                    c.clip_frac
                ));
            }
        }
        if let Some(g) = o.grad_norm {
            if let Some(s) = spike_ratio(&[self.grad_norm.as_slice(), &[g]].concat(), w) {
                if c.grad_spike > 0.0 && s > c.grad_spike {
                    trip("health_grad_spike", s, format!(
                        "gradient-norm spike: {g:.3} is {s:.1}x the median of the last {w} (threshold health.grad_spike {})",
                        c.grad_spike
                    ));
                }
            }
            self.grad_norm.push(g);
        }
        if let Some(z) = o.zero_spread {
            self.zero_spread.push(z);
            if c.zero_spread > 0.0 && persistently_at_least(&self.zero_spread, c.zero_spread, w) {
                trip("health_zero_spread", z, format!(
                    "no learning signal: {:.0}% of the groups scored alike (zero advantages) for {w} steps in a row; the task is too hard or too easy for the policy, or the reward cannot tell completions apart (threshold health.zero_spread {})",
                    z * 100.0, c.zero_spread
                ));
            }
        }
        if let Some(m) = o.margin {
            self.margin.push(m);
            let best = self
                .margin
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, f64::max);
            if let Some(f) = fall_from_best(&self.margin) {
                if c.margin_drop > 0.0 && best > c.margin_min && f > c.margin_drop {
                    trip("health_margin_collapse", f, format!(
                        "margin collapse: the held-out chosen - rejected margin fell from its best {best:.3} to {m:.3} ({:.0}% lower; threshold health.margin_drop {})",
                        f * 100.0, c.margin_drop
                    ));
                }
            }
        }
        if let Some(r) = o.reward_chosen {
            if c.chosen_floor > 0.0 && r < -c.chosen_floor {
                trip("health_chosen_falls", r, format!(
                    "chosen responses losing likelihood: their implicit reward beta*log(pi/pi_ref) is {r:.3}, below -{} (the policy pushes preferred and rejected responses down alike; threshold health.chosen_floor)",
                    c.chosen_floor
                ));
            }
        }
        out
    }
}

/// What [`HealthMonitor::check`] found at one step.
#[derive(Debug, Default, PartialEq)]
pub struct Checked {
    /// Warning lines to print (`warning: ...`): each signal's first trip, or every trip
    /// when the run stops on one.
    pub warnings: Vec<String>,
    /// Why the run must stop (`train.stop_on_health` and a signal tripped).
    pub stop: Option<String>,
}

impl HealthMonitor {
    /// The whole check of one logged step, as PPO, GRPO and DPO make it: observe what
    /// `metrics` holds for `step` (its records merged), log every tripped signal as
    /// `health_*` in one more record at `step`, and say what to print and whether to stop.
    pub fn check(&mut self, metrics: &mut MetricsLog, step: u64, stop_on_health: bool) -> Checked {
        let obs = observation_of(&merged_step(&metrics.records, step));
        let tripped = self.observe(&obs);
        let mut out = Checked::default();
        if tripped.is_empty() {
            return out;
        }
        let mut rec = Map::new();
        rec.insert("step".into(), step.into());
        for t in &tripped {
            rec.insert(t.key.into(), t.value.into());
            if self.first_warning(t.key) || stop_on_health {
                out.warnings.push(format!("warning: {}", t.message));
            }
        }
        metrics.push(rec);
        if stop_on_health {
            out.stop = Some(tripped[0].message.clone());
        }
        out
    }
}

fn step_of(r: &Map<String, Value>) -> u64 {
    r.get("step").and_then(Value::as_u64).unwrap_or(0)
}

/// The records logged at `step` merged into one (later keys win).
pub fn merged_step(records: &[Map<String, Value>], step: u64) -> Map<String, Value> {
    let mut out = Map::new();
    for r in records.iter().filter(|r| step_of(r) == step) {
        out.extend(r.clone());
    }
    out
}

/// The health observation in a logged record, under the names the RL stages log:
/// PPO's and GRPO's (`entropy`, `kl`, `response_len`, `reward_mean`, `judge_score`,
/// `clip_frac`, `grad_norm`, GRPO's `zero_spread`) and DPO's (`reward_chosen`,
/// `reward_rejected`, `eval_margin`; its training reward is the margin
/// `reward_chosen − reward_rejected`).
pub fn observation_of(r: &Map<String, Value>) -> Observation {
    let f = |k: &str| r.get(k).and_then(Value::as_f64);
    let dpo_margin = match (f("reward_chosen"), f("reward_rejected")) {
        (Some(c), Some(r)) => Some(c - r),
        _ => None,
    };
    Observation {
        entropy: f("entropy"),
        kl: f("kl"),
        response_len: f("response_len"),
        reward: f("reward_mean").or(dpo_margin),
        judge: f("judge_score"),
        clip_frac: f("clip_frac"),
        grad_norm: f("grad_norm"),
        zero_spread: f("zero_spread"),
        margin: f("eval_margin"),
        reward_chosen: f("reward_chosen"),
    }
}

/// After a step's [`HealthMonitor::check`] on rank 0: with `train.stop_on_health` every
/// rank takes rank 0's decision, and a stop becomes the run's error, naming the step (`unit`
/// is what the stage calls one: `step`, `iteration`) and where the last good checkpoint is.
pub fn stop_if_tripped(
    stop: Option<String>,
    stop_on_health: bool,
    dist: &crate::dist::Dist,
    unit: &str,
    step: u64,
    out: &std::path::Path,
) -> crate::Result<()> {
    let stop = if stop_on_health {
        dist.broadcast_value(&stop)?
    } else {
        stop
    };
    match stop {
        Some(why) => Err(crate::err(format!(
            "run health: {why}; stopped at {unit} {step} (train.stop_on_health), the last good checkpoint (if any) is kept in {}",
            out.display()
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // hand-computed values
    #[test]
    fn signals_by_hand() {
        assert_eq!(entropy_ratio(&[2.0]), None);
        assert_eq!(entropy_ratio(&[2.0, 1.5, 0.4]), Some(0.2));
        // slope of 1, 3, 5 is 2; of the last 3 of 0, 1, 3, 5 too
        assert_eq!(growth_rate(&[1.0, 3.0, 5.0], 3), Some(2.0));
        assert_eq!(growth_rate(&[0.0, 1.0, 3.0, 5.0], 3), Some(2.0));
        assert_eq!(growth_rate(&[1.0, 3.0], 3), None);
        // best of 0.25, 1, 0.5 is 1; 0.25 is 75 % below it
        assert_eq!(fall_from_best(&[0.25, 1.0, 0.5, 0.25]), Some(0.75));
        assert_eq!(fall_from_best(&[0.2]), None);
        assert_eq!(fall_from_best(&[-0.2, -0.5]), None);
        assert!(persistently_at_least(&[0.5, 1.0, 1.0], 1.0, 2));
        assert!(!persistently_at_least(&[1.0, 0.9, 1.0], 1.0, 2));
        // x = 0..4, y = 0, 0, 1, 1: slope = Σdx·dy / Σdx² = (−1.5·−.5 −.5·−.5 +.5·.5 +1.5·.5)/5 = 0.4
        assert!((growth_rate(&[0.0, 0.0, 1.0, 1.0], 4).unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(relative_drift(&[10.0, 25.0]), Some(1.5));
        assert_eq!(relative_drift(&[10.0, 2.0]), Some(-0.8));
        assert_eq!(judge_drop_while_reward_rises(&[(0.1, 0.5)]), None);
        assert_eq!(
            judge_drop_while_reward_rises(&[(0.1, 0.5), (0.3, 0.25)]),
            Some(0.25)
        );
        assert_eq!(
            judge_drop_while_reward_rises(&[(0.3, 0.5), (0.1, 0.25)]),
            Some(0.0)
        );
        assert!(persistently_above(&[0.1, 0.5, 0.6], 0.4, 2));
        assert!(!persistently_above(&[0.5, 0.1, 0.6], 0.4, 2));
        assert!(!persistently_above(&[0.6], 0.4, 2));
        // median of 1, 3, 2 is 2; of 1, 2, 3, 4 is 2.5
        assert_eq!(spike_ratio(&[1.0, 3.0, 2.0, 20.0], 3), Some(10.0));
        assert_eq!(spike_ratio(&[1.0, 2.0, 3.0, 4.0, 5.0], 4), Some(2.0));
        assert_eq!(spike_ratio(&[1.0, 2.0], 3), None);
    }

    fn obs(entropy: f64, kl: f64, len: f64, clip: f64, grad: f64) -> Observation {
        Observation {
            entropy: Some(entropy),
            kl: Some(kl),
            response_len: Some(len),
            reward: None,
            judge: None,
            clip_frac: Some(clip),
            grad_norm: Some(grad),
            ..Default::default()
        }
    }

    #[test]
    fn a_healthy_run_is_quiet_and_a_broken_one_trips_each_signal() {
        let mut m = HealthMonitor::new(HealthConfig::default());
        for i in 0..20 {
            let t = i as f64;
            let o = Observation {
                zero_spread: Some(if i % 2 == 0 { 1.0 } else { 0.5 }),
                // held-out margin rising with a dip of 20 %, chosen reward slowly falling
                margin: (i % 4 == 0).then_some(if i == 12 { 0.64 } else { 0.1 * t }),
                reward_chosen: Some(-0.05 * t),
                ..obs(
                    2.0 - 0.02 * t,
                    0.05 * t,
                    20.0 + 0.2 * t,
                    0.1,
                    1.0 + 0.1 * (t % 3.0),
                )
            };
            assert!(m.observe(&o).is_empty(), "step {i}");
        }
        let mut m = HealthMonitor::new(HealthConfig::default());
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..12 {
            let t = i as f64;
            let o = Observation {
                reward: Some(0.1 * t),
                judge: (i % 4 == 0).then_some(0.5 - 0.1 * t),
                zero_spread: Some(1.0),
                margin: (i % 4 == 0).then_some(if i == 8 { 0.1 } else { 0.1 * t }),
                reward_chosen: Some(-0.3 * t),
                ..obs(
                    2.0 * 0.7f64.powf(t),
                    t * t,
                    20.0 + 5.0 * t,
                    0.5,
                    if i == 10 { 50.0 } else { 1.0 },
                )
            };
            for tr in m.observe(&o) {
                seen.insert(tr.key);
            }
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), {
            let mut k = HEALTH_KEYS.to_vec();
            k.sort();
            k
        });
    }

    #[test]
    fn replay_rebuilds_the_history_from_logged_records() {
        let rec = |e: f64| {
            let mut m = Map::new();
            m.insert("entropy".into(), e.into());
            m
        };
        let mut a = rec(2.0);
        a.insert("step".into(), 1.into());
        let mut b = rec(1.0);
        b.insert("step".into(), 2.into());
        let mut m = HealthMonitor::replay(HealthConfig::default(), &[a, b]);
        let t = m.observe(&Observation {
            entropy: Some(0.4),
            ..Default::default()
        });
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].key, "health_entropy");
        assert!((t[0].value - 0.2).abs() < 1e-12);
        let e = HealthConfig {
            kl_growth: f64::NAN,
            ..Default::default()
        }
        .validate("ppo.yaml")
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("ppo.yaml: health.kl_growth: NaN"), "{e}");
    }
}
