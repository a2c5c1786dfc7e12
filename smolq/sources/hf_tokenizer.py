"""A GGUF/legacy vocabulary back as a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json).

The inverse of sources/vocab.py's loading, built to tokenize as llama.cpp does:

- "gpt2" (byte-level BPE): the vocabulary and merges as they are (GPT-2's
  byte->unicode encoding kept), the pre-tokenizer that splits as llama.cpp's
  regexes for tokenizer.ggml.pre do (PRE_TOKENIZERS; an unknown pre-tokenizer
  is refused rather than guessed), a ByteLevel decoder;
- "llama" (SentencePiece): tokenizer.model (a SentencePiece ModelProto with the
  GGUF's pieces, scores and types: sentencepiece_model) and, for transformers'
  fast tokenizer, LlamaTokenizerFast's conventions (its
  "legacy" form): a BPE with byte fallback whose merges are every pair of
  pieces that makes a normal piece, ranked by that piece's score (llama.cpp's
  SPM tokenizer merges the best-scoring pair first), spaces as "▁" and a
  leading "▁" per text fragment (tokenizer.ggml.add_space_prefix).

tokenizer_config.json names the generic PreTrainedTokenizerFast, which takes
tokenizer.json as it is in transformers 4 and 5 alike.

Control tokens (and <unk>) become special added tokens, user-defined ones
plain added tokens (llama.cpp splits on both before tokenizing); BOS/EOS are
added by a post-processor as tokenizer.ggml.add_bos/eos_token say.
"""
from __future__ import annotations

from typing import Any

from smolq.errors import InputError
from smolq.lazy import lazy_module
from smolq.sources.bpe_pre import PRE_TOKENIZER_FORMS
from smolq.sources.vocab import (ADDED_TOKEN_SCORE, BYTE, CONTROL, NORMAL, SPIECE_SPACE, UNKNOWN, UNUSED, USER_DEFINED,
                                 Vocab)

tokenizers = lazy_module("tokenizers")  # imported at first use: `smolq --help` stays fast

# tokenizer.ggml.pre -> pre-tokenizer steps that split as llama-vocab.cpp's regexes for it:
# "gpt2"/"default"/"mpt": the GPT-2 regex (ByteLevel's own); "smollm": \p{N} (single digits), then GPT-2's.
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": ("bytelevel",),
    "gpt2": ("bytelevel",),
    "smollm": ("digits", "bytelevel"),
    # MPT's tokenizer (GPT-NeoX's) is byte-level BPE with the GPT-2 regex after NFC; smolq writes
    # "mpt" for it. llama.cpp's regexes for "mpt" are its own stated approximation of that
    # tokenizer (and it skips NFC), so the export keeps the checkpoint's.
    "mpt": ("bytelevel",),
}
# tokenizer.ggml.pre -> the normalizer the original tokenizer.json had (none where absent).
NORMALIZERS: dict[str, str] = {"mpt": "nfc"}


def hf_tokenizer(vocab: Vocab, path: Any = None):
    """A `tokenizers.Tokenizer` that tokenizes as llama.cpp does with this vocabulary."""
    if vocab.model == "gpt2":
        tok = _byte_level_bpe(vocab, path)
    elif vocab.model == "llama":
        tok = _sentencepiece_bpe(vocab, path)
    else:
        raise InputError(path, f"tokenizer.ggml.model {vocab.model!r} cannot be rebuilt as a Hugging Face "
                               "tokenizer (gpt2 and llama can)")
    added = [tokenizers.AddedToken(t, special=kind != USER_DEFINED, normalized=False)
             for t, kind in zip(vocab.tokens, vocab.types) if kind in (CONTROL, USER_DEFINED, UNKNOWN)]
    tok.add_tokens(added)
    tok.post_processor = _post_processor(vocab)
    return tok


def _token_ids(vocab: Vocab, path: Any) -> dict[str, int]:
    ids: dict[str, int] = {}
    for i, t in enumerate(vocab.tokens):
        if t in ids:
            raise InputError(path, f"token {t!r} appears twice (ids {ids[t]} and {i}); a Hugging Face "
                                   "vocabulary maps each text to one id")
        ids[t] = i
    return ids


