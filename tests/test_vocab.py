"""vocab.py against independent decoders: transformers' GPT-2 byte map, the tokenizer itself,
and the legacy text rules of formats.md 3 written out here."""
from __future__ import annotations

import json

import pytest

from smolq.sources.vocab import BYTE, CONTROL, UNKNOWN, UNUSED, USER_DEFINED, byte_encoder, load_vocab


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("vocab-models")
    return {"llama": make_tiny_model("llama", root / "llama"), "gptj": make_tiny_model("gptj", root / "gptj")}


def test_byte_map_equals_transformers():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert byte_encoder() == bytes_to_unicode()


def test_gptj_raw_bytes_decode_like_the_tokenizer(tiny):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny["gptj"] / "tokenizer.json"))
    v = load_vocab(tiny["gptj"], 320, "gptj")
    assert len(v) == 320
    for i in range(tok.get_vocab_size()):
        if v.types[i] in (CONTROL, USER_DEFINED):
            continue
        text = tok.decode([i], skip_special_tokens=False)
        raw = v.raw_bytes(i)
        if "\ufffd" not in text:
            assert raw.decode("utf-8") == text, i
    # legacy GPT-J: raw bytes, no scores that matter, added tokens as their text
    legacy = v.legacy_tokens("gptj", "ggml", "gpt4all")
    added = json.loads((tiny["gptj"] / "added_tokens.json").read_text())
    for content, tid in added.items():
        assert legacy[tid][0] == content.encode()


def test_mpt_examples_latin1_as_utf8_and_padding(tiny):
    v = load_vocab(tiny["gptj"], 330, "mpt")  # 10 ids more than the tokenizer: padded
    legacy = v.legacy_tokens("mpt", "ggml", "ggml-examples")
    assert len(legacy) == 330
    for i in range(len(v)):
        if v.types[i] == 1:
            assert legacy[i][0] == "".join(chr(b) for b in v.raw_bytes(i)).encode("utf-8")
    last_real = max(i for i in range(len(v)) if v.types[i] != UNUSED)
    assert all(legacy[i] == legacy[last_real] for i in range(last_real + 1, 330))  # last token repeated


def test_llama_legacy_text_rules(tiny):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny["llama"] / "tokenizer.model"))
    v = load_vocab(tiny["llama"], 384, "llama")
    legacy = v.legacy_tokens("llama", "ggjt", "llama.cpp")
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_unknown(i):
            want = b" \xe2\x81\x87 "
        elif sp.is_control(i):
            want = b""
        elif sp.is_byte(i):
            want = bytes([int(piece[3:5], 16)])
        else:
            want = piece.replace("\u2581", " ").encode()
        assert legacy[i][0] == want, (i, piece)
        assert legacy[i][1] == pytest.approx(sp.get_score(i))
    assert v.types[0] == UNKNOWN and any(t == BYTE for t in v.types)


def test_added_tokens_beyond_n_vocab_are_dropped(tiny, tmp_path):
    import shutil

    src = tmp_path / "llama"
    shutil.copytree(tiny["llama"], src)
    # the SentencePiece model has 384 pieces; the model (say) 386 embedding rows
    (src / "added_tokens.json").write_text(json.dumps({"<pad-in>": 385, "<pad-out>": 386}))
    v = load_vocab(src, 386, "llama")
    assert len(v) == 386
    assert v.tokens[384] == "[PAD384]" and v.types[384] == UNUSED
    assert v.tokens[385] == "<pad-in>" and v.types[385] == USER_DEFINED and v.scores[385] == -1000.0
    assert "<pad-out>" not in v.tokens
    assert any("dropped" in n for n in v.notes)
    assert v.special_ids == {"bos": 1, "eos": 2, "unk": 0}
