#!/usr/bin/env bash
# What each speed lever gives: candor's CPU time per training step / generation (steadier
# than wall time on a shared machine) with the levers switched off one by one through
# their environment switches. BASE_BIN (optional) is a candor built before the levers.
#   scripts/bench/levers.sh [shape ...]          (default: tiny medium small)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${CANDOR_BIN:-$ROOT/target/debug/candor}"
STEPS="${STEPS:-4}"
shapes=("$@"); [ ${#shapes[@]} -gt 0 ] || shapes=(tiny medium small)
one() { # label, env..., -- args
  local label=$1; shift
  local envs=(); while [ "$1" != -- ]; do envs+=("$1"); shift; done; shift
  local bin="$BIN"; [[ "$label" == base* ]] && bin="$BASE_BIN"
  env RAYON_NUM_THREADS=2 "${envs[@]}" "$bin" bench --json "$@" |
    python3 -c '
import json, sys
d = json.load(sys.stdin)
load = open("/proc/loadavg").read().split()[0]
cpu = d.get("cpu_sec_per_step", float("nan"))
print(f"{sys.argv[1]:<44} {d['"'"'shape'"'"']:<7} {d['"'"'mode'"'"']:<7} {cpu:7.3f} CPU s {d['"'"'tokens_per_sec'"'"']:8.0f} tok/s {d['"'"'peak_rss_bytes'"'"']/2**20:5.0f} MiB  load {load}")' "$label"
}
for shape in "${shapes[@]}"; do
  for mode in train sample; do
    args=(--shape "$shape" --steps "$STEPS" --warmup 1); [ "$mode" = sample ] && args=(--shape "$shape" --sample)
    [ -n "${BASE_BIN:-}" ] && one "base (before: composed ops)" X=1 -- "${args[@]}"
    one "composed ops, candle pool 2 threads" CANDOR_FUSED=0 CANDLE_NUM_THREADS=2 -- "${args[@]}"
    one "composed ops, candle pool 1" CANDOR_FUSED=0 -- "${args[@]}"
    one "fused kernels on gemm crate, pool 2" CANDOR_GEMM=gemm CANDLE_NUM_THREADS=2 -- "${args[@]}"
    one "fused kernels, packed GEMM, pool 2" CANDLE_NUM_THREADS=2 -- "${args[@]}"
    one "fused on gemm crate, pool 1" CANDOR_GEMM=gemm -- "${args[@]}"
    one "fused, packed GEMM capped at AVX2" CANDOR_ISA=avx2 -- "${args[@]}"
    one "fused, packed GEMM, portable (scalar)" CANDOR_ISA=scalar -- "${args[@]}"
    one "all levers (fused, packed GEMM, pool 1)" X=1 -- "${args[@]}"
  done
done
