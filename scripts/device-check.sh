#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (H200: sm_90, CUDA 13 driver) that has PyTorch but
# no Rust toolchain and no network. Build first, here or anywhere with the toolchain:
#
#   scripts/build-cuda.sh                 # → target-cuda/candor (stripped, cuda + nccl)
#
# then, on the GPU machine, from the repository root (the binary carried along):
#
#   scripts/device-check.sh               # ≈ 5–8 minutes; results in $OUT (or runs/device-check)
#
# It runs, each step under its own timeout and going on after a failure:
#   1. nvidia-smi; the binary's libraries (cuBLAS/cuRAND/cudart/nvrtc/NCCL 13 from PyTorch's
#      nvidia wheels, found with `import nvidia`);
#   2. the tiny pretraining config for 20 steps on the CPU and on the GPU (same seed, same
#      binary), f32 and bf16: the 20 training losses compared step by step. Tolerances:
#      f32 GPU vs CPU |Δloss| ≤ 1e-3 (same math, different summation order; cuBLAS f32
#      without TF32); bf16 GPU vs f32 CPU ≤ 0.05 (bf16 rounding; the CPU bf16 test in
#      crates/candor-pretrain/tests/parallel.rs holds 0.05 too);
#   3. the whole tiny config (400 steps) on the GPU, and the tiny recipe if this candor has
#      `candor run` and configs/recipes/tiny.yaml exists;
#   4. `candor bench --shape small --device cuda` in f32 and bf16 (training) beside the
#      PyTorch twin (scripts/bench/torch_twin.py --device cuda) on the same GPU, tokens/s
#      and MFU against 790 TFLOP/s (dense bf16 measured on an H200);
#   5. data parallel: a 1-process NCCL run (WORLD_SIZE=1 with MASTER_ADDR: NCCL set up and
#      used), a 2-process NCCL run (on one GPU NCCL normally refuses two ranks on the same
#      device; the reason is printed), and a 2-process run over the TCP transport on the
#      same GPU, whose losses must equal the 1-process run's (≤ 1e-4); then PPO in bf16 on
#      2 processes (rollouts sharded, TCP) from the recipe's SFT and reward models;
# and prints one table (also written to $OUT/device-check.md, with every log beside it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BIN=${CANDOR_BIN:-target-cuda/candor}
[[ -x $BIN ]] || BIN=target-cuda/release/candor
if [[ ! -x $BIN ]]; then
  echo "device-check: no CUDA build of candor (target-cuda/candor); run scripts/build-cuda.sh first" >&2
  exit 1
fi
BIN=$(realpath "$BIN")
# DEVICE_CHECK_DEVICE=cpu rehearses the whole script on a machine without a GPU
GPU=${DEVICE_CHECK_DEVICE:-cuda}
if [[ $GPU == cuda ]]; then GPU0=cuda:0; else GPU0=$GPU; fi
TINY_STEPS=${TINY_STEPS:-400}
ROWS=$OUT/rows.tsv
: >"$ROWS"
row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$ROWS"; echo "== $1: $2 ${3:+($3)}" >&2; }
t_start=$(date +%s)
elapsed() { echo $(( $(date +%s) - t_start )); }

# 1. the machine and the libraries ----------------------------------------------------
if nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader >"$OUT/gpu.txt" 2>&1; then
  row "nvidia-smi" "ok" "$(head -1 "$OUT/gpu.txt")"
else
  row "nvidia-smi" "FAILED" "$(head -1 "$OUT/gpu.txt")"
fi
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
NV=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__) if getattr(nvidia, "__file__", None) else list(nvidia.__path__)[0])' 2>/dev/null || true)
if [[ -n $NV ]]; then
  LIBS=$(find "$NV" -maxdepth 3 -type d -name lib | sort | tr '\n' ':')
  export LD_LIBRARY_PATH=${LIBS}${LD_LIBRARY_PATH:-}
fi
missing=$(ldd "$BIN" | grep "not found" | awk '{print $1}' | tr '\n' ' ')
if [[ -z $missing ]]; then
  row "libraries" "ok" "$(ldd "$BIN" | grep -oE 'lib(cublas|cublasLt|curand|cudart|nvrtc|nccl|cuda)\.so[.0-9]*' | sort -u | tr '\n' ' ')"
else
  row "libraries" "FAILED" "not found: $missing (LD_LIBRARY_PATH from $NV)"
fi
"$BIN" --version >/dev/null 2>&1 || { row "candor" "FAILED" "the binary does not start"; }

