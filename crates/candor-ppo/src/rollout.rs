//! Steps 2 and 3 of a PPO iteration: responses sampled from the policy with the KV cache,
//! scored, and per token the log-probs of policy and reference and the critic's values;
//! gathered over the ranks of a data-parallel run.

use std::time::Instant;

use candle_nn::VarMap;
use candor_core::rng::Rng;
use candor_data::Tokenizer;
use candor_model::generate::SamplingParams;
use candor_model::Model;
use candor_train::dist::Dist;
use candor_train::precision::{inference_model, Precision};
use candor_train::rollout::{sample_responses, Prompt};
use candor_train::score::{judge_means, Scorer};
use candor_train::seq::{logprobs, rows, values};

use crate::Result;

/// The models a rollout reads: policy and critic as trained so far (f32 master weights,
/// sampled in `dtype`), the frozen reference, the scorer.
pub(crate) struct RolloutModels<'a> {
    pub policy: &'a Model,
    pub policy_vars: &'a VarMap,
    pub critic: &'a Model,
    pub critic_vars: &'a VarMap,
    pub reference: &'a Model,
    pub dtype: Precision,
    pub scorer: &'a Scorer,
}

/// How responses are sampled; log-probs are computed at the sampling `temperature`.
pub(crate) struct RolloutSampling<'a> {
    pub tok: &'a Tokenizer,
    pub params: &'a SamplingParams,
    pub stop: &'a [u32],
    pub temperature: f64,
}

/// When a rollout's phases took place.
pub(crate) struct RolloutTimes {
    /// Seconds spent sampling.
    pub generate: f64,
    /// When scoring began.
    pub score_start: Instant,
    /// Each of `score.judges`' batch mean over every rank, as `(reward_<label>, mean)`.
    pub judge_means: Vec<(String, f64)>,
}

/// This rank's share of the prompts (`mine`) rolled out, then every rank's rows gathered.
/// Rank 0 samples from the run's generator `rng`, the others from streams derived from it
/// and their rank; `rng` is then rank 0's on every rank (it shuffles the minibatches).
pub(crate) fn roll_out(
    m: &RolloutModels,
    how: &RolloutSampling,
    mine: &[&Prompt],
    rng: &mut Rng,
    dist: &Dist,
) -> Result<(Rollout, RolloutTimes)> {
    let t0 = Instant::now();
    let policy_now = inference_model(m.policy, m.policy_vars, m.dtype)?;
    let critic_now = inference_model(m.critic, m.critic_vars, m.dtype)?;
    let mut rank_rng = Rng::derive(
        rng.clone().next_u64(),
        &format!("rollout-rank-{}", dist.rank()),
    );
    let sampling_rng = if dist.is_main() {
        &mut *rng
    } else {
        &mut rank_rng
    };
    let samples = sample_responses(
        &policy_now,
        how.tok,
        mine,
        how.params,
        how.stop,
        sampling_rng,
    )?;
    *rng = dist.broadcast_value(&*rng)?;
    let generate = t0.elapsed().as_secs_f64();
    let score_start = Instant::now();
    let device = m.policy.device();
    let sb = samples.seq_batch(mine, how.tok.pad_id(), device)?;
    let scores = m
        .scorer
        .score(&sb, mine, &samples.texts, &samples.stopped)?;
    let judge_means = judge_means(&scores.per_judge, dist)?;
    let old_lp = rows(&logprobs(&policy_now, &sb, how.temperature)?.0.detach())?;
    let ref_lp = rows(&logprobs(m.reference, &sb, how.temperature)?.0)?;
    let old_values = rows(&values(&critic_now, &sb)?.detach())?;
    drop((policy_now, critic_now));
    let mut local = Rollout::default();
    for i in 0..samples.tokens.len() {
        local.push(
            &samples.tokens[i],
            samples.stopped[i],
            scores.combined[i],
            scores.raw[i],
            &old_lp[i],
            &ref_lp[i],
            &old_values[i],
        );
    }
    let roll = local.gather(dist)?;
    Ok((
        roll,
        RolloutTimes {
            generate,
            score_start,
            judge_means,
        },
    ))
}

