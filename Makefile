# Two commands on a brand-new machine: `make demo` and `make test` (each creates .venv if missing).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export DAGSTER_HOME := $(CURDIR)/dagster_home
export DFKD_CONFIG ?= configs/demo.yaml
UI_PORT ?= 3000
# the UI serves anyone who can reach it (no login): loopback only unless you choose otherwise
UI_HOST ?= 127.0.0.1

.PHONY: install demo test test-fast lint ui compare benchmark clean-data fleet fleet-down

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	$(BIN)/python -m pip check
	$(BIN)/dfkd emojiworld fetch  # world 2's npm packages (npm pack, sha256 checked) into storage/emoji-npm
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dfkd toyworld build --out storage/toyworld
	$(BIN)/dfkd run --config $(DFKD_CONFIG)

compare: $(STAMP)
	$(BIN)/dfkd toyworld build --out storage/toyworld
	$(BIN)/dfkd compare --config $(DFKD_CONFIG) --out storage/compare

# The recipe on every world (issue 35): the pinned toyworld, the toyworld of world seed 1 (trained here: no
# pin, tens of minutes) and world 2 (emoji artwork), each with configs/demo.yaml's recipe and only paths,
# classes and templates changed; BENCH_METHODS over BENCH_SEEDS per world, tables in storage/benchmark/<world>/.
# Hours on 2 CPU cores (a world-2 run alone is about 40 min at one thread).
BENCH_METHODS ?= contrastive real
BENCH_SEEDS ?= 0 1 2
benchmark: $(STAMP)
	$(BIN)/dfkd toyworld build --out storage/toyworld
	printf 'seed: 1\n' > storage/toyworld-s1.settings.yaml
	$(BIN)/dfkd toyworld build --settings storage/toyworld-s1.settings.yaml --out storage/toyworld-s1
	sed 's#storage/toyworld#storage/toyworld-s1#g' configs/demo.yaml > storage/toyworld-s1.yaml
	$(BIN)/dfkd emojiworld build --out storage/emoji
	$(BIN)/dfkd compare --config configs/demo.yaml --methods $(BENCH_METHODS) --seeds $(BENCH_SEEDS) --out storage/benchmark/toyworld
	$(BIN)/dfkd compare --config storage/toyworld-s1.yaml --methods $(BENCH_METHODS) --seeds $(BENCH_SEEDS) --out storage/benchmark/toyworld-s1
	$(BIN)/dfkd compare --config configs/emoji.yaml --methods $(BENCH_METHODS) --seeds $(BENCH_SEEDS) --out storage/benchmark/emoji

test: $(STAMP)
	$(BIN)/ruff check dfkd_assets tests scripts
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff with the rules in pyproject.toml ([tool.ruff]); `make test` runs it first
lint: $(STAMP)
	$(BIN)/ruff check dfkd_assets tests scripts

# the quick loop: what `make test` runs minus the whole-graph, minutes-long and CUDA tests
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e and not slow and not gpu" $(PYTEST_ARGS)

ui: $(STAMP)
	$(BIN)/dagster dev --host $(UI_HOST) --port $(UI_PORT) -m dfkd_assets.definitions

# a local scale-out fleet (infra/README.md): Dagster + MLflow on Postgres, FLEET_WORKERS Celery workers on RabbitMQ
FLEET_WORKERS ?= 2
FLEET_CONFIG ?= configs/ci.yaml
fleet: $(STAMP)
	$(BIN)/dfkd fleet up --config $(FLEET_CONFIG) --workers $(FLEET_WORKERS)

fleet-down: $(STAMP)
	$(BIN)/dfkd fleet down

clean-data:
	rm -rf data/synthetic data/.work data/student data/reports data/prompt_bank data/teacher_head data/previews data/synthetic.dvc storage dagster_home/storage dagster_home/history dagster_home/schedules dagster_home/.logs_queue dagster_home/.nux dagster_home/.telemetry
