"""smolq: convert Hugging Face checkpoints into GGUF and legacy ggml files, and quantize them.

The public API (smolq.api): convert, quantize, imatrix, read_imatrix, migrate, split, merge, open.
"""

__version__ = "0.1.0"

from smolq.threads import yielding_defaults  # noqa: E402

# Before anything imports torch: its OpenMP threads then sleep, not spin, when they wait
# (a GPTQ run beside another busy process slowed ~30x without it; smolq/threads.py).
yielding_defaults()

from smolq.api import (  # noqa: E402,F401
    Source,
    TensorInfo,
    convert,
    imatrix,
    merge,
    migrate,
    open,
    quantize,
    read_imatrix,
    split,
)
from smolq.errors import FormatError, InputError, SmolqError  # noqa: E402,F401

__all__ = ["__version__", "convert", "quantize", "imatrix", "read_imatrix", "migrate", "split", "merge", "open", "Source", "TensorInfo",
           "SmolqError", "InputError", "FormatError"]
