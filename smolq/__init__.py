"""smolq: convert Hugging Face checkpoints into GGUF and legacy ggml files, and quantize them.

The public API (smolq.api): convert, quantize, imatrix, read_imatrix, migrate, split, merge, open.
"""

__version__ = "0.1.0"

from smolq.threads import yielding_defaults

# Before anything imports torch: its OpenMP threads then sleep, not spin, when they wait
# (a GPTQ run beside another busy process slowed ~30x without it; smolq/threads.py).
yielding_defaults()

from smolq.errors import FormatError, InputError, SmolqError  # noqa: E402
from smolq.lazy import lazy_module  # noqa: E402

# The public API is imported at first use: `smolq quantize` then loads the modules its command
# needs, not every pipeline (about 0.3 s of imports on a 2-core machine).
_api = lazy_module("smolq.api")
_API_NAMES = frozenset({"Source", "TensorInfo", "convert", "imatrix", "merge", "migrate", "open", "quantize",
                        "read_imatrix", "split"})


def __getattr__(name: str):
    if name in _API_NAMES:
        return getattr(_api, name)
    raise AttributeError(f"module 'smolq' has no attribute {name!r}")


__all__ = [
    "FormatError",
    "InputError",
    "SmolqError",
    "Source",
    "TensorInfo",
    "__version__",
    "convert",
    "imatrix",
    "merge",
    "migrate",
    "open",
    "quantize",
    "read_imatrix",
    "split",
]
