#!/usr/bin/env python3
"""Run TRL's own GRPO code on fixed inputs and write tests/fixtures/grpo_math.json.

candor-grpo's unit tests (crates/candor-grpo/src/math.rs) compare its group advantages and
losses with these numbers at 1e-6. Nothing here re-derives a formula:

* advantages: the block of `GRPOTrainer._generate_and_score_completions` that turns rewards
  into advantages (from `rewards_per_func = self._calculate_rewards(...)` to
  `advantages = torch.nan_to_num(...)`) is cut out of TRL's installed source and executed
  with a stub `self` holding the config attributes it reads; the same for the leave-one-out
  block of `RLOOTrainer`. REINFORCE++-baseline (group mean subtracted, then whitened over
  the batch) is TRL's GRPO block with `scale_rewards="none"` followed by RLOOTrainer's
  batch-normalisation line (`normalize_advantages=True`), both cut from TRL's source.
* losses: the unbound `GRPOTrainer._compute_loss` is called with a stub `self` whose
  `_get_per_token_logps_and_entropies` returns the fixed per-token log-probs (a float64 leaf
  tensor, so the gradient TRL's loss gives it is recorded too), for every `loss_type`,
  clip-higher (`epsilon_high`), `importance_sampling_level` token and sequence, `beta` 0 and
  > 0 (k3 KL), and a truncated (fully masked) row.
* the soft overlong penalty: `trl.rewards.get_soft_overlong_punishment`.

Usage: /work/venv/bin/python scripts/grpo_reference.py  (TRL version recorded in the fixture)
"""

import collections
import inspect
import json
import os
import textwrap
import types

import torch
import trl
from trl.rewards import get_soft_overlong_punishment
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.rloo_trainer import RLOOTrainer
from trl.trainer.utils import nanstd

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "grpo_math.json")


def source_block(method, start, end):
    """The lines of `method`'s source from the one containing `start` through the one
    containing `end`, dedented."""
    lines = inspect.getsource(method).splitlines()
    i = next(k for k, l in enumerate(lines) if start in l)
    j = next(k for k in range(i, len(lines)) if end in lines[k])
    return textwrap.dedent("\n".join(lines[i : j + 1]))


GRPO_ADV = source_block(
    GRPOTrainer._generate_and_score_completions,
    "rewards_per_func = self._calculate_rewards(",
    "advantages = torch.nan_to_num(advantages, nan=0.0)",
)
RLOO_ADV = source_block(
    RLOOTrainer._generate_and_score_completions,
    "rewards_per_func = self._calculate_rewards(",
    "advantages = torch.nan_to_num(advantages, nan=0.0)",
)
RLOO_NORMALIZE = source_block(
    RLOOTrainer._generate_and_score_completions,
    "if self.normalize_advantages:",
    "advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)",
)


def run_block(code, self, rewards, extra=None):
    scope = {
        "self": self,
        "torch": torch,
        "nanstd": nanstd,
        "inputs": None,
        "prompts": None,
        "completions": None,
        "completion_ids_list": None,
        "device": "cpu",
        "mode": "train",
        "gather": lambda x: x,
    }
    scope.update(extra or {})
    self._calculate_rewards = lambda *a: rewards.unsqueeze(1).clone()
    exec(code, scope)
    return scope


def stub(**attrs):
    s = types.SimpleNamespace(**attrs)
    s.reward_weights = torch.tensor([1.0])
    return s


def advantages_case(rewards, group_size):
    r = torch.tensor(rewards)
    out = {"rewards": rewards, "group_size": group_size}
    for scale in ["group", "batch", "none"]:
        s = stub(
            num_generations=group_size,
            scale_rewards=scale,
            multi_objective_aggregation="sum_then_normalize",
        )
        sc = run_block(GRPO_ADV, s, r)
        out[f"grpo_{scale}"] = sc["advantages"].tolist()
        if scale == "group":
            out["zero_spread"] = sc["is_std_zero"].tolist()
    s = stub(num_generations=group_size, reward_clip_range=None, beta=0.0, normalize_advantages=False)
    out["rloo"] = run_block(RLOO_ADV, s, r)["advantages"].tolist()
    # REINFORCE++-baseline: TRL's group-mean block (no scaling), then RLOO's batch whitening
    s = stub(
        num_generations=group_size,
        scale_rewards="none",
        multi_objective_aggregation="sum_then_normalize",
    )
    centred = run_block(GRPO_ADV, s, r)["advantages"]
    s = stub(normalize_advantages=True)
    out["reinforce_pp"] = run_block(RLOO_NORMALIZE, s, None, {"advantages": centred.clone()})[
        "advantages"
    ].tolist()
    return out


