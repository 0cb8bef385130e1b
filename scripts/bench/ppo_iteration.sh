#!/usr/bin/env bash
# Seconds per PPO iteration, split into generation, scoring (reward model, reference and
# critic forward passes) and training, read from the stage's own metrics.jsonl.
#
#   bash scripts/bench/ppo_iteration.sh [RUN_DIR]
#
# RUN_DIR holds `sft` and `reward` checkpoints of a recipe run (default: runs/sentiment, made
# by `candor run configs/recipes/sentiment.yaml`: 4 layers, width 128, 4 heads, 0.94M
# parameters, the size of PERF-NOTES' TRL GRPOTrainer peer). Two settings are timed:
#   - "TRL-sized": 16 prompts, up to 32 new tokens, one PPO epoch of one minibatch — the
#     work of one GRPOTrainer step in PERF-NOTES (0.21 s there);
#   - the recipe's own: configs/tiny/ppo.yaml as the sentiment recipe sets it (32 prompts,
#     4 epochs of minibatches of 8).
# The first two iterations are dropped (allocation warm-up); medians of the rest.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN="${1:-runs/sentiment}"
ITER="${ITER:-12}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
CANDOR="${CANDOR:-cargo run -q -p candor-cli --bin candor --}"
medians() {
  python3 - "$1" "$2" <<'PY'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
r = [x for x in rows if "time_generate" in x][2:]
m = {k: st.median(x[k] for x in r) for k in ("time_generate", "time_score", "time_train")}
total = st.median(x["time_generate"] + x["time_score"] + x["time_train"] for x in r)
print(f"| {sys.argv[2]} | {m['time_generate']:.3f} | {m['time_score']:.3f} | {m['time_train']:.3f} | {total:.3f} | {len(r)} |")
PY
}
echo "| setting | generation (s) | scoring (s) | training (s) | total (s) | iterations |"
echo "|---|---:|---:|---:|---:|---:|"
$CANDOR ppo --config configs/tiny/ppo.yaml --device cpu --policy "$RUN/sft" --reward "$RUN/reward" --out "$OUT/trl" \
  --set train.steps="$ITER" --set train.eval_every=0 --set rollout.prompts_per_iteration=16 \
  --set rollout.max_new_tokens=32 --set ppo.epochs=1 --set train.batch_size=16 >/dev/null 2>&1
medians "$OUT/trl" "TRL-sized (16 x 32 tokens, 1 epoch)"
$CANDOR ppo --config configs/tiny/ppo.yaml --device cpu --policy "$RUN/sft" --reward "$RUN/reward" --out "$OUT/recipe" \
  --set train.steps="$ITER" --set train.eval_every=0 --set rollout.prompts_per_iteration=32 \
  --set rollout.max_new_tokens=32 >/dev/null 2>&1
medians "$OUT/recipe" "sentiment recipe (32 x 32 tokens, 4 epochs)"
