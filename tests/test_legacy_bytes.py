"""Byte-exact legacy files: expected bytes are built here with struct.pack from formats.md.

For every container/version/family/dialect the test writes the file bytes by
hand (magic, header, vocab, tensor records, ggjt padding, quantized blocks in
the version's layout), then checks that smolq's writer produces exactly them
and smolq's reader reads back every field.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import pytest

from smolq.formats.base import TensorEntry
from smolq.formats.legacy import read_legacy, write_legacy
from smolq.ggml_types import GGMLType as T

# --- the spec, transcribed from formats.md (sections 1-5) -----------------------------------

MAGIC = {"ggml": b"lmgg", "ggmf": b"fmgg", "ggjt": b"tjgg", "ggmm": b"mmgg"}  # reversed on disk

# (struct format of the header after magic/version, field names) -- formats.md 2.1-2.3
HEADER = {
    "llama": ("<7I", ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")),
    "gptj": ("<7i", ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer", "n_rot", "ftype")),
    "mpt-ggml": ("<5i2fi", ("d_model", "max_seq_len", "n_heads", "n_layers", "n_vocab",
                             "alibi_bias_max", "clip_qkv", "ftype")),
    "mpt-ggmm": ("<5I2fI", ("n_vocab", "n_ctx", "n_layer", "n_head", "n_embd",
                             "alibi_bias_max", "clip_qkv", "ftype")),
}


def nibbles_v1(q):  # byte k: element 2k low, element 2k+1 high (formats.md 5.2.1)
    return bytes(q[2 * k] | (q[2 * k + 1] << 4) for k in range(len(q) // 2))


def nibbles_v2(q):  # byte k: element k low, element k + QK/2 high (5.2.2, 5.2.3)
    h = len(q) // 2
    return bytes(q[k] | (q[k + h] << 4) for k in range(h))


def q4_0_block(layout, d, q):
    if layout == "v1":
        return struct.pack("<f", d) + nibbles_v1(q)
    if layout == "v2":
        return struct.pack("<f", d) + nibbles_v2(q)
    return struct.pack("<e", d) + nibbles_v2(q)


def q4_1_block(layout, d, m, q):
    scale = "<ff" if layout in ("v1", "v2") else "<ee"
    return struct.pack(scale, d, m) + (nibbles_v1(q) if layout == "v1" else nibbles_v2(q))


def q5_0_block(layout, d, q5):  # f16 d; u32 qh (bit j = 5th bit of element j); nibbles
    qh = sum(((v >> 4) & 1) << j for j, v in enumerate(q5))
    low = [v & 15 for v in q5]
    return struct.pack("<eI", d, qh) + (nibbles_v1(low) if layout == "v1" else nibbles_v2(low))


def q8_0_block(layout, d, q):
    return struct.pack("<f" if layout in ("v1", "v2") else "<e", d) + struct.pack("<32b", *q)


def q4_2_block(d, q):  # 16 elements, f16 d (v1 only)
    return struct.pack("<e", d) + nibbles_v1(q)


RNG = np.random.default_rng(1234)


def q4(n=32):
    return [int(v) for v in RNG.integers(0, 16, n)]


# --- one case = one file ------------------------------------------------------------------------

@dataclass
class Tensor:
    name: str
    file_id: int
    type: T
    ne: tuple  # ggml order
    data: bytes
    layout: str


@dataclass
class Case:
    id: str
    container: str
    version: int | None
    family: str
    dialect: str
    header: str  # key of HEADER
    hparams: dict  # without ftype
    ftype: int
    qntvr: int | None
    vocab: list  # (bytes, score|None)
    tensors: list
    count: bool = False
    scores: bool = False
    aligned: bool = False
    special: frozenset = frozenset()
    layout: str = "v1"
    extra: dict = field(default_factory=dict)

    def expected_bytes(self) -> bytes:
        out = bytearray(MAGIC[self.container])
        if self.version is not None:
            out += struct.pack("<I", self.version)
        fmt, names = HEADER[self.header]
        stored = (self.qntvr or 0) * 1000 + self.ftype
        out += struct.pack(fmt, *[stored if n == "ftype" else self.hparams[n] for n in names])
        if self.count:
            out += struct.pack("<i", len(self.vocab))
        for i, (text, score) in enumerate(self.vocab):
            flag = (1 << 31) if i in self.special else 0
            out += struct.pack("<I", len(text) | flag) + text
            if self.scores:
                out += struct.pack("<f", score)
        for t in self.tensors:
            name = t.name.encode()
            out += struct.pack("<iii", len(t.ne), len(name), t.file_id)
            out += struct.pack(f"<{len(t.ne)}i", *t.ne) + name
            if self.aligned:
                out += b"\0" * (-len(out) % 32)
            out += t.data
        return bytes(out)


def f32_1d(name, n=32):
    return Tensor(name, 0, T.F32, (n,), np.arange(n, dtype="<f4").tobytes(), "v1")


def f16_2d(name, ne0=32, ne1=3):
    data = (np.arange(ne0 * ne1, dtype=np.float32) / 7).astype("<f2").tobytes()
    return Tensor(name, 1, T.F16, (ne0, ne1), data, "v1")


LLAMA_VOCAB = [(b" \xe2\x81\x87 ", 0.0), (b"", 0.0), (b"", -0.0), (b"\x0a", 0.0), (b" the", -3.25)]
LLAMA_HP = {"n_vocab": 5, "n_embd": 32, "n_mult": 16, "n_head": 4, "n_layer": 1, "n_rot": 8}


def llama_case(container, version, layout, qtensors, ftype):
    scored = container != "ggml"
    vocab = [(t, s if scored else None) for t, s in LLAMA_VOCAB]
    tensors = [f32_1d("norm.weight"), f16_2d("tok_embeddings.weight"), *qtensors]
    return Case(f"llama-{container}-v{version}", container, version, "llama", "llama.cpp", "llama",
                dict(LLAMA_HP), ftype, None, vocab, tensors, scores=scored,
                aligned=container == "ggjt", layout=layout)


def two_q4_0(name, layout, file_id=2):
    blocks = [q4_0_block(layout, 0.5, q4()), q4_0_block(layout, -0.25, q4())]
    return Tensor(name, file_id, T.Q4_0, (32, 2), b"".join(blocks), layout)


def cases() -> list[Case]:
    out = []
    # LLaMA 'ggml' (2023-03): codes 0-3, v1 blocks, no scores, no alignment.
    out.append(llama_case("ggml", None, "v1", [two_q4_0("layers.0.attention.wq.weight", "v1")], 2))
    # 'ggmf' v1: Q4_1 {f32 d, f32 m, interleaved nibbles}.
    q41 = Tensor("layers.0.attention.wk.weight", 3, T.Q4_1, (32, 1), q4_1_block("v1", 0.125, -1.0, q4()), "v1")
    out.append(llama_case("ggmf", 1, "v1", [q41], 3))
    # 'ggjt' v1: 230511 ids: Q4_0=2, Q4_2=4, Q5_0=6, Q8_0=8; v1 blocks.
    q42 = Tensor("layers.0.attention.wv.weight", 4, T.Q4_2, (32, 1),
                 q4_2_block(0.5, q4(16)) + q4_2_block(2.0, q4(16)), "v1")
    q50 = Tensor("layers.0.attention.wo.weight", 6, T.Q5_0, (32, 1),
                 q5_0_block("v1", 0.75, [int(v) for v in RNG.integers(0, 32, 32)]), "v1")
    q80 = Tensor("output.weight", 8, T.Q8_0, (32, 1),
                 q8_0_block("v1", 0.01, [int(v) for v in RNG.integers(-127, 128, 32)]), "v1")
    out.append(llama_case("ggjt", 1, "v1", [two_q4_0("layers.0.attention.wq.weight", "v1"), q42, q50, q80], 2))
    # 'ggjt' v2: split nibbles, f32 scales.
    q50v2 = Tensor("layers.0.attention.wo.weight", 6, T.Q5_0, (32, 1),
                   q5_0_block("v2", 0.75, [int(v) for v in RNG.integers(0, 32, 32)]), "v2")
    out.append(llama_case("ggjt", 2, "v2", [two_q4_0("layers.0.attention.wq.weight", "v2"), q50v2], 2))
    # 'ggjt' v3: f16 scales; K-quant Q6_K with id 14 (raw 210-byte block).
    q6k = Tensor("output.weight", 14, T.Q6_K, (256, 1), bytes(RNG.integers(0, 256, 210, dtype=np.uint8)), "v3")
    q80v3 = Tensor("layers.0.feed_forward.w2.weight", 8, T.Q8_0, (32, 1),
                   q8_0_block("v3", 0.5, [int(v) for v in RNG.integers(-127, 128, 32)]), "v3")
    out.append(llama_case("ggjt", 3, "v3", [two_q4_0("layers.0.attention.wq.weight", "v3"), q6k, q80v3], 2))

    gptj_hp = {"n_vocab": 4, "n_ctx": 128, "n_embd": 32, "n_head": 4, "n_layer": 1, "n_rot": 4}
    gptj_vocab = [(b"!", None), (b"\xc4\xa0", None), (b"\xff", None), (b"<|endoftext|>", None)]
    gptj_tensors = lambda layout, fid=2: [f32_1d("transformer.ln_f.bias"), f16_2d("transformer.wte.weight"),
                                          two_q4_0("transformer.h.0.attn.q_proj.weight", layout, fid)]
    # GPT-J ggml examples: ftype word = qntvr*1000 + ftype; qntvr picks the layout.
    for qntvr, layout in ((0, "v1"), (1, "v2"), (2, "v3")):
        out.append(Case(f"gptj-examples-q{qntvr}", "ggml", None, "gptj", "ggml-examples", "gptj", dict(gptj_hp),
                        2, qntvr, gptj_vocab, gptj_tensors(layout), count=True, layout=layout))
    # GPT-J ggml examples, qntvr 1, Q8_0 (f32 d, unchanged from v1).
    q80v2 = Tensor("lm_head.weight", 8, T.Q8_0, (32, 1),
                   q8_0_block("v2", 0.5, [int(v) for v in RNG.integers(-127, 128, 32)]), "v2")
    out.append(Case("gptj-examples-q1-q8", "ggml", None, "gptj", "ggml-examples", "gptj", dict(gptj_hp),
                    7, 1, gptj_vocab, [f32_1d("transformer.ln_f.weight"), q80v2], count=True, layout="v2"))
    # GPT-J GPT4All: same header, plain ftype, codes 0-3, v1 blocks; n_vocab in [50300, 50400].
    big_vocab = [(b"t%d" % i, None) for i in range(50400)]
    out.append(Case("gptj-gpt4all", "ggml", None, "gptj", "gpt4all", "gptj", dict(gptj_hp, n_vocab=50400),
                    2, None, big_vocab, gptj_tensors("v1"), count=True, layout="v1"))

    # MPT ggml examples: floats in the header, no count.
    mpt_hp = {"d_model": 32, "max_seq_len": 64, "n_heads": 4, "n_layers": 1, "n_vocab": 3,
              "alibi_bias_max": 8.0, "clip_qkv": 0.0}
    mpt_vocab = [(b"a", None), (b"\xc3\xbf", None), (b"\xc3\xbf", None)]  # chr(255) as UTF-8, last repeated
    q41v3 = Tensor("transformer.blocks.0.attn.Wqkv.weight", 3, T.Q4_1, (32, 1),
                   q4_1_block("v3", 0.5, 0.25, q4()), "v3")
    out.append(Case("mpt-examples-q2", "ggml", None, "mpt", "ggml-examples", "mpt-ggml", mpt_hp, 3, 2, mpt_vocab,
                    [f32_1d("transformer.norm_f.weight"), f16_2d("transformer.wte.weight"), q41v3], layout="v3"))
    out.append(Case("mpt-examples-q0", "ggml", None, "mpt", "ggml-examples", "mpt-ggml", dict(mpt_hp, clip_qkv=6.0),
                    1, 0, mpt_vocab, [f32_1d("transformer.norm_f.weight"), f16_2d("transformer.wte.weight")]))
    # MPT GPT4All 'ggmm': other order, count, bit 31 = special; 230511 ids (Q5_0 = 6), v1 blocks.
    ggmm_hp = {"n_vocab": 4, "n_ctx": 2048, "n_layer": 1, "n_head": 4, "n_embd": 32,
               "alibi_bias_max": 8.0, "clip_qkv": 0.0}
    ggmm_vocab = [(b"<|endoftext|>", None), (b"hi", None), (b"", None), (b"<|im_end|>", None)]
    q50m = Tensor("transformer.blocks.0.ffn.up_proj.weight", 6, T.Q5_0, (32, 1),
                  q5_0_block("v1", 0.3, [int(v) for v in RNG.integers(0, 32, 32)]), "v1")
    out.append(Case("mpt-ggmm", "ggmm", None, "mpt", "gpt4all", "mpt-ggmm", ggmm_hp, 2, None, ggmm_vocab,
                    [Tensor("transformer.wte.weight", 0, T.F32, (32, 4), np.ones(128, "<f4").tobytes(), "v1"),
                     two_q4_0("transformer.blocks.0.attn.Wqkv.weight", "v1"), q50m],
                    count=True, special=frozenset({0, 3})))
    return out


CASES = cases()


def entries(case: Case) -> list[TensorEntry]:
    return [TensorEntry(t.name, t.type, tuple(reversed(t.ne)), load=(lambda d=t.data: d), layout=t.layout)
            for t in case.tensors]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_writer_produces_spec_bytes(case, tmp_path):
    path = tmp_path / "model.bin"
    write_legacy(path, case.container, case.version, case.family, case.hparams, case.vocab, entries(case),
                 dialect=case.dialect, ftype=case.ftype, qntvr=case.qntvr, special_tokens=case.special)
    assert path.read_bytes() == case.expected_bytes()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reader_reads_spec_bytes(case, tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(case.expected_bytes())
    lf = read_legacy(path)  # family and dialect detected from the bytes
    assert (lf.container, lf.version, lf.family, lf.dialect) == (case.container, case.version, case.family,
                                                                 case.dialect)
    assert lf.hparams == case.hparams and list(lf.hparams) == [n for n in HEADER[case.header][1] if n != "ftype"]
    assert (lf.ftype, lf.qntvr, lf.layout) == (case.ftype, case.qntvr, case.layout)
    assert lf.vocab == case.vocab
    assert lf.special_tokens == case.special
    assert [t.name for t in lf.tensors] == [t.name for t in case.tensors]
    for got, want in zip(lf.tensors, case.tensors):
        assert got.type == want.type and got.extra["file_type_id"] == want.file_id
        assert got.shape == tuple(reversed(want.ne))
        assert got.layout == case.layout and got.nbytes == len(want.data)
        assert bytes(got.load()) == want.data
        if case.aligned:
            assert got.offset % 32 == 0


def test_hand_made_v3_blocks_decode_as_gguf_does():
    """Check the test's own block maker against gguf.quants for the v3 (= GGUF) layout."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    q = q4()
    block = q4_0_block("v3", 0.5, q)
    got = dequantize(np.frombuffer(block, np.uint8), Q.Q4_0)
    np.testing.assert_array_equal(got.reshape(-1), (np.array(q) - 8) * 0.5)
    q5 = [int(v) for v in RNG.integers(0, 32, 32)]
    got = dequantize(np.frombuffer(q5_0_block("v3", 0.25, q5), np.uint8), Q.Q5_0)
    np.testing.assert_array_equal(got.reshape(-1), (np.array(q5) - 16) * 0.25)


def test_llama_header_example_from_spec(tmp_path):
    """formats.md 2.1's example header: 7B ggjt v3 Q4_0."""
    hp = {"n_vocab": 32000, "n_embd": 4096, "n_mult": 256, "n_head": 32, "n_layer": 32, "n_rot": 128}
    vocab = [(b"x", 0.0)] * 32000
    path = tmp_path / "h.bin"
    write_legacy(path, "ggjt", 3, "llama", hp, vocab, [], ftype=2)
    want = bytes.fromhex("746A6767 03000000 007D0000 00100000 00010000 20000000 20000000 80000000 02000000")
    assert path.read_bytes()[:36] == want
