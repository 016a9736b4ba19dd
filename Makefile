# Every target installs what it needs into .venv first; a second `make setup` is a no-op.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed

# Demo scale: a few minutes end to end on a 2-core CPU. Override on the command line, e.g.
#   make data EPISODES=200 MAX_STEPS=2000
EPISODES  ?= 24
MAX_STEPS ?= 400
WORKERS   ?= 2
VIDEOS    ?= bulk_videos
SHARDS    ?= shards/pairs
LATENT    ?= shards/latent
CKPT_DIR  ?= checkpoints/latent_action
CKPT      ?= $(CKPT_DIR)/best.pt
REPORTS   ?= reports
# `make train` picks `full` on a CUDA machine and `demo` elsewhere; PRESET=... overrides.
PRESET    ?= $(shell $(PY) -c "import torch; print('full' if torch.cuda.is_available() else 'demo')" 2>/dev/null || echo demo)
TRAIN_ARGS ?=
# EXTRACT_ARGS=--zstd also writes .tar.zst copies of the latent shards, for transfer.
EXTRACT_ARGS ?=

.PHONY: setup data shards train extract eval demo bench test clean help

help:
	@echo "make demo   - install, record, pack, train (demo preset), extract, evaluate"
	@echo "make test   - run the test suite (CPU only)"
	@echo "make setup | data | shards | train | extract | eval | bench | clean"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

data: setup
	$(PY) -m pipeline.record --out $(VIDEOS) --episodes $(EPISODES) --max-steps $(MAX_STEPS) --workers $(WORKERS) --skip-existing

shards: setup
	$(PY) -m pipeline.pack --src $(VIDEOS) --out $(SHARDS) --workers $(WORKERS)

train: setup
	@echo "==> make train: preset '$(PRESET)' (full when CUDA is present, demo otherwise; PRESET=... overrides)"
	$(PY) train.py --shards $(SHARDS) --preset $(PRESET) --out $(CKPT_DIR) $(TRAIN_ARGS)

extract: setup
	$(PY) extract.py --shards $(SHARDS) --checkpoint $(CKPT) --out $(LATENT) $(EXTRACT_ARGS)

eval: setup
	$(PY) evaluate.py --shards $(SHARDS) --checkpoint $(CKPT) --split val --out $(REPORTS)/val
	$(PY) evaluate.py --shards $(SHARDS) --checkpoint $(CKPT) --split test --out $(REPORTS)/test

demo: setup
	$(MAKE) data shards
	$(MAKE) train PRESET=demo
	$(MAKE) extract eval

bench: setup
	$(PY) -m bench

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(SHARDS) $(LATENT) runs reports wandb
