"""scripts/swap_tensors.py: the per-class swap diagnostics the README's GPTQ tables come from.

Checked with gguf-py's reader on files smolq writes from two tiny models of the same shapes
(different seeds, so every tensor's bytes differ): the matching tensors are the donor's, the
rest and the metadata the base's."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from smolq import api
from smolq.tiny import make_tiny_model
from tests.script_module import load_script

V_OR_DOWN = r"attn_v\.|ffn_down\."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("swap")
    out = {}
    for seed in (0, 1):
        hf = make_tiny_model("llama", d / f"hf{seed}", seed=seed)
        out[f"f32_{seed}"] = d / f"f32-{seed}.gguf"
        api.convert(hf, out[f"f32_{seed}"], outtype="f32")
        out[f"q_{seed}"] = d / f"q4_0-{seed}.gguf"
        api.quantize(out[f"f32_{seed}"], out[f"q_{seed}"], type="q4_0")
    return out


def _tensors(path):
    return {t.name: t for t in GGUFReader(path).tensors}


def _fields(path):
    return {k: (f.types, f.contents()) for k, f in GGUFReader(path).fields.items()}


def test_byte_swap_takes_the_donors_matching_tensors_and_keeps_the_rest(files, tmp_path):
    out = tmp_path / "swapped.gguf"
    names = load_script("swap_tensors").swap(files["q_0"], files["q_1"], out, V_OR_DOWN)
    base, donor, got = _tensors(files["q_0"]), _tensors(files["q_1"]), _tensors(out)
    assert sorted(names) == sorted(n for n in base if "attn_v." in n or "ffn_down." in n) and len(names) == 4
    assert list(got) == list(base) and out.stat().st_size == files["q_0"].stat().st_size
    for name, t in got.items():
        want = donor[name] if name in names else base[name]
        assert base[name].data.tobytes() != donor[name].data.tobytes() or "norm" in name
        assert t.tensor_type == want.tensor_type and t.data.tobytes() == want.data.tobytes(), name
    assert _fields(out) == _fields(files["q_0"])
    assert not list(tmp_path.glob(".*swap-tmp"))


def test_float_swap_decodes_the_donor_and_copies_the_rest(files, tmp_path):
    out = tmp_path / "f32-parts.gguf"
    names = load_script("swap_tensors").swap(files["q_0"], files["q_1"], out, r"attn_q\.", as_float=True)
    base, donor, got = _tensors(files["q_0"]), _tensors(files["q_1"]), _tensors(out)
    assert len(names) == 2 and list(got) == list(base)
    for name, t in got.items():
        if name in names:
            assert t.tensor_type.name == "F32"
            want = dequantize(donor[name].data, donor[name].tensor_type)
            np.testing.assert_array_equal(np.asarray(t.data), want)
        else:
            assert t.tensor_type == base[name].tensor_type and t.data.tobytes() == base[name].data.tobytes()
    assert _fields(out) == _fields(files["q_0"])


@pytest.mark.parametrize("cut", [6, 100, 1000])
def test_a_cut_base_file_is_one_line_exit_2(files, tmp_path, capsys, cut):
    cut_file = tmp_path / "cut.gguf"
    cut_file.write_bytes(files["q_0"].read_bytes()[:cut])
    out = tmp_path / "never.gguf"
    rc = load_script("swap_tensors").main([str(cut_file), str(files["q_1"]), str(out), "--match", "attn"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(cut_file) in err[0] and "gguf-py can read" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("donor,regex,problem", [
    ("f32_1", V_OR_DOWN, "is F32, the base file's is Q4_0"),
    ("q_1", "no_such_tensor", "no tensor name matches"),
    ("q_1", "(", "--match"),
])
def test_bad_input_is_one_line_exit_2_and_no_file(files, tmp_path, capsys, donor, regex, problem):
    out = tmp_path / "never.gguf"
    rc = load_script("swap_tensors").main([str(files["q_0"]), str(files[donor]), str(out), "--match", regex])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and problem in err[0]
    assert not out.exists() and not list(tmp_path.glob(".*swap-tmp"))
