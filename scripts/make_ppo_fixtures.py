#!/usr/bin/env python3
"""Writes tests/fixtures/ppo_math.json: PPO / RLHF reference values computed in PyTorch
(float64) on small fixed random inputs.

Run with the reference venv (scripts/setup_venv.sh):

    .venv/bin/python scripts/make_ppo_fixtures.py

Layout of the JSON object: {"meta": {...}, "<kind>": [entry, ...], ...} with kinds
gae, masked_whiten, policy_loss, value_loss, entropy, adaptive_kl, reward_pairwise.
Every entry is {"name", "inputs": {...}, "outputs": {...}}; tensors are plain nested lists
(batch-major, [batch][position] or [batch][position][vocab]); masks are 0/1 numbers.
Shapes: batch B=3, response length T=5; the mask is right-padded with lengths [5, 2, 4]
(row 0 full, row 1 two real tokens, row 2 four). Inputs at padded positions (mask 0) hold
finite garbage, as they do in a real padded batch: an implementation must mask them out.

Sources of the formulas (pasted below next to each function):
  * TRL v0.11.4 (the last release with the original `PPOTrainer`, by von Werra et al.;
    huggingface/trl tag v0.11.4): trl/core.py (masked_mean, masked_var, masked_whiten,
    entropy_from_logits, logprobs_from_logits, clip_by_value), trl/trainer/ppo_trainer.py
    (PPOTrainer.compute_rewards, compute_advantages, loss), trl/trainer/utils.py
    (AdaptiveKLController). The functions in this file reproduce that code line for line;
    GAE is additionally cross-checked against an independent per-sequence recursion.
  * Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation" (GAE); Schulman et al. 2017, "Proximal Policy Optimization Algorithms"
    (clipped surrogate, eq. 7).
  * Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2
    (adaptive KL coefficient, a proportional controller).
  * Ouyang et al. 2022, "Training language models to follow instructions with human
    feedback" (InstructGPT), eq. 1 (reward-model loss over all C(K,2) pairs of a K-way
    ranking) and eq. 2 (RL objective: r_theta(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x))).
  * Schulman, "Approximating KL Divergence" (2020 note): the k3 estimator
    (r - 1) - log r with r = pi_new / pi_old evaluated on samples from pi_old.

Conventions an implementation must match (all from TRL v0.11.4):
  * masked_mean(x, m) = sum(x * m) / sum(m)    (over the whole tensor, not per row)
  * masked_var(x, m)  = masked_mean((x - masked_mean(x, m))^2, m) * n / (n - 1),  n = sum(m)
    (unbiased = Bessel-corrected; TRL's default and what masked_whiten uses)
  * masked_whiten(x, m, shift_mean=True) = (x - mean) * rsqrt(var + 1e-8)
    shift_mean=False adds the mean back afterwards.
  * Per-token reward (compute_rewards, kl_penalty="kl"):
        kl_t = logprob_t - ref_logprob_t
        reward_t = -kl_coef * kl_t ;  reward_{last real t} += score
  * GAE (compute_advantages, whiten_rewards=False):
        values = values * mask; rewards = rewards * mask
        for t = T-1 .. 0:
            nextvalues = values[:, t+1] if t < T-1 else 0
            delta_t = rewards_t + gamma * nextvalues - values_t
            lastgaelam = delta_t + gamma * lam * lastgaelam      (lastgaelam starts at 0)
            A_t = lastgaelam
        returns = A + values            (computed BEFORE whitening)
        advantages = masked_whiten(A, mask)   (shift_mean=True)
    With right padding, positions past the end have values = rewards = 0, so A = 0 there and
    the recursion for the real tokens starts from V_T = 0, A_T = 0 at the end of each row.
  * Clipped policy loss (PPOTrainer.loss):
        ratio = exp(logprobs - old_logprobs)
        pg_losses  = -adv * ratio
        pg_losses2 = -adv * clamp(ratio, 1 - cliprange, 1 + cliprange)
        pg_loss    = masked_mean(max(pg_losses, pg_losses2), mask)
        pg_clipfrac = masked_mean(pg_losses2 > pg_losses, mask)      (strict >)
        approxkl   = 0.5 * masked_mean((logprobs - old_logprobs)^2, mask)
        policykl   = masked_mean(old_logprobs - logprobs, mask)
        k3 (extra, not in TRL 0.11) = masked_mean((ratio - 1) - log(ratio), mask)
  * Clipped value loss (PPOTrainer.loss):
        vpredclipped = clamp(vpreds, values - cliprange_value, values + cliprange_value)
        vf_losses1 = (vpreds - returns)^2 ; vf_losses2 = (vpredclipped - returns)^2
        vf_loss = 0.5 * masked_mean(max(vf_losses1, vf_losses2), mask)
        vf_clipfrac = masked_mean(vf_losses2 > vf_losses1, mask)      (strict >)
        loss = pg_loss + vf_coef * vf_loss        (vf_coef default 0.1)
  * Entropy (entropy_from_logits): H = logsumexp(logits) - sum(softmax(logits) * logits),
    reported as masked_mean(H, mask).
  * AdaptiveKLController.update(current, n_steps):
        proportional_error = clip(current / target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / horizon
        value *= mult
    (TRL calls it once per PPO step with current = mean sequence KL of the batch,
    n_steps = batch_size * num_processes.)
  * Pairwise reward-model loss (InstructGPT eq. 1; TRL RewardTrainer for K=2):
        loss = -1/C(K,2) * sum_{(w,l)} log sigmoid(r(x, y_w) - r(x, y_l)), averaged over
        prompts; accuracy = fraction of pairs with r(x, y_w) > r(x, y_l) (strict).
"""
from __future__ import annotations

