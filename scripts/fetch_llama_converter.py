#!/usr/bin/env python3
"""Fetch llama.cpp's own HF -> GGUF converter, to compare smolq's GGUF with it.

llama.cpp's converter is not on PyPI by itself, but the llama-cpp-python sdist
vendors the whole llama.cpp tree. This script gets that sdist through the
package registry's ordinary client (pip download, source only, no build) and
extracts just what the converter needs:

    convert_hf_to_gguf.py   the entry point
    conversion/             its per-architecture model classes
    gguf-py/                the gguf package of the same commit (the converter
                            uses constants the PyPI gguf release may lack)
    LICENSE

into DEST (default: .venv/real/llama.cpp-converter beside this checkout), with
a VERSION file naming the sdist. Nothing is built or installed. Run again, it
does nothing when DEST already holds that version (idempotent); a failed run
leaves no half directory (extracted to a temporary sibling, then renamed).

    python scripts/fetch_llama_converter.py                 # download + extract
    python scripts/fetch_llama_converter.py --sdist F.tar.gz   # use a local sdist

tests/test_vs_llama_converter.py runs the result in a subprocess with
PYTHONPATH=DEST/gguf-py and skips, saying why, when DEST is absent.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / ".venv" / "real" / "llama.cpp-converter"
# Paths under <sdist root>/vendor/llama.cpp/ that the converter needs.
WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
VENDOR = PurePosixPath("vendor/llama.cpp")
MARKER = "VERSION"


def is_complete(dest: Path, version: str) -> bool:
    marker = dest / MARKER
    return (marker.is_file() and marker.read_text().strip() == f"{PACKAGE}=={version}"
            and (dest / "convert_hf_to_gguf.py").is_file() and (dest / "conversion").is_dir()
            and (dest / "gguf-py" / "gguf").is_dir())


def download_sdist(version: str, into: Path) -> Path:
    """pip download of the source distribution only (no dependencies, no build)."""
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
           "--no-binary", ":all:", f"{PACKAGE}=={version}", "-d", str(into)]
    subprocess.run(cmd, check=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz")) + sorted(into.glob("llama-cpp-python-*.tar.gz"))
    if not found:
        raise SystemExit(f"pip download left no {PACKAGE} sdist in {into}")
    return found[0]


def _relative_to_vendor(name: str) -> PurePosixPath | None:
    """The member's path under vendor/llama.cpp/ if it is one of WANTED, else None."""
    parts = PurePosixPath(name).parts
    if len(parts) < 2 or any(p in ("..", "") for p in parts) or name.startswith("/"):
        return None
    rel = PurePosixPath(*parts[1:])  # drop the sdist's top directory
    try:
        inner = rel.relative_to(VENDOR)
    except ValueError:
        return None
    text = str(inner)
    if any(text == w.rstrip("/") or (w.endswith("/") and text.startswith(w)) for w in WANTED):
        return inner
    return None


def extract_converter(sdist: Path, dest: Path) -> int:
    """Copy the WANTED regular files out of the sdist into dest; returns how many."""
    count = 0
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            inner = _relative_to_vendor(member.name)
            if inner is None or not member.isfile():
                continue  # only plain files: no links, devices or paths outside dest
            target = dest / inner
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            count += 1
    if not (dest / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{sdist} has no {VENDOR}/convert_hf_to_gguf.py")
    return count


def fetch(dest: Path = DEFAULT_DEST, version: str = VERSION, sdist: Path | None = None, quiet: bool = False) -> Path:
    """Make dest hold llama.cpp's converter from llama-cpp-python==version; returns dest."""
    if is_complete(dest, version):
        if not quiet:
            print(f"{dest}: already holds {PACKAGE}=={version}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".llama-converter-", dir=dest.parent) as tmp:
        tmp_path = Path(tmp)
        archive = sdist if sdist is not None else download_sdist(version, tmp_path / "sdist")
        staging = tmp_path / "converter"
        staging.mkdir()
        n = extract_converter(archive, staging)
        (staging / MARKER).write_text(f"{PACKAGE}=={version}\n")
        if dest.exists():
            shutil.rmtree(dest)  # an older version or a broken half: replace it whole
        staging.rename(dest)
    if not quiet:
        print(f"{dest}: {n} files of llama.cpp's converter from {PACKAGE}=={version}")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"target directory (default {DEFAULT_DEST})")
    ap.add_argument("--version", default=VERSION, help=f"{PACKAGE} version whose vendored llama.cpp to use")
    ap.add_argument("--sdist", type=Path, help="use this local sdist (.tar.gz) instead of downloading")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    fetch(args.dest, args.version, args.sdist, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
