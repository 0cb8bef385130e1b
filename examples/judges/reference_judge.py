#!/usr/bin/env python3
"""A candor program judge, dependency-free: `--judge "command:python3 examples/judges/reference_judge.py"`.

candor starts it once and writes one JSON request a line to its stdin:
    {"prompt": "What is 15 + 24?", "response": "39", "reference": "39", ...}
(every field of the prompt line comes along). It answers each with one line, in order:
    {"score": 1.0}
This one scores agreement with the line's `reference` answer exactly as candor's built-in
`reference` judge: 1 for an exact match after normalisation, else 0.9 x SQuAD token F1.
Anything printed to stderr shows up in candor's output, prefixed [judge python3].
"""
import json
import sys
from collections import Counter


def normalise(text):
    spaced = "".join(c if c.isalnum() else " " for c in text)
    return " ".join(spaced.lower().split())


def token_f1(a, b):
    a, b = a.split(), b.split()
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    p, r = common / len(a), common / len(b)
    return 2.0 * p * r / (p + r)


def score(response, reference):
    r, a = normalise(response), normalise(reference)
    return 1.0 if r == a else 0.9 * token_f1(r, a)


def main():
    # --missing X: score a line without `reference` X (default: stop, as the built-in does)
    missing = float(sys.argv[sys.argv.index("--missing") + 1]) if "--missing" in sys.argv else None
    for line in sys.stdin:  # one request a line, answered in order
        request = json.loads(line)
        if "reference" not in request and missing is not None:
            print(json.dumps({"score": missing}), flush=True)
            continue
        if "reference" not in request:
            print(f"no `reference` in the line for {request['prompt']!r}", file=sys.stderr)
            sys.exit(2)  # candor reports the exit, naming the prompt
        s = score(request["response"], str(request["reference"]))
        print(json.dumps({"score": s}), flush=True)  # flush: candor waits for each line


if __name__ == "__main__":
    main()
