#!/usr/bin/env python3
"""Check the shipped data/ files: UTF-8, LF line endings, one trailing newline,
the JSONL schemas, the held-out sets' disjointness, and the size budget.
Needs nothing but the files. Usage: python3 scripts/data/check_data.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "data"
BUDGET = 6 * 1024 * 1024
errors: list[str] = []


def err(msg: str) -> None:
    errors.append(msg)


def text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        err(f"{path}: not UTF-8 ({e})")
        return ""
    if "\r" in s:
        err(f"{path}: has CR characters")
    if not s.endswith("\n") or s.endswith("\n\n"):
        err(f"{path}: must end with exactly one newline")
    if "\u2028" in s or "\u2029" in s or "\x85" in s:
        err(f"{path}: has a Unicode line separator")
    return s


def rows(path: Path) -> list[dict]:
    out = []
    for i, line in enumerate(text(path).split("\n")[:-1], 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            err(f"{path}:{i}: bad JSON ({e})")
            continue
        if not isinstance(r, dict):
            err(f"{path}:{i}: not an object")
            continue
        out.append(r)
    return out


def is_str(v) -> bool:
    return isinstance(v, str) and v != ""


def check_keys(path: Path, rs: list[dict], allowed: list[set[str]]) -> None:
    for i, r in enumerate(rs, 1):
        if set(r) not in allowed or not all(is_str(v) for k, v in r.items() if k != "messages"):
            err(f"{path}:{i}: unexpected fields or values {sorted(r)}")


def main() -> None:
    # corpus
    text(DATA / "corpus" / "moby-dick.txt")
    fortunes = rows(DATA / "corpus" / "fortunes.jsonl")
    check_keys(DATA / "corpus" / "fortunes.jsonl", fortunes, [{"text"}])
    for i, r in enumerate(fortunes, 1):
        t = r.get("text", "")
        if not 1 <= len(t) <= 600 or t != t.strip() or any(ln != ln.rstrip() for ln in t.split("\n")):
            err(f"fortunes.jsonl:{i}: length or whitespace")

    # sft
    p = DATA / "sft" / "instructions.jsonl"
    sft = rows(p)
    check_keys(p, sft, [{"prompt", "response"}, {"messages"}])
    user_turns, multi = set(), 0
    for i, r in enumerate(sft, 1):
        if "messages" in r:
            multi += 1
            ms = r["messages"]
            roles = [m.get("role") for m in ms]
            if roles not in (["user", "assistant"] * 2, ["system"] + ["user", "assistant"] * 2) \
                    or not all(set(m) == {"role", "content"} and is_str(m["content"]) for m in ms):
                err(f"{p}:{i}: bad messages")
            user_turns.update(m["content"] for m in ms if m.get("role") == "user")
        else:
            user_turns.add(r.get("prompt"))
    if not 6000 <= len(sft) <= 12000 or not 0.03 <= multi / max(len(sft), 1) <= 0.08:
        err(f"{p}: {len(sft)} rows, {multi} multi-turn")

    # prompts
    st = rows(DATA / "prompts" / "sentiment-train.jsonl")
    sh = rows(DATA / "prompts" / "sentiment-heldout.jsonl")
    ih = rows(DATA / "prompts" / "instructions-heldout.jsonl")
    check_keys(DATA / "prompts" / "sentiment-train.jsonl", st, [{"prompt"}])
    check_keys(DATA / "prompts" / "sentiment-heldout.jsonl", sh, [{"prompt"}])
    check_keys(DATA / "prompts" / "instructions-heldout.jsonl", ih, [{"prompt"}, {"prompt", "reference"}])
    trp, hp = [r.get("prompt") for r in st], [r.get("prompt") for r in sh]
    if len(set(trp)) != len(trp) or len(set(hp)) != len(hp) or set(trp) & set(hp):
        err("sentiment prompt sets have duplicates or overlap")
    leaked = [r["prompt"] for r in ih if r.get("prompt") in user_turns]
    if leaked:
        err(f"instructions-heldout prompts found in the SFT set: {leaked}")

    # arithmetic: exact answers; SFT demonstrations, RL questions and held-out ones disjoint
    ar = DATA / "arithmetic"
    at, asft, ah = rows(ar / "train.jsonl"), rows(ar / "sft.jsonl"), rows(ar / "heldout.jsonl")
    check_keys(ar / "train.jsonl", at, [{"prompt", "reference"}])
    check_keys(ar / "sft.jsonl", asft, [{"prompt", "response"}])
    check_keys(ar / "heldout.jsonl", ah, [{"prompt", "reference"}])
    for path, rs, key in [(ar / "train.jsonl", at, "reference"), (ar / "sft.jsonl", asft, "response"),
                          (ar / "heldout.jsonl", ah, "reference")]:
        for i, r in enumerate(rs, 1):
            q = r.get("prompt", "").removeprefix("What is ").removesuffix("?").split(" ")
            ok = len(q) == 3 and q[1] in "+-" and q[0].isdigit() and q[2].isdigit()
            ok = ok and int(q[0]) <= 19 and int(q[2]) <= 9 and (q[1] == "+" or int(q[2]) <= int(q[0]))
            if not ok or str(int(q[0]) + int(q[2]) if q[1] == "+" else int(q[0]) - int(q[2])) != r.get(key):
                err(f"{path}:{i}: not a question a + b or a - b (a <= 19, b <= 9) with its exact answer")
    sets = [{r.get("prompt") for r in rs} for rs in (at, asft, ah)]
    if sum(map(len, sets)) != 355 or len(sets[0] | sets[1] | sets[2]) != 355:
        err("arithmetic: the SFT, RL and held-out questions overlap, or some are missing")

    # sentiment
    lex = text(DATA / "sentiment" / "vader_lexicon.txt").split("\n")[:-1]
    for i, line in enumerate(lex, 1):
        f = line.split("\t")
        try:
            ok = len(f) == 4 and -4.0 <= float(f[1]) <= 4.0 and float(f[2]) >= 0
        except ValueError:
            ok = False
        if not ok:
            err(f"vader_lexicon.txt:{i}: bad line")
    ref = rows(DATA / "sentiment" / "vader_reference.jsonl")
    for i, r in enumerate(ref, 1):
        if set(r) != {"text", "compound"} or not isinstance(r["compound"], (int, float)) \
                or not -1 <= r["compound"] <= 1:
            err(f"vader_reference.jsonl:{i}: bad row")

    for f in sorted(DATA.rglob("*")):  # every file: UTF-8, LF only, final newline
        if f.is_file() and f.suffix not in (".jsonl",) and f.name != "vader_lexicon.txt":
            text(f)

    total = sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file())
    if total > BUDGET:
        err(f"data/ is {total} bytes, over the {BUDGET} byte budget")

    for e in errors:
        print("error:", e, file=sys.stderr)
    print(f"data/: {total} bytes; fortunes {len(fortunes)}, sft {len(sft)} ({multi} multi-turn), "
          f"sentiment prompts {len(st)}+{len(sh)}, instruction held-out {len(ih)}, "
          f"lexicon {len(lex)}, vader reference {len(ref)}, arithmetic {len(at)}+{len(ah)}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