# helpers ----------------------------------------------------------------------------
TINY=configs/tiny/pretrain.yaml
pretrain() { # name timeout args...   (sets rc)
  local name=$1 t=$2; shift 2
  timeout "$t" "$BIN" pretrain --config "$TINY" --overwrite --out "$OUT/$name" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  return $rc
}
losses_close() { # a b tol n → prints "max |Δ| over n steps", exit 1 when above tol
  python3 - "$OUT/$1/metrics.jsonl" "$OUT/$2/metrics.jsonl" "$3" "$4" <<'EOF'
import json, sys
def losses(p):
    return [r["loss"] for r in map(json.loads, open(p)) if "loss" in r]
a, b, tol, n = losses(sys.argv[1]), losses(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
if len(a) < n or len(b) < n:
    print(f"only {len(a)} and {len(b)} losses"); sys.exit(1)
d = max(abs(x - y) for x, y in zip(a[:n], b[:n]))
print(f"max |Δloss| {d:.2e} over {n} steps (tolerance {tol:g}); loss {a[0]:.4f} → {a[n-1]:.4f}")
sys.exit(0 if d <= tol else 1)
EOF
}
# the reason a step failed: "timed out" (status 124 from timeout) or its log's last line
last_line() {
  if [[ ${rc:-0} == 124 ]]; then echo "timed out"; else tail -1 "$1" 2>/dev/null | cut -c1-160; fi
}
STEPS20=(--set train.steps=20 --set train.log_every=1 --set train.eval_every=0)

# 2. first 20 losses: GPU vs CPU ----------------------------------------------------------
pretrain cpu-f32 240 --device cpu "${STEPS20[@]}" || row "pretrain 20 steps cpu f32" "FAILED" "$(last_line "$OUT/cpu-f32.log")"
if pretrain cuda-f32 120 --device $GPU "${STEPS20[@]}"; then
  if r=$(losses_close cpu-f32 cuda-f32 1e-3 20); then row "losses $GPU f32 vs cpu f32" "ok" "$r"; else row "losses $GPU f32 vs cpu f32" "FAILED" "$r"; fi
else
  row "pretrain 20 steps $GPU f32" "FAILED" "$(last_line "$OUT/cuda-f32.log")"
fi
if pretrain cuda-bf16 120 --device $GPU --set train.dtype=bf16 "${STEPS20[@]}"; then
  if r=$(losses_close cpu-f32 cuda-bf16 0.05 20); then row "losses $GPU bf16 vs cpu f32" "ok" "$r"; else row "losses $GPU bf16 vs cpu f32" "FAILED" "$r"; fi
else
  row "pretrain 20 steps $GPU bf16" "FAILED" "$(last_line "$OUT/cuda-bf16.log")"
fi

# 3. the whole tiny config, and the recipe --------------------------------------------------
for dt in f32 bf16; do
  t0=$(date +%s)
  if pretrain "tiny-$dt" 150 --device $GPU --set train.steps=$TINY_STEPS --set train.dtype=$dt; then
    ev=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))["metrics"]; print("eval_loss %.4f, %.0f tok/s" % (m["eval_loss"], m["tokens_per_sec"]))' "$OUT/tiny-$dt/candor.json" 2>&1)
    row "tiny pretrain $TINY_STEPS steps $GPU $dt" "ok" "$(( $(date +%s) - t0 )) s, $ev"
  else
    row "tiny pretrain $TINY_STEPS steps $GPU $dt" "FAILED" "$(last_line "$OUT/tiny-$dt.log")"
  fi
done
if "$BIN" run --help >/dev/null 2>&1 && [[ -f configs/recipes/tiny.yaml ]]; then
  t0=$(date +%s)
  timeout 240 "$BIN" run configs/recipes/tiny.yaml --device $GPU --set "out=$OUT/recipe" >"$OUT/recipe.log" 2>&1
  rc=$?
  if [[ $rc == 0 ]]; then
    row "tiny recipe $GPU" "ok" "$(( $(date +%s) - t0 )) s"
  else
    row "tiny recipe $GPU" "FAILED" "$(last_line "$OUT/recipe.log")"
  fi
else
  row "tiny recipe $GPU" "skipped" "this candor has no \`run\` command or no configs/recipes/tiny.yaml"
fi

# 4. throughput beside PyTorch -------------------------------------------------------------
: >"$OUT/bench.jsonl"
for dt in f32 bf16; do
  timeout 120 "$BIN" bench --shape small --device $GPU --dtype $dt --steps 20 --warmup 5 --json >>"$OUT/bench.jsonl" 2>"$OUT/bench-candor-$dt.log"
  rc=$?; [[ $rc == 0 ]] || row "bench candor small $dt" "FAILED" "$(last_line "$OUT/bench-candor-$dt.log")"
  timeout 120 python3 scripts/bench/torch_twin.py --shape small --device $GPU --dtype $dt --steps 20 --warmup 5 --json >>"$OUT/bench.jsonl" 2>"$OUT/bench-torch-$dt.log"
  rc=$?; [[ $rc == 0 ]] || row "bench pytorch small $dt" "FAILED" "$(last_line "$OUT/bench-torch-$dt.log")"
