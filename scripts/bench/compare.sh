#!/usr/bin/env bash
# candor vs its PyTorch twin, side by side in one run: for every shape (tiny, medium, small)
# and mode (train, sample), PASSES passes (default 3) that alternate candor and PyTorch,
# then a table of medians with the ratios candor/PyTorch (tokens/s, peak RSS).
#
#   scripts/bench/compare.sh                      # all shapes, train and sample
#   SHAPES="tiny" MODES="train" scripts/bench/compare.sh
#   THREADS=1 STEPS=4 WARMUP=1 PASSES=1 scripts/bench/compare.sh   # a quick look
#   RT=1 scripts/bench/compare.sh                 # on a busy machine, as root (see below)
#
# Both use RAYON_NUM_THREADS / --threads = THREADS (default 2). Raw results (one JSON
# object a line, with the load average at the start of each run) go to RESULTS (default
# target/bench/compare-<date>.jsonl). Before each run the script waits (up to
# QUIET_MAX_WAIT s, default 300) until the CPUs are QUIET_IDLE % idle (default 90) over
# 3 s: on a small shared machine a concurrent build halves the figures. Every result also
# carries background_cpu_frac (other processes' share of the CPUs while timing) and candor's
# carries cpu_sec_per_step (its own CPU time per step), steadier than wall time under load.
#
# candor is the dev-profile binary the README's `cargo candor` runs (CANDOR_BIN overrides);
# PyTorch is scripts/bench/torch_twin.py in the venv of scripts/setup_venv.sh (PY overrides,
# e.g. PY=/work/venv/bin/python).
#
# The machine's peak: before the runs, PyTorch's best fp32 matrix product at THREADS threads
# (scripts/bench/matmul_peak.py; PEAK_GFLOPS=N skips it) and candor's own (`candor bench
# --matmul`). Every result line carries the CPU model, its SIMD flags, the peak and candor's
# matmul GFLOP/s; the table's "% peak" columns are over that measured peak.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="${PY_FALLBACK:-/work/main/.venv/bin/python}"
THREADS="${THREADS:-2}"
PASSES="${PASSES:-3}"
SHAPES="${SHAPES:-tiny medium small}"
MODES="${MODES:-train sample}"
QUIET_IDLE="${QUIET_IDLE:-90}"
QUIET_MAX_WAIT="${QUIET_MAX_WAIT:-300}"
mkdir -p "$ROOT/target/bench"
RESULTS="${RESULTS:-$ROOT/target/bench/compare-$(date +%Y%m%d-%H%M%S).jsonl}"

# RT=1 (root): run both under the real-time FIFO scheduler, so other processes on a shared
# machine (a build, someone's training run) are kept off the cores while timing; the
# kernel still leaves them 5% (sched_rt_runtime_us). The quiet-machine wait is then skipped.
prio=()
if [ "${RT:-0}" = 1 ]; then
  prio=(chrt -f 10)
  QUIET_MAX_WAIT=0
fi

if [ -z "${CANDOR_BIN:-}" ]; then
  (cd "$ROOT" && cargo build -q -p candor-cli)
  CANDOR_BIN="$ROOT/target/debug/candor"
fi

# shellcheck source=quiet.sh
source "$ROOT/scripts/bench/quiet.sh"

# run IMPL SHAPE MODE: one JSON line with the load average added
run() {
  local impl=$1 shape=$2 mode=$3 flag=() line load
  [ "$mode" = sample ] && flag=(--sample)
  # STEPS / WARMUP (optional) shorten the training runs of both, e.g. for a busy machine
  [ "$mode" = train ] && [ -n "${STEPS:-}" ] && flag+=(--steps "$STEPS")
  [ "$mode" = train ] && [ -n "${WARMUP:-}" ] && flag+=(--warmup "$WARMUP")
  [ "${RT:-0}" = 1 ] || wait_quiet
  load=$(cut -d' ' -f1 /proc/loadavg)
  if [ "$impl" = candor ]; then
    line=$(RAYON_NUM_THREADS="$THREADS" "${prio[@]}" "$CANDOR_BIN" bench --shape "$shape" --json "${flag[@]}")
  else
    line=$("${prio[@]}" "$PY" "$ROOT/scripts/bench/torch_twin.py" --shape "$shape" --threads "$THREADS" --json "${flag[@]}")
  fi
  "$PY" -c '
import json, sys
d = json.loads(sys.argv[1])
d["load_avg_1m"] = float(sys.argv[2])
d.update(json.loads(sys.argv[3]))
print(json.dumps(d))' "$line" "$load" "$MACHINE"
}

