#!/usr/bin/env python3
"""Regenerate data/sft/instructions.jsonl, the instruction-tuning (SFT) set.

Built from real material with a few regular templates and short answers:
  - WordNet 3.0 (Debian wordnet-base 1:3.0-37): word definitions and example
    sentences, for common words of the shipped corpus;
  - exact-answer tasks (sorting, addition, subtraction, comparison, reversing
    and counting word lists) generated with fixed seeds;
  - passage continuation and "Write a sentence about X." answers taken from
    the shipped corpus (data/corpus/, so run fetch_corpus.py first);
  - about 5% two-turn conversations in the {"messages": [...]} form.
Prompts held out in data/prompts/instructions-heldout.jsonl never appear here.

Idempotent and deterministic. Usage: python3 scripts/data/make_sft.py
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tasks as T  # noqa: E402
from _common import DATA, log, write_jsonl  # noqa: E402

N_DEFINE = 2000
N_USAGE = 1000
N_EXACT = {"sort": 800, "add": 500, "subtract": 500, "compare": 400, "reverse": 400,
           "count": 400}
N_CONTINUE = 1000
WRITING_PER_NOUN = 12
MIN_WRITING_PER_NOUN = 4
N_MULTI = {"arith": 120, "word": 120, "sort": 100, "writing": 120}
SYSTEM = "You are a helpful assistant. Answer briefly."


def pair(prompt: str, response: str) -> dict:
    return {"prompt": prompt, "response": response}


def build() -> list[dict]:
    held = T.heldout_items()
    held_prompts = {h["prompt"] for h in held}
    held_words = set(T.heldout_words())
    rows: list[dict] = []
    counts: dict[str, int] = {}

    # WordNet definitions and usage examples, most frequent corpus words first.
    entries = [e for e in T.wordnet_entries() if e["word"] not in held_words]
    rng = random.Random(T.SEED + 1)
    define = [pair(T.define_prompt(e["word"], rng.randrange(2)), T.define_answer(e))
              for e in entries[:N_DEFINE]]
    usage = [pair(T.usage_prompt(e["word"]), e["example"])
             for e in entries if e["example"]][:N_USAGE]
    rows += define + usage
    counts["define"], counts["usage"] = len(define), len(usage)

    # Exact-answer tasks.
    used = set(held_prompts)
    for i, (kind, n) in enumerate(sorted(N_EXACT.items())):
        items = T.unique_tasks(kind, n, T.SEED + 100 + i, used)
        used.update(p for p, _ in items)
        rows += [pair(p, a) for p, a in items]
        counts[kind] = len(items)

    # Passage continuation.
    pairs = [(a, b) for a, b in T.continuation_pairs() if T.continue_prompt(a) not in held_prompts]
    rng = random.Random(T.SEED + 2)
    chosen = rng.sample(pairs, min(N_CONTINUE, len(pairs)))
    rows += [pair(T.continue_prompt(a), b) for a, b in chosen]
    counts["continue"] = len(chosen)

    # Open-ended writing: a real corpus sentence mentioning the noun.
    rng = random.Random(T.SEED + 3)
    sents = T.noun_sentences()
    writing = []
    for noun, np in T.NOUNS:
        cands = list(sents[noun])
        if len(cands) < MIN_WRITING_PER_NOUN:
            raise SystemExit(f"only {len(cands)} corpus sentences mention {noun!r}")
        for s in rng.sample(cands, min(WRITING_PER_NOUN, len(cands))):
            writing.append(pair(rng.choice(T.WRITING_TEMPLATES).format(np=np), s))
    rows += writing
    counts["writing"] = len(writing)

    # Two-turn conversations.
    rng = random.Random(T.SEED + 4)
    multi = []

    def convo(u1: str, a1: str, u2: str, a2: str) -> dict:
        msgs = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
        msgs += [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                 {"role": "user", "content": u2}, {"role": "assistant", "content": a2}]
        return {"messages": msgs}

    for _ in range(N_MULTI["arith"]):
        a, b, c = rng.randint(0, 99), rng.randint(0, 99), rng.randint(0, 99)
        s = a + b
        if rng.random() < 0.5:
            multi.append(convo(f"What is {a} + {b}?", str(s), f"Now add {c} to that.", str(s + c)))
        else:
            c = rng.randint(0, s)
            multi.append(convo(f"What is {a} + {b}?", str(s), f"Now subtract {c} from that.",
                               str(s - c)))
    with_ex = [e for e in entries if e["example"]]
    for e in rng.sample(with_ex, N_MULTI["word"]):
        multi.append(convo(T.define_prompt(e["word"], rng.randrange(2)), T.define_answer(e),
                           "Use it in a sentence.", e["example"]))
    for _ in range(N_MULTI["sort"]):
        p, a = T.task_sort(rng)
        nums = [int(x) for x in a.split()]
        if p in held_prompts:
            continue
        if rng.random() < 0.5:
            multi.append(convo(p, a, "Which of them is the largest?", str(max(nums))))
        else:
            multi.append(convo(p, a, "Now reverse that order.", " ".join(reversed(a.split()))))
    nouns_ok = [(n, np) for n, np in T.NOUNS if len(sents[n]) >= 2]
    for _ in range(N_MULTI["writing"]):
        noun, np = rng.choice(nouns_ok)
        s1, s2 = rng.sample(sents[noun], 2)
        multi.append(convo(rng.choice(T.WRITING_TEMPLATES).format(np=np), s1,
                           "Write another one.", s2))
    rows += multi
    counts["multi-turn"] = len(multi)

    for r in rows:  # nothing held out may leak in, as a prompt or as a user turn
        turns = [r["prompt"]] if "prompt" in r else [m["content"] for m in r["messages"]
                                                      if m["role"] == "user"]
        assert not (set(turns) & held_prompts), turns
    random.Random(T.SEED + 5).shuffle(rows)
    log("sft: " + " ".join(f"{k}={v}" for k, v in counts.items()) + f" total={len(rows)}")
    return rows


def main() -> None:
    write_jsonl(DATA / "sft" / "instructions.jsonl", build())


if __name__ == "__main__":
    main()
