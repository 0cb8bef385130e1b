#!/usr/bin/env python3
"""Write data/arithmetic/: a verifiable task a tiny model can learn on 2 CPU cores.

Every sum a + b and every difference a − b (b <= a) with a in 0..19 and b in 0..9:
200 + 155 = 355 questions "What is a + b?" with exact answers. A fixed seed splits them
into three disjoint sets: 142 answered questions for SFT, 142 other questions with only
their references for RL, and 71 held out.

  sft.jsonl      {"prompt", "response"}    answered questions: teach the format (the bare
                                           number, then end of turn) and some facts
  train.jsonl    {"prompt", "reference"}   the prompts GRPO/PPO pose, the `math` judge's
                                           answers; no demonstrations of these anywhere, so
                                           the judge's reward carries what SFT did not show
  heldout.jsonl  {"prompt", "reference"}   held-out exact-match accuracy

Deterministic: running it again rewrites the files byte for byte. Needs python3 only.
Usage: python3 scripts/data/make_arithmetic.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "data" / "arithmetic"
SEED = 15
HELDOUT = 71
MAX_A, MAX_B = 19, 9


def questions():
    qs = []
    for a in range(MAX_A + 1):
        for b in range(MAX_B + 1):
            qs.append((f"What is {a} + {b}?", a + b))
    for a in range(MAX_A + 1):
        for b in range(min(a, MAX_B) + 1):
            qs.append((f"What is {a} - {b}?", a - b))
    return qs


def write(name, rows):
    with open(OUT / name, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    qs = questions()
    random.Random(SEED).shuffle(qs)
    heldout, rest = qs[:HELDOUT], qs[HELDOUT:]
    sft, rl = rest[: len(rest) // 2], rest[len(rest) // 2 :]
    OUT.mkdir(parents=True, exist_ok=True)
    write("sft.jsonl", [{"prompt": q, "response": str(a)} for q, a in sft])
    write("train.jsonl", [{"prompt": q, "reference": str(a)} for q, a in rl])
    write("heldout.jsonl", [{"prompt": q, "reference": str(a)} for q, a in heldout])
    print(f"{OUT}: {len(sft)} SFT demonstrations (sft.jsonl), {len(rl)} RL questions (train.jsonl), {len(heldout)} held out")


if __name__ == "__main__":
    main()
