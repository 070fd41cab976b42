# her2exp: `make help` lists the targets. Every target creates .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.her2exp-installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train test test-slow bench gpu-check lint format ui montage clean demo-folder demo-slides ddp sweep compare mlflow-server docs reference

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-12s %s\n", $$1, $$2}'

# Reinstalls only when pyproject.toml is newer than the stamp: a second `make install` takes
# well under a second.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install her2exp (editable, with dev extras); idempotent

train: $(STAMP) ## train on the embedded data (CPU, one MLflow run in ./mlflow.db); ARGS="k=v ..." adds overrides
	$(VENV)/bin/her2exp-train $(ARGS)

test: $(STAMP) ## the whole test suite (what CI runs)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

test-slow: $(STAMP) ## long soak tests, and tests whose claim `make test` proves elsewhere
	$(PY) -m pytest -q -m slow

$(VENV)/.bench-installed: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	@touch $@

bench: $(VENV)/.bench-installed ## her2exp's epoch vs a bare PyTorch loop (img/s, ratio); CI speed; stain normalisers; slides; bag heads' epoch, feature read rate; ONNX Runtime vs PyTorch; served model
	$(PY) -m her2exp.bench $(ARGS)

gpu-check: $(STAMP) ## CUDA-only tests + the CUDA bench (< 8 min on one GPU); without CUDA: the CPU part and what it skipped
	$(PY) -m her2exp.bench.gpu_check $(ARGS)

lint: $(STAMP) ## ruff check + format check + the import contracts (layers, light config/cli) + no import cycle
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -p no:cacheprovider tests/test_lint.py

format: $(STAMP) ## apply ruff format and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: $(STAMP) reference ## build the documentation site into docs/_build/html (strict)
	$(PY) -m sphinx -W -n --keep-going -q -b html docs docs/_build/html

mlflow-server: $(STAMP) ## team MLflow server on 127.0.0.1:5000: PostgreSQL backend (private cluster in .mlflow-server/ unless ARGS="backend_store_uri=..."), served artifacts
	$(VENV)/bin/her2exp-server out=$(CURDIR)/.mlflow-server port=5000 $(ARGS)

ui: $(STAMP) ## MLflow UI on 127.0.0.1:5000 over ./mlflow.db
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

montage: $(STAMP) ## redraw docs/synthetic_montage.png from the embedded generator
	$(PY) -c "from her2exp.data import synthetic as s; from PIL import Image; \
	im = Image.fromarray(s.montage(s.generate(seed=0), per_group=6)); \
	im.resize((im.width * 2, im.height * 2), Image.NEAREST).save('docs/synthetic_montage.png')"

reference: $(STAMP) ## regenerate docs/reference from the code (commands' keys, config groups); tests/docs fails while stale
	$(PY) -m her2exp.cli.reference docs/reference

demo-folder: $(STAMP) ## export the embedded data as a PNG folder + manifest under outputs/, then train on it via data=folder
	rm -rf outputs/demo_folder
	$(VENV)/bin/her2exp-manifest export_synthetic=$(CURDIR)/outputs/demo_folder n_patients=40 patches_per_patient=12 image_size=32
	$(VENV)/bin/her2exp-train experiment=smoke data=folder data.root=$(CURDIR)/outputs/demo_folder 'data.patient_regex="^([^-]+)-"' $(ARGS)

demo-slides: $(STAMP) ## 20 embedded whole-slide TIFFs -> her2exp-tile -> her2exp-train data=slides (offline, a few minutes)
	rm -rf outputs/demo_slides
	$(PY) -m her2exp.data.synthetic_slides outputs/demo_slides/slides --n-slides 20
	$(VENV)/bin/her2exp-tile input=outputs/demo_slides/slides/slides.csv out=outputs/demo_slides/tiles tiles.mpp=0.5 tiles.size=128 tiles.processes=2
	$(VENV)/bin/her2exp-train data=slides data.path=$(CURDIR)/outputs/demo_slides/tiles/tiles.parquet model=resnet10t data.image_size=64 data.num_workers=2 trainer.epochs=4 evaluation.decision_level=slide hydra.run.dir=outputs/demo_slides/run $(ARGS)

ddp: $(STAMP) ## the 2-process CPU DDP example (torchrun, gloo)
	$(VENV)/bin/torchrun --nproc_per_node=2 -m her2exp.train experiment=smoke model.name=test_convnext trainer.epochs=3 $(ARGS)

sweep: $(STAMP) ## a small Optuna sweep on the CPU (in-memory study; one MLflow parent run, one child per trial)
	$(VENV)/bin/her2exp-train -m hydra/sweeper=her2_optuna hydra.sweeper.n_trials=6 experiment=smoke loss=focal tracking.log_model=false $(ARGS)

compare: $(STAMP) ## table of the latest sweep's runs from MLflow, best first (ARGS="sweep=all" for every run)
	$(VENV)/bin/her2exp-compare $(ARGS)

clean: ## remove outputs/, multirun contents and the local MLflow store (not .venv)
	rm -rf outputs mlflow.db mlartifacts && find multirun -mindepth 1 ! -name .gitkeep -delete
