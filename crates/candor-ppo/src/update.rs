//! Step 5 of a PPO iteration: several epochs over minibatches of the rollout, each a
//! clipped policy loss + vf_coef · clipped value loss − entropy bonus (+ PPO-ptx), the
//! gradients of the whole minibatch summed over the ranks, both optimisers stepped; early
//! stop when the approximate KL passes `ppo.max_approx_kl`.

use std::path::Path;

use candle_nn::VarMap;
use candor_core::rng::Rng;
use candor_model::{Model, Recording};
use candor_train::batch::{lm_batch, LmExample, Sampler};
use candor_train::dist::Dist;
use candor_train::err;
use candor_train::loss::lm_loss;
use candor_train::optim::{clip_grad_norm, AdamW, Grads};
use candor_train::precision::compute_model;
use candor_train::rl::{masked_mean, policy_loss, scalar};
use candor_train::seq::{logprobs, seq_batch, tensor, values};

use crate::math::value_loss;
use crate::rollout::Rollout;
use crate::{PpoAlgo, PpoConfig, Result};

/// The statistics of one minibatch update (means over its response tokens; `grad_norm`:
/// the policy's, before clipping), or their means over an iteration's updates.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpdateStats {
    pub policy_loss: f64,
    pub value_loss: f64,
    pub clip_frac: f64,
    pub value_clip_frac: f64,
    pub approx_kl: f64,
    pub entropy: f64,
    pub grad_norm: f64,
}

impl UpdateStats {
    /// The fields in one order, for the all-reduce over the ranks.
    fn to_vec(self) -> Vec<f64> {
        vec![
            self.policy_loss,
            self.value_loss,
            self.clip_frac,
            self.value_clip_frac,
            self.approx_kl,
            self.entropy,
            self.grad_norm,
        ]
    }

    fn from_slice(v: &[f64]) -> Self {
        UpdateStats {
            policy_loss: v[0],
            value_loss: v[1],
            clip_frac: v[2],
            value_clip_frac: v[3],
            approx_kl: v[4],
            entropy: v[5],
            grad_norm: v[6],
        }
    }

    /// `f` applied to every field.
    pub fn map(self, f: impl Fn(f64) -> f64) -> Self {
        UpdateStats::from_slice(&self.to_vec().into_iter().map(f).collect::<Vec<_>>())
    }

    fn add(&mut self, o: &UpdateStats) {
        let sums: Vec<f64> = self
            .to_vec()
            .iter()
            .zip(o.to_vec())
            .map(|(a, b)| a + b)
            .collect();
        *self = UpdateStats::from_slice(&sums);
    }
}

/// The updates of one iteration: their statistics' sum, how many, and whether the
/// approximate-KL limit stopped them early.
#[derive(Default)]
pub struct EpochStats {
    sum: UpdateStats,
    n: usize,
    pub early_stopped: bool,
}

impl EpochStats {
    fn add(&mut self, stats: &UpdateStats) {
        self.sum.add(stats);
        self.n += 1;
    }

    /// Each statistic's mean over the updates.
    pub fn mean(&self) -> UpdateStats {
        let n = self.n.max(1) as f64;
        self.sum.map(|s| s / n)
    }
}

/// The trainable models (f32 master weights) and their optimisers.
pub(crate) struct Learners<'a> {
    pub policy: &'a Model,
    pub policy_vars: &'a VarMap,
    pub critic: &'a Model,
    pub critic_vars: &'a VarMap,
    pub policy_opt: &'a mut AdamW,
    pub critic_opt: &'a mut AdamW,
}

/// What the epochs of one iteration run with.
pub(crate) struct Epochs<'a> {
    pub cfg: &'a PpoConfig,
    pub lr: f64,
    /// critic lr / policy lr.
    pub critic_lr_scale: f64,
    pub temperature: f64,
    pub pad: u32,
    pub dist: &'a Dist,
    /// The iteration (from 0), for the error that stops a run.
    pub iteration: usize,
    pub out: &'a Path,
    /// PPO-ptx's pretraining examples (none: no ptx term).
    pub ptx: &'a [LmExample],
}

