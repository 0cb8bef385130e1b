#!/usr/bin/env python3
"""A real checkpoint's training step and generation: candor (`candor bench --model`) and
PyTorch + transformers (+ PEFT for the LoRA rows) side by side in one run, on the same
checkpoint directory, batch and sequence length, 2 threads each.

    /work/venv/bin/python scripts/bench/model_twin.py --model .cache/smollm2/model \
        [--batch 4] [--seq-len 256] [--steps 3] [--warmup 1] [--prompt-len 32] \
        [--new-tokens 64] [--rows train,train-ckpt,lora,lora-ckpt,generate] \
        [--candor target/debug/candor] [--json-out FILE]

Rows (each side runs each row in a process of its own, so a row's peak resident memory,
VmHWM, is its own; the two sides alternate row by row, so both see the same background load):
  train       optimiser steps on `batch` random sequences of `seq_len` predicted tokens:
              forward, next-token cross-entropy over all of them, backward, clip 1.0, AdamW
              (lr 1e-5, betas (0.9, 0.95), eps 1e-8, weight decay 0.1); full weights, f32.
              PyTorch: AutoModelForCausalLM (its default SDPA attention), torch.optim.AdamW.
  train-ckpt  the same with gradient checkpointing (candor: `train.gradient_checkpointing`;
              transformers: `gradient_checkpointing_enable(use_reentrant=False)`).
  lora        PEFT LoRA r=16, alpha 32, dropout 0 on q/k/v/o/gate/up/down_proj, only the
              adapters trained (candor: `train.lora` {rank 16, alpha 32, all-linear}, the
              same optimiser); `lora-ckpt` with gradient checkpointing. A row an older
              `candor bench` lacks shows as "—".
  generate    `batch` prompts of `prompt_len` random tokens, `new_tokens` new tokens each
              (no early stop), sampling at temperature 1, KV cache. transformers:
              `generate(do_sample=True, top_k=0, min_new_tokens=max_new_tokens)`.
Tokens/s: training batch*seq_len per median step; generation new tokens per median whole
generation (prefill included). Prints a Markdown table and the machine's load average.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
THREADS = 2
os.environ.setdefault("RAYON_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

ROWS = {
    "train": "training step, full weights",
    "train-ckpt": "training step, full weights, gradient checkpointing",
    "lora": "training step, LoRA r16 (all linear)",
    "lora-ckpt": "training step, LoRA r16, gradient checkpointing",
    "generate": "generation, KV cache",
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def status_bytes(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def torch_row(name, a):
    """One row in this process; returns what candor's RowResult holds."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    times, first_loss = [], None
    if name == "generate":
        model.eval()
        prompts = torch.randint(0, vocab, (a.batch, a.prompt_len), generator=gen)
        mask = torch.ones_like(prompts)
        loaded = status_bytes("VmRSS")
        cpu0 = time.process_time()
        for i in range(a.warmup + a.steps):
            if i == a.warmup:
                cpu0 = time.process_time()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(input_ids=prompts, attention_mask=mask, do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0,
                                     max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                     use_cache=True, pad_token_id=model.config.pad_token_id or 0)
            assert out.shape[1] == a.prompt_len + a.new_tokens, out.shape
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
        tokens = a.batch * a.new_tokens
    else:
        if name.endswith("-ckpt"):
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if name.startswith("lora"):
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        ids = torch.randint(0, vocab, (a.batch, a.seq_len + 1), generator=gen)
        loaded = status_bytes("VmRSS")
        cpu0 = time.process_time()
        for i in range(a.warmup + a.steps):
            if i == a.warmup:
                cpu0 = time.process_time()
            t0 = time.perf_counter()
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if first_loss is None:
                first_loss = loss.item()
            del logits, loss
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
        tokens = a.batch * a.seq_len
    cpu = time.process_time() - cpu0
    med = statistics.median(times)
    return {
        "row": name, "what": ROWS[name], "tokens_per_sec": tokens / med, "step_sec_median": med,
        "cpu_sec_per_step": cpu / a.steps,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loaded_rss_bytes": loaded, "first_loss": first_loss,
    }