def _byte_level_bpe(vocab: Vocab, path: Any):
    pre = vocab.pre or "default"
    if pre not in PRE_TOKENIZERS and pre not in PRE_TOKENIZER_FORMS:
        known = sorted(set(PRE_TOKENIZERS) | set(PRE_TOKENIZER_FORMS))
        raise InputError(path, f"tokenizer.ggml.pre {pre!r} has no known Hugging Face pre-tokenizer "
                               f"(known: {', '.join(known)})")
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges] if vocab.merges else merges_from_ranks(vocab)
    if not merges:
        raise InputError(path, "the byte-level BPE vocabulary has no merges (tokenizer.ggml.merges)")
    ids = _token_ids(vocab, path)
    # The [PADi] pieces smolq's convert adds up to the embedding's rows (UNUSED) are no part of the
    # checkpoint's tokenizer: left out, so converting the export back pads them the same way.
    end = len(vocab)
    while end and vocab.types[end - 1] == UNUSED and vocab.tokens[end - 1] == f"[PAD{end - 1}]":
        end -= 1
        del ids[vocab.tokens[end]]
    model = tokenizers.models.BPE(vocab=ids, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = tokenizers.Tokenizer(model)
    pt = tokenizers.pre_tokenizers
    steps = {"digits": pt.Digits(individual_digits=True),
             "bytelevel": pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)}
    if pre in PRE_TOKENIZERS:
        tok.pre_tokenizer = pt.Sequence([steps[s] for s in PRE_TOKENIZERS[pre]])
    else:  # Llama 3's, Qwen2's: the Split regex of the original tokenizer.json (sources/bpe_pre.py)
        tok.pre_tokenizer = pt.Sequence([_pre_tokenizer_step(s) for s in PRE_TOKENIZER_FORMS[pre]])
    if NORMALIZERS.get(pre) == "nfc":
        tok.normalizer = tokenizers.normalizers.NFC()
    tok.decoder = tokenizers.decoders.ByteLevel()
    return tok


def _pre_tokenizer_step(step: tuple[str, ...]):
    """One step of a PRE_TOKENIZER_FORMS entry as a `tokenizers` pre-tokenizer."""
    pt = tokenizers.pre_tokenizers
    if step[0] == "split":
        return pt.Split(tokenizers.Regex(step[1]), behavior="isolated", invert=False)
    if step[0] == "digits":
        return pt.Digits(individual_digits=True)
    return pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=step[0] == "bytelevel")


