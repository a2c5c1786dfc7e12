"""The directory transformers saves for a bitsandbytes 4-bit model: model.safetensors,
config.json with quantization_config, tokenizer files; written atomically (a temporary
directory renamed into place), tensor by tensor."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

from smolq.atomic import atomic_directory
from smolq.formats.bnb_ckpt import SafetensorsStream
from smolq.formats.gptq_ckpt import TOKENIZER_FILES

# One output group: its name (for progress) and a load() giving {tensor name: (array, safetensors dtype)}.
Group = tuple[str, Callable[[], dict[str, tuple[Any, str | None]]]]


def write(out: Path, src_dir: Path, config: dict[str, Any], groups: Iterable[Group],
          on_tensor: Callable[[str, int], None] | None = None) -> int:
    """Write the directory; returns its size in bytes."""
    with atomic_directory(out) as tmp:
        stream = SafetensorsStream(tmp / ".model.safetensors.data")
        try:
            for name, load in groups:
                size = sum(stream.add(k, a, dt) for k, (a, dt) in load().items())
                if on_tensor:
                    on_tensor(name, size)
            with open(tmp / "model.safetensors", "wb") as fh:
                stream.finish(fh)
        except BaseException:
            stream.discard()
            raise
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for fname in TOKENIZER_FILES:
            if (src_dir / fname).is_file():
                shutil.copyfile(src_dir / fname, tmp / fname)
        return sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
