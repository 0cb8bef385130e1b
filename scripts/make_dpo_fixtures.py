#!/usr/bin/env python3
"""Writes the DPO stage's reference fixtures by running TRL's and transformers' own code.

    /work/venv/bin/python scripts/make_dpo_fixtures.py      # or .venv/bin/python (setup_venv.sh)

1. tests/fixtures/dpo_losses.json: the preference losses and implicit rewards of every
   `dpo.loss_type` candor has, computed by TRL's trainer code on fixed log-probs (float64):

   * `sigmoid`, `hinge`, `ipo` and RPO's NLL term (`sft`): `DPOTrainer._compute_loss`
     (trl/trainer/dpo_trainer.py) called on a stand-in `self` and a stand-in model whose
     per-token log-probs are fixed (TRL's fused LM head returns `log_probs`; ours are
     `selective_log_softmax` of fixed random logits), with precomputed reference log-probs.
     RPO is TRL's `loss_type=["sigmoid", "sft"]`, `loss_weights=[1, sft_coef]`.
   * `sigmoid` with `label_smoothing` (conservative DPO) and `simpo`: TRL 1.x's DPOTrainer
     dropped label smoothing from `sigmoid` (its `robust` is another estimator) and never had
     SimPO; both live in `CPOTrainer.cpo_loss` (trl/experimental/cpo). cDPO is that
     function's `sigmoid` applied to the log-ratios (it reads only chosen − rejected);
     SimPO is its `simpo` on the length-averaged log-probs that `CPOTrainer.get_batch_logps`
     (average_log_prob=True) computes from the same logits.

   Each case: the inputs candor's loss functions take per pair (sums of the response's
   token log-probs under policy and reference, response lengths), and TRL's per-pair loss
   (a batch of one pair), chosen/rejected rewards, and the whole batch's loss, accuracy,
   margin and mean log-probs.

2. tests/fixtures/dpo_logps.json: sequence log-probs of prompt/response exchanges under
   tests/fixtures/parity/candor-lm (a candor-made Llama with a ChatML template) computed by
   transformers. The exchange is tokenised as TRL's DPOTrainer does for conversational data
   (`trl.data_utils._tokenize` with the chat template: the prompt with the generation prompt,
   then prompt + assistant turn, the completion being the difference), and the per-token
   log-probs of the completion come from `LlamaForCausalLM`'s logits. TRL's completion ends
   with the newline the template writes after `<|im_end|>`; candor scores the response up
   to and including its end-of-turn token (what a policy generates before it stops), so the
   fixture also records where `<|im_end|>` is.
"""

import json
import os
import types
from collections import defaultdict

import torch
import transformers
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.data_utils import _tokenize
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.utils import selective_log_softmax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

torch.set_default_dtype(torch.float64)


class Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def gather_for_metrics(x):
        return x


def make_batch(seed, lengths, prompt_len=3, vocab=11, logit_scale=2.0):
    """Random logits over a small vocabulary and random tokens; rows are [chosen..., rejected...]
    with the given completion lengths, right-padded to one width."""
    g = torch.Generator().manual_seed(seed)
    width = prompt_len + max(lengths)
    n = len(lengths)
    input_ids = torch.randint(1, vocab, (n, width), generator=g)
    completion_mask = torch.zeros(n, width, dtype=torch.long)
    attention_mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        completion_mask[i, prompt_len:prompt_len + length] = 1
        attention_mask[i, :prompt_len + length] = 1
    logits = torch.randn(n, width, vocab, generator=g) * logit_scale
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    # what TRL's fused LM head returns as `log_probs`: the shifted label log-probs, 0 where ignored
    shifted = labels[:, 1:].clone()
    mask = shifted != -100
    shifted[~mask] = 0
    log_probs = selective_log_softmax(logits[:, :-1, :], shifted) * mask
    return dict(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask,
                logits=logits, labels=labels, log_probs=log_probs)


def dpo_stub(loss_types, loss_weights, beta, label_smoothing=0.0):
    """A stand-in `self` with the attributes `DPOTrainer._compute_loss` reads."""
    s = types.SimpleNamespace()
    s.model = types.SimpleNamespace(training=True)
    s.accelerator = Accelerator()
    s.aux_loss_enabled = False
    s.ld_alpha = None
    s.precompute_ref_logps = True
    s.f_divergence_type = "reverse_kl"
    s.loss_types = loss_types
    s.loss_weights = loss_weights
    s.beta = beta
    s.label_smoothing = label_smoothing
    s.use_weighting = False
    s._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    s._total_train_tokens = 0
    s._tp_size = 1
    s.args = types.SimpleNamespace()
    return s


def fake_model(log_probs):
    def forward(**kwargs):
        n, w = log_probs.shape
        return types.SimpleNamespace(
            log_probs=log_probs,
            entropy=torch.zeros(n, w),
            mean_logits=torch.zeros(n, w),
            is_top1=torch.zeros(n, w, dtype=torch.bool),
        )
    return forward


