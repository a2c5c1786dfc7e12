"""Vocabulary recovery: the tokenizer a GGUF or legacy model file holds, as a Vocab.

Legacy files store token texts (and, from 'ggmf' on, scores) only; the GGUF
view (token kinds, special ids, add_bos ...) is rebuilt by each format's
text rules (formats.md 3, 6.5), and every rebuilt or assumed value is listed
as a Guess. A tokenizer given with --config is used instead when its tokens
are the file's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from smolq.arch.base import LegacyTarget
from smolq.arch.legacy_config import Guess
from smolq.errors import FormatError
from smolq.sources.vocab import (
    BYTE,
    CONTROL,
    NORMAL,
    SPIECE_SPACE,
    UNK_LEGACY_TEXT,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Vocab,
    byte_encoder,
    decode_byte_level,
    load_vocab,
)

_PAD = "[PAD{}]"


def _pad_name(i: int, text: bytes) -> bool:
    return text == _PAD.format(i).encode()


def vocab_from_legacy(lf, guesses: list[Guess]) -> Vocab:
    """The GGUF view of a legacy vocabulary, by each format's text rules (formats.md 3, 6.5)."""
    if lf.family == "llama":
        return _llama_vocab_from_legacy(lf, guesses)
    mpt = lf.family == "mpt"
    tokens, types = _byte_level_tokens(lf)
    if mpt and lf.container == "ggmm":
        guesses.append(Guess("tokenizer.ggml.tokens", "rebuilt", "'ggmm' stored tokens as UTF-8 text: byte tokens "
                                                                "that were not valid UTF-8 came through as U+FFFD"))
    if mpt:
        guesses.append(Guess("tokenizer.ggml.token_type", "normal/control/unused", "rebuilt from the legacy vocabulary"))
    guesses.append(Guess("tokenizer.ggml.merges", None, "legacy files store no BPE merges; pass --config with the tokenizer"))
    # A GPT-2 byte-level tokenizer (ByteLevel post-processor) adds no BOS/EOS; convert writes that as
    # add_bos/add_eos = false, as llama.cpp's converter does.
    vocab = Vocab("gpt2", tokens, types, None, [], {}, add_bos=False, add_eos=False,
                  pre="mpt" if mpt else None, n_base=len(lf.vocab))
    guesses.append(Guess("tokenizer.ggml.add_bos_token", False, "GPT-2 byte-level BPE adds no BOS"))
    guesses.append(Guess("tokenizer.ggml.add_eos_token", False, "GPT-2 byte-level BPE adds no EOS"))
    if mpt:
        guesses.append(Guess("tokenizer.ggml.pre", "mpt", "the pre-tokenizer smolq convert writes for MPT"))
    _endoftext_is_special(vocab, guesses)
    return vocab


def _byte_level_tokens(lf) -> tuple[list[str], list[int]]:
    """(GPT-2 byte-level token, token type) per id of a GPT-J or MPT legacy vocabulary."""
    examples_mpt = lf.family == "mpt" and lf.container == "ggml"
    tokens, types = [], []
    last = None
    for i, (text, _) in enumerate(lf.vocab):
        if examples_mpt and last is not None and text == last and i > 0:
            tokens.append(_PAD.format(i))  # the ggml examples repeat the last token up to n_vocab
            types.append(UNUSED)
            continue
        last = text
        token, kind = _byte_level_token(i, text, i in lf.special_tokens, examples_mpt)
        tokens.append(token)
        types.append(kind)
    return tokens, types


def _byte_level_token(i: int, text: bytes, special: bool, examples_mpt: bool) -> tuple[str, int]:
    enc = byte_encoder()
    if _pad_name(i, text):
        return text.decode(), UNUSED
    if special:
        return text.decode("utf-8", "replace"), CONTROL
    if examples_mpt:  # the ggml MPT example stored each byte-level character as UTF-8 text
        raw = _latin1_utf8_to_bytes(text)
        if raw is None:  # an added token, kept as its text
            return text.decode("utf-8", "replace"), USER_DEFINED
        return "".join(enc[b] for b in raw), NORMAL
    return "".join(enc[b] for b in text), NORMAL