/// `ppo.epochs` passes over the rollout in minibatches of `train.batch_size` rows, in an
/// order drawn from `rng` (the same on every rank), each a [`minibatch_grads`] update of
/// both models; a loss or policy gradient norm that is not finite stops the run.
pub(crate) fn ppo_epochs(
    l: &mut Learners,
    targets: &Targets,
    ptx_sampler: &mut Option<Sampler>,
    rng: &mut Rng,
    e: &Epochs,
) -> Result<EpochStats> {
    let cfg = e.cfg;
    let dtype = cfg.train.dtype;
    let n = targets.roll.len();
    let mb = cfg.train.batch_size.min(n);
    let mut stats = EpochStats::default();
    'epochs: for _epoch in 0..cfg.ppo.epochs {
        let mut order: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut order);
        for chunk in order.chunks(mb) {
            let ptx_rows: Vec<usize> = ptx_sampler.as_mut().map_or(vec![], |s| s.next(chunk.len()));
            let models = Models {
                policy: &*compute_model(l.policy, l.policy_vars, dtype)?,
                critic: &*compute_model(l.critic, l.critic_vars, dtype)?,
                policy_opt: l.policy_opt,
                critic_opt: l.critic_opt,
                gradient_checkpointing: cfg.train.gradient_checkpointing,
            };
            let ptx_batch = PtxBatch {
                examples: e.ptx,
                rows: &ptx_rows,
            };
            // LoRA dropout, when there is any, in the update passes only
            models.policy.set_adapter_training(true);
            models.critic.set_adapter_training(true);
            let u = minibatch_grads(
                &models,
                targets,
                chunk,
                &ptx_batch,
                &cfg.ppo,
                e.temperature,
                e.pad,
                e.dist,
            );
            models.policy.set_adapter_training(false);
            models.critic.set_adapter_training(false);
            let mut u = u?;
            if candor_train::fault::nan_at(e.iteration as u64 + 1) {
                u.loss = f64::NAN;
            }
            if !u.loss.is_finite() {
                return Err(err(format!(
                    "PPO loss became {} at iteration {}; stopped, the last good checkpoint (if any) is kept in {}",
                    u.loss,
                    e.iteration + 1,
                    e.out.display()
                )));
            }
            let gn = clip_grad_norm(&mut u.policy_grads, cfg.train.grad_clip)?;
            clip_grad_norm(&mut u.critic_grads, cfg.train.grad_clip)?;
            if !gn.is_finite() {
                return Err(err(format!(
                    "policy gradient norm became {gn} at iteration {}; stopped, the last good checkpoint (if any) is kept in {}",
                    e.iteration + 1,
                    e.out.display()
                )));
            }
            l.policy_opt.step(&u.policy_grads, e.lr)?;
            l.critic_opt
                .step(&u.critic_grads, e.lr * e.critic_lr_scale)?;
            u.stats.grad_norm = gn;
            stats.add(&u.stats);
            if cfg.ppo.max_approx_kl > 0.0 && u.stats.approx_kl > cfg.ppo.max_approx_kl {
                stats.early_stopped = true;
                break 'epochs;
            }
        }
    }
    Ok(stats)
}

/// The models one minibatch update runs (in `train.dtype`) and their optimisers.
pub(crate) struct Models<'a> {
    pub policy: &'a Model,
    pub critic: &'a Model,
    pub policy_opt: &'a AdamW,
    pub critic_opt: &'a AdamW,
    /// `train.gradient_checkpointing`: both models' blocks recomputed in the backward.
    pub gradient_checkpointing: bool,
}

/// A rollout batch and what PPO fits to it, rows in the batch's order, per-token rows
/// padded to the rollout's width.
pub(crate) struct Targets<'a> {
    pub prompts: &'a [&'a [u32]],
    pub roll: &'a Rollout,
    pub old_lp: &'a [Vec<f64>],
    pub old_values: &'a [Vec<f64>],
    pub advantages: &'a [Vec<f64>],
    pub returns: &'a [Vec<f64>],
}

/// PPO-ptx: pretraining examples and the rows of them this minibatch mixes in.
pub(crate) struct PtxBatch<'a> {
    pub examples: &'a [LmExample],
    pub rows: &'a [usize],
}

/// One minibatch update's gradients (summed over the ranks), loss and statistics (over the
/// whole minibatch: means over its response tokens; `grad_norm` is set after clipping).
pub(crate) struct MinibatchUpdate {
    pub policy_grads: Grads,
    pub critic_grads: Grads,
    pub loss: f64,
    pub stats: UpdateStats,
}

