"""smolq: convert Hugging Face checkpoints into GGUF and legacy ggml files, and quantize them."""

__version__ = "0.1.0"

from smolq.errors import FormatError, InputError, SmolqError  # noqa: E402,F401
