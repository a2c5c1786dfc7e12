"""Quantized conversion into containers older than the K-quants.

Before June 2023 llama.cpp's quantizer gave every 2-D weight the file's type
(formats.md 4.2); the later mix rules (output.weight -> Q6_K) must not leak
into files whose loaders cannot hold Q6_K or Q8_0.
"""
from __future__ import annotations

import pytest

from smolq.pipeline.convert import convert
from smolq.formats.legacy import read_legacy
from smolq.ggml_types import GGMLType
from smolq.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("hf") / "llama", hidden_size=256)


@pytest.mark.parametrize("fmt", ["ggml", "ggmf", "ggjt-v1", "ggjt-v2"])
@pytest.mark.parametrize("outtype, qtype", [("q4_0", GGMLType.Q4_0), ("q4_1", GGMLType.Q4_1)])
def test_every_matrix_gets_the_file_type(tiny_llama, tmp_path, fmt, outtype, qtype):
    out = tmp_path / "m.bin"
    convert(tiny_llama, out, format=fmt, outtype=outtype)
    with read_legacy(out) as f:
        types = {t.name: (t.type, len(t.shape)) for t in f.tensors}
    assert types["output.weight"][0] == qtype
    for name, (t, ndim) in types.items():
        assert t == (qtype if ndim == 2 else GGMLType.F32), name


def test_ggjt_v3_keeps_the_k_quant_era_output_rule(tiny_llama, tmp_path):
    out = tmp_path / "m.bin"
    convert(tiny_llama, out, format="ggjt-v3", outtype="q4_0")
    with read_legacy(out) as f:
        assert f.tensor("output.weight").type == GGMLType.Q6_K
