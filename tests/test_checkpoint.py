"""checkpoint.py: safetensors/bin discovery, shards, lazy loads, and one-line errors.

Files are made here with the safetensors package and torch.save, so the
parser is checked against independent writers.
"""
from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from smolq.arch.base import rope_theta
from smolq.errors import FormatError, InputError
from smolq.sources.checkpoint import open_checkpoint

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def _dir(tmp_path, name="ckpt"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    return d


def test_single_safetensors_lazy_and_dtypes(tmp_path):
    d = _dir(tmp_path)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.linspace(-2, 2, 8).astype(np.float16)
    save_file({"a": a, "b": b}, str(d / "model.safetensors"))
    ck = open_checkpoint(d)
    assert ck.kind == "safetensors" and set(ck.tensors) == {"a", "b"}
    assert ck.tensors["a"].dtype == "F32" and ck.tensors["a"].shape == (3, 4)
    np.testing.assert_array_equal(ck.tensors["a"].load(), a)
    np.testing.assert_array_equal(ck.tensors["b"].load(), b)
    assert ck.tensors["b"].load().dtype == np.float16


def test_bf16_widens_exactly(tmp_path):
    d = _dir(tmp_path)
    x = torch.tensor([[1.0, -2.5, 3.140625, 1e-3]], dtype=torch.bfloat16)
    save_torch({"w": x}, str(d / "model.safetensors"))
    t = open_checkpoint(d).tensors["w"]
    assert t.dtype == "BF16"
    np.testing.assert_array_equal(t.load(), x.float().numpy())


def _sharded(d, parts: dict[str, dict[str, np.ndarray]], weight_map=None):
    wm = {}
    for shard, tensors in parts.items():
        save_file(tensors, str(d / shard))
        wm.update({k: shard for k in tensors})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map or wm}))


def test_sharded_safetensors(tmp_path):
    d = _dir(tmp_path)
    _sharded(d, {"model-00001-of-00002.safetensors": {"x": np.ones(4, np.float32)},
                 "model-00002-of-00002.safetensors": {"y": np.zeros((2, 2), np.float32)}})
    ck = open_checkpoint(d)
    assert set(ck.tensors) == {"x", "y"}
    assert ck.tensors["y"].file.name == "model-00002-of-00002.safetensors"


def test_missing_shard(tmp_path):
    d = _dir(tmp_path)
    _sharded(d, {"model-00001-of-00002.safetensors": {"x": np.ones(4, np.float32)}},
             weight_map={"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"})
    with pytest.raises(InputError, match="model-00002-of-00002.safetensors.*missing shard"):
        open_checkpoint(d)


def test_tensor_listed_but_absent(tmp_path):
    d = _dir(tmp_path)
    _sharded(d, {"s1.safetensors": {"x": np.ones(4, np.float32)}},
             weight_map={"x": "s1.safetensors", "z": "s1.safetensors"})
    with pytest.raises(FormatError, match=r"s1.safetensors: tensor z is listed"):
        open_checkpoint(d)


def test_unexpected_extra_tensor_in_shard(tmp_path):
    d = _dir(tmp_path)
    _sharded(d, {"s1.safetensors": {"x": np.ones(4, np.float32), "extra": np.ones(1, np.float32)}},
             weight_map={"x": "s1.safetensors"})
    with pytest.raises(FormatError, match="unexpected tensor extra"):
        open_checkpoint(d)


def test_truncated_safetensors(tmp_path):
    d = _dir(tmp_path)
    save_file({"a": np.ones((64, 64), np.float32)}, str(d / "model.safetensors"))
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match=r"model.safetensors: truncated: tensor a"):
        open_checkpoint(d)


def test_header_length_beyond_file(tmp_path):
    d = _dir(tmp_path)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(FormatError, match="truncated or not safetensors"):
        open_checkpoint(d)


def test_pytorch_bin_single_and_sharded(tmp_path):
    d = _dir(tmp_path)
    a = torch.randn(3, 5)
    b = torch.randn(7).to(torch.bfloat16)
    torch.save({"a": a}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": b}, d / "pytorch_model-00002-of-00002.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    ck = open_checkpoint(d)
    assert ck.kind == "pytorch"
    np.testing.assert_array_equal(ck.tensors["a"].load(), a.numpy())
    np.testing.assert_array_equal(ck.tensors["b"].load(), b.float().numpy())


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    d = _dir(tmp_path)
    torch.save({"w": torch.ones(2), "evil": _Evil()}, d / "pytorch_model.bin")
    with pytest.raises(FormatError, match=r"pytorch_model.bin: refusing to load"):
        open_checkpoint(d)


def test_plain_pickle_is_not_a_checkpoint(tmp_path):
    d = _dir(tmp_path)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(FormatError, match="pytorch_model.bin"):
        open_checkpoint(d)


def test_no_weights_no_config(tmp_path):
    d = _dir(tmp_path)
    with pytest.raises(InputError, match="no model.safetensors"):
        open_checkpoint(d)
    (d / "config.json").unlink()
    with pytest.raises(InputError, match="no config.json"):
        open_checkpoint(d)


@pytest.mark.parametrize("config,want", [
    ({"rope_theta": 500000.0}, 500000.0),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}, 1e6),
    ({"rope_parameters": {"full_attention": {"rope_theta": 123.0}}}, 123.0),
    ({}, None),
])
def test_rope_theta_both_locations(config, want):
    assert rope_theta(config) == want