done
python3 - "$OUT/bench.jsonl" >>"$ROWS" <<'EOF'
import json, sys
PEAK = 790e12  # dense bf16 FLOP/s measured on an H200
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {(r["impl"], r.get("dtype", "f32")): r for r in rows}
for (impl, dt), r in sorted(by.items()):
    mfu = r["flops_per_sec"] / PEAK
    vs = ""
    other = by.get(("pytorch", dt))
    if impl == "candor" and other:
        vs = f", {r['tokens_per_sec'] / other['tokens_per_sec']:.2f}× PyTorch"
    print(f"bench small train {dt} {impl}\tok\t{r['tokens_per_sec']:,.0f} tok/s, {r['flops_per_sec']/1e12:.1f} TFLOP/s, MFU {100*mfu:.2f}% of 790 TFLOP/s bf16{vs}")
EOF

# 5. data parallel ---------------------------------------------------------------------
DP=(--set train.steps=10 --set train.log_every=1 --set train.eval_every=0)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pretrain dp-one 120 --device $GPU0 "${DP[@]}" || row "dp reference (1 process)" "FAILED" "$(last_line "$OUT/dp-one.log")"
if RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$(free_port) CANDOR_DIST_BACKEND=nccl \
    pretrain dp-nccl1 120 --device $GPU0 "${DP[@]}"; then
  r=$(losses_close dp-one dp-nccl1 1e-5 10) && row "nccl 1 process" "ok" "$(grep -o '1 ranks (nccl)' "$OUT/dp-nccl1.log" | head -1); $r" ||
    row "nccl 1 process" "FAILED" "$r"
else
  row "nccl 1 process" "FAILED" "$(last_line "$OUT/dp-nccl1.log")"
fi
if [[ $NGPU -ge 2 && $GPU == cuda ]]; then dev2=cuda; where="2 GPUs"; else dev2=$GPU0; where="both ranks on $GPU0"; fi
if NCCL_DEBUG=WARN CANDOR_DIST_BACKEND=nccl pretrain dp-nccl2 180 --device $dev2 --nproc 2 "${DP[@]}"; then
  r=$(losses_close dp-one dp-nccl2 1e-4 10) && row "nccl 2 processes ($where)" "ok" "$r" || row "nccl 2 processes ($where)" "FAILED" "$r"
else
  why=$(grep -hoE "(Duplicate GPU[^\"]*|NCCL[^\"]{0,120})" "$OUT/dp-nccl2.log" | head -1)
  row "nccl 2 processes ($where)" "FAILED" "${why:-$(last_line "$OUT/dp-nccl2.log")}"
fi
if CANDOR_DIST_BACKEND=tcp pretrain dp-tcp2 180 --device $dev2 --nproc 2 "${DP[@]}"; then
  r=$(losses_close dp-one dp-tcp2 1e-4 10) && row "tcp 2 processes ($where)" "ok" "$r" || row "tcp 2 processes ($where)" "FAILED" "$r"
else
  row "tcp 2 processes ($where)" "FAILED" "$(last_line "$OUT/dp-tcp2.log")"
fi

if [[ -f $OUT/recipe/sft/candor.json && -f $OUT/recipe/reward/candor.json ]]; then
  CANDOR_DIST_BACKEND=tcp timeout 180 "$BIN" ppo --config configs/tiny/ppo.yaml --policy "$OUT/recipe/sft" \
    --reward "$OUT/recipe/reward" --device $dev2 --nproc 2 --overwrite --out "$OUT/ppo-bf16-2" \
    --set train.dtype=bf16 --set train.steps=4 --set train.eval_every=0 >"$OUT/ppo-bf16-2.log" 2>&1
  rc=$?
  if [[ $rc == 0 ]]; then
    r=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))["metrics"]; print("reward_mean %.3f, kl %.4f, %.1f s generating" % (m["reward_mean"], m["kl"], m["time_generate"]))' "$OUT/ppo-bf16-2/candor.json" 2>&1)
    row "ppo bf16 2 processes tcp ($where)" "ok" "$r"
  else
    row "ppo bf16 2 processes tcp ($where)" "FAILED" "$(last_line "$OUT/ppo-bf16-2.log")"
  fi
else
  row "ppo bf16 2 processes tcp" "skipped" "the tiny recipe left no sft and reward checkpoints"
fi

# the table ------------------------------------------------------------------------------
{
  echo "# candor device check — $(date -u +%Y-%m-%d), $(head -1 "$OUT/gpu.txt"), $(elapsed) s"
  echo
  echo "| check | result | detail |"
  echo "|---|---|---|"
  awk -F'\t' '{ printf "| %s | %s | %s |\n", $1, $2, $3 }' "$ROWS"
} >"$OUT/device-check.md"
cat "$OUT/device-check.md"
! grep -qP '\tFAILED\t' "$ROWS"
