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
# `make train` picks `full` on a CUDA machine and `demo` elsewhere; PRESET=... overrides. (Deferred `=`:
# asked when a recipe runs, after `setup` has made the venv that can answer; asked once: each answer
# imports torch, 1.7 s on a 2-core CPU.)
HAS_CUDA   = $(eval HAS_CUDA := $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0))$(HAS_CUDA)
PRESET    ?= $(if $(filter 1,$(HAS_CUDA)),full,demo)
# `make demo` trains `gpu-demo` (the full-width model, a few thousand steps) on a CUDA machine, `demo` elsewhere.
DEMO_PRESET ?= $(if $(filter 1,$(HAS_CUDA)),gpu-demo,demo)
EVAL_SPLITS ?= val test
TRAIN_ARGS ?=
# EXTRACT_ARGS=--zstd also writes .tar.zst copies of the latent shards, for transfer.
EXTRACT_ARGS ?=
CONTROLLER_DIR  ?= checkpoints/controller
CONTROLLER      ?= $(CONTROLLER_DIR)/controller.pt
CONTROLLER_ARGS ?=
# the README's ablation table: 800 steps, two runs side by side (about 2 hours for all 8 variants on 2 cores)
ABLATE_ARGS ?= --iters 800 --jobs 2
ROLLOUT_ARGS ?=
# The demo's own sizes: the controller's steps (make controller: its default).
DEMO_CONTROLLER_ARGS ?= --steps 800
# The world model that is played (control/world.py, docs/world-model.md): rollout, play and
# play-session play it when $(WORLD) exists, else the LAM's decoder.
WORLD_DIR  ?= checkpoints/world
WORLD      ?= $(WORLD_DIR)/world.pt
WORLD_ARGS ?=
# The demo does not train one: `make world`'s 600 steps take 8 minutes on a 2-core CPU and,
# measured, keep the ball in play in under a third of a session's frames (docs/world-model.md). The demo's rollouts: 12 starts
# played 200 steps and 24 held LEFT / RIGHT starts (make rollout: 48 and 100).
DEMO_ROLLOUT_ARGS ?= --starts 12 --control-starts 24
PLAY_WORLD = $$([ -f $(WORLD) ] && echo --world $(WORLD))
# The GPU check runs with the GPU machine's own Python and torch, installing only carried wheels.
GPU_PY ?= python3
WHEELS ?= wheels

.PHONY: setup data shards train extract eval controller world rollout play play-session demo bench ablate ablate-world readme-figures test browser gpu-check wheels clean help

help:
	@echo "make demo   - install, record, pack, train (demo preset; gpu-demo on CUDA), extract, evaluate, play"
	@echo "make test   - run the test suite (CPU only)"
	@echo "make setup | data | shards | train | extract | eval | controller | world | rollout | play | play-session | bench | clean"
	@echo "make readme-figures - the README's table, GIF and pipeline picture from a demo's reports"
	@echo "make wheels (here), then make gpu-check (on a GPU machine)"

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
	@for split in $(EVAL_SPLITS); do \
	  $(PY) evaluate.py --shards $(SHARDS) --checkpoint $(CKPT) --split $$split --out $(REPORTS)/$$split || exit $$?; \
	done

controller: setup
	$(PY) -m control.train --latent $(LATENT) --out $(CONTROLLER_DIR) $(CONTROLLER_ARGS)

# The world model: from the LAM's decoder, on the controller's codes and its own rollouts.
world: setup
	$(PY) -m control.world_train --latent $(LATENT) --checkpoint $(CKPT) --controller $(CONTROLLER) --out $(WORLD_DIR) $(WORLD_ARGS)

rollout: setup
	$(PY) play.py rollout --checkpoint $(CKPT) --controller $(CONTROLLER) --latent $(LATENT) --out $(REPORTS)/play $(PLAY_WORLD) $(ROLLOUT_ARGS)

play: setup
	$(PY) play.py serve --checkpoint $(CKPT) --controller $(CONTROLLER) --latent $(LATENT) $(PLAY_WORLD)

