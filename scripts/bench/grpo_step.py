#!/usr/bin/env python3
"""Seconds per GRPO step: candor vs TRL's GRPOTrainer, side by side in one run, plus
candor's PPO iteration at the same shape.

The shape (issue 15, PERF-NOTES): a random Llama of 4 layers, width 128, 4 heads, vocab 512;
each step 4 prompts x 4 completions of up to 32 new tokens, a rule reward (the final number
equals the reference: candor's `math` judge, the same check in Python for TRL), one
optimisation pass of one update over the 16 completions, no reference model (beta 0), 2
threads. Both sides load the same checkpoint directory (the tokenizer from
`candor tokenizer train` on the shipped corpus, the weights from transformers'
LlamaForCausalLM with a fixed seed) and pose data/arithmetic/train.jsonl.

    /work/venv/bin/python scripts/bench/grpo_step.py [--steps 12] [--warmup 2] [--candor PATH]

Per-step times: TRL, wall time between `on_step_begin` and `on_step_end` (generation,
reward, loss, backward, optimiser step); candor, time_generate + time_score + time_train from
the stage's metrics.jsonl. Medians over the steps after `--warmup`. Prints a Markdown table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
THREADS = 2
os.environ.setdefault("RAYON_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


def make_model(dirpath, candor):
    """tokenizer (vocab 512) + a random Llama 4 x 128, 4 heads, saved as a HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    subprocess.run(
        [*candor, "tokenizer", "train", "--corpus", str(ROOT / "data/corpus/fortunes.jsonl"),
         "--vocab-size", "512",
         "--out", str(dirpath / "tokenizer.json")],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(dirpath, safe_serialization=True)


def reward_final_number(completions, reference, **_):
    """1 when the completion's last number equals the reference (candor's `math` judge)."""
    import re

    out = []
    for c, r in zip(completions, reference):
        nums = re.findall(r"-?\d+(?:\.\d+)?", c)
        out.append(1.0 if nums and abs(float(nums[-1]) - float(r)) < 1e-9 else 0.0)
    return out


def trl_step_times(model_dir, steps, workdir):
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(THREADS)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    tok.pad_token = "<|endoftext|>"
    tok.eos_token = "<|endoftext|>"
    rows = [json.loads(l) for l in open(ROOT / "data/arithmetic/train.jsonl")]
    data = Dataset.from_list(rows)
    args = GRPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=16, num_generations=4,
        max_completion_length=32, num_iterations=1, steps_per_generation=1, beta=0.0,
        learning_rate=1e-5, max_steps=steps, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=False, seed=1, temperature=1.0, dataloader_num_workers=0,
        disable_tqdm=True)

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_final_number, args=args,
                          train_dataset=data, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history
               if "completions/mean_length" in h]
    return times, lengths


def candor_step_times(candor, stage, model_dir, steps, workdir):
    out = workdir / stage
    common = ["--device", "cpu", "--policy", str(model_dir), "--out", str(out),
              "--set", f"train.steps={steps}", "--set", "train.eval_every=0",
              "--set", "train.batch_size=16", "--set", "rollout.max_new_tokens=32",
              "--set", "rollout.temperature=1.0",
              "--set", "data.prompts=data/arithmetic/train.jsonl",
              "--set", "score.judge=math", "--set", "score.judge_weight=1.0"]
    if stage == "grpo":
        extra = ["--config", "configs/tiny/grpo.yaml", "--set", "rollout.prompts_per_step=4",
                 "--set", "rollout.group_size=4", "--set", "grpo.num_iterations=1",
                 "--set", "grpo.beta=0.0"]
    else:
        extra = ["--config", "configs/tiny/ppo.yaml", "--set", "rollout.prompts_per_iteration=16",
                 "--set", "ppo.epochs=1", "--set", "critic.init=policy",
                 "--set", "score.reward_model_weight=0.0"]
    subprocess.run([*candor, stage, *extra, *common], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    rows = [r for r in rows if "time_generate" in r]
    return [r["time_generate"] + r["time_score"] + r["time_train"] for r in rows], rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--candor", default=str(ROOT / "target/release/candor"))
    a = ap.parse_args()
    candor = [a.candor]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        model_dir.mkdir()
        make_model(model_dir, candor)
        grpo, grpo_rows = candor_step_times(candor, "grpo", model_dir, a.steps, work)
        ppo, _ = candor_step_times(candor, "ppo", model_dir, a.steps, work)
        trl, trl_lengths = trl_step_times(model_dir, a.steps, work)
    w = a.warmup
    med = {k: statistics.median(v[w:]) for k, v in [("grpo", grpo), ("ppo", ppo), ("trl", trl)]}
    split = {k: statistics.median(r[k] for r in grpo_rows[w:])
             for k in ("time_generate", "time_score", "time_train")}
    lens = statistics.mean(r["response_len"] for r in grpo_rows)
    print(f"{a.steps} steps each, medians of the last {a.steps - w}; {THREADS} threads; "
          f"candor GRPO split: generate {split['time_generate']:.3f} s, score "
          f"{split['time_score']:.3f} s, train {split['time_train']:.3f} s; mean completion "
          f"length: candor {lens:.1f}, TRL {statistics.mean(trl_lengths):.1f} tokens")
    print()
    print("| work per step (16 completions of <= 32 tokens) | seconds per step | vs TRL GRPOTrainer |")
    print("|---|---:|---:|")
    print(f"| TRL {__import__('trl').__version__} GRPOTrainer | {med['trl']:.3f} | 1.00x |")
    print(f"| candor grpo | {med['grpo']:.3f} | {med['grpo'] / med['trl']:.2f}x |")
    print(f"| candor ppo (1 epoch, critic from the policy) | {med['ppo']:.3f} | {med['ppo'] / med['trl']:.2f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
