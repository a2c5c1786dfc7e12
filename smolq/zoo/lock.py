"""JSON state files of a zoo (lock file, fingerprint cache, reports), written atomically."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smolq.atomic import atomic_output
from smolq.errors import InputError


def load_json(path: Path, default: Any) -> Any:
    """The file's JSON, or `default` when it does not exist; a corrupt file is an error naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc.msg} at line {exc.lineno}); delete it to start afresh") from None


def save_json(path: Path, obj: Any) -> None:
    """Write atomically; a file that already holds exactly this is left alone (so a run that
    changes nothing leaves the lock file's mtime, and any tool watching it, undisturbed)."""
    data = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False).encode("utf-8") + b"\n"
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as fh:
        fh.write(data)
