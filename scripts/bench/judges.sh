#!/usr/bin/env bash
# Judge overhead: seconds per 1,000 scored responses for the built-in `reference` judge, the
# same rule as a program judge (examples/judges/reference_judge.py, `command:`) and as a
# reward server (examples/judges/reward_server.py, `http://127.0.0.1`), timed through
# `candor rank`, which sends each prompt's K responses to the judge as one batch (PPO sends
# a whole iteration's). Two batch sizes: K = 8 and K = 64; N responses each (default 4000).
# Each figure is the median of 3 runs, less the time of `candor rank` with the built-in
# judge on a single prompt (process start and file reading).
#
#   bash scripts/bench/judges.sh        # CANDOR=target/release/candor to time a release build
set -euo pipefail
cd "$(dirname "$0")/../.."
N="${N:-4000}"
# outputs on tmpfs: `rank` fsyncs each prompt's line, which is not the judge's cost
OUT="$(mktemp -d -p /dev/shm)"
CANDOR="${CANDOR:-cargo run -q -p candor-cli --bin candor --}"
python3 examples/judges/reward_server.py --port 0 >"$OUT/port" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; rm -rf "$OUT"' EXIT
for _ in $(seq 50); do [ -s "$OUT/port" ] && break; sleep 0.1; done
URL="http://127.0.0.1:$(head -1 "$OUT/port")/score"
candidates() { # prompts K file
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
prompts, k, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
words = "the cat sat on a warm mat by the door while rain fell".split()
with open(path, "w") as f:
    for p in range(prompts):
        rs = [" ".join(words[(p + r + j) % len(words)] for j in range(1 + r % 7)) + f" {r}" for r in range(k)]
        f.write(json.dumps({"prompt": f"Say something about item {p}.", "responses": rs, "reference": "the cat sat on the mat"}) + "\n")
PY
}
seconds() { # judge candidates
  local best=()
  for i in 1 2 3; do
    rm -f "$OUT/ranked.jsonl"
    local t0; t0=$(date +%s.%N)
    $CANDOR rank --in "$2" --out "$OUT/ranked.jsonl" --judge "$1" >/dev/null 2>&1
    best+=("$(echo "$(date +%s.%N) - $t0" | bc)")
  done
  printf '%s\n' "${best[@]}" | sort -n | sed -n 2p
}
candidates 1 8 "$OUT/one.jsonl"
BASE=$(seconds reference "$OUT/one.jsonl")
echo "startup (built-in judge, one prompt): ${BASE} s"
echo
echo "| judge | batch (K) | s per 1,000 responses | over the built-in |"
echo "|---|---:|---:|---:|"
for K in 8 64; do
  candidates $((N / K)) "$K" "$OUT/c$K.jsonl"
  BUILTIN=""
  for J in reference "command:python3 examples/judges/reference_judge.py" "$URL"; do
    T=$(seconds "$J" "$OUT/c$K.jsonl")
    PER=$(echo "($T - $BASE) * 1000 / $N" | bc -l)
    [ -z "$BUILTIN" ] && BUILTIN=$PER
    NAME="$J"; [[ "$J" == http* ]] && NAME="http://127.0.0.1 (reward_server.py)"
    printf '| `%s` | %d | %.3f | %+.3f |\n' "$NAME" "$K" "$PER" "$(echo "$PER - $BUILTIN" | bc -l)"
  done
done
echo
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%Y-%m-%d)"