def rows(batch, idx):
    return {k: v[idx] for k, v in batch.items()}


def trl_dpo(batch, ref_c, ref_r, loss_types, loss_weights, beta):
    """DPOTrainer._compute_loss on a [chosen..., rejected...] batch: (loss, metrics)."""
    stub = dpo_stub(loss_types, loss_weights, beta)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    inputs["ref_chosen_logps"] = ref_c
    inputs["ref_rejected_logps"] = ref_r
    loss = DPOTrainer._compute_loss(stub, fake_model(batch["log_probs"]), inputs, False)
    m = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return float(loss), m


def cpo_stub(loss_type, beta, label_smoothing, simpo_gamma=0.5):
    s = types.SimpleNamespace()
    s.alpha = 0.0
    s.accelerator = Accelerator()
    s.loss_type = loss_type
    s.beta = beta
    s.label_smoothing = label_smoothing
    s.simpo_gamma = simpo_gamma
    return s


def losses_case(name, batch_seed, lengths_c, lengths_r, ref_shift, cfg):
    """One fixture case: P pairs, chosen i against rejected i."""
    p = len(lengths_c)
    batch = make_batch(batch_seed, lengths_c + lengths_r)
    g = torch.Generator().manual_seed(batch_seed + 1000)
    seq = batch["log_probs"].sum(dim=1)  # (2P,) policy sums, what TRL's `logps` are
    lens = batch["completion_mask"].sum(dim=1).to(torch.float64)
    ref = seq + ref_shift * torch.randn(2 * p, generator=g)  # reference sums near the policy's
    pc, pr, rc, rr = seq[:p], seq[p:], ref[:p], ref[p:]
    loss_type, beta = cfg["loss_type"], cfg["beta"]
    ls, gamma, sft_coef = cfg.get("label_smoothing", 0.0), cfg.get("simpo_gamma", 0.0), cfg.get("sft_coef", 0.0)
    per_pair, chosen_rewards, rejected_rewards = [], [], []
    if loss_type in ("sigmoid", "hinge", "ipo") and ls == 0.0:
        for i in range(p):
            sub = rows(batch, torch.tensor([i, p + i]))
            loss, m = trl_dpo(sub, rc[i:i + 1], rr[i:i + 1], [loss_type], [1.0], beta)
            per_pair.append(loss)
            chosen_rewards.append(m["rewards/chosen"])
            rejected_rewards.append(m["rewards/rejected"])
        types_, weights = ([loss_type, "sft"], [1.0, sft_coef]) if sft_coef else ([loss_type], [1.0])
        loss, m = trl_dpo(batch, rc, rr, types_, weights, beta)
        whole = dict(loss=loss, accuracy=m["rewards/accuracies"], margin=m["rewards/margins"],
                     logps_chosen=m["logps/chosen"], logps_rejected=m["logps/rejected"],
                     reward_chosen=m["rewards/chosen"], reward_rejected=m["rewards/rejected"])
        source = "trl.trainer.dpo_trainer.DPOTrainer._compute_loss"
    else:
        assert sft_coef == 0.0
        if loss_type == "sigmoid":  # conservative DPO: cpo_loss reads only chosen − rejected
            stub = cpo_stub("sigmoid", beta, ls)
            losses, cr, rj = CPOTrainer.cpo_loss(stub, pc - rc, pr - rr)
            a_c, a_r = pc, pr
            source = "trl.experimental.cpo.cpo_trainer.CPOTrainer.cpo_loss (loss_type='sigmoid') on log-ratios"
        elif loss_type == "simpo":
            stub = cpo_stub("simpo", beta, ls, gamma)
            avg = CPOTrainer.get_batch_logps(batch["logits"], batch["labels"].clone(), average_log_prob=True)
            a_c, a_r = avg[:p], avg[p:]
            losses, cr, rj = CPOTrainer.cpo_loss(stub, a_c, a_r)
            source = "trl.experimental.cpo.cpo_trainer.CPOTrainer.get_batch_logps(average_log_prob=True) + cpo_loss (loss_type='simpo')"
        else:
            raise ValueError(loss_type)
        per_pair = losses.tolist()
        chosen_rewards, rejected_rewards = cr.tolist(), rj.tolist()
        whole = dict(loss=float(losses.mean()), accuracy=float((cr > rj).double().mean()),
                     margin=float((cr - rj).mean()), logps_chosen=float(a_c.mean()),
                     logps_rejected=float(a_r.mean()), reward_chosen=float(cr.mean()),
                     reward_rejected=float(rj.mean()))
    return {
        "name": name,
        "source": source,
        "config": dict(loss_type=loss_type, beta=beta, label_smoothing=ls, simpo_gamma=gamma, sft_coef=sft_coef),
        "inputs": {
            "policy_chosen": pc.tolist(), "policy_rejected": pr.tolist(),
            "reference_chosen": rc.tolist(), "reference_rejected": rr.tolist(),
            "len_chosen": lens[:p].tolist(), "len_rejected": lens[p:].tolist(),
        },
        "outputs": {"per_pair_loss": per_pair, "chosen_rewards": chosen_rewards,
                    "rejected_rewards": rejected_rewards, **whole},
    }


