"""Where llama.cpp's own ggml library is, for byte-identity checks.

`make setup` installs llama-cpp-python, which builds libggml-base with the
reference quantizers (quantize_row_*_ref, quantize_q*, ggml_quantize_chunk).
$SMOLQ_LIBGGML points elsewhere; tests skip with this reason when absent.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

NO_LIBGGML = "libggml from llama-cpp-python not installed (make setup installs it)"


def find_libggml() -> Path | None:
    env = os.environ.get("SMOLQ_LIBGGML")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None:
        return None
    for root in spec.submodule_search_locations or []:
        for name in ("libggml-base.so", "libggml-base.dylib"):
            p = Path(root) / "lib" / name
            if p.exists():
                return p
    return None