/// One rollout batch: responses, their scores, and per response token the log-probs of
/// policy and reference and the critic's values (real tokens only, no padding).
///
/// In a data-parallel run each rank samples and scores its share of the prompts;
/// [`Rollout::gather`] gives every rank the whole batch, rows in the global batch's order
/// (rank order: the shares are contiguous), so the rest of the iteration (rewards, GAE,
/// whitening over the whole batch, minibatch order) is the same computation on every rank.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rollout {
    pub responses: Vec<Vec<u32>>,
    /// The response ended on a stop token (not the length limit).
    pub stopped: Vec<bool>,
    /// The score PPO optimises (normalised, weighted, clipped) and the raw one.
    pub combined: Vec<f64>,
    pub raw: Vec<f64>,
    pub old_logprobs: Vec<Vec<f64>>,
    pub ref_logprobs: Vec<Vec<f64>>,
    pub values: Vec<Vec<f64>>,
}

impl Rollout {
    pub fn len(&self) -> usize {
        self.responses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.responses.is_empty()
    }

    /// Append a row; per-token rows may be wider than the response (batch padding).
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        response: &[u32],
        stopped: bool,
        combined: f64,
        raw: f64,
        old_lp: &[f64],
        ref_lp: &[f64],
        values: &[f64],
    ) {
        let n = response.len();
        self.responses.push(response.to_vec());
        self.stopped.push(stopped);
        self.combined.push(combined);
        self.raw.push(raw);
        self.old_logprobs.push(old_lp[..n].to_vec());
        self.ref_logprobs.push(ref_lp[..n].to_vec());
        self.values.push(values[..n].to_vec());
    }

    /// Every rank's rows, in rank order (numbers exchanged as f64: token ids and f32-born
    /// values arrive exactly).
    pub fn gather(&self, dist: &Dist) -> Result<Rollout> {
        let mut flat = vec![];
        for i in 0..self.len() {
            flat.extend([
                self.responses[i].len() as f64,
                f64::from(u8::from(self.stopped[i])),
                self.combined[i],
                self.raw[i],
            ]);
            flat.extend(self.responses[i].iter().map(|&t| f64::from(t)));
            for row in [
                &self.old_logprobs[i],
                &self.ref_logprobs[i],
                &self.values[i],
            ] {
                flat.extend(row);
            }
        }
        let mut all = Rollout::default();
        for part in dist.all_gather_f64(&flat)? {
            let mut at = 0;
            while at < part.len() {
                let n = part[at] as usize;
                let row = |k: usize| part[at + 4 + k * n..at + 4 + (k + 1) * n].to_vec();
                let response: Vec<u32> = row(0).into_iter().map(|t| t as u32).collect();
                all.push(
                    &response,
                    part[at + 1] != 0.0,
                    part[at + 2],
                    part[at + 3],
                    &row(1),
                    &row(2),
                    &row(3),
                );
                at += 4 + 4 * n;
            }
        }
        Ok(all)
    }

    /// Width of the per-token rows once padded: the longest response (at least 1).
    pub fn width(&self) -> usize {
        self.responses
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0)
            .max(1)
    }

    /// (B, width): whether each column is a real response token.
    pub fn mask_rows(&self) -> Vec<Vec<bool>> {
        self.responses
            .iter()
            .map(|r| (0..self.width()).map(|j| j < r.len()).collect())
            .collect()
    }

    /// Per-token rows right-padded with zeros to [`width`](Self::width).
    pub fn padded(&self, rows: &[Vec<f64>]) -> Vec<Vec<f64>> {
        rows.iter()
            .map(|r| {
                let mut r = r.clone();
                r.resize(self.width(), 0.0);
                r
            })
            .collect()
    }
}