def _endoftext_is_special(vocab: Vocab, guesses: list[Guess]) -> None:
    """GPT-2 style tokenizers use <|endoftext|> as BOS, EOS and UNK alike."""
    eot = "<|endoftext|>"
    for i, tok in enumerate(vocab.tokens):
        if tok == eot or decode_byte_level(tok) == eot.encode():
            vocab.special_ids.update(bos=i, eos=i, unk=i)
            for key in ("bos", "eos", "unknown"):
                guesses.append(Guess(f"tokenizer.ggml.{key}_token_id", i, f"the id of {eot}"))
            break


def _latin1_utf8_to_bytes(text: bytes) -> bytes | None:
    try:
        s = text.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return bytes(ord(c) for c in s) if all(ord(c) < 256 for c in s) else None


def _llama_vocab_from_legacy(lf, guesses: list[Guess]) -> Vocab:
    """convert-llama-ggml-to-gguf's rules (formats.md 6.5), written here from the table."""
    tokens, types, scores = [], [], []
    has_scores = bool(lf.vocab) and lf.vocab[0][1] is not None
    for i, (text, score) in enumerate(lf.vocab):
        if text == UNK_LEGACY_TEXT or (i == 0 and text == b""):
            tok, kind = "<unk>", UNKNOWN
        elif text == b"":
            tok, kind = {1: "<s>", 2: "</s>"}.get(i, f"[CONTROL{i}]"), CONTROL
        elif len(text) == 1 and 3 <= i < 3 + 256:
            tok, kind = f"<0x{text[0]:02X}>", BYTE
        elif _pad_name(i, text):
            tok, kind = text.decode(), UNUSED
        else:
            tok, kind = text.decode("utf-8", "surrogateescape").replace(" ", SPIECE_SPACE), NORMAL
        tokens.append(tok)
        types.append(kind)
        scores.append(float(score) if has_scores else 0.0)
    guesses.append(Guess("tokenizer.ggml.model", "llama", "legacy LLaMA files store no tokenizer kind; SentencePiece assumed"))
    guesses.append(Guess("tokenizer.ggml.tokens", "rebuilt", "spaces -> U+2581, single bytes at ids 3..258 -> <0xNN>, "
                                                            "empty -> control (formats.md 6.5)"))
    guesses.append(Guess("tokenizer.ggml.token_type", "rebuilt", "from the token texts, as above"))
    if not has_scores:
        guesses.append(Guess("tokenizer.ggml.scores", 0.0, "unversioned 'ggml' files store no scores"))
    special = {"unk": 0, "bos": 1, "eos": 2}
    for kind, i in special.items():
        key = {"unk": "unknown"}.get(kind, kind)
        guesses.append(Guess(f"tokenizer.ggml.{key}_token_id", i, "llama.cpp's default for SentencePiece LLaMA"))
    guesses.append(Guess("tokenizer.ggml.add_bos_token", True, "LLaMA's SentencePiece tokenizer adds <s>"))
    guesses.append(Guess("tokenizer.ggml.add_eos_token", False, "LLaMA's SentencePiece tokenizer adds no </s>"))
    guesses.append(Guess("tokenizer.ggml.add_sep_token", False, "LLaMA's tokenizer adds no separator"))
    return Vocab("llama", tokens, types, scores, [], dict(special), add_bos=True, add_eos=False, add_sep=False,
                 pre="default",
                 n_base=len(tokens))


