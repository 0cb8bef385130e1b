#!/usr/bin/env python3
"""The machine's measured fp32 matrix-product peak: PyTorch's best GFLOP/s at --threads threads.

BENCHMARKS.md quotes every "% of peak" over this number, measured on the same machine in
the same run (scripts/bench/compare.sh runs it first). Shapes: a square 2048^3 product and
the transformer products of the benchmark shapes (rows = batch*context = 2048).
Each shape: 2 warm-up products, then the best of --reps timed ones.

  python3 scripts/bench/matmul_peak.py [--threads 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = [  # m, k, n
    (2048, 2048, 2048),
    (2048, 384, 1536),
    (2048, 384, 4096),
    (2048, 256, 8192),
    (2048, 128, 384),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    per_shape = {}
    for m, k, n in SHAPES:
        a = torch.randn(m, k, generator=g)
        b = torch.randn(k, n, generator=g)
        c = torch.empty(m, n)
        for _ in range(2):
            torch.mm(a, b, out=c)
        best = float("inf")
        reps = max(3, args.reps * 2048**3 // (m * k * n) // 4)
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b, out=c)
            best = min(best, time.perf_counter() - t)
        per_shape[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
    peak = max(per_shape.values())
    out = {"impl": "pytorch", "torch": torch.__version__, "threads": args.threads,
           "peak_gflops": round(peak, 1),
           "gflops": {s: round(v, 1) for s, v in per_shape.items()}}
    if args.json:
        print(json.dumps(out))
    else:
        for s, v in per_shape.items():
            print(f"{s:>16}  {v:7.1f} GFLOP/s")
        print(f"peak {peak:.1f} GFLOP/s at {args.threads} threads (torch {torch.__version__})")


if __name__ == "__main__":
    main()