def sizes_args(a):
    return ["--batch", str(a.batch), "--seq-len", str(a.seq_len), "--steps", str(a.steps),
            "--warmup", str(a.warmup), "--prompt-len", str(a.prompt_len),
            "--new-tokens", str(a.new_tokens)]


def run_torch(name, a):
    cmd = [sys.executable, __file__, "--model", a.model, "--torch-row", name, *sizes_args(a)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_candor(name, a, candor):
    """candor's row, or None when `candor bench` has no such row."""
    cmd = [*candor, "bench", "--model", a.model, "--rows", name, "--json", "--device", "cpu",
           *sizes_args(a)]
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        if "unknown row" in out.stderr:
            return None
        sys.stderr.write(out.stderr)
        raise SystemExit(f"candor bench --model failed on row {name}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["rows"][0] | {"cpu_model": res["cpu_model"], "params": res["params"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--candor", default=None,
                   help="candor binary (default: target/release/candor if built, else target/debug/candor)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--torch-row", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.torch_row:
        print(json.dumps(torch_row(a.torch_row, a)))
        return
    rows = [r for r in a.rows.split(",") if r]
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"--rows: unknown row `{r}`; expected one of {', '.join(ROWS)}")
    if a.candor:
        candor = [a.candor]
    else:
        rel = ROOT / "target/release/candor"
        candor = [str(rel if rel.exists() else ROOT / "target/debug/candor")]
    load0 = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = []
    for r in rows:
        c = run_candor(r, a, candor)
        t = run_torch(r, a)
        print(f"[{r}] candor {c['tokens_per_sec']:.1f} tok/s, {c['peak_rss_bytes'] / 2**20:.0f} MiB | "
              f"torch {t['tokens_per_sec']:.1f} tok/s, {t['peak_rss_bytes'] / 2**20:.0f} MiB"
              if c else f"[{r}] candor — | torch {t['tokens_per_sec']:.1f} tok/s", file=sys.stderr)
        results.append({"row": r, "candor": c, "torch": t})
    load1 = os.getloadavg()
    import torch
    import transformers

    mib = lambda b: b / 2**20
    print(f"\n{a.model}: batch {a.batch} x {a.seq_len} tokens (training), {a.batch} x "
          f"({a.prompt_len} + {a.new_tokens} new) tokens (generation), f32, {THREADS} threads, "
          f"{cpu_model()}, {started}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; load average {load0[0]:.1f} before, {load1[0]:.1f} after\n")
    print("| row | candor tok/s | PyTorch tok/s | candor / PyTorch | candor peak MiB | PyTorch peak MiB "
          "| candor / PyTorch | candor s/step | PyTorch s/step | candor CPU s/step | PyTorch CPU s/step |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for x in results:
        c, t = x["candor"], x["torch"]
        if c:
            print(f"| {x['row']} | {c['tokens_per_sec']:.1f} | {t['tokens_per_sec']:.1f} | "
                  f"{c['tokens_per_sec'] / t['tokens_per_sec']:.2f}x | {mib(c['peak_rss_bytes']):.0f} | "
                  f"{mib(t['peak_rss_bytes']):.0f} | {c['peak_rss_bytes'] / t['peak_rss_bytes']:.2f}x | "
                  f"{c['step_sec_median']:.2f} | {t['step_sec_median']:.2f} | "
                  f"{c['cpu_sec_per_step']:.2f} | {t['cpu_sec_per_step']:.2f} |")
        else:
            print(f"| {x['row']} | — | {t['tokens_per_sec']:.1f} | — | — | {mib(t['peak_rss_bytes']):.0f} "
                  f"| — | — | {t['step_sec_median']:.2f} | — | {t['cpu_sec_per_step']:.2f} |")
    if a.json_out:
        out = {"model": a.model, "sizes": vars(a) | {"torch_row": None}, "threads": THREADS,
               "cpu_model": cpu_model(), "started": started, "load_before": load0,
               "load_after": load1, "rows": results}
        tmp = a.json_out + ".part"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, a.json_out)


if __name__ == "__main__":
    main()
