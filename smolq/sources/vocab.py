"""Vocabularies: SentencePiece (tokenizer.model) and BPE (tokenizer.json / vocab.json + merges.txt).

One `Vocab` per checkpoint, padded or trimmed to the model's n_vocab, that
renders itself two ways:
- GGUF `tokenizer.ggml.*` keys (formats.md 6.5, llamacpp.md 1.5): SentencePiece
  pieces stay raw ("▁", "<0x0A>"); byte-level BPE tokens stay in GPT-2's
  byte->unicode encoding ("Ġthe"), except GPT-J, whose only GGUF reader
  (GPT4All) wants the decoded bytes;
- legacy vocab entries (formats.md 3): (bytes, score, special) per token, with
  each family's text rules.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from smolq.arch.base import meta
from smolq.errors import FormatError, InputError
from smolq.sources.bpe_pre import identify_pre

# tokenizer.ggml.token_type values (formats.md 6.5)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

ADDED_TOKEN_SCORE = -1000.0  # convert.py / convert_hf_to_gguf.py score for added tokens
UNK_LEGACY_TEXT = " \u2047 ".encode("utf-8")  # what ggjt-era converters stored for <unk>
SPIECE_SPACE = "\u2581"
SPECIAL_KINDS = ("bos", "eos", "unk", "pad", "sep")


@lru_cache(maxsize=1)
def byte_encoder() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    return {c: b for b, c in byte_encoder().items()}


def decode_byte_level(token: str) -> bytes:
    """Undo the GPT-2 byte map; characters outside it (added tokens) stay UTF-8."""
    dec = byte_decoder()
    out = bytearray()
    for ch in token:
        if ch in dec:
            out.append(dec[ch])
        else:
            out += ch.encode("utf-8")
    return bytes(out)


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece-style) or "gpt2" (byte-level BPE)
    tokens: list[str]  # as upstream GGUF stores them
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_sep: bool | None = None
    chat_template: str | None = None
    pre: str | None = None
    source: Path | None = None
    notes: list[str] = field(default_factory=list)
    n_base: int = 0  # ids below this are the base tokenizer's; the rest were added
    # SentencePiece pieces that HF added-token lists re-typed for GGUF: id -> (piece, type, score) as
    # tokenizer.model has them; the legacy view keeps these (2023 converters read tokenizer.model only).
    base_pieces: dict[int, tuple[str, int, float]] = field(default_factory=dict)
    add_space_prefix: bool | None = None  # tokenizer.ggml.add_space_prefix of a GGUF source (None: absent)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def byte_level(self) -> bool:
        return self.model == "gpt2"

    # ---------------------------------------------------------- GGUF
    def tokenizer_keys(self, family: str) -> dict[str, Any]:

        raw = family == "gptj"  # GPT4All's GPT-J reader: decoded bytes, no types or scores
        tokens: list[Any] = [self.raw_bytes(i) for i in range(len(self))] if raw else self.tokens
        md: dict[str, Any] = {"tokenizer.ggml.model": meta("str", self.model)}
        if self.pre and not raw:
            md["tokenizer.ggml.pre"] = meta("str", self.pre)
        md["tokenizer.ggml.tokens"] = meta("array", tokens, "str")
        if self.scores is not None and not raw:
            md["tokenizer.ggml.scores"] = meta("array", self.scores, "f32")
        if not raw:
            md["tokenizer.ggml.token_type"] = meta("array", self.types, "i32")
        if self.merges:
            md["tokenizer.ggml.merges"] = meta("array", self.merges, "str")
        key_names = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding", "sep": "seperator"}
        for kind in SPECIAL_KINDS:
            if kind in self.special_ids:
                md[f"tokenizer.ggml.{key_names[kind]}_token_id"] = meta("u32", self.special_ids[kind])
        for kind, flag in (("bos", self.add_bos), ("sep", self.add_sep), ("eos", self.add_eos)):
            if flag is not None:
                md[f"tokenizer.ggml.add_{kind}_token"] = meta("bool", flag)
        if self.add_space_prefix is not None:
            md["tokenizer.ggml.add_space_prefix"] = meta("bool", self.add_space_prefix)
        if self.chat_template:
            md["tokenizer.chat_template"] = meta("str", self.chat_template)
        return md

    # ---------------------------------------------------------- bytes of a token
    def raw_bytes(self, i: int) -> bytes:
        """The bytes token i stands for (byte tokens as the byte, '▁' as space, BPE map undone)."""
        return self._piece_bytes(self.tokens[i], self.types[i])

    def _piece_bytes(self, text: str, kind: int) -> bytes:
        if self.byte_level:
            return text.encode("utf-8") if kind in (CONTROL, USER_DEFINED, UNUSED) else decode_byte_level(text)
        if kind == BYTE and len(text) == 6 and text.startswith("<0x"):
            return bytes([int(text[3:5], 16)])
        return text.replace(SPIECE_SPACE, " ").encode("utf-8")

    # ---------------------------------------------------------- legacy
    def check_legacy(self, family: str, path: Path | None) -> None:
        """Legacy LLaMA loaders read SentencePiece pieces; a byte-level BPE vocabulary (Llama 3's)
        would be read as such pieces and tokenize wrongly, so it has no place there."""
        if family == "llama" and self.byte_level:
            raise InputError(path, "a byte-level BPE vocabulary (Llama 3 style) has no place in a legacy LLaMA file: "
                                   "no 2023 loader reads one; write GGUF")

    def legacy_tokens(self, family: str, container: str, dialect: str) -> list[tuple[bytes, float, bool]]:
        """(text bytes, score, special) per token, by the rules of formats.md 3."""
        self.check_legacy(family, self.source)
        if family == "llama":
            return [self._llama_legacy(i) for i in range(len(self))]
        if family == "mpt" and container == "ggml":
            return self._mpt_examples_legacy()
        out = []
        for i in range(len(self)):
            text = self.raw_bytes(i)
            if family == "mpt":  # 'ggmm': decode(['.', i])[1:], so partial UTF-8 becomes U+FFFD
                text = text.decode("utf-8", "replace").encode("utf-8")
            out.append((text, 0.0, self.types[i] == CONTROL))
        return out

    def _llama_legacy(self, i: int) -> tuple[bytes, float, bool]:
        if i in self.base_pieces:
            text, kind, score = self.base_pieces[i]
        else:
            text, kind = self.tokens[i], self.types[i]
            score = self.scores[i] if self.scores is not None else -float(i)
        special = kind == CONTROL
        if kind == UNKNOWN:
            return UNK_LEGACY_TEXT, score, special
        if kind == CONTROL and i < self.n_base:
            return b"", score, special  # the tokenizer's own <s>, </s>
        return self._piece_bytes(text, kind), score, special

    def _mpt_examples_legacy(self) -> list[tuple[bytes, float, bool]]:
        # Each byte b of the token is stored as the UTF-8 of chr(b) (Latin-1 as UTF-8);
        # added tokens keep their text; padding repeats the last real token.
        out: list[tuple[bytes, float, bool]] = []
        for i in range(len(self)):
            if self.types[i] == UNUSED and out:
                out.append(out[-1])
                continue
            if self.types[i] in (CONTROL, USER_DEFINED):
                text = self.tokens[i].encode("utf-8")
            else:
                text = "".join(chr(b) for b in self.raw_bytes(i)).encode("utf-8")
            out.append((text, 0.0, False))
        return out


# ====================================================================== loading

def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(path, f"not valid JSON: {exc}") from None


def _added_tokens(directory: Path, tokenizer_json: dict | None) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from tokenizer.json, tokenizer_config.json and added_tokens.json."""
    added: dict[int, tuple[str, bool]] = {}
    for path_name in ("added_tokens.json",):
        data = _read_json(directory / path_name)
        if isinstance(data, dict):
            for content, tid in data.items():
                added[int(tid)] = (content, False)
    config = _read_json(directory / "tokenizer_config.json") or {}
    for tid, info in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(info, dict) and "content" in info:
            added[int(tid)] = (info["content"], bool(info.get("special", False)))
    for info in (tokenizer_json or {}).get("added_tokens") or []:
        if isinstance(info, dict) and "content" in info and "id" in info:
            added[int(info["id"])] = (info["content"], bool(info.get("special", False)))
    return added


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_settings(directory: Path, token_to_id: dict[str, int], model_config: dict[str, Any], vocab: Vocab,
                      tokenizer_json: dict | None) -> None:
    tok_config = _read_json(directory / "tokenizer_config.json") or {}
    special_map = _read_json(directory / "special_tokens_map.json") or {}
    for kind in SPECIAL_KINDS:
        content = _token_content(tok_config.get(f"{kind}_token")) or _token_content(special_map.get(f"{kind}_token"))
        if content is not None and content in token_to_id:
            vocab.special_ids[kind] = token_to_id[content]
        elif isinstance(model_config.get(f"{kind}_token_id"), int):
            vocab.special_ids[kind] = model_config[f"{kind}_token_id"]
    for kind in list(vocab.special_ids):
        if not 0 <= vocab.special_ids[kind] < len(vocab):
            vocab.notes.append(f"{kind} token id {vocab.special_ids.pop(kind)} is outside the vocabulary; dropped")
    flags = add_token_flags(tokenizer_json, tok_config)
    vocab.add_bos, vocab.add_eos, vocab.add_sep = flags.get("bos"), flags.get("eos"), flags.get("sep")
    template = tok_config.get("chat_template", _chat_template_file(directory))
    if isinstance(template, str):
        vocab.chat_template = template
    elif template is not None:
        vocab.notes.append("chat template given as a list of named templates; only a single template is written")


def _chat_template_file(directory: Path) -> Any:
    """The chat template transformers 5 saves beside tokenizer_config.json (chat_template.jinja,
    or chat_template.json's "chat_template"), which llama.cpp's converter reads when the config has none."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    data = _read_json(directory / "chat_template.json")
    return data.get("chat_template") if isinstance(data, dict) else None


def add_token_flags(tokenizer_json: Any, tok_config: dict | None) -> dict[str, bool]:
    """{"bos"|"eos"|"sep": add it?} for tokenizer.ggml.add_*_token; a kind left out is unknown.

    The post-processor in tokenizer.json is what the tokenizer actually does, so it
    wins; tokenizer_config.json's add_*_token only fills the gaps (the precedence
    of llama.cpp's converter, gguf-py SpecialVocab).
    """
    tok_config = tok_config or {}
    flags = _post_processor_flags(tokenizer_json, tok_config)
    for kind in ("bos", "eos", "sep"):
        if kind not in flags and isinstance(tok_config.get(f"add_{kind}_token"), bool):
            flags[kind] = tok_config[f"add_{kind}_token"]
    return flags


def _template_special(item: Any) -> str | None:
    """The token of a TemplateProcessing item {"SpecialToken": {"id": "<s>"}}, None for a sequence."""
    special = item.get("SpecialToken") if isinstance(item, dict) else None
    return special.get("id") if isinstance(special, dict) else None


def _template_sequence(item: Any) -> str | None:
    sequence = item.get("Sequence") if isinstance(item, dict) else None
    return sequence.get("id") if isinstance(sequence, dict) else None


def _post_processor_flags(tokenizer_json: Any, tok_config: dict) -> dict[str, bool]:
    """add_bos / add_eos / add_sep as tokenizer.json's post-processor implies them.

    Written from the rules of llama.cpp's converter (gguf-py SpecialVocab), so the
    GGUF carries the same tokenizer.ggml.add_*_token keys: ByteLevel adds nothing
    (bos/eos False unless set otherwise); RobertaProcessing adds all three; a
    TemplateProcessing adds BOS when its single template starts with the bos (or
    cls) token, EOS when it ends with a special token, and SEP when its pair
    template puts sep/eos between $A and $B. Unlike llama.cpp we do not re-assign
    the eos token to a different trailing special token; we only report adding it.
    """
    post = tokenizer_json.get("post_processor") if isinstance(tokenizer_json, dict) else None
    if not isinstance(post, dict):
        return {}
    names = {k: _token_content(tok_config.get(f"{k}_token")) for k in ("bos", "eos", "cls", "sep")}
    names["bos"] = names["bos"] or names["cls"]
    names["eos"] = names["eos"] or names["sep"]
    flags: dict[str, bool] = {}
    for proc in post.get("processors") or [post]:
        kind = proc.get("type") if isinstance(proc, dict) else None
        if kind == "ByteLevel":
            flags.setdefault("bos", False)
            flags.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            flags.update(bos=True, eos=True, sep=True)
        elif kind == "TemplateProcessing":
            flags.update(_template_flags(proc, names, has_config=bool(tok_config)))
    return flags


def _template_flags(proc: dict, names: dict[str, str | None], has_config: bool) -> dict[str, bool]:
    single, pair = proc.get("single") or [], proc.get("pair") or []
    flags: dict[str, bool] = {}
    first = _template_special(single[0]) if len(single) > 1 else None
    last = _template_special(single[-1]) if len(single) > 1 else None
    if first:
        # A leading special token that is neither bos nor cls becomes whichever of them is unset.
        known = (names["bos"], names["cls"])
        flags["bos"] = not has_config or first in known or not names["bos"] or not names["cls"]
    if last:
        flags["eos"] = True  # llama.cpp: the trailing special token is (or becomes) eos
        names = {**names, "eos": last}
    middle = list(pair)
    if first and middle and _template_special(middle[0]) == first:
        middle = middle[1:]
    if last and middle and _template_special(middle[-1]) == last:
        middle = middle[:-1]
    if len(middle) > 2 and _template_sequence(middle[0]) == "A" and _template_sequence(middle[-1]) == "B":
        between = [_template_special(x) for x in middle[1:-1]]
        separators = (names["sep"], names["eos"])
        add_sep = bool(between[0] in separators and between[0] and not last)
        if len(between) == 2 and between[1] and between[1] in separators:
            add_sep = True
        flags["sep"] = add_sep
    return flags


def _fit(vocab_tokens: list[str], types: list[int], scores: list[float] | None, n_vocab: int, notes: list[str]):
    """Pad with [PAD{i}] (UNUSED) up to n_vocab, or drop ids the embedding has no row for."""
    if len(vocab_tokens) > n_vocab:
        notes.append(f"tokenizer has {len(vocab_tokens)} tokens but the model {n_vocab}; ids >= {n_vocab} dropped")
        del vocab_tokens[n_vocab:], types[n_vocab:]
        if scores is not None:
            del scores[n_vocab:]
    for i in range(len(vocab_tokens), n_vocab):
        vocab_tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
        if scores is not None:
            scores.append(ADDED_TOKEN_SCORE)


def _place_added(tokens: list[str], types: list[int], scores: list[float] | None, added: dict[int, tuple[str, bool]], n_base: int) -> None:
    for tid in sorted(added):
        content, special = added[tid]
        if tid < n_base:
            if special and types[tid] == NORMAL:
                types[tid] = CONTROL
            continue
        while len(tokens) < tid:
            tokens.append(f"[PAD{len(tokens)}]")
            types.append(UNUSED)
            if scores is not None:
                scores.append(ADDED_TOKEN_SCORE)
        if len(tokens) == tid:
            tokens.append(content)
            types.append(CONTROL if special else USER_DEFINED)
            if scores is not None:
                scores.append(ADDED_TOKEN_SCORE)
        else:
            tokens[tid] = content
            types[tid] = CONTROL if special else USER_DEFINED


def _sentencepiece_vocab(path: Path) -> tuple[list[str], list[int], list[float]]:
    try:
        import sentencepiece
    except ImportError:
        raise InputError(path, "reading tokenizer.model needs the sentencepiece package") from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(path.read_bytes())
    except Exception as exc:  # sentencepiece raises plain RuntimeError/OSError variants
        raise FormatError(path, f"not a SentencePiece model: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    tokens, types, scores = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            types.append(UNKNOWN)
        elif sp.IsControl(i):
            types.append(CONTROL)
        elif sp.IsUnused(i):
            types.append(UNUSED)
        elif sp.IsByte(i):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return tokens, types, scores


SPM_PAD_SCORE = -10000.0  # llama.cpp's score for ids the SentencePiece model leaves undefined


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter makes CONTROL even when not flagged special
    (does_token_look_special): <pad>, <mask>, <|...|>, <｜...｜>, <unused...>."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _sentencepiece_with_added(directory: Path, sp_path: Path, n_vocab: int, notes: list[str]):
    """tokenizer.model plus the HF added-token lists, by the rules of llama.cpp's converter
    (_create_vocab_sentencepiece), so the GGUF vocabulary is the one it writes:

    - pieces beyond n_vocab are dropped; ids nobody defines are [PADi], UNUSED, score -10000;
    - added_tokens.json entries become USER_DEFINED, then tokenizer_config.json's
      added_tokens_decoder entries CONTROL (flagged special, or looking special) or USER_DEFINED
      with '▁' pre-normalized to a space; both get score -1000 and both override pieces of the
      SentencePiece model itself (so a listed <unk> becomes CONTROL);
    - tokenizer.json's added_tokens are not read on this path.

    Returns (tokens, types, scores, n_pieces, originals of the overridden pieces).
    """
    pieces, piece_types, piece_scores = _sentencepiece_vocab(sp_path)
    n_pieces = min(len(pieces), n_vocab)
    if len(pieces) > n_vocab:
        notes.append(f"tokenizer has {len(pieces)} tokens but the model {n_vocab}; ids >= {n_vocab} dropped")
    tokens = pieces[:n_pieces] + [f"[PAD{i}]" for i in range(n_pieces, n_vocab)]
    types = piece_types[:n_pieces] + [UNUSED] * (n_vocab - n_pieces)
    scores = piece_scores[:n_pieces] + [SPM_PAD_SCORE] * (n_vocab - n_pieces)
    originals: dict[int, tuple[str, int, float]] = {}

    def put(tid: int, text: str, kind: int) -> None:
        if not 0 <= tid < n_vocab:
            notes.append(f"added token {text!r} has id {tid}, outside the model's {n_vocab}; dropped")
            return
        if tid < n_pieces:
            originals.setdefault(tid, (tokens[tid], types[tid], scores[tid]))
        tokens[tid], types[tid], scores[tid] = text, kind, ADDED_TOKEN_SCORE

    added_json = _read_json(directory / "added_tokens.json")
    for text, tid in (added_json.items() if isinstance(added_json, dict) else ()):
        put(int(tid), text, USER_DEFINED)
    config = _read_json(directory / "tokenizer_config.json") or {}
    for tid, info in (config.get("added_tokens_decoder") or {}).items():
        if not isinstance(info, dict) or not isinstance(info.get("content"), str):
            continue
        text = info["content"]
        if info.get("special") or _looks_special(text):
            put(int(tid), text, CONTROL)
        else:
            put(int(tid), text.replace(SPIECE_SPACE, " "), USER_DEFINED)
    return tokens, types, scores, n_pieces, originals


def _merge_strings(merges: list[Any]) -> list[str]:
    """tokenizers keeps merges as "a b" strings (old) or [a, b] pairs (new); GGUF wants "a b".
    A space inside a pair's part is written as U+0120, as gguf-py's SpecialVocab does."""
    return [m if isinstance(m, str) else " ".join(part.replace(" ", "\u0120") for part in m) for m in merges]


def _bpe_from_tokenizer_json(path: Path, data: dict) -> tuple[str, dict[str, int], list[str]]:
    """(ggml model, token->id, merges) of a tokenizers BPE model."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise InputError(path, f"tokenizer model {model.get('type')!r} is not supported (SentencePiece or BPE)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise FormatError(path, "BPE model without a vocab")
    text = json.dumps(data.get("pre_tokenizer")) + json.dumps(data.get("decoder"))
    kind = "gpt2" if "ByteLevel" in text else "llama"  # SentencePiece-style BPE with byte fallback
    return kind, vocab, _merge_strings(model.get("merges") or [])


def _bpe_from_files(directory: Path) -> tuple[str, dict[str, int], list[str]]:
    vocab = _read_json(directory / "vocab.json")
    merges_path = directory / "merges.txt"
    merges = []
    if merges_path.is_file():
        lines = merges_path.read_text(encoding="utf-8").splitlines()
        merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    return "gpt2", vocab, merges


# Families whose vocabulary smolq reads as they were in 2023 (their GGUF and legacy files predate
# llama.cpp's rules for added tokens and pre-tokenizer hashes); every other family follows the converter.
LEGACY_VOCAB_FAMILIES = ("gptj", "mpt")
# Families written as GGUF `llama`, whose converter also writes tokenizer_config's add_prefix_space.
LLAMA_GGUF_FAMILIES = ("llama", "mistral")
# Families whose tokenizer.json alone llama.cpp's converter cannot place (no pre-tokenizer hash for it).
SENTENCEPIECE_ONLY = ("gemma3",)


def load_vocab(directory: str | Path, n_vocab: int, family: str, model_config: dict[str, Any] | None = None) -> Vocab:
    """Read the checkpoint's tokenizer and fit it to n_vocab ids."""
    directory = Path(directory)
    model_config = model_config or {}
    tokenizer_json = _read_json(directory / "tokenizer.json")
    sp_path = directory / "tokenizer.model"
    notes: list[str] = []
    if family in SENTENCEPIECE_ONLY and not sp_path.is_file():
        raise InputError(directory, f"no tokenizer.model: {family}'s vocabulary is read from it (llama.cpp's "
                                    "converter knows no pre-tokenizer for its tokenizer.json alone)")
    if family not in LEGACY_VOCAB_FAMILIES and sp_path.is_file():
        tokens, types, scores, n_base, originals = _sentencepiece_with_added(directory, sp_path, n_vocab, notes)
        vocab = Vocab("llama", tokens, types, scores, [], {}, pre="default", source=sp_path, notes=notes,
                      n_base=n_base, base_pieces=originals)
        _special_settings(directory, {t: i for i, t in enumerate(tokens)}, model_config, vocab, tokenizer_json)
        _space_prefix(directory, family, vocab)
        return vocab
    if tokenizer_json is not None:
        model, token_to_id, merges = _bpe_from_tokenizer_json(directory / "tokenizer.json", tokenizer_json)
        source = directory / "tokenizer.json"
    elif (directory / "vocab.json").is_file():
        model, token_to_id, merges = _bpe_from_files(directory)
        source = directory / "vocab.json"
    else:
        raise InputError(directory, "no tokenizer found (tokenizer.model, tokenizer.json or vocab.json)")
    if family not in LEGACY_VOCAB_FAMILIES and model == "gpt2":
        return _byte_level_vocab(directory, source, tokenizer_json, token_to_id, merges, n_vocab, family, model_config)
    added = _added_tokens(directory, tokenizer_json)
    tokens, types, scores = _tokens_by_id(source, token_to_id, model)
    pre = {"mpt": "mpt", "gptj": None}.get(family, "default")  # GPT4All's GPT-J reader takes no pre
    if model == "llama":
        merges = []  # SentencePiece-style: llama.cpp merges by score
    n_base = len(tokens)
    _place_added(tokens, types, scores, added, n_base)
    _fit(tokens, types, scores, n_vocab, notes)
    vocab = Vocab(model, tokens, types, scores, merges, {}, pre=pre, source=source, notes=notes, n_base=n_base)
    _special_settings(directory, {t: i for i, t in enumerate(tokens)}, model_config, vocab, tokenizer_json)
    _space_prefix(directory, family, vocab)
    return vocab


def _space_prefix(directory: Path, family: str, vocab: Vocab) -> None:
    """llama.cpp's LLaMA converter writes tokenizer_config's add_prefix_space as add_space_prefix."""
    value = (_read_json(directory / "tokenizer_config.json") or {}).get("add_prefix_space")
    if family in LLAMA_GGUF_FAMILIES and isinstance(value, bool):
        vocab.add_space_prefix = value


def _byte_level_vocab(directory: Path, source: Path, tokenizer_json: dict | None, token_to_id: dict[str, int],
                      merges: list[str], n_vocab: int, family: str, model_config: dict[str, Any]) -> Vocab:
    """A byte-level BPE vocabulary by the rules of llama.cpp's converter (get_vocab_base, SpecialVocab):

    - ids 0..n_vocab-1; an id no token has is [PADi], UNUSED (the converter refuses ids >= n_vocab,
      smolq drops them with a note);
    - tokens of tokenizer.json's added_tokens are CONTROL when flagged special or looking special
      (<|...|>, <pad>, ...), else USER_DEFINED with '▁' pre-normalized to a space; the rest NORMAL;
    - no scores; merges as SpecialVocab writes them; tokenizer.ggml.pre by the check-text hash;
    - special token ids: tokenizer_config's bos/eos/... content looked up among the added tokens,
      else config.json's <kind>_token_id.
    """
    notes: list[str] = []
    tokens, types, _ = _tokens_by_id(source, token_to_id, "gpt2")
    n_base = len(tokens)
    added = {int(a["id"]): a for a in (tokenizer_json or {}).get("added_tokens") or []
             if isinstance(a, dict) and isinstance(a.get("content"), str) and isinstance(a.get("id"), int)}
    for tid, info in sorted(added.items()):
        while len(tokens) <= tid:
            tokens.append(f"[PAD{len(tokens)}]")
            types.append(UNUSED)
        text = info["content"]
        if info.get("special") or _looks_special(text):
            tokens[tid], types[tid] = text, CONTROL
        else:
            tokens[tid], types[tid] = text.replace(SPIECE_SPACE, " "), USER_DEFINED
    _fit(tokens, types, None, n_vocab, notes)
    pre = identify_pre(source, tokenizer_json or {}, notes) if source.name == "tokenizer.json" else "gpt-2"
    vocab = Vocab("gpt2", tokens, types, None, merges, {}, pre=pre, source=source, notes=notes, n_base=n_base)
    added_ids = {info["content"]: tid for tid, info in sorted(added.items(), reverse=True)}  # first match wins
    _special_settings(directory, added_ids, model_config, vocab, tokenizer_json)
    _space_prefix(directory, family, vocab)
    return vocab


def _tokens_by_id(source: Path, token_to_id: dict[str, int], model: str) -> tuple[list[str], list[int], list[float] | None]:
    if not token_to_id:
        raise FormatError(source, "empty vocabulary")
    size = max(token_to_id.values()) + 1
    if size > 10 * len(token_to_id) + 1000:
        raise FormatError(source, f"token ids reach {size - 1} for {len(token_to_id)} tokens")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for text, tid in token_to_id.items():
        tokens[tid] = text
        types[tid] = NORMAL
    if model == "gpt2":
        return tokens, types, None
    # SentencePiece-style BPE from tokenizer.json: byte tokens and <unk>, scores in vocab order
    # (SentencePiece keeps pieces sorted by score, so -id ranks merges the same way).
    scores = []
    for i, text in enumerate(tokens):
        if text.startswith("<0x") and text.endswith(">") and len(text) == 6:
            types[i] = BYTE
        elif text == "<unk>":
            types[i] = UNKNOWN
        scores.append(0.0 if types[i] != NORMAL else -float(i))
    return tokens, types, scores
