"""tokenizer.ggml.pre for a byte-level BPE tokenizer, chosen the way llama.cpp's converter chooses it.

llama.cpp tokenizes a fixed check text with the model's tokenizer and names
the pre-tokenizer by sha256(str(token ids)) (its get_vocab_base_pre; the text
and the known hashes are data in bpe_pre_table.py, generated from the
converter by scripts/gen_bpe_pre_table.py). The ids come from tokenizer.json
through the `tokenizers` library, special tokens included, as the converter's
`tokenizer.encode(chktxt)` gives them.

A hash llama.cpp does not know makes its converter stop. smolq goes one step
further, never silently: when tokenizer.json's pre-tokenizer is exactly one
whose splitting llama.cpp implements under a name (PRE_TOKENIZER_FORMS: the
GPT-2, Llama 3, Qwen2 and SmolLM2 forms), that name is written with a note
saying so; otherwise the conversion is refused in one line naming the hash.
The same forms turn a name back into a pre-tokenizer for `--format hf` (sources/hf_tokenizer.py).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from smolq.errors import InputError
from smolq.lazy import lazy_module
from smolq.sources.bpe_pre_table import CHECK_TEXT, KNOWN_PRE

tokenizers = lazy_module("tokenizers")  # imported at first use: `smolq --help` stays fast

# The regexes of tokenizer.json's Split step as the original tokenizers ship them (llama-vocab.cpp
# quotes them above its adapted forms for the same names).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

# tokenizer.ggml.pre -> the pre-tokenizer steps of tokenizer.json that split as llama.cpp's regexes
# for that name: ("bytelevel",) is ByteLevel with its own GPT-2 regex; ("split", R) a Split on regex R
# (isolated), always followed by a ByteLevel that only maps bytes; ("digits",) single digits.
PRE_TOKENIZER_FORMS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gpt-2": (("bytelevel",),),
    "llama-bpe": (("split", LLAMA3_REGEX), ("bytemap",)),
    "qwen2": (("split", QWEN2_REGEX), ("bytemap",)),
    "smollm": (("digits",), ("bytelevel",)),
}


def check_hash(tokenizer_json: Path) -> str:
    """sha256 of str(ids of CHECK_TEXT), as llama.cpp's converter computes it."""
    try:
        tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    except Exception as exc:  # tokenizers raises its own Exception subclass for any bad file
        raise InputError(tokenizer_json, f"the tokenizers library cannot read it: {exc}") from None
    ids = tok.encode(CHECK_TEXT).ids
    return hashlib.sha256(str(list(ids)).encode()).hexdigest()


def identify_pre(tokenizer_json: Path, data: dict[str, Any], notes: list[str]) -> str:
    """tokenizer.ggml.pre: by the check-text hash, else by the pre-tokenizer's form (noted), else refused."""
    digest = check_hash(tokenizer_json)
    if digest in KNOWN_PRE:
        return KNOWN_PRE[digest]
    form = pre_tokenizer_form(data.get("pre_tokenizer"))
    for name, steps in PRE_TOKENIZER_FORMS.items():
        if form == steps:
            notes.append(f"pre-tokenizer hash {digest} is not in llama.cpp's table (its converter refuses this "
                         f"tokenizer); its pre-tokenizer splits as llama.cpp's {name!r}, so that is written")
            return name
    raise InputError(tokenizer_json, f"unknown BPE pre-tokenizer (check-text hash {digest}, not in llama.cpp's "
                                     f"table, and its pre_tokenizer is none of {', '.join(PRE_TOKENIZER_FORMS)})")


def pre_tokenizer_form(pre: Any) -> tuple[tuple[str, ...], ...] | None:
    """tokenizer.json's pre_tokenizer as PRE_TOKENIZER_FORMS spells it; None for any other."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        return None
    form = []
    for s in steps:
        kind = s.get("type")
        if kind == "ByteLevel" and not s.get("add_prefix_space", False):
            form.append(("bytelevel",) if s.get("use_regex", True) else ("bytemap",))
        elif kind == "Digits" and s.get("individual_digits") is True:
            form.append(("digits",))
        elif (kind == "Split" and s.get("behavior") == "Isolated" and not s.get("invert", False)
              and isinstance(s.get("pattern"), dict) and isinstance(s["pattern"].get("Regex"), str)):
            form.append(("split", s["pattern"]["Regex"]))
        else:
            return None
    return tuple(form)