import itertools
import json
import math
import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "ppo_math.json"
DT = torch.float64
B, T = 3, 5
LENGTHS = [5, 2, 4]


# ---------------------------------------------------------------------------------------
# TRL v0.11.4 trl/core.py (verbatim apart from type hints)
# ---------------------------------------------------------------------------------------
def masked_mean(values, mask, axis=None):
    """Compute mean of tensor with a masked values."""
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    else:
        return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    """Compute variance of tensor with masked values."""
    mean = masked_mean(values, mask)
    centered_values = values - mean
    variance = masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("The sum of the mask is zero")
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def masked_whiten(values, mask, shift_mean=True):
    """Whiten values with masked values."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def clip_by_value(x, tensor_min, tensor_max):
    """Tensor extension to torch.clamp (elementwise min/max with tensors)."""
    clipped = torch.max(torch.min(x, tensor_max), tensor_min)
    return clipped


def entropy_from_logits(logits):
    """Calculate entropy from logits."""
    pd = torch.nn.functional.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, axis=-1) - torch.sum(pd * logits, axis=-1)
    return entropy


def logprobs_from_logits(logits, labels):
    logp = F.log_softmax(logits, dim=2)
    return torch.gather(logp, 2, labels.unsqueeze(2)).squeeze(-1)


# ---------------------------------------------------------------------------------------
# TRL v0.11.4 trl/trainer/ppo_trainer.py: PPOTrainer.compute_rewards (kl_penalty="kl")
# ---------------------------------------------------------------------------------------
def compute_rewards(scores, logprobs, ref_logprobs, masks, kl_coef):
    rewards, non_score_rewards, kls = [], [], []
    for score, logprob, ref_logprob, mask in zip(scores, logprobs, ref_logprobs, masks):
        kl = logprob - ref_logprob
        kls.append(kl)
        non_score_reward = -kl_coef * kl
        non_score_rewards.append(non_score_reward)
        reward = non_score_reward.clone()
        last_non_masked_index = mask.nonzero()[-1]
        reward[last_non_masked_index] += score
        rewards.append(reward)
    return torch.stack(rewards), torch.stack(non_score_rewards), torch.stack(kls)


# PPOTrainer.compute_advantages (whiten_rewards=False)
def compute_advantages(values, rewards, mask, gamma, lam):
    lastgaelam = 0
    advantages_reversed = []
    gen_len = rewards.shape[-1]
    values = values * mask
    rewards = rewards * mask
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)
    returns = advantages + values
    raw = advantages
    advantages = masked_whiten(advantages, mask)
    return values, raw, advantages, returns


def gae_independent(values, rewards, lengths, gamma, lam):
    """Plain per-sequence GAE over the real tokens only (Schulman et al. 2016, eq. 16):
    A_t = sum_l (gamma*lam)^l delta_{t+l},  delta_t = r_t + gamma V_{t+1} - V_t,  V_len = 0."""
    out = torch.zeros_like(values)
    for b, n in enumerate(lengths):
        for t in range(n):
            acc = 0.0
            for l in range(n - t):
                v_next = values[b, t + l + 1].item() if t + l + 1 < n else 0.0
                delta = rewards[b, t + l].item() + gamma * v_next - values[b, t + l].item()
                acc += (gamma * lam) ** l * delta
            out[b, t] = acc
    return out


# ---------------------------------------------------------------------------------------
# PPOTrainer.loss (policy and value parts, split)
# ---------------------------------------------------------------------------------------
def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange):
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses).to(DT), mask)
    approxkl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)
    policykl = masked_mean(old_logprobs - logprobs, mask)
    # k3 (Schulman 2020): unbiased, always >= 0 per sample
    k3 = masked_mean((ratio - 1) - torch.log(ratio), mask)
    return dict(
        ratio=ratio,
        pg_losses=pg_losses,
        pg_losses2=pg_losses2,
        pg_loss=pg_loss,
        clipfrac=pg_clipfrac,
        approx_kl=approxkl,
        policy_kl=policykl,
        k3_kl=k3,
    )


def value_loss(vpreds, values, returns, mask, cliprange_value):
    vpredclipped = clip_by_value(vpreds, values - cliprange_value, values + cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = masked_mean(torch.gt(vf_losses2, vf_losses1).to(DT), mask)
    return dict(
        vpredclipped=vpredclipped,
        vf_losses1=vf_losses1,
        vf_losses2=vf_losses2,
        vf_loss=vf_loss,
        vf_clipfrac=vf_clipfrac,
    )


# ---------------------------------------------------------------------------------------
# TRL v0.11.4 trl/trainer/utils.py: AdaptiveKLController (Ziegler et al. 2019)
# ---------------------------------------------------------------------------------------
class AdaptiveKLController:
    def __init__(self, init_kl_coef, target, horizon):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current, n_steps):
        target = self.target
        proportional_error = np.clip(current / target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult
        return float(proportional_error), float(mult)


# ---------------------------------------------------------------------------------------
# Reward model loss (InstructGPT eq. 1)
# ---------------------------------------------------------------------------------------
def pairwise_rm(rewards_per_prompt):
    """rewards_per_prompt: [P][K], each row ordered best -> worst by the labeller's ranking."""
    r = torch.tensor(rewards_per_prompt, dtype=DT)
    K = r.shape[1]
    pairs = list(itertools.combinations(range(K), 2))  # (winner, loser) = (i, j), i < j
    w = torch.stack([r[:, i] for i, _ in pairs], dim=1)
    l = torch.stack([r[:, j] for _, j in pairs], dim=1)
    per_pair = -F.logsigmoid(w - l)
    loss = per_pair.mean()
    acc = (w > l).to(DT).mean()
    return dict(
        pairs=[list(p) for p in pairs],
        chosen_rewards=w,
        rejected_rewards=l,
        per_pair_loss=per_pair,
        loss=loss,
        accuracy=acc,
    )


