#!/usr/bin/env python3
"""Build llama.cpp's own command-line tools, portably, to check smolq against.

llama-quantize, llama-imatrix and llama-perplexity are not on PyPI, but the
llama-cpp-python sdist vendors the whole llama.cpp tree. This script gets the
sdist with pip (source only; the one scripts/fetch_llama_converter.py uses),
configures vendor/llama.cpp with CMake for a PORTABLE instruction set (the
Makefile's reasons: a native build crashed on an AVX-512/AMX machine), builds
only the three tools, statically linked, and installs them into
DEST/bin (default .venv/real/llama.cpp-tools/bin) with a VERSION marker.

Idempotent: nothing happens when DEST already holds that version. A failed
run leaves no half directory (built in a temporary sibling, then renamed).

    python scripts/build_llama_tools.py                 # download + build (~8 min on 2 cores)
    python scripts/build_llama_tools.py --sdist F.tar.gz
    python scripts/build_llama_tools.py --source DIR    # an unpacked llama.cpp tree

tests/real_loaders.py: llama_tool(name) finds the result ($SMOLQ_LLAMA_TOOLS overrides)
and tests skip, saying why, without it.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_llama_converter import PACKAGE, VERSION, download_sdist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / ".venv" / "real" / "llama.cpp-tools"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
MARKER = "VERSION"

# Same instruction-set policy as the Makefile's llama-cpp-python build.
PORTABLE = ["-DGGML_NATIVE=OFF", "-DGGML_CPU_ALL_VARIANTS=OFF", "-DGGML_BACKEND_DL=OFF"]
X86_64 = ["-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
          "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF",
          "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF", "-DGGML_AMX_TILE=OFF",
          "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
# Only the tools: no network code, no server, no tests, one static binary each.
MINIMAL = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
           "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
           "-DLLAMA_BUILD_EXAMPLES=OFF"]


def cmake_args() -> list[str]:
    machine = platform.machine().lower()
    return MINIMAL + PORTABLE + (X86_64 if machine in ("x86_64", "amd64") else [])


def is_complete(dest: Path, version: str) -> bool:
    marker = dest / MARKER
    return (marker.is_file() and marker.read_text().strip() == f"{PACKAGE}=={version}"
            and all((dest / "bin" / t).is_file() for t in TOOLS))


def unpack_llama_cpp(sdist: Path, into: Path) -> Path:
    """Extract vendor/llama.cpp of the sdist (regular files only) and return its path."""
    with tarfile.open(sdist, "r:gz") as tar:
        members = [m for m in tar if (m.isfile() or m.isdir()) and "/vendor/llama.cpp/" in m.name + "/"
                   and not m.name.startswith("/") and ".." not in Path(m.name).parts]
        tar.extractall(into, members=members, filter="data")
    found = sorted(into.glob("*/vendor/llama.cpp"))
    if not found:
        raise SystemExit(f"{sdist} has no vendor/llama.cpp")
    return found[0]


def build(source: Path, build_dir: Path, jobs: int) -> Path:
    subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *cmake_args()], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TOOLS], check=True,
                   stdout=subprocess.DEVNULL)
    return build_dir / "bin"


def install(dest: Path = DEFAULT_DEST, version: str = VERSION, sdist: Path | None = None,
            source: Path | None = None, jobs: int | None = None, quiet: bool = False) -> Path:
    if is_complete(dest, version):
        if not quiet:
            print(f"{dest}: already holds {', '.join(TOOLS)} of {PACKAGE}=={version}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix=".llama-tools-", dir=dest.parent) as tmp:
        tmp_path = Path(tmp)
        if source is None:
            archive = sdist if sdist is not None else download_sdist(version, tmp_path / "sdist")
            source = unpack_llama_cpp(archive, tmp_path / "src")
        bin_dir = build(source, tmp_path / "build", jobs)
        staging = tmp_path / "tools"
        (staging / "bin").mkdir(parents=True)
        for tool in TOOLS:
            shutil.copy2(bin_dir / tool, staging / "bin" / tool)
        (staging / MARKER).write_text(f"{PACKAGE}=={version}\n")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    if not quiet:
        print(f"{dest}/bin: {', '.join(TOOLS)} from {PACKAGE}=={version}")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"target directory (default {DEFAULT_DEST})")
    ap.add_argument("--version", default=VERSION, help=f"{PACKAGE} version whose vendored llama.cpp to build")
    ap.add_argument("--sdist", type=Path, help="use this local sdist (.tar.gz) instead of downloading")
    ap.add_argument("--source", type=Path, help="build this unpacked llama.cpp tree instead")
    ap.add_argument("-j", "--jobs", type=int, help="parallel compile jobs (default: all cores)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    install(args.dest, args.version, args.sdist, args.source, args.jobs, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
