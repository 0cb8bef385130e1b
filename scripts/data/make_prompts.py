#!/usr/bin/env python3
"""Regenerate the prompt sets under data/prompts/.

  sentiment-train.jsonl        300 {"prompt"} open-ended writing prompts for RLHF
  sentiment-heldout.jsonl       60 more, about 20 nouns that no training prompt uses
  instructions-heldout.jsonl    50 SFT-style prompts absent from data/sft/instructions.jsonl;
                                exact-answer ones carry {"reference": the expected answer}

The sentiment prompts use the same templates as the SFT writing examples
("Write a sentence about X.", "Describe X.", "Write one sentence about X.")
about nouns that occur in the corpus, so a response can be positive or negative.
Run after make_sft.py (this checks the held-out prompts against its output).

Idempotent and deterministic. Usage: python3 scripts/data/make_prompts.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tasks as T  # noqa: E402
from _common import DATA, write_jsonl  # noqa: E402

N_TRAIN = 300


def sentiment_prompts() -> tuple[list[dict], list[dict]]:
    train_nouns, held_nouns = T.sentiment_noun_split()
    train = [t.format(np=np) for _, np in train_nouns for t in T.WRITING_TEMPLATES]
    train = random.Random(T.SEED + 21).sample(train, N_TRAIN)  # sample() also shuffles
    held = [t.format(np=np) for _, np in held_nouns for t in T.WRITING_TEMPLATES]
    random.Random(T.SEED + 22).shuffle(held)
    assert not set(train) & set(held)
    return [{"prompt": p} for p in train], [{"prompt": p} for p in held]


def sft_user_turns() -> set[str]:
    path = DATA / "sft" / "instructions.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run make_sft.py first")
    out = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "prompt" in r:
                out.add(r["prompt"])
            else:
                out.update(m["content"] for m in r["messages"] if m["role"] == "user")
    return out


def main() -> None:
    train, held = sentiment_prompts()
    write_jsonl(DATA / "prompts" / "sentiment-train.jsonl", train)
    write_jsonl(DATA / "prompts" / "sentiment-heldout.jsonl", held)

    items = list(T.heldout_items())
    leaked = [i["prompt"] for i in items if i["prompt"] in sft_user_turns()]
    if leaked:
        raise SystemExit(f"held-out prompts found in the SFT set: {leaked}")
    assert len({i["prompt"] for i in items}) == len(items)
    write_jsonl(DATA / "prompts" / "instructions-heldout.jsonl", items)


if __name__ == "__main__":
    main()