# A ball-following policy plays 300 steps on the play page in headless Chromium (make browser).
play-session: setup
	$(PY) play.py session --checkpoint $(CKPT) --controller $(CONTROLLER) --latent $(LATENT) --out $(REPORTS)/play $(PLAY_WORLD)

# Run again, it reuses what is finished and valid (recordings, shards, a finished run of the same
# settings, latents and a controller of that checkpoint) and redoes a stage whose inputs changed,
# saying so; `make clean` wipes the data and reports. Val is evaluated while training (best.pt is
# chosen on it); the demo reports test (`make eval` does both).
CLOCK = $(PY) -m bench.timed --log $(REPORTS)/demo-timings.json
demo: setup
	@$(CLOCK) --fresh
	$(CLOCK) --stage "record + pack" -- $(MAKE) data shards
	$(CLOCK) --stage "train ($(DEMO_PRESET))" -- $(MAKE) train PRESET=$(DEMO_PRESET) TRAIN_ARGS="--reuse $(TRAIN_ARGS)"
	$(CLOCK) --stage extract -- $(MAKE) extract EXTRACT_ARGS="--overwrite $(EXTRACT_ARGS)"
	$(CLOCK) --stage "evaluate (test)" -- $(MAKE) eval EVAL_SPLITS=test
	$(CLOCK) --stage controller -- $(MAKE) controller CONTROLLER_ARGS="--reuse $(DEMO_CONTROLLER_ARGS)"
	$(CLOCK) --stage "rollouts" -- $(MAKE) rollout ROLLOUT_ARGS="$(DEMO_ROLLOUT_ARGS)"
	@$(CLOCK) --summary
	@echo "==> reports: $(REPORTS)/test/report.md (model), $(REPORTS)/play/report.md (controller and rollouts)"

bench: setup
	$(PY) -m bench

# Each model variant trained at demo scale on the same shards and scored on val (hours on a CPU).
ablate: setup
	$(PY) -m bench.ablate --shards $(SHARDS) --out $(REPORTS)/ablation $(ABLATE_ARGS)

# The README's headline table (between its marker lines), docs/img/rollout.gif and docs/img/pipeline.png,
# from a demo's reports/test and reports/play; each report names its commit and machine.
readme-figures: setup
	$(PY) -m bench.readme_figures --reports $(REPORTS)

# The world model's levers on this LAM and controller (docs/world-model.md): world-ablation.md.
WORLD_ABLATE_ARGS ?= --worlds decoder controller-codes own-rollouts paddle-row context-noise past-3 key split --controller-steps 800
ablate-world: setup
	$(PY) -m bench.ablate --checkpoint $(CKPT) --latent $(LATENT) --controller $(CONTROLLER) --out $(REPORTS)/ablation $(WORLD_ABLATE_ARGS)

# The play page's browser test drives Debian's Chromium; without it that one test skips and says so.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) ; } || \
	  echo "chromium not installed: the browser test will skip"

# One pytest worker per core (a file's tests stay on one worker, so its module fixtures are built once),
# the slowest files first (tests/conftest.py, SLOWEST_FIRST).
test: setup browser
	$(PY) -m pytest -n auto --dist loadfile --no-loadscope-reorder

# Runtime wheels for a GPU machine without registry access (cp312, manylinux x86-64): torch and
# torchmetrics are left out, as that machine has its own. DALI's wheel (~200 MB) is larger than one
# carry: split it (split -b 60M) or let the check fall back to the torch loader.
wheels: setup
	$(BIN)/pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(WHEELS) webdataset wandb zstandard uvicorn starlette zlib-ng ale-py gymnasium tqdm matplotlib scikit-learn pytest pytest-timeout hypothesis
	@ls $(WHEELS) | wc -l | xargs echo "wheels in $(WHEELS)/:"

gpu-check:
	@$(GPU_PY) -m bench.gpu_check --preflight
	@[ ! -d $(WHEELS) ] || $(GPU_PY) -m pip install -q --no-index --find-links $(WHEELS) $(WHEELS)/*.whl
	$(GPU_PY) -m bench.gpu_check --out $(REPORTS)/gpu-check

clean:
	rm -rf $(SHARDS) $(dir $(SHARDS)).$(notdir $(SHARDS)).* $(LATENT) runs reports wandb
