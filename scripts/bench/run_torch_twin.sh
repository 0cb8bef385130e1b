#!/usr/bin/env bash
# Runs the PyTorch twin for every shape, train and sample, printing one JSON object a line.
#   scripts/bench/run_torch_twin.sh [extra torch_twin.py args...]   (e.g. --threads 1)
# Before each run it waits (up to QUIET_MAX_WAIT seconds, default 600) until the machine's
# CPUs are at least QUIET_IDLE percent idle (default 90) over 3 s, since on a 2-core box a
# concurrent cargo build halves the figures and makes 2-thread OpenMP runs thrash.
# A run during which other processes used more than MAX_BG (default 0.05) of the CPUs (the
# twin reports it as background_cpu_frac) is repeated, up to TRIES times (default 4); the
# last attempt is printed either way.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
QUIET_IDLE="${QUIET_IDLE:-90}"
QUIET_MAX_WAIT="${QUIET_MAX_WAIT:-600}"
MAX_BG="${MAX_BG:-0.05}"
TRIES="${TRIES:-4}"

# shellcheck source=quiet.sh
source "$ROOT/scripts/bench/quiet.sh"

for shape in tiny small medium; do
  for mode in train sample; do
    extra=()
    [ "$mode" = sample ] && extra=(--sample)
    for try in $(seq 1 "$TRIES"); do
      wait_quiet
      line=$("$PY" "$ROOT/scripts/bench/torch_twin.py" --shape "$shape" --json "${extra[@]}" "$@")
      if "$PY" -c 'import json,sys; sys.exit(json.loads(sys.argv[1])["background_cpu_frac"] > float(sys.argv[2]))' \
          "$line" "$MAX_BG"; then
        break
      fi
      echo "note: $shape $mode attempt $try disturbed by other processes, retrying" >&2
    done
    echo "$line"
  done
done
