"""Golden outputs: every byte smolq writes for a fixed matrix of commands, pinned by sha256.

tests/golden_matrix.py builds tiny LLaMA / GPT-J / MPT checkpoints offline
and runs convert (every container and version x f32/f16/q4_0/q4_k_m and
more), RTN quantize (every preset, --pure, --tensor-type and the other
overrides, into GGUF and legacy containers), GPTQ (to GGUF, to a legacy
file, to GPTQ directories of 4/3/8 bits), GPTQ import, and migrate between
every pair of containers, all through the CLI entry point, in ONE child
process whose float environment is pinned (ATEN_CPU_CAPABILITY=avx2,
MKL_CBWR=COMPATIBLE, one thread; see golden_matrix.DETERMINISTIC_ENV). Each case is
one test here, compared with tests/golden/outputs.sha256.json, so a failure
names the case. Refusals are golden too ("error:2"): a command that starts
or stops refusing is a change.

The recorded file also holds fingerprints of the tiny models themselves
("input/..." keys). If they differ, this machine builds different INPUTS
(another CPU architecture, another torch or transformers): the cases fail
with that message, and their hashes say nothing about smolq.

GPTQ's bytes (the gptq and gptq-import cases) follow the order in which BLAS and LAPACK sum
floats. MKL's COMPATIBLE branch is meant to sum alike on every x86-64 CPU; the record also holds
a fingerprint of those calls ("float-env/blas-lapack"), and on a machine where it differs those
cases are skipped with that reason (the other cases still compare).

Regenerating (SMOLQ_GOLDEN_RECORD=1 writes the file instead of comparing):

    SMOLQ_GOLDEN_RECORD=1 python -m pytest -q tests/test_golden_outputs.py
    git diff tests/golden/outputs.sha256.json

Only regenerate when a change is MEANT to change output bytes (or a
refusal), after checking the changed outputs some other way, and say in the
commit message which cases changed and why. A refactor must leave every
hash as it is.

Debugging one case: `python tests/golden_matrix.py /tmp/g --only CASE
--only ITS-INPUT-CASE` runs part of the matrix (same pinned environment) and
leaves the outputs under /tmp/g/out/.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import golden_matrix as gm

GOLDEN = Path(__file__).resolve().parent / "golden" / "outputs.sha256.json"
RECORD = os.environ.get("SMOLQ_GOLDEN_RECORD") == "1"

CASES = gm.build_cases()
CASE_NAMES = [c.name for c in CASES]


def _recorded() -> dict[str, str]:
    if not GOLDEN.exists():
        return {}
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def actual(tmp_path_factory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("golden") / "work"
    results = gm.run_in_child(work)
    if RECORD:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(gm.dumps(results))
    return results


@pytest.fixture(scope="module")
def recorded(actual) -> dict[str, str]:
    rec = _recorded()
    if not rec:
        pytest.fail(f"{GOLDEN} is missing: record it with SMOLQ_GOLDEN_RECORD=1 (see this module's docstring)")
    return rec


def _input_diff(actual: dict[str, str], recorded: dict[str, str]) -> list[str]:
    keys = sorted(k for k in set(actual) | set(recorded) if k.startswith("input/"))
    return [k for k in keys if actual.get(k) != recorded.get(k)]


def _inputs_message(diff: list[str]) -> str:
    return (f"the tiny models built on this machine differ from the recorded ones ({', '.join(diff)}): "
            "different INPUTS (CPU architecture, torch or transformers version), so the output hashes "
            "cannot be compared here. This is not a smolq output change; see tests/test_golden_outputs.py.")


def test_input_fingerprints(actual, recorded):
    diff = _input_diff(actual, recorded)
    if diff:
        pytest.fail(_inputs_message(diff), pytrace=False)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_golden_output(case, actual, recorded):
    diff = _input_diff(actual, recorded)
    if diff:
        pytest.fail(_inputs_message(diff), pytrace=False)
    if case not in recorded:
        pytest.fail(f"{case} has no recorded hash: a new case; record it with SMOLQ_GOLDEN_RECORD=1", pytrace=False)
    if case.split("/")[0] in gm.FLOAT_ENV_GROUPS and actual.get(gm.FLOAT_ENV_KEY) != recorded.get(gm.FLOAT_ENV_KEY):
        pytest.skip(f"this machine's BLAS/LAPACK sums floats unlike the recorded one ({gm.FLOAT_ENV_KEY} "
                    f"{actual.get(gm.FLOAT_ENV_KEY, '?')[:12]} vs {recorded.get(gm.FLOAT_ENV_KEY, '?')[:12]}, "
                    "in the pinned environment), so GPTQ's bytes cannot be compared here")
    got, want = actual.get(case), recorded[case]
    if got != want:
        pytest.fail(f"{case}: output changed: recorded {want}, got {got} (argv: {' '.join(_argv(case))})",
                    pytrace=False)


def _argv(case: str) -> list[str]:
    return next(c.argv for c in CASES if c.name == case)


def test_record_has_no_stale_cases():
    """Every recorded case is still in the matrix (removing one needs a regeneration, in plain sight)."""
    rec = _recorded()
    stale = sorted(k for k in rec if not k.startswith("input/") and k != gm.FLOAT_ENV_KEY and k not in set(CASE_NAMES))
    assert not stale, f"recorded cases no longer in the matrix: {stale}"


# ---------------------------------------------------------------- the matrix may not shrink silently
# The lists below are written out here on purpose, not taken from golden_matrix: shrinking the
# matrix means editing this test too.

FAMILIES = ("llama", "gptj", "mpt")
ALL_FORMATS = ("gguf-v1", "gguf-v2", "gguf-v3", "ggml", "ggmf", "ggjt-v1", "ggjt-v2", "ggjt-v3", "ggmm")
LEGACY_OF = {"llama": ("ggml", "ggmf", "ggjt-v1", "ggjt-v2", "ggjt-v3"), "gptj": ("ggml",), "mpt": ("ggml", "ggmm")}
RTN_PRESETS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
               "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "tq1_0", "tq2_0")


def _by_group() -> dict[str, list[gm.Case]]:
    groups: dict[str, list[gm.Case]] = {}
    for c in CASES:
        groups.setdefault(c.group, []).append(c)
    return groups


def test_matrix_covers_every_case_family():
    names = set(CASE_NAMES)
    rec = _recorded()
    groups = _by_group()
    missing = []

    def need(name):
        if name not in names:
            missing.append(name)

    # convert: 3 families x GGUF v1-v3 + every legacy container/version x f32/f16/q4_0/q4_k_m
    for fam in FAMILIES:
        for fmt in ALL_FORMATS:
            for ot in ("f32", "f16", "q4_0", "q4_k_m"):
                need(f"convert/{fam}/{fmt}/{ot}")
    # quantize RTN: every preset from an f16 GGUF of each family, --pure, --tensor-type, legacy containers
    for fam in FAMILIES:
        for preset in RTN_PRESETS:
            need(f"quantize/{fam}/{preset}")
        fam_cases = [c for c in CASES if c.name.split("/")[1:2] == [fam]]
        if not any("--pure" in c.argv for c in fam_cases):
            missing.append(f"quantize --pure ({fam})")
        if not any("--tensor-type" in c.argv and not c.name.endswith(("bad-regex", "bad-type")) for c in fam_cases):
            missing.append(f"quantize --tensor-type ({fam})")
        legacy_ok = [c for c in groups.get("quantize-legacy", []) if c.name.split("/")[1] == fam
                     and rec and len(rec.get(c.name, "")) == 64]
        if rec and not legacy_ok:
            missing.append(f"quantize into a legacy container that works ({fam})")
    # GPTQ on the tiny LLaMA: to GGUF q4_0 and q4_k_m, to GPTQ dirs of 4 and 3 bits; fixed seed, small sizes
    for name in ("gptq/llama/gguf-q4_0", "gptq/llama/gguf-q4_k_m", "gptq/llama/gptq-b4", "gptq/llama/gptq-b3"):
        need(name)
    for c in groups.get("gptq", []):
        assert {"--seed", "--nsamples", "--seqlen"} <= set(c.argv), c.name
    # GPTQ import: every GPTQ directory -> GGUF and -> a legacy file
    gptq_dirs = [c.name for c in groups.get("gptq", [])
                 if "--format" in c.argv and c.argv[c.argv.index("--format") + 1] == "gptq"]
    assert {"gptq/llama/gptq-b4", "gptq/llama/gptq-b3"} <= set(gptq_dirs)
    for d in gptq_dirs:
        need(f"gptq-import/{d.split('/', 1)[1]}/gguf")
        need(f"gptq-import/{d.split('/', 1)[1]}/ggjt-v3")
    # migrate: every ordered pair of the family's containers, from f16 and q4_0 files
    for fam in FAMILIES:
        containers = ALL_FORMATS[:3] + LEGACY_OF[fam]
        for st in ("f16", "q4_0"):
            for a in containers:
                for z in containers:
                    if a != z:
                        need(f"migrate/{fam}/{st}/{a}>{z}")
    assert not missing, f"the golden matrix lost cases: {missing}"