# ---------------------------------------------------------------------------------------
def tolist(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {k: tolist(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [tolist(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def make_mask():
    m = torch.zeros(B, T, dtype=DT)
    for b, n in enumerate(LENGTHS):
        m[b, :n] = 1.0
    return m


def main() -> int:
    g = torch.Generator().manual_seed(20240601)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=DT) * scale

    mask = make_mask()
    fixture = {
        "meta": {
            "generator": "scripts/make_ppo_fixtures.py",
            "torch": torch.__version__,
            "dtype": "float64",
            "batch": B,
            "response_len": T,
            "lengths": LENGTHS,
            "note": (
                "Formulas follow TRL v0.11.4 (original PPOTrainer); see the generator's "
                "docstring. Inputs at mask==0 positions are garbage on purpose. Outputs at "
                "mask==0 positions are what TRL's code gives (e.g. advantages_whitened is "
                "non-zero there); only mask==1 positions matter downstream, so compare "
                "those unless a field says it is masked."
            ),
        }
    }

    # ---- GAE ------------------------------------------------------------------------
    logprobs = -randn(B, T, scale=1.0).abs() - 0.5
    ref_logprobs = logprobs + randn(B, T, scale=0.3)
    values = randn(B, T, scale=0.5)
    scores = randn(B, scale=1.0)
    kl_coef = 0.2
    gae_entries = []
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8)]:
        rewards, non_score, kls = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
        values_m, adv_raw, adv_white, returns = compute_advantages(values, rewards, mask, gamma, lam)
        indep = gae_independent(values * mask, rewards * mask, LENGTHS, gamma, lam)
        assert torch.allclose(indep, adv_raw, atol=1e-12, rtol=0), (indep, adv_raw)
        # masked positions: advantages and returns are exactly zero
        assert torch.all(adv_raw[mask == 0] == 0) and torch.all(returns[mask == 0] == 0)
        gae_entries.append(
            {
                "name": f"gae_gamma{gamma}_lam{lam}",
                "inputs": {
                    "kl_coef": kl_coef,
                    "gamma": gamma,
                    "lam": lam,
                    "scores": scores,
                    "logprobs": logprobs,
                    "ref_logprobs": ref_logprobs,
                    "values": values,
                    "mask": mask,
                },
                "outputs": {
                    "kl_masked": kls * mask,
                    "non_score_rewards_masked": non_score * mask,
                    "rewards_masked": rewards * mask,
                    "values_masked": values_m,
                    "advantages": adv_raw,
                    "returns": returns,
                    "advantages_whitened": adv_white,
                },
            }
        )
    fixture["gae"] = gae_entries

    # ---- masked whiten ------------------------------------------------------------------
    x = randn(B, T, scale=2.0) + 0.7
    whiten_entries = [
        {
            "name": "masked_whiten_random",
            "inputs": {"values": x, "mask": mask},
            "outputs": {
                "mean": masked_mean(x, mask),
                "var_unbiased": masked_var(x, mask, unbiased=True),
                "var_biased": masked_var(x, mask, unbiased=False),
                "whitened": masked_whiten(x, mask, shift_mean=True),
                "whitened_keep_mean": masked_whiten(x, mask, shift_mean=False),
            },
        }
    ]
    fixture["masked_whiten"] = whiten_entries

    # ---- clipped policy loss ----------------------------------------------------------
    pl_entries = []
    for name, cliprange, scale in [("policy_loss_clip0.2", 0.2, 0.3), ("policy_loss_clip0.1", 0.1, 0.15)]:
        old = -randn(B, T).abs() - 0.3
        new = old + randn(B, T, scale=scale)
        adv = randn(B, T)
        out = policy_loss(new, old, adv, mask, cliprange)
        clip_n = float(out["clipfrac"] * mask.sum())
        assert 0 < clip_n < mask.sum(), f"{name}: want some but not all tokens clipped, got {clip_n}"
        pl_entries.append(
            {
                "name": name,
                "inputs": {
                    "cliprange": cliprange,
                    "logprobs_new": new,
                    "logprobs_old": old,
                    "advantages": adv,
                    "mask": mask,
                },
                "outputs": out,
            }
        )
    fixture["policy_loss"] = pl_entries

    # ---- clipped value loss -------------------------------------------------------------
    vl_entries = []
    for name, crv, dev in [("value_loss_clip0.2", 0.2, 0.4), ("value_loss_clip0.5", 0.5, 0.9)]:
        vals = randn(B, T, scale=0.5)
        vpred = vals + randn(B, T, scale=dev)
        rets = vals + randn(B, T, scale=0.6)
        out = value_loss(vpred, vals, rets, mask, crv)
        assert 0 < float(out["vf_clipfrac"]) < 1, name
        vl_entries.append(
            {
                "name": name,
                "inputs": {
                    "cliprange_value": crv,
                    "vpred": vpred,
                    "values": vals,
                    "returns": rets,
                    "mask": mask,
                },
                "outputs": out,
            }
        )
    fixture["value_loss"] = vl_entries

    # ---- entropy (and log-probs of labels) ----------------------------------------------
    V = 7
    logits = randn(B, T, V, scale=2.0)
    labels = torch.randint(0, V, (B, T), generator=g)
    ent = entropy_from_logits(logits)
    # independent check: -sum p log p
    p = torch.softmax(logits, -1)
    assert torch.allclose(ent, -(p * torch.log(p)).sum(-1), atol=1e-12)
    fixture["entropy"] = [
        {
            "name": "entropy_v7",
            "inputs": {"logits": logits, "labels": labels, "mask": mask},
            "outputs": {
                "entropy": ent,
                "entropy_masked_mean": masked_mean(ent, mask),
                "logprobs": logprobs_from_logits(logits, labels),
            },
        }
    ]

    # ---- adaptive KL controller ---------------------------------------------------------
    init, target, horizon, n_steps = 0.2, 6.0, 10000, 256
    current_kls = [3.0, 6.0, 7.5, 12.0, 0.0, 6.9]
    ctl = AdaptiveKLController(init, target, horizon)
    values_after, errs, mults = [], [], []
    for kl in current_kls:
        e, m = ctl.update(kl, n_steps)
        errs.append(e)
        mults.append(m)
        values_after.append(float(ctl.value))
    # hand check of the first step: error clipped to -0.2 -> mult = 1 - 0.2*256/10000
    assert math.isclose(values_after[0], 0.2 * (1 - 0.2 * 256 / 10000), rel_tol=1e-15)
    fixture["adaptive_kl"] = [
        {
            "name": "adaptive_kl_6_updates",
            "inputs": {
                "init_kl_coef": init,
                "target": target,
                "horizon": horizon,
                "n_steps": n_steps,
                "current_kl": current_kls,
            },
            "outputs": {
                "proportional_error": errs,
                "mult": mults,
                "kl_coef_after_each_update": values_after,
            },
        }
    ]

    # ---- pairwise reward-model loss -----------------------------------------------------
    rm_entries = []
    # one prompt, K=4, one mis-ordered pair (ranks 1 and 2)
    k4 = [[1.3, 0.2, 0.5, -0.7]]
    # two prompts, K=4 (12 pairs); mean over all pairs of all prompts
    k4x2 = [[1.3, 0.2, 0.5, -0.7], [-0.25, -1.5, 0.75, -2.0]]
    # K=2, a batch of 3 chosen/rejected pairs (TRL RewardTrainer shape)
    k2 = [[0.8, -0.1], [0.0, 0.4], [2.5, 2.0]]
    for name, r in [("rm_k4_one_prompt", k4), ("rm_k4_two_prompts", k4x2), ("rm_k2_batch3", k2)]:
        out = pairwise_rm(r)
        rm_entries.append({"name": name, "inputs": {"rewards_ranked_best_first": r}, "outputs": out})
    assert math.isclose(rm_entries[0]["outputs"]["accuracy"].item(), 5 / 6)
    fixture["reward_pairwise"] = rm_entries

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(tolist(fixture), indent=1) + "\n", encoding="utf-8")
    n = sum(len(v) for k, v in fixture.items() if k != "meta")
    print(f"wrote {n} entries to {OUT.relative_to(ROOT)} (torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
