//! Step 4 of a PPO iteration, over the whole rollout batch: per-token rewards (−β·KL at
//! every token, the score at the last), advantages and returns by GAE, advantages whitened.

use candor_train::rl::masked_whiten;

use crate::math::{gae, per_token_rewards};
use crate::rollout::Rollout;
use crate::PpoAlgo;

/// What the PPO epochs fit, per response token, rows padded to the rollout's width.
pub(crate) struct Advantages {
    pub mask_rows: Vec<Vec<bool>>,
    /// The policy's log-probs and the critic's values while sampling.
    pub old_lp: Vec<Vec<f64>>,
    pub old_values: Vec<Vec<f64>>,
    /// log π − log π_ref at each token (the KL the penalty charged).
    pub kl: Vec<Vec<f64>>,
    pub advantages: Vec<Vec<f64>>,
    pub returns: Vec<Vec<f64>>,
}

/// Rewards with the KL coefficient `kl_coef`, GAE with `ppo.gamma`/`ppo.lam`, whitening
/// when `ppo.whiten_advantages`.
pub(crate) fn advantages(roll: &Rollout, kl_coef: f64, ppo: &PpoAlgo) -> Advantages {
    let mask_rows = roll.mask_rows();
    let (old_lp, old_values) = (roll.padded(&roll.old_logprobs), roll.padded(&roll.values));
    let (rewards, kl) = per_token_rewards(
        &roll.combined,
        &old_lp,
        &roll.padded(&roll.ref_logprobs),
        &mask_rows,
        kl_coef,
    );
    let (advantages, returns) = gae(&rewards, &old_values, &mask_rows, ppo.gamma, ppo.lam);
    let advantages = if ppo.whiten_advantages {
        masked_whiten(&advantages, &mask_rows, true)
    } else {
        advantages
    };
    Advantages {
        mask_rows,
        old_lp,
        old_values,
        kl,
        advantages,
        returns,
    }
}