def write_losses():
    lc, lr = [5, 2, 7, 4, 6, 3], [3, 6, 7, 1, 5, 4]
    cases = [
        losses_case("sigmoid_beta0.1", 1, lc, lr, 2.0, dict(loss_type="sigmoid", beta=0.1)),
        losses_case("sigmoid_beta5_large_margins", 2, lc, lr, 12.0, dict(loss_type="sigmoid", beta=5.0)),
        losses_case("cdpo_beta0.5_ls0.2", 3, lc, lr, 2.0, dict(loss_type="sigmoid", beta=0.5, label_smoothing=0.2)),
        losses_case("ipo_beta0.1", 4, lc, lr, 2.0, dict(loss_type="ipo", beta=0.1)),
        losses_case("ipo_beta1", 5, lc, lr, 2.0, dict(loss_type="ipo", beta=1.0)),
        losses_case("hinge_beta0.1", 6, lc, lr, 2.0, dict(loss_type="hinge", beta=0.1)),
        losses_case("hinge_beta2", 7, lc, lr, 2.0, dict(loss_type="hinge", beta=2.0)),
        losses_case("simpo_beta2_gamma0.5", 8, lc, lr, 0.0, dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5)),
        losses_case("simpo_beta2.5_gamma1.4_ls0.1", 9, lc, lr, 0.0,
                    dict(loss_type="simpo", beta=2.5, simpo_gamma=1.4, label_smoothing=0.1)),
        losses_case("rpo_sigmoid_beta0.1_sft1", 10, lc, lr, 2.0, dict(loss_type="sigmoid", beta=0.1, sft_coef=1.0)),
        losses_case("rpo_sigmoid_beta0.3_sft0.5", 11, lc, lr, 2.0, dict(loss_type="sigmoid", beta=0.3, sft_coef=0.5)),
    ]
    # cDPO through cpo_loss agrees with DPOTrainer's sigmoid when label_smoothing is 0
    c = losses_case("check", 1, lc, lr, 2.0, dict(loss_type="sigmoid", beta=0.1))
    stub = cpo_stub("sigmoid", 0.1, 0.0)
    i = c["inputs"]
    t = lambda k: torch.tensor(i[k])
    l, _, _ = CPOTrainer.cpo_loss(stub, t("policy_chosen") - t("reference_chosen"),
                                  t("policy_rejected") - t("reference_rejected"))
    assert torch.allclose(l, torch.tensor(c["outputs"]["per_pair_loss"]), atol=1e-12, rtol=0)
    out = {
        "meta": {"trl": trl.__version__, "torch": torch.__version__, "dtype": "float64",
                 "script": "scripts/make_dpo_fixtures.py"},
        "cases": cases,
    }
    path = os.path.join(FIXTURES, "dpo_losses.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {path} ({len(cases)} cases)")


def write_logps():
    model_dir = os.path.join(FIXTURES, "parity", "candor-lm")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    exchanges = [
        ("Tell me a fortune.", "You will find a penny."),
        ("Why?", "Because the sea is wide and the night is long, my friend."),
        ("Say nothing", ""),
        ("What is 2 + 2?", "4"),
    ]
    out = []
    for prompt, response in exchanges:
        msgs = [{"role": "user", "content": prompt}]
        prompt_ids = _tokenize(tok, msgs, add_generation_prompt=True)["input_ids"]
        full_ids = _tokenize(tok, msgs + [{"role": "assistant", "content": response}])["input_ids"]
        assert full_ids[:len(prompt_ids)] == prompt_ids, "prompt is a prefix (ChatML)"
        completion = full_ids[len(prompt_ids):]
        ids = torch.tensor([full_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].to(torch.float64)
        logps = torch.log_softmax(logits, dim=-1)
        start = len(prompt_ids)
        token_logps = [float(logps[start - 1 + j, t]) for j, t in enumerate(completion)]
        eot = completion.index(im_end)
        out.append({
            "prompt": prompt,
            "response": response,
            "prompt_ids": prompt_ids,
            "completion_ids": completion,
            "completion_logps": token_logps,
            "end_of_turn_index": eot,
            "logp_through_end_of_turn": sum(token_logps[:eot + 1]),
            "logp_trl_completion": sum(token_logps),
        })
    doc = {
        "meta": {"model": "tests/fixtures/parity/candor-lm", "transformers": transformers.__version__,
                 "trl": trl.__version__, "torch": torch.__version__, "dtype": "float32 model, float64 log_softmax",
                 "script": "scripts/make_dpo_fixtures.py"},
        "exchanges": out,
    }
    path = os.path.join(FIXTURES, "dpo_logps.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {path} ({len(out)} exchanges)")


if __name__ == "__main__":
    write_losses()
    write_logps()