class Accelerator:
    num_processes = 1

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def loss_case(inputs, loss_type, level, epsilon, epsilon_high, beta, max_len):
    logps = torch.tensor(inputs["logprobs"], requires_grad=True)
    entropies = torch.ones_like(logps)
    mask = torch.tensor(inputs["mask"])
    b, t = logps.shape
    s = types.SimpleNamespace(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        accelerator=Accelerator(),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
    )
    s._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    batch = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": torch.tensor(inputs["advantages"]),
        "old_per_token_logps": torch.tensor(inputs["old_logprobs"]),
        "ref_per_token_logps": torch.tensor(inputs["ref_logprobs"]),
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(s, None, batch)
    loss.backward()
    m = s._metrics["train"]
    return {
        "loss_type": loss_type,
        "importance_sampling_level": level,
        "epsilon": epsilon,
        "epsilon_high": epsilon_high,
        "beta": beta,
        "max_completion_length": max_len,
        "loss": loss.item(),
        "grad_logprobs": logps.grad.tolist(),
        "kl": m["kl"][0] if beta != 0.0 else None,
        "clip_low": m["clip_ratio/low_mean"][0],
        "clip_high": m["clip_ratio/high_mean"][0],
        "clip_region": m["clip_ratio/region_mean"][0],
    }


def loss_inputs():
    b, t = 6, 7
    lengths = [7, 3, 5, 1, 6, 0]  # the last row truncated and masked out whole
    mask = [[1.0 if j < n else 0.0 for j in range(t)] for n in lengths]
    old = -2.0 + 0.5 * torch.randn(b, t)
    new = old + 0.3 * torch.randn(b, t)  # ratios from about 0.4 to 2.5: some clip, some not
    ref = old + 0.2 * torch.randn(b, t)
    adv = torch.tensor([1.3, -0.7, 0.4, -1.5, 0.9, 0.6])
    return {
        "logprobs": new.tolist(),
        "old_logprobs": old.tolist(),
        "ref_logprobs": ref.tolist(),
        "advantages": adv.tolist(),
        "mask": mask,
    }


def main():
    adv_cases = [
        # 3 groups of 4: mixed, all equal (zero spread), binary
        advantages_case([1.0, 0.0, 0.5, 2.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0], 4),
        advantages_case([0.3, -1.2, 2.5, 0.7, 0.7, 0.1], 2),
        advantages_case(torch.randn(12).tolist(), 6),
    ]
    inputs = loss_inputs()
    loss_cases = []
    for loss_type in ["grpo", "bnpo", "dr_grpo", "dapo"]:
        for level in ["token", "sequence"]:
            for eps, eps_high, beta in [(0.2, 0.2, 0.0), (0.2, 0.28, 0.04)]:
                loss_cases.append(loss_case(inputs, loss_type, level, eps, eps_high, beta, 7))
    punish = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=8)
    lengths = [0, 5, 12, 13, 16, 19, 20, 25]
    overlong = {
        "max_completion_len": 20,
        "soft_punish_cache": 8,
        "lengths": lengths,
        "penalty": punish([[1] * n for n in lengths]),
    }
    fixture = {
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "advantages": adv_cases,
        "loss_inputs": inputs,
        "losses": loss_cases,
        "soft_overlong": overlong,
    }
    with open(OUT, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT)}: {len(adv_cases)} advantage cases, {len(loss_cases)} loss cases (TRL {trl.__version__})")


if __name__ == "__main__":
    main()
