#!/usr/bin/env python3
"""Write the dataset-format fixtures of tests/fixtures/formats/ and a fake offline Hugging
Face dataset cache (tests/fixtures/hf-cache/), with pyarrow and `datasets` from PyPI.

    /work/venv/bin/python scripts/make_dataset_fixtures.py

The same six preferences are written in candor's form (`responses`), TRL's standard form
(`prompt`/`chosen`/`rejected` strings), TRL's conversational form (message lists), and
TRL's implicit-prompt conversational form; each as JSONL and as Parquet (written by
`datasets`, as the Hub stores them). Prompt-only and prompt-completion sets likewise. The
cache holds `datasets--candor-test--prefs` with a `train` and a `test` split, laid out as
`huggingface_hub` writes it (refs/main → snapshots/<commit>/data/<split>-00000-of-00001.parquet).
"""
import json
import os
import shutil

import datasets
import pyarrow.parquet as pq

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "formats")

PREFS = [
    ("Write one sentence about a book.", "I love this wonderful book.", "I hate this awful book."),
    ("Write one sentence about the sea.", "The sea is calm and beautiful.", "The sea is dark and cruel."),
    ("Write a sentence about science.", "Science brings great joy.", "Science is a sad failure."),
    ("Write one sentence about a friend.", "My friend is kind and fun.", "My friend is mean."),
    ("Write a sentence about winter.", "Winter is a happy time.", "Winter is bleak and grim."),
    ("Write one sentence about music.", "Music makes me smile.", "Music makes me cry in pain."),
]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


FORMS = {
    "pref_candor": [{"prompt": p, "responses": [c, r]} for p, c, r in PREFS],
    "pref_trl_standard": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PREFS],
    "pref_trl_conversational": [
        {"prompt": user(p), "chosen": assistant(c), "rejected": assistant(r)} for p, c, r in PREFS
    ],
    "pref_trl_implicit": [
        {"chosen": user(p) + assistant(c), "rejected": user(p) + assistant(r)} for p, c, r in PREFS
    ],
    # the same preferences unpaired (KTO's form): each prompt's completions labelled
    "pref_trl_unpaired": [
        row for p, c, r in PREFS
        for row in ({"prompt": p, "completion": c, "label": True},
                    {"prompt": p, "completion": r, "label": False})
    ],
    # other column names, for data.columns / --columns
    "pref_renamed": [{"question": p, "good": c, "bad": r} for p, c, r in PREFS],
    "prompts_standard": [{"prompt": p, "reference": c} for p, c, _ in PREFS],
    "prompts_conversational": [{"prompt": user(p), "reference": c} for p, c, _ in PREFS],
    "sft_candor": [{"prompt": p, "response": c} for p, c, _ in PREFS],
    "sft_trl_prompt_completion": [{"prompt": p, "completion": c} for p, c, _ in PREFS],
    "sft_trl_conversational": [{"prompt": user(p), "completion": assistant(c)} for p, c, _ in PREFS],
    "sft_trl_messages": [{"messages": user(p) + assistant(c)} for p, c, _ in PREFS],
    "text": [{"text": f"{p} {c}"} for p, c, _ in PREFS],
}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, rows in FORMS.items():
        write_jsonl(os.path.join(OUT, name + ".jsonl"), rows)
        datasets.Dataset.from_list(rows).to_parquet(os.path.join(OUT, name + ".parquet"))
    # a JSON array, as some exports write
    with open(os.path.join(OUT, "pref_trl_standard_array.json"), "w") as f:
        json.dump(FORMS["pref_trl_standard"], f, indent=1)

    cache = os.path.join(ROOT, "hf-cache")
    shutil.rmtree(cache, ignore_errors=True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(cache, "datasets--candor-test--prefs")
    snapshot = os.path.join(repo, "snapshots", commit, "data")
    os.makedirs(snapshot)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    conv = FORMS["pref_trl_conversational"]
    datasets.Dataset.from_list(conv[:4]).to_parquet(os.path.join(snapshot, "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(conv[4:]).to_parquet(os.path.join(snapshot, "test-00000-of-00001.parquet"))
    for f in sorted(os.listdir(OUT)):
        if f.endswith(".parquet"):
            t = pq.read_table(os.path.join(OUT, f))
            print(f, t.num_rows, "rows", t.schema.names)


if __name__ == "__main__":
    main()
