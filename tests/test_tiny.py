"""The tiny checkpoint maker: loadable by transformers, shaped like real repos, deterministic."""
from __future__ import annotations

import hashlib
import json
import struct

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")

from smolq.tiny import LEGACY_VOCAB, LLAMA_ROPE_THETA, bytes_to_unicode, make_tiny_model  # noqa: E402


def _digest(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _load(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)


def _safetensors_keys(directory) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    return keys


@pytest.mark.parametrize("family", ["llama", "gptj", "mpt"])
def test_each_family_loads_and_gives_order_one_logits(tmp_path, family):
    d = make_tiny_model(family, tmp_path / family)
    model = _load(d)
    with torch.no_grad():
        logits = model(torch.tensor([[3, 10, 20, 30, 40]])).logits
    assert logits.shape == (1, 5, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # Not the near-flat logits of a default 0.02-std initialisation.
    assert 0.3 < float(logits.std()) < 30


def test_llama_tied_has_no_lm_head_and_untied_has_one(tmp_path):
    tied = make_tiny_model("llama", tmp_path / "t", tied=True)
    untied = make_tiny_model("llama", tmp_path / "u")
    assert "lm_head.weight" not in _safetensors_keys(tied)
    assert "lm_head.weight" in _safetensors_keys(untied)
    assert json.loads((tied / "config.json").read_text())["tie_word_embeddings"] is True


def test_mpt_is_tied_and_has_no_biases(tmp_path):
    keys = _safetensors_keys(make_tiny_model("mpt", tmp_path / "m"))
    assert "lm_head.weight" not in keys
    assert not [k for k in keys if k.endswith(".bias")]


def test_gqa_heads_do_not_hide_the_old_k_permutation_bug(tmp_path):
    cfg = json.loads((make_tiny_model("llama", tmp_path / "g", gqa=True) / "config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    assert n_kv < n_head and n_head // n_kv != n_kv


def test_llama_ffn_size_is_reproducible_from_n_mult(tmp_path):
    cfg = json.loads((make_tiny_model("llama", tmp_path / "l") / "config.json").read_text())
    n_embd, n_ff = cfg["hidden_size"], cfg["intermediate_size"]
    # formats.md 2.1: legacy loaders rebuild n_ff from n_mult with integer arithmetic.
    assert any(((2 * (4 * n_embd) // 3 + m - 1) // m) * m == n_ff for m in range(2, 257))


@pytest.mark.parametrize("style", ["top", "nested"])
def test_rope_theta_location(tmp_path, style):
    d = make_tiny_model("llama", tmp_path / style, rope_params_style=style)
    cfg = json.loads((d / "config.json").read_text())
    if style == "top":
        assert cfg["rope_theta"] == LLAMA_ROPE_THETA and "rope_parameters" not in cfg
    else:
        assert cfg["rope_parameters"]["rope_theta"] == LLAMA_ROPE_THETA and "rope_theta" not in cfg
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(d).rope_parameters["rope_theta"] == LLAMA_ROPE_THETA


def test_same_seed_same_files_other_seed_other_weights(tmp_path):
    a = make_tiny_model("llama", tmp_path / "a", seed=5)
    b = make_tiny_model("llama", tmp_path / "b", seed=5)
    c = make_tiny_model("llama", tmp_path / "c", seed=6)
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]
    assert _digest(a)["tokenizer.model"] == _digest(c)["tokenizer.model"]


@pytest.mark.parametrize("weights,pattern,index", [
    ("safetensors", "model-*-of-00003.safetensors", "model.safetensors.index.json"),
    ("bin", "pytorch_model-*-of-00003.bin", "pytorch_model.bin.index.json"),
])
def test_shards_have_an_index_naming_every_tensor(tmp_path, weights, pattern, index):
    d = make_tiny_model("llama", tmp_path / weights, shards=3, weights=weights, dtype="float16")
    files = sorted(p.name for p in d.glob(pattern))
    assert len(files) == 3
    weight_map = json.loads((d / index).read_text())["weight_map"]
    assert set(weight_map.values()) == set(files)
    reference = _load(make_tiny_model("llama", tmp_path / "single", dtype="float16"))
    sharded = _load(d)
    assert set(weight_map) == set(reference.state_dict())  # untied: lm_head is a real tensor
    for name, tensor in reference.state_dict().items():
        assert torch.equal(sharded.state_dict()[name], tensor), name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_is_stored(tmp_path, dtype):
    from safetensors import safe_open

    d = make_tiny_model("gptj", tmp_path / dtype, dtype=dtype)
    with safe_open(str(d / "model.safetensors"), "pt") as st:
        assert st.get_tensor("transformer.wte.weight").dtype == getattr(torch, dtype)
    assert json.loads((d / "config.json").read_text())["dtype"] == dtype


@pytest.mark.parametrize("n_vocab", [None, LEGACY_VOCAB["llama"]])
def test_sentencepiece_model_is_llama_shaped(tmp_path, n_vocab):
    d = make_tiny_model("llama", tmp_path / "l", vocab_size=n_vocab)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    size = json.loads((d / "config.json").read_text())["vocab_size"]
    assert sp.get_piece_size() == size == (n_vocab or size)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.is_unknown(0) and sp.is_control(1) and sp.is_control(2)
    assert all(sp.is_byte(3 + b) and sp.id_to_piece(3 + b) == f"<0x{b:02X}>" for b in range(256))
    assert len({sp.id_to_piece(i) for i in range(size)}) == size
    text = "The quick brown fox, café 東京 1024."
    assert sp.decode(sp.encode(text)) == text
    assert max(sp.encode(text)) < size


@pytest.mark.parametrize("family", ["gptj", "mpt"])
@pytest.mark.parametrize("legacy", [False, True])
def test_byte_level_bpe_tokenizer(tmp_path, family, legacy):
    from tokenizers import Tokenizer

    d = make_tiny_model(family, tmp_path / family, vocab_size="legacy" if legacy else None)
    n_vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    if legacy:
        assert n_vocab == LEGACY_VOCAB[family]
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    text = "The quick brown fox, café 東京 1024.\n"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text and max(ids) < n_vocab
    vocab = tok.get_vocab(with_added_tokens=True)
    if family == "gptj":
        assert len(vocab) == n_vocab  # BPE vocabulary + <|extratoken_N|>, like GPT-J's 50257 + 143
        assert vocab["<|endoftext|>"] == json.loads((d / "config.json").read_text())["eos_token_id"]
        slow = json.loads((d / "vocab.json").read_text())
        added = json.loads((d / "added_tokens.json").read_text())
        assert len(slow) + len(added) == n_vocab
        assert sorted(slow.values()) == list(range(len(slow)))
    else:
        assert len(vocab) < n_vocab and vocab["<|endoftext|>"] == 0  # MPT-7B: 50254 tokens for 50432 rows
    # Every vocabulary string is made of GPT-2 byte characters (legacy converters map them back to bytes).
    byte_chars = set(bytes_to_unicode().values())
    bpe = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
    assert all(set(piece) <= byte_chars for piece in bpe if piece != "<|endoftext|>")


def test_gptj_legacy_buffers_are_extra_tensors(tmp_path):
    d = make_tiny_model("gptj", tmp_path / "g", legacy_buffers=True)
    keys = _safetensors_keys(d)
    assert "transformer.h.0.attn.bias" in keys and "transformer.h.1.attn.masked_bias" in keys
    _load(d)  # transformers ignores them, as it does for real GPT-J checkpoints


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(ValueError):
        make_tiny_model("gpt2", tmp_path / "x")
    with pytest.raises(ValueError):
        make_tiny_model("mpt", tmp_path / "x", gqa=True)
    with pytest.raises(ValueError):
        make_tiny_model("gptj", tmp_path / "x", tied=True)
    with pytest.raises(ValueError):
        make_tiny_model("llama", tmp_path / "x", vocab_size=100)


def test_sentencepiece_padding_pieces_are_valid_protobuf(tmp_path):
    # An independent parse of the padded ModelProto: the last piece is a
    # well-formed SentencePiece message (field 1 string, field 2 float, field 3 enum).
    d = make_tiny_model("llama", tmp_path / "l", vocab_size=400)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    last = sp.id_to_piece(399)
    assert last.startswith("<extra_") and sp.get_score(399) < sp.get_score(300)
    blob = (d / "tokenizer.model").read_bytes()
    body = b"\x0a" + bytes([len(last)]) + last.encode() + b"\x15" + struct.pack("<f", sp.get_score(399)) + b"\x18\x01"
    assert b"\x0a" + bytes([len(body)]) + body in blob


@pytest.mark.parametrize("n_vocab", [None, LEGACY_VOCAB["llama"]])
def test_llama_tokenizer_json_encodes_like_sentencepiece(tmp_path, n_vocab):
    from tokenizers import Tokenizer

    from smolq.tiny import TINY_TEXT

    d = make_tiny_model("llama", tmp_path / "l", vocab_size=n_vocab)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    fast = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert fast.get_vocab_size() == sp.get_piece_size()
    for text in [*TINY_TEXT.splitlines(), "  two  spaces", "unseen: \u2603 \U0001F642", ""]:
        ids = fast.encode(text).ids
        assert ids == [sp.bos_id(), *sp.encode(text)], text
        assert fast.decode(ids, skip_special_tokens=True) == text
