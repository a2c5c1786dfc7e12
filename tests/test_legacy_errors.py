"""Bad legacy files give one FormatError naming the file; bad write requests an InputError and no file."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from smolq.errors import FormatError, InputError
from smolq.formats.base import TensorEntry
from smolq.formats.legacy import read_legacy, write_legacy
from smolq.ggml_types import GGMLType as T

LLAMA_HP = {"n_vocab": 2, "n_embd": 32, "n_mult": 16, "n_head": 4, "n_layer": 1, "n_rot": 8}
GPTJ_HP = {"n_vocab": 2, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 1, "n_rot": 8}


def entry(name, t=T.F32, shape=(32,), layout="v3", nbytes=None):
    from smolq.ggml_types import tensor_nbytes

    n = tensor_nbytes(t, shape, layout) if nbytes is None else nbytes
    return TensorEntry(name, t, shape, load=lambda: bytes(range(256)) * (n // 256) + bytes(n % 256), layout=layout)


def ggjt_file(tmp_path, version=3, tensors=None, name="m.bin"):
    path = tmp_path / name
    tensors = tensors if tensors is not None else [entry("norm.weight"), entry("tok", T.F16, (2, 32))]
    write_legacy(path, "ggjt", version, "llama", LLAMA_HP, [(b"ab", 0.5), (b"c", -1.0)], tensors, ftype=1)
    return path


# Offsets in ggjt_file(): magic 0, version 4, header 8..36, vocab 36..(36 + 4+2+4 + 4+1+4) = 55.
VOCAB_END = 55


def patched(tmp_path, data: bytes, name="bad.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def expect_format_error(path, *needles, **kw):
    with pytest.raises(FormatError) as info:
        lf = read_legacy(path, **kw)
        for t in lf.tensors:
            t.load()
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_wrong_magic(tmp_path):
    expect_format_error(patched(tmp_path, b"GGUF" + bytes(60)), "GGUF")
    expect_format_error(patched(tmp_path, b"PK\x03\x04" + bytes(60)), "not a legacy")
    expect_format_error(patched(tmp_path, b"lm"), "too short")


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_legacy(tmp_path / "nope.bin")


def test_unsupported_version(tmp_path):
    data = bytearray(ggjt_file(tmp_path).read_bytes())
    data[4:8] = struct.pack("<I", 4)
    expect_format_error(patched(tmp_path, bytes(data)), "unsupported 'ggjt' version 4")
    data[0:8] = b"fmgg" + struct.pack("<I", 2)
    expect_format_error(patched(tmp_path, bytes(data)), "unsupported 'ggmf' version 2")


def test_truncated_everywhere(tmp_path):
    data = ggjt_file(tmp_path).read_bytes()
    for cut in (6, 20, 40, VOCAB_END - 1, VOCAB_END + 5, len(data) - 1):
        expect_format_error(patched(tmp_path, data[:cut]))
    expect_format_error(patched(tmp_path, data[:20]), "truncated llama header")
    expect_format_error(patched(tmp_path, data[:len(data) - 1]), "tok", "truncated")
    expect_format_error(patched(tmp_path, data + bytes(5)), "truncated tensor record #2")


def test_token_length_beyond_file(tmp_path):
    data = bytearray(ggjt_file(tmp_path).read_bytes())
    data[36:40] = struct.pack("<I", 0x7FFFFFFF)
    expect_format_error(patched(tmp_path, bytes(data)), "token 0", "past the end")


def test_n_vocab_larger_than_file(tmp_path):
    data = bytearray(ggjt_file(tmp_path).read_bytes())
    data[8:12] = struct.pack("<I", 0xFFFFFFF0)
    expect_format_error(patched(tmp_path, bytes(data)), "n_vocab 4294967280")


def test_vocab_count_mismatch(tmp_path):
    path = tmp_path / "gptj.bin"
    write_legacy(path, "ggml", None, "gptj", GPTJ_HP, [(b"a", None), (b"b", None)], [entry("w")])
    data = bytearray(path.read_bytes())
    data[32:36] = struct.pack("<i", 3)
    expect_format_error(patched(tmp_path, bytes(data)), "token count 3 does not match n_vocab 2",
                        family="gptj")


def test_bad_n_dims_and_type_ids(tmp_path):
    data = bytearray(ggjt_file(tmp_path).read_bytes())
    record = VOCAB_END
    for n_dims in (0, 5, -1):
        bad = bytearray(data)
        bad[record:record + 4] = struct.pack("<i", n_dims)
        expect_format_error(patched(tmp_path, bytes(bad)), f"n_dims {n_dims} is not in 1..4")
    for version, type_id in ((3, 9), (3, 4), (2, 4), (2, 10), (1, 10), (3, 15), (3, 99)):
        bad = bytearray(data)
        bad[4:8] = struct.pack("<I", version)
        bad[record + 8:record + 12] = struct.pack("<i", type_id)
        expect_format_error(patched(tmp_path, bytes(bad)), f"type id {type_id} never existed")


def test_gpt4all_gptj_accepts_only_codes_0_to_3(tmp_path):
    path = tmp_path / "j.bin"
    q = entry("w", T.Q5_0, (1, 32), layout="v1")
    write_legacy(path, "ggml", None, "gptj", GPTJ_HP, [(b"a", None), (b"b", None)], [q], qntvr=0, ftype=2)
    assert read_legacy(path).dialect == "ggml-examples"
    expect_format_error(path, "type id 6 never existed", family="gptj", dialect="gpt4all")


def test_misaligned_ggjt_data(tmp_path):
    data = bytearray(ggjt_file(tmp_path).read_bytes())
    # The first record is 12 + 4 + len("norm.weight") bytes; its data starts at the next multiple of 32.
    pad_start = VOCAB_END + 12 + 4 + 11
    assert data[pad_start:pad_start + 4] == bytes(4)
    data[pad_start] = 0xAA
    expect_format_error(patched(tmp_path, bytes(data)), "misaligned")


def test_ggmf_relabelled_as_ggjt_is_refused(tmp_path):
    path = tmp_path / "f.bin"
    write_legacy(path, "ggmf", 1, "llama", LLAMA_HP, [(b"ab", 0.5), (b"c", -1.0)],
                 [entry("norm.weight"), entry("tok", T.F16, (2, 32))], ftype=1)
    data = bytearray(path.read_bytes())
    data[0:4] = b"tjgg"
    expect_format_error(patched(tmp_path, bytes(data)))


def test_duplicate_names(tmp_path):
    path = ggjt_file(tmp_path, tensors=[entry("a"), entry("b")])
    data = bytearray(path.read_bytes())
    i = data.rindex(b"b")
    data[i:i + 1] = b"a"
    expect_format_error(patched(tmp_path, bytes(data)), "tensor a appears twice")


def test_name_not_utf8_and_bad_dims(tmp_path):
    data = bytearray(ggjt_file(tmp_path).read_bytes())
    bad = bytearray(data)
    bad[VOCAB_END + 16:VOCAB_END + 17] = b"\xff"
    expect_format_error(patched(tmp_path, bytes(bad)), "not UTF-8")
    bad = bytearray(data)
    bad[VOCAB_END + 12:VOCAB_END + 16] = struct.pack("<i", -32)
    expect_format_error(patched(tmp_path, bytes(bad)), "bad dimensions")


def test_quantized_row_not_multiple_of_block(tmp_path):
    path = ggjt_file(tmp_path, tensors=[entry("q", T.Q4_0, (1, 32))])
    data = bytearray(path.read_bytes())
    data[VOCAB_END + 12:VOCAB_END + 16] = struct.pack("<i", 16)
    expect_format_error(patched(tmp_path, bytes(data)), "not a multiple")


def test_family_override_that_cannot_apply(tmp_path):
    expect_format_error(ggjt_file(tmp_path), "cannot hold", family="gptj")


# --- writer refusals ---------------------------------------------------------------------------

def refuse(tmp_path, match, **kw):
    args = dict(container="ggjt", version=3, family="llama", hparams=LLAMA_HP,
                vocab=[(b"a", 0.0), (b"b", 0.0)], tensors=[entry("w")], ftype=1)
    args.update(kw)
    path = tmp_path / "out.bin"
    with pytest.raises(InputError, match=match):
        write_legacy(path, **args)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_wrong_layout(tmp_path):
    refuse(tmp_path, "layout v3, but 'ggjt' v1 stores layout v1", version=1,
           tensors=[entry("q", T.Q4_0, (1, 32), layout="v3")])
    refuse(tmp_path, "layout v1", version=2, tensors=[entry("q", T.Q8_0, (1, 32), layout="v1")])


def test_writer_refuses_types_the_version_lacks(tmp_path):
    refuse(tmp_path, "cannot hold Q4_K", version=2, tensors=[entry("q", T.Q4_K, (1, 256), layout="v2")])
    refuse(tmp_path, "cannot hold Q4_2", version=3, tensors=[entry("q", T.Q4_2, (1, 32))])
    refuse(tmp_path, "cannot hold Q5_0", container="ggml", version=None, family="gptj", hparams=GPTJ_HP,
           dialect="gpt4all", vocab=[(b"a", None), (b"b", None)], tensors=[entry("q", T.Q5_0, (1, 32), "v1")])
    refuse(tmp_path, "cannot hold BF16", tensors=[entry("q", T.BF16, (1, 32))])


def test_writer_refuses_bad_requests(tmp_path):
    refuse(tmp_path, "no legacy format", family="gptj")
    refuse(tmp_path, "has no version 4", version=4)
    refuse(tmp_path, "missing", hparams={k: v for k, v in LLAMA_HP.items() if k != "n_rot"})
    refuse(tmp_path, "unknown", hparams=dict(LLAMA_HP, n_ctx=5))
    refuse(tmp_path, "does not match the 1 tokens", vocab=[(b"a", 0.0)])
    refuse(tmp_path, "no score", vocab=[(b"a", 0.0), (b"b", None)])
    refuse(tmp_path, "given twice", tensors=[entry("w"), entry("w")])
    refuse(tmp_path, "not a multiple", tensors=[entry("q", T.Q4_0, (1, 16), nbytes=9)])
    refuse(tmp_path, "do not fit", hparams=dict(LLAMA_HP, n_embd=-1))


def test_writer_checks_each_load_size_and_leaves_no_file(tmp_path):
    bad = entry("w2", T.F16, (2, 32), nbytes=100)
    refuse(tmp_path, "load\\(\\) returned 100 bytes, .* needs 128", tensors=[entry("w"), bad])


def test_interrupted_write_leaves_no_file_and_keeps_old_target(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def boom():
        raise KeyboardInterrupt

    tensors = [entry("a"), TensorEntry("b", T.F32, (32,), load=boom)]
    with pytest.raises(KeyboardInterrupt):
        write_legacy(target, "ggjt", 3, "llama", LLAMA_HP, [(b"a", 0.0), (b"b", 0.0)], tensors, ftype=0)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]

    def stop(e):
        raise RuntimeError("stop after " + e.name)

    with pytest.raises(RuntimeError):
        write_legacy(tmp_path / "new.bin", "ggjt", 3, "llama", LLAMA_HP, [(b"a", 0.0), (b"b", 0.0)],
                     [entry("a"), entry("b")], ftype=0, on_tensor=stop)
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_writer_accepts_numpy_and_memoryview_data(tmp_path):
    arr = np.arange(32, dtype=np.float32)
    tensors = [TensorEntry("a", T.F32, (32,), load=lambda: arr),
               TensorEntry("b", T.F32, (32,), load=lambda: memoryview(arr.tobytes()))]
    path = tmp_path / "m.bin"
    write_legacy(path, "ggjt", 3, "llama", LLAMA_HP, [(b"a", 0.0), (b"b", 0.0)], tensors, ftype=0)
    lf = read_legacy(path)
    for t in lf.tensors:
        np.testing.assert_array_equal(t.load().view(np.float32), arr)


def test_error_about_a_strange_tensor_name_stays_one_line(tmp_path):
    path = ggjt_file(tmp_path, tensors=[entry("evil\nname")])
    data = path.read_bytes()
    message = expect_format_error(patched(tmp_path, data[:-1]), "truncated")
    assert "'evil\\nname'" in message
