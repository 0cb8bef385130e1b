#!/usr/bin/env python3
"""Fingerprint a recipe run directory so a refactor can be checked bit for bit.

    python3 scripts/tiny_fingerprint.py runs/tiny > after.txt
    diff scripts/fixtures/tiny-fingerprint.txt after.txt

Prints one line per file: its path and a sha256. Weights, tokenizers, configs, samples,
rankings and trainer state are hashed as they are; `metrics.jsonl` is hashed with the
wall-clock keys (`tokens_per_sec`, `time_*`, `elapsed*`) removed (so is
`trainer_state.json`), and `candor.json` is
reduced to its `content_hash` and `parents` hashes, since both also hold times and paths.
Fingerprints depend on the machine's floating-point path (CPU, OpenBLAS or not), so
compare two runs on the same machine and build.
"""
import hashlib
import json
import os
import sys

WALL_CLOCK = ("tokens_per_sec", "elapsed", "time_")


def timeless(obj):
    if isinstance(obj, dict):
        return {k: timeless(v) for k, v in obj.items() if not k.startswith(WALL_CLOCK)}
    if isinstance(obj, list):
        return [timeless(v) for v in obj]
    return obj


def digest(path, rel):
    name = os.path.basename(rel)
    with open(path, "rb") as f:
        data = f.read()
    if name == "trainer_state.json":
        data = json.dumps(timeless(json.loads(data)), sort_keys=True).encode()
    elif name == "metrics.jsonl":
        lines = [json.dumps(timeless(json.loads(l)), sort_keys=True) for l in data.splitlines() if l.strip()]
        data = "\n".join(lines).encode()
    elif name == "candor.json":
        meta = json.loads(data)
        keep = {"content_hash": meta.get("content_hash"),
                "parents": [p.get("content_hash") for p in meta.get("parents", []) if isinstance(p, dict)]}
        data = json.dumps(keep, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "runs/tiny"
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != ".recipe")
        for f in sorted(filenames):
            if f in ("report.md",) or f.endswith(".svg"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, root)
            print(f"{rel} {digest(path, rel)}")


if __name__ == "__main__":
    main()
