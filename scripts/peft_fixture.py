#!/usr/bin/env python3
"""Writes tests/fixtures/lora/: LoRA adapters in PEFT's format, both ways, with PEFT's
outputs, for crates/candor-model/tests/lora.rs.

    /work/venv/bin/python scripts/peft_fixture.py        # torch, transformers, peft 0.21

Part 1, PEFT -> candor. On the small random-weight checkpoints of tests/fixtures/parity/
(made by scripts/make_parity_fixtures.py), PEFT's `get_peft_model` adds adapters whose
A and B are then drawn at random (B non-zero, so the adapters change the outputs), and
`save_pretrained` writes the adapter directory:

    peft-llama        llama-tied, CAUSAL_LM, target_modules all-linear, r 4, alpha 12
    peft-gpt2         gpt2, CAUSAL_LM, c_attn c_proj c_fc (Conv1D: fan_in_fan_out), r 2, alpha 3
    peft-llama-score  llama-tied as LlamaForSequenceClassification (a new score head, which
                      PEFT saves whole: modules_to_save), SEQ_CLS, q_proj v_proj, r 4,
                      alpha 8, rsLoRA (scale alpha/sqrt(r))

Part 2, candor -> PEFT. tests/fixtures/lora/candor-sft is an adapter `candor sft` trained
with `train.lora` on tests/fixtures/parity/candor-lm, and tests/fixtures/lora/candor-reward
one `candor reward` trained (adapters and a new score head, SEQ_CLS) on the same base,
from a few preference pairs written here (both made when absent, --remake-candor to
redo); PEFT loads each onto that base with `PeftModel.from_pretrained` (every tensor must
be used) and its logits (the reward model: its score at every position) are written
beside it.

Each directory gets reference.safetensors: input_ids (B, T) i64 and logits (B, T, V) f32
(for the score adapter: scores (B, T) f32). The adapters' base_model_name_or_path is
rewritten to the base's path relative to the adapter directory (PEFT records the absolute
path it loaded from), which is how candor resolves it wherever the repository lies.
"""
import argparse
import json
import os
import shutil
import subprocess
import tempfile

import peft
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY = os.path.join(ROOT, "tests", "fixtures", "parity")
OUT = os.path.join(ROOT, "tests", "fixtures", "lora")

torch.set_grad_enabled(False)


def input_ids(vocab):
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, vocab, (2, 9), generator=g)


def relative_base(adapter_dir, base_dir):
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = os.path.relpath(base_dir, adapter_dir)
    if isinstance(cfg.get("target_modules"), list):  # PEFT writes a set: make reruns identical
        cfg["target_modules"] = sorted(cfg["target_modules"])
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def peft_to_candor(name, base, lora, score=False, seed=0):
    base_dir = os.path.join(PARITY, base)
    out = os.path.join(OUT, name)
    torch.manual_seed(seed)
    if score:
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = 0
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, lora)
    g = torch.Generator().manual_seed(seed + 1)
    n = 0
    for pname, p in model.named_parameters():
        if "lora_A" in pname or "lora_B" in pname:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            n += 1
        elif "modules_to_save" in pname:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    assert n > 0
    if os.path.exists(out):
        shutil.rmtree(out)
    model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))  # PEFT's model card template, not needed
    relative_base(out, base_dir)
    model.eval()
    ids = input_ids(model.config.vocab_size)
    tensors = {"input_ids": ids}
    if score:
        # the score head at every position (transformers pools the last one)
        hidden = model.base_model.model.model(input_ids=ids).last_hidden_state
        tensors["scores"] = model.base_model.model.score(hidden)[..., 0].contiguous()
    else:
        tensors["logits"] = model(input_ids=ids).logits.contiguous()
    save_file(tensors, os.path.join(out, "reference.safetensors"))
    print(f"{name}: {n} adapter tensors, reference written")


