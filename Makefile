# dpo-recipe. Every setting lives in configs/*.yaml; these targets only choose which file and launcher.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/beta0.3.yaml
# Probed (a torch import, seconds) only by the targets that launch training, not by every make.
HAS_GPU = $(shell $(BIN)/python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
# One GPU: accelerate with bf16. No GPU: one plain process. Scale out with e.g.
#   make train LAUNCH="$(BIN)/accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml"
LAUNCH ?= $(if $(filter 1,$(HAS_GPU)),$(BIN)/accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml,$(BIN)/python)
SWEEP_CONFIGS ?= configs/beta0.3.yaml configs/beta0.3_lr1e-5.yaml configs/beta0.5.yaml configs/beta0.7.yaml
# Extra arguments for the command a target runs, e.g. make train ARGS=--resume, make test ARGS="-k report -x".
ARGS ?=
# The smoke targets are demos, so each run starts over (--overwrite) and running them twice works; ARGS=--resume
# continues instead.
DEMO_START = $(if $(filter --resume,$(ARGS)),,--overwrite)

.PHONY: install test smoke train eval sweep sweep-smoke bench bench-memory bench-data docker

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU build that is on disk here; on a GPU machine install your CUDA torch first instead.
install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'

test:
	$(BIN)/python -m pytest tests $(ARGS)

smoke:
	$(LAUNCH) scripts/train.py --config configs/smoke.yaml $(DEMO_START) $(ARGS)

train:
	$(LAUNCH) scripts/train.py --config $(CONFIG) $(ARGS)

EVAL_PATHS ?= checkpoints
SMOKE_BETAS ?= 0.1 0.3 1.0
SWEEP_REPORT ?= reports/sweep.md
smoke_runs = $(foreach beta,$(SMOKE_BETAS),checkpoints/smoke_beta$(beta))
# Where each sweep config trains (its run_name and output_dir, with ARGS' --set overrides), asked of the config itself.
TRAIN_ONLY_FLAGS := --resume --overwrite --strict --verbose --print-config
sweep_run_dirs = for config in $(SWEEP_CONFIGS); do \
	$(BIN)/python -m dpo_recipe print-config --run-dir --config $$config $(filter-out $(TRAIN_ONLY_FLAGS),$(ARGS)) || exit 1; done

# Best epoch of every run under checkpoints/. One run: make eval EVAL_PATHS=checkpoints/beta0.3; every epoch: ARGS=--all-epochs
eval:
	$(BIN)/python scripts/eval.py $(EVAL_PATHS) $(ARGS)

# The four sweep configs, each evaluated on its test pairs at its best epoch, then reports/sweep.md.
sweep:
	for config in $(SWEEP_CONFIGS); do $(LAUNCH) scripts/train.py --config $$config $(ARGS) || exit 1; done
	runs="$$($(sweep_run_dirs))" && $(BIN)/python scripts/eval.py $$runs && \
	$(BIN)/python -m dpo_recipe report $$runs --out $(SWEEP_REPORT)

# The same pipeline at smoke size (tiny GPT-2, synthetic pairs, CPU): one smoke run per beta, then reports/sweep_smoke.md.
sweep-smoke:
	for beta in $(SMOKE_BETAS); do $(LAUNCH) scripts/train.py --config configs/smoke.yaml --set run_name=smoke_beta$$beta --set loss.beta=$$beta $(DEMO_START) $(ARGS) || exit 1; done
	$(BIN)/python scripts/eval.py $(smoke_runs)
	$(BIN)/python -m dpo_recipe report $(smoke_runs) --out reports/sweep_smoke.md

# This recipe's trainer against plain trl.DPOTrainer in one run; writes benchmarks/results.md.
bench:
	$(BIN)/python scripts/bench.py $(ARGS)

# Preparing 60k UltraFeedback-like pairs: the recipe (1 and 2 processes, its cache) against TRL's _prepare_dataset;
# writes its section of benchmarks/results.md. A rehearsal: make bench-data ARGS="--pairs 2000 --output ''".
bench-data:
	$(BIN)/python scripts/bench_data.py $(ARGS)

# The CUDA image (Dockerfile); another base: make docker BASE_IMAGE=pytorch/pytorch:<tag>. Linted in the tests, not built there.
DOCKER_IMAGE ?= dpo-recipe
BASE_IMAGE ?=
docker:
	docker build -t $(DOCKER_IMAGE) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) .

# Memory per setting (full fp32/bf16 weights, LoRA, QLoRA): measured on tiny Llamas on this CPU, counted on fake
# tensors at 0.5B-8B shapes; replaces its own section of benchmarks/results.md. Runs are cached in benchmarks/.memory_runs.
bench-memory:
	$(BIN)/python scripts/bench_memory.py $(ARGS)