def merges_from_ranks(vocab: Vocab) -> list[tuple[str, str]]:
    """The merges of a byte-level BPE vocabulary that stores none (legacy files), rebuilt from
    its order: GPT-2-style vocabularies list each merged token right after the merges before
    it, so a token's id is its merge's rank. Each normal multi-character token is split by
    running BPE over its characters with only the lower-ranked tokens (as transformers rebuilds
    tiktoken's merges); a token that does not end as exactly two parts gives no merge."""
    rank: dict[str, int] = {}
    for i, (t, kind) in enumerate(zip(vocab.tokens, vocab.types)):
        if kind == NORMAL and t not in rank:
            rank[t] = i
    merges = []
    for token, r in rank.items():
        if len(token) < 2 or any(c not in rank for c in token):
            continue
        parts = list(token)
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda j: rank.get(parts[j] + parts[j + 1], len(vocab)))
            if rank.get(parts[best] + parts[best + 1], len(vocab)) >= r:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def sentencepiece_merges(vocab: Vocab) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a normal piece, best-scoring piece first."""
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    scores = vocab.scores if vocab.scores is not None else [-float(i) for i in range(len(vocab))]
    ranked = []
    for i, piece in enumerate(vocab.tokens):
        if vocab.types[i] in (CONTROL, UNKNOWN, BYTE, UNUSED, USER_DEFINED):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, ids[left], (left, right)))
    return [pair for *_, pair in sorted(ranked)]


def _sentencepiece_bpe(vocab: Vocab, path: Any):
    unk = vocab.special_ids.get("unk")
    unk_token = vocab.tokens[unk] if unk is not None and 0 <= unk < len(vocab) else None
    model = tokenizers.models.BPE(vocab=_token_ids(vocab, path), merges=sentencepiece_merges(vocab),
                                  unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    tok = tokenizers.Tokenizer(model)
    n, d = tokenizers.normalizers, tokenizers.decoders
    steps = [n.Prepend(SPIECE_SPACE)] if vocab.add_space_prefix is not False else []
    tok.normalizer = n.Sequence(steps + [n.Replace(" ", SPIECE_SPACE)])
    decode = [d.Replace(SPIECE_SPACE, " "), d.ByteFallback(), d.Fuse()]
    if vocab.add_space_prefix is not False:
        decode.append(d.Strip(" ", 1, 0))
    tok.decoder = d.Sequence(decode)
    return tok


def _adds(vocab: Vocab) -> tuple[bool, bool]:
    """(add BOS, add EOS) as llama.cpp decides: the GGUF flags, else BOS for SentencePiece only."""
    add_bos = vocab.add_bos if vocab.add_bos is not None else vocab.model == "llama"
    add_eos = bool(vocab.add_eos)
    return add_bos and "bos" in vocab.special_ids, add_eos and "eos" in vocab.special_ids


def _post_processor(vocab: Vocab):
    add_bos, add_eos = _adds(vocab)
    if not add_bos and not add_eos:
        if vocab.model == "gpt2":
            return tokenizers.processors.ByteLevel(trim_offsets=False)
        return None
    bos, eos = vocab.special_ids.get("bos"), vocab.special_ids.get("eos")
    first = ([f"{vocab.tokens[bos]}:0"] if add_bos else [])
    last = ([f"{vocab.tokens[eos]}:0"] if add_eos else [])
    single = first + ["$A:0"] + last
    pair = single + [p.replace(":0", ":1") for p in first] + ["$B:1"] + [p.replace(":0", ":1") for p in last]
    special = ([(vocab.tokens[bos], bos)] if add_bos else []) + ([(vocab.tokens[eos], eos)] if add_eos and eos != bos else [])
    return tokenizers.processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                    special_tokens=special)


def tokenizer_config(vocab: Vocab, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: class, special tokens by text, BOS/EOS flags, chat template."""
    add_bos, add_eos = _adds(vocab)
    cfg: dict[str, Any] = {
        # The generic class loads tokenizer.json as it is; transformers 5's LlamaTokenizer rebuilds its own
        # normalizer (Metaspace), which splits runs of spaces unlike llama.cpp.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    if vocab.model == "llama":
        cfg["legacy"] = True  # the prefix rules above: a "▁" before every text fragment
        cfg["add_prefix_space"] = vocab.add_space_prefix is not False
    for kind, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unk", "unk_token"), ("pad", "pad_token")):
        i = vocab.special_ids.get(kind)
        if i is not None and 0 <= i < len(vocab):
            cfg[name] = vocab.tokens[i]
    listed = _listed_added_tokens(vocab)
    if listed:
        cfg["added_tokens_decoder"] = {
            str(i): {"content": vocab.tokens[i], "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False, "special": vocab.types[i] != USER_DEFINED} for i in listed}
    if vocab.chat_template:
        cfg["chat_template"] = vocab.chat_template
    return cfg


def _listed_added_tokens(vocab: Vocab) -> list[int]:
    """Ids tokenizer_config.json lists as added tokens.

    Byte-level BPE: every control, user-defined and unknown token. SentencePiece: only those
    that were added tokens in the checkpoint the GGUF came from, i.e. control / user-defined
    with llama.cpp's added-token score (-1000): the pieces of tokenizer.model keep their own
    types and scores there, and listing one would make llama.cpp's converter re-type it as an
    added token; listing the added ones makes it type them as it did (Gemma's specials and its
    user-defined newline runs come back CONTROL and USER_DEFINED, not NORMAL)."""
    kinds = (CONTROL, USER_DEFINED, UNKNOWN)
    if vocab.model != "llama":
        return [i for i, kind in enumerate(vocab.types) if kind in kinds]
    if vocab.scores is None:
        return []
    return [i for i, (kind, score) in enumerate(zip(vocab.types, vocab.scores))
            if kind in (CONTROL, USER_DEFINED) and score == ADDED_TOKEN_SCORE]


# SentencePiece's ModelProto (sentencepiece_model.proto), the fields written here:
# ModelProto: pieces = 1 (SentencePiece: piece = 1, score = 2, type = 3), trainer_spec = 2, normalizer_spec = 3;
# TrainerSpec: model_type = 3 (BPE = 2), vocab_size = 4, byte_fallback = 35, unk_id = 40, bos_id = 41,
# eos_id = 42, pad_id = 43; NormalizerSpec: name = 1, add_dummy_prefix = 3, remove_extra_whitespaces = 4,
# escape_whitespaces = 5.
_SPM_BPE = 2


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative ids (-1: none) as protobuf's 64-bit two's complement
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2) + _varint(len(data)) + data


def _int_field(number: int, value: int) -> bytes:
    return _field(number, 0) + _varint(int(value))


def sentencepiece_model(vocab: Vocab) -> bytes:
    """tokenizer.model for a SentencePiece ("llama") vocabulary: its pieces, scores and types as
    the GGUF holds them, a BPE model with byte fallback, the identity normalizer that keeps runs
    of spaces (as llama.cpp does) and the GGUF's add_space_prefix as add_dummy_prefix."""
    import struct

    scores = vocab.scores if vocab.scores is not None else [-float(i) for i in range(len(vocab))]
    out = bytearray()
    for piece, score, kind in zip(vocab.tokens, scores, vocab.types):
        body = _bytes_field(1, piece.encode("utf-8")) + _field(2, 5) + struct.pack("<f", score) + _int_field(3, kind)
        out += _bytes_field(1, body)
    ids = {k: vocab.special_ids.get(k, -1) for k in ("unk", "bos", "eos", "pad")}
    trainer = (_int_field(3, _SPM_BPE) + _int_field(4, len(vocab)) + _int_field(35, any(t == BYTE for t in vocab.types))
               + _int_field(40, ids["unk"]) + _int_field(41, ids["bos"]) + _int_field(42, ids["eos"])
               + _int_field(43, ids["pad"]))
    normalizer = (_bytes_field(1, b"identity") + _int_field(3, vocab.add_space_prefix is not False)
                  + _int_field(4, 0) + _int_field(5, 1))
    out += _bytes_field(2, trainer) + _bytes_field(3, normalizer)
    return bytes(out)


def special_tokens_map(config: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in config.items() if k in ("bos_token", "eos_token", "unk_token", "pad_token")}
