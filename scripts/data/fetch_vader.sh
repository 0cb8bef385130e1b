#!/usr/bin/env bash
# Regenerate data/sentiment/ from PyPI vaderSentiment 3.3.2 (MIT):
#   vader_lexicon.txt      the package's lexicon, CRLF line endings turned into LF
#   LICENSE                the package's LICENSE.txt (MIT), CRLF turned into LF
#   vader_reference.jsonl  20 {"text", "compound"} pairs scored by the package's own
#                          SentimentIntensityAnalyzer (a test fixture)
# The wheel is fetched with pip into the cache (.cache/data/pypi by default) and
# imported from there: nothing is installed. Idempotent and deterministic.
# Usage: bash scripts/data/fetch_vader.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python3 - <<'PY'
import json
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, "scripts/data")
from _common import DATA, PYPI_VADER, fetch_pypi_wheel, log, write_jsonl, write_text

whl = fetch_pypi_wheel(PYPI_VADER)
out = DATA / "sentiment"
with zipfile.ZipFile(whl) as z:
    lexicon = z.read("vaderSentiment/vader_lexicon.txt").decode("utf-8")
    licence = z.read("vaderSentiment-3.3.2.dist-info/LICENSE.txt").decode("utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        z.extractall(tmp)
        sys.path.insert(0, tmp)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        analyzer = SentimentIntensityAnalyzer()

lexicon = lexicon.replace("\r\n", "\n")
licence = licence.replace("\r\n", "\n")
assert "\r" not in lexicon + licence
rows = [line.split("\t") for line in lexicon.splitlines()]
assert all(len(r) == 4 for r in rows), "expected token, mean, std, ratings"
log(f"vader lexicon: {len(rows)} entries")
write_text(out / "vader_lexicon.txt", lexicon)
write_text(out / "LICENSE", licence)

# Chosen to cover VADER's rules (negation, boosters, ALL CAPS, "but", "kind of",
# "least", emoticons, "!" emphasis on neutral text) plus sentences from the
# shipped corpus. No emoji: those need the emoji lexicon, which is not shipped.
SENTENCES = [
    "VADER is smart, handsome, and funny.",
    "VADER is not smart, handsome, nor funny.",
    "VADER is VERY SMART, handsome, and FUNNY!!!",
    "The book was kind of good.",
    "The plot was good, but the characters are uncompelling and the dialog is not great.",
    "At least it isn't a horrible book.",
    "Today SUX!",
    "Make sure you :) or :D today!",
    "Not bad at all",
    "The sea was calm and beautiful this morning.",
    "The storm destroyed the ship and killed the crew.",
    "I love my friend, and my friend loves the whale.",
    "Money is the root of all evil.",
    "The whale was a monster of the deep.",
    "It was the best of times, it was the worst of times.",
    "She gave me her heart.",
    "Look there!",
    "Call me Ishmael.",
    "But Faith, like a jackal, feeds among the tombs, and even from these dead doubts she gathers her most vital hope.",
    "A gift of a flower will soon be made to you.",
]
write_jsonl(out / "vader_reference.jsonl",
            ({"text": s, "compound": analyzer.polarity_scores(s)["compound"]} for s in SENTENCES))
PY