def candor_to_peft(remake):
    base_dir = os.path.join(PARITY, "candor-lm")
    out = os.path.join(OUT, "candor-sft")
    if remake and os.path.exists(out):
        shutil.rmtree(out)
    if not os.path.exists(out):
        with tempfile.TemporaryDirectory() as tmp:
            run = os.path.join(tmp, "run")
            subprocess.run(["cargo", "run", "-q", "-p", "candor-cli", "--bin", "candor", "--", "sft",
                            "--config", "configs/tiny/sft.yaml", "--init", base_dir, "--out", run,
                            "--set", "train.steps=4", "--set", "train.batch_size=4", "--set", "train.lr=0.01",
                            "--set", "train.eval_every=0", "--set", "train.lora.rank=4",
                            "--set", "train.lora.alpha=8", "--set", "train.lora.target_modules=[all-linear]"],
                           cwd=ROOT, check=True)
            os.makedirs(out)
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy(os.path.join(run, f), out)
        relative_base(out, base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    # every tensor of the file must have found its place in the model
    from peft.utils import load_peft_weights
    saved = load_peft_weights(out)
    state = model.state_dict()
    missing = [k for k in saved if k.replace(".weight", ".default.weight") not in state]
    assert not missing, f"PEFT did not use {missing}"
    b_norm = sum(p.abs().sum().item() for n, p in model.named_parameters() if "lora_B" in n)
    assert b_norm > 0, "the candor adapter's B matrices are all zero (nothing was trained)"
    model.eval()
    ids = input_ids(model.config.vocab_size)
    logits = model(input_ids=ids).logits.contiguous()
    with model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    assert (logits - base_logits).abs().max() > 1e-4, "the adapter changes nothing"
    save_file({"input_ids": ids, "logits": logits}, os.path.join(out, "reference.safetensors"))
    print(f"candor-sft: PEFT {peft.__version__} loaded {len(saved)} tensors, reference written")


def candor_reward_to_peft(remake):
    base_dir = os.path.join(PARITY, "candor-lm")
    out = os.path.join(OUT, "candor-reward")
    if remake and os.path.exists(out):
        shutil.rmtree(out)
    if not os.path.exists(out):
        with tempfile.TemporaryDirectory() as tmp:
            pairs = os.path.join(tmp, "pairs.jsonl")
            with open(pairs, "w") as f:
                for i in range(16):
                    f.write(json.dumps({"prompt": f"day {i}", "chosen": "a good and kind day",
                                        "rejected": "a bad and cruel day"}) + "\n")
            run = os.path.join(tmp, "run")
            subprocess.run(["cargo", "run", "-q", "-p", "candor-cli", "--bin", "candor", "--", "reward",
                            "--config", "configs/tiny/reward.yaml", "--init", base_dir, "--out", run,
                            "--set", f"data.files=[{pairs}]", "--set", "data.heldout=null",
                            "--set", "data.heldout_fraction=0.25", "--set", "train.steps=4",
                            "--set", "train.lr=0.01", "--set", "train.eval_every=0",
                            "--set", "train.lora.rank=2", "--set", "train.lora.alpha=4"],
                           cwd=ROOT, check=True)
            os.makedirs(out)
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy(os.path.join(run, f), out)
        relative_base(out, base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    from peft.utils import load_peft_weights
    saved = load_peft_weights(out)
    state = model.state_dict()
    missing = [k for k in saved
               if k.replace(".weight", ".default.weight") not in state
               and k.replace("score.weight", "score.modules_to_save.default.weight") not in state]
    assert not missing, f"PEFT did not use {missing}"
    model.eval()
    ids = input_ids(model.config.vocab_size)
    inner = model.base_model.model
    hidden = inner.model(input_ids=ids).last_hidden_state
    scores = inner.score(hidden)[..., 0].contiguous()
    assert torch.allclose(inner.score.modules_to_save["default"].weight,
                          saved["base_model.model.score.weight"]), "PEFT did not load candor's score head"
    save_file({"input_ids": ids, "scores": scores}, os.path.join(out, "reference.safetensors"))
    print(f"candor-reward: PEFT {peft.__version__} loaded {len(saved)} tensors (SEQ_CLS), reference written")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--remake-candor", action="store_true")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    peft_to_candor("peft-llama", "llama-tied",
                   LoraConfig(r=4, lora_alpha=12, target_modules="all-linear", task_type="CAUSAL_LM"))
    peft_to_candor("peft-gpt2", "gpt2",
                   LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj", "c_fc"],
                              fan_in_fan_out=True, task_type="CAUSAL_LM"), seed=1)
    peft_to_candor("peft-llama-score", "llama-tied",
                   LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                              task_type="SEQ_CLS"), score=True, seed=2)
    candor_to_peft(args.remake_candor)
    candor_reward_to_peft(args.remake_candor)


if __name__ == "__main__":
    main()