def vocab_from_gguf(meta: dict[str, Any], family: str, path: Path) -> Vocab:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise FormatError(path, "GGUF metadata has no tokenizer.ggml.tokens; a legacy file needs a vocabulary")
    model = meta.get("tokenizer.ggml.model", "llama")
    enc = byte_encoder()
    if family == "gptj" and tokens and isinstance(tokens[0], (bytes, str)):
        # GPT4All's GPT-J GGUF stores decoded bytes; smolq's Vocab keeps the byte-level encoding.
        tokens = ["".join(enc[b] for b in (t.encode("utf-8", "surrogateescape") if isinstance(t, str) else t))
                  for t in tokens]
    tokens = [t.decode("utf-8", "surrogateescape") if isinstance(t, bytes) else t for t in tokens]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    special = {}
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"), ("sep", "seperator")):
        if isinstance(meta.get(f"tokenizer.ggml.{key}_token_id"), int):
            special[kind] = meta[f"tokenizer.ggml.{key}_token_id"]
    flags = {f: meta.get(f"tokenizer.ggml.{f}_token") for f in ("add_bos", "add_eos", "add_sep")}
    flags = {f: v for f, v in flags.items() if isinstance(v, bool)}
    space = meta.get("tokenizer.ggml.add_space_prefix")
    template = meta.get("tokenizer.chat_template")
    return Vocab(model, tokens, list(types), list(scores) if scores else None, list(meta.get("tokenizer.ggml.merges") or []),
                 special, n_base=len(tokens), pre=meta.get("tokenizer.ggml.pre"),
                 chat_template=template if isinstance(template, str) else None,
                 add_space_prefix=space if isinstance(space, bool) else None, **flags)


def _legacy_texts(vocab: Vocab, lf) -> list[bytes]:
    return [t for t, _, _ in vocab.legacy_tokens(lf.family, lf.container, lf.dialect)]


def recover_vocab(model, arch, user: dict[str, Any], tok_dir: Path | None, guesses: list[Guess],
                  notes: list[str]) -> Vocab:
    """The tokenizer from --config when it matches the file, else the file's own vocabulary."""
    n_vocab = arch.n_vocab
    if tok_dir is not None:
        vocab = load_vocab(tok_dir, n_vocab, arch.family, user)
        mismatch = _vocab_mismatch(vocab, model)
        if not mismatch:
            notes += vocab.notes
            return vocab
        notes.append(f"the tokenizer in {tok_dir} differs from the file's vocabulary at {mismatch} ids; "
                     "using the file's")
    if model.container == "gguf":
        return vocab_from_gguf(model.metadata, arch.family, model.path)
    if len(model.raw.vocab) != n_vocab:
        raise FormatError(model.path, f"{len(model.raw.vocab)} tokens for n_vocab {n_vocab}")
    return vocab_from_legacy(model.raw, guesses)


def _vocab_mismatch(vocab: Vocab, model) -> int:
    """How many ids differ between `vocab` and the file's own tokens (length difference included)."""
    if model.container == "gguf":
        theirs = model.metadata.get("tokenizer.ggml.tokens") or []
        mine = vocab.tokenizer_keys(model.architecture)["tokenizer.ggml.tokens"].value
        return sum(a != b for a, b in zip(mine, theirs)) + abs(len(mine) - len(theirs))
    lf = model.raw
    texts = _legacy_texts(vocab, lf)
    return sum(a != b for a, (b, _) in zip(texts, lf.vocab)) + abs(len(texts) - len(lf.vocab))


def legacy_tokens(model, vocab: Vocab, family: str, lt: LegacyTarget) -> list[tuple[bytes, float | None, bool]]:
    """(text, score, special) per id for a legacy target; the file's own bytes where the text rules agree."""
    if model.container != "gguf" and _same_text_rules(model.raw, lt):
        lf = model.raw
        out = []
        for i, (text, score) in enumerate(lf.vocab):
            if score is None and (vocab.scores is not None):
                score = vocab.scores[i]
            out.append((text, score if score is not None else 0.0, i in lf.special_tokens))
        return out
    return vocab.legacy_tokens(family, lt.container, lt.dialect)


def _same_text_rules(lf, lt: LegacyTarget) -> bool:
    """LLaMA and GPT-J store texts alike in every container they exist in; MPT's 'ggml' and 'ggmm' do not."""
    return lf.family in ("llama", "gptj") or lf.container == lt.container
