"""The one summary shape every pipeline returns (and `--json` prints).

Every summary has these keys; a pipeline adds its own beside them:

    source, output, format        input path, output path, output format name
    n_tensors, tensor_bytes       output tensors and their data bytes
    bytes, seconds                the written output's size and the time taken (None on a dry run)
    notes                         lines a user should read
    tensors                       rows with at least name, shape, type, bytes
"""
from __future__ import annotations

from typing import Any

SUMMARY_KEYS = ("source", "output", "format", "n_tensors", "tensor_bytes", "bytes", "seconds", "notes", "tensors")


def common_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """`summary` with every common key present (missing ones filled from what is there, else None)."""
    tensors = summary.setdefault("tensors", [])
    summary.setdefault("notes", [])
    summary.setdefault("n_tensors", len(tensors) if tensors else None)
    summary.setdefault("tensor_bytes", sum(t["bytes"] for t in tensors) if tensors else None)
    for key in ("source", "output", "format", "bytes", "seconds"):
        summary.setdefault(key, None)
    return summary