# the machine: CPU model, SIMD flags, measured peak (PyTorch's) and candor's matmul speed
cpu_model=$(sed -n 's/^model name[[:space:]]*: *//p' /proc/cpuinfo | head -1)
cpu_simd=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|avx2|fma|avx512f|avx512bw|avx512vl|avx512_vnni|avx512_bf16|amx_tile|amx_bf16|asimd|sve)$' | paste -sd' ' || true)
if [ -z "${PEAK_GFLOPS:-}" ]; then
  PEAK_GFLOPS=$("${prio[@]}" "$PY" "$ROOT/scripts/bench/matmul_peak.py" --threads "$THREADS" --json |
    "$PY" -c 'import json,sys; print(json.load(sys.stdin)["peak_gflops"])')
fi
candor_mm=$(RAYON_NUM_THREADS="$THREADS" "${prio[@]}" "$CANDOR_BIN" bench --matmul --json)
MACHINE=$("$PY" -c '
import json, sys
mm = json.loads(sys.argv[4])
print(json.dumps({"cpu_model": sys.argv[1], "cpu_simd_flags": sys.argv[2].split(),
                  "peak_gflops": float(sys.argv[3]), "candor_matmul_gflops": mm["best_gflops"],
                  "candor_matmul_by_shape": mm["gflops"], "candor_isa": mm["isa"]}))' \
  "$cpu_model" "$cpu_simd" "$PEAK_GFLOPS" "$candor_mm")
echo "# machine: $MACHINE" >&2
export PEAK_GFLOPS MACHINE

echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs, threads $THREADS, $PASSES passes${prio:+, under ${prio[*]}}" >&2
for shape in $SHAPES; do
  for mode in $MODES; do
    for pass in $(seq 1 "$PASSES"); do
      # alternate which goes first, so slow drifts in the machine's state hit both alike
      if [ $(( pass % 2 )) -eq 1 ]; then order="candor pytorch"; else order="pytorch candor"; fi
      for impl in $order; do
        run "$impl" "$shape" "$mode" | tee -a "$RESULTS" >&2
      done
    done
  done
done

"$PY" - "$RESULTS" <<'PYEOF'
import json, os, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(xs): return statistics.median(xs) if xs else float("nan")
print(f"results: {sys.argv[1]}")
peak = float(os.environ["PEAK_GFLOPS"]) * 1e9
m = json.loads(os.environ["MACHINE"])
print(f"CPU: {m['cpu_model']}, SIMD: {' '.join(m['cpu_simd_flags'])}; candor's kernels: {m['candor_isa']}")
print(f"peak: {peak/1e9:.0f} GFLOP/s (PyTorch's best fp32 matmul, same threads); "
      f"candor's matmul {m['candor_matmul_gflops']:.0f} GFLOP/s = {100e9*m['candor_matmul_gflops']/peak:.0f}% of it")
print("% peak columns: achieved FLOP/s of the whole step over that peak")
print("| shape | mode | candor tok/s | PyTorch tok/s | ratio | candor peak RSS | PyTorch peak RSS | RSS ratio | candor % peak | PyTorch % peak | candor CPU s/step | max load (1 min) | max background |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
seen = []
for r in rows:
    k = (r["shape"], r["mode"])
    if k not in seen: seen.append(k)
for shape, mode in seen:
    c = [r for r in rows if r["shape"] == shape and r["mode"] == mode and r["impl"] == "candor"]
    p = [r for r in rows if r["shape"] == shape and r["mode"] == mode and r["impl"] == "pytorch"]
    ct, pt = med([r["tokens_per_sec"] for r in c]), med([r["tokens_per_sec"] for r in p])
    cm, pm = med([r["peak_rss_bytes"] for r in c]) / 2**20, med([r["peak_rss_bytes"] for r in p]) / 2**20
    cpu = med([r.get("cpu_sec_per_step", float("nan")) for r in c])
    cf, pf = med([r["flops_per_sec"] for r in c]) / peak, med([r["flops_per_sec"] for r in p]) / peak
    load = max(r["load_avg_1m"] for r in c + p)
    bg = max(r.get("background_cpu_frac", 0.0) for r in c + p)
    print(f"| {shape} | {mode} | {ct:,.0f} | {pt:,.0f} | {ct/pt:.2f} | {cm:.0f} MiB | {pm:.0f} MiB | {cm/pm:.2f} | {100*cf:.0f}% | {100*pf:.0f}% | {cpu:.3f} | {load:.2f} | {bg:.2f} |")
PYEOF