/// The clipped policy loss + vf_coef · clipped value loss − entropy_coef · entropy (+
/// ptx_coef · next-token loss) of one minibatch (rows `chunk` of the rollout), from this
/// rank's share of its rows, gradients summed over the ranks. Each rank's token means are
/// weighted by its share of the minibatch's response tokens (and of the ptx examples'
/// target tokens), so the sum over the ranks is the whole minibatch's loss, and every rank
/// gets the same gradients and statistics. With `Dist::single()` the weights are 1.
#[allow(clippy::too_many_arguments)]
pub(crate) fn minibatch_grads(
    m: &Models,
    t: &Targets,
    chunk: &[usize],
    ptx: &PtxBatch,
    cfg: &PpoAlgo,
    temperature: f64,
    pad: u32,
    dist: &Dist,
) -> Result<MinibatchUpdate> {
    let device = m.policy.device();
    let mine = dist.shard(chunk);
    let tokens = |rows: &[usize]| {
        rows.iter()
            .map(|&i| t.roll.responses[i].len())
            .sum::<usize>()
    };
    let recording = Recording::start(&[m.policy, m.critic], m.gradient_checkpointing);
    let mut loss: Option<candle_core::Tensor> = None;
    // this rank's weighted loss and statistics
    let (mut local_loss, mut local) = (0.0f64, UpdateStats::default());
    if !mine.is_empty() {
        let w = tokens(mine) as f64 / tokens(chunk).max(1) as f64;
        let m_pr: Vec<&[u32]> = mine.iter().map(|&i| t.prompts[i]).collect();
        let m_resp: Vec<&[u32]> = mine
            .iter()
            .map(|&i| t.roll.responses[i].as_slice())
            .collect();
        let msb = seq_batch(&m_pr, &m_resp, pad, device)?;
        let r = msb.response_width;
        let pick = |x: &[Vec<f64>]| -> Vec<Vec<f64>> {
            mine.iter()
                .map(|&i| {
                    let mut v = x[i].clone();
                    v.resize(r, 0.0);
                    v
                })
                .collect()
        };
        let old_lp_t = tensor(&pick(t.old_lp), device)?;
        let adv_t = tensor(&pick(t.advantages), device)?;
        let ret_t = tensor(&pick(t.returns), device)?;
        let val_t = tensor(&pick(t.old_values), device)?;
        let (new_lp, logits) = logprobs(m.policy, &msb, temperature)?;
        let pl = policy_loss(&new_lp, &old_lp_t, &adv_t, &msb.mask, cfg.cliprange)?;
        let vpred = values(m.critic, &msb)?;
        let (vl, vclip) = value_loss(&vpred, &val_t, &ret_t, &msb.mask, cfg.cliprange_value)?;
        let entropy = masked_mean(&candor_model::ops::entropy(&logits)?, &msb.mask)?;
        let mut l = (&pl.loss + (&vl * cfg.vf_coef)?)?;
        if cfg.entropy_coef != 0.0 {
            l = (l - (&entropy * cfg.entropy_coef)?)?;
        }
        let l = (l * w)?;
        local_loss = scalar(&l)?;
        local = UpdateStats {
            policy_loss: scalar(&pl.loss)?,
            value_loss: scalar(&vl)?,
            clip_frac: pl.clip_frac,
            value_clip_frac: vclip,
            approx_kl: pl.approx_kl,
            entropy: scalar(&entropy)?,
            grad_norm: 0.0,
        }
        .map(|x| x * w);
        loss = Some(l);
    }
    let ptx_mine = dist.shard(ptx.rows);
    if !ptx_mine.is_empty() {
        let all: usize = ptx.rows.iter().map(|&i| ptx.examples[i].n_targets()).sum();
        let ex: Vec<&LmExample> = ptx_mine.iter().map(|&i| &ptx.examples[i]).collect();
        let (sum, _) = lm_loss(m.policy, &lm_batch(&ex, pad, device)?)?;
        let l = (sum * (cfg.ptx_coef / all.max(1) as f64))?;
        local_loss += scalar(&l)?;
        loss = Some(match loss {
            Some(x) => (x + l)?,
            None => l,
        });
    }
    let mut policy_grads = m.policy_opt.zero_grads();
    let mut critic_grads = m.critic_opt.zero_grads();
    if let Some(loss) = loss {
        recording.backward(loss, |store| -> Result<()> {
            m.policy_opt.accumulate(store, &mut policy_grads)?;
            m.critic_opt.accumulate(store, &mut critic_grads)?;
            Ok(())
        })?;
    }
    dist.all_reduce_grads(&mut policy_grads, m.policy_opt)?;
    dist.all_reduce_grads(&mut critic_grads, m.critic_opt)?;
    let mut wire = vec![local_loss];
    wire.extend(local.to_vec());
    let g = dist.all_reduce_f64(&wire)?;
    Ok(MinibatchUpdate {
        policy_grads,
        critic_grads,
        loss: g[0],
        stats: UpdateStats::from_slice(&g[1..]),
    })
}
