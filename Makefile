# Every target works alone on a fresh clone: it creates .venv and installs the package first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: setup demo data train compare search test test-slow test-all bench lint ui clean

$(BIN)/digitlab: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

setup: $(BIN)/digitlab

# The whole loop in a few minutes on the embedded data: a small search, promote, submit, score.
demo: setup
	$(BIN)/digitlab search --space search/quick.yaml $(ARGS)
	$(BIN)/digitlab promote
	$(BIN)/digitlab submit
	$(BIN)/digitlab score submissions/submission.csv data/digit-recognizer/solution.csv

data: setup
	$(BIN)/digitlab data $(ARGS)

train: setup
	$(BIN)/digitlab train $(ARGS)

compare: setup
	$(BIN)/digitlab compare $(ARGS)

search: setup
	$(BIN)/digitlab search $(ARGS)

# The test suite without its slow tier (PostgreSQL tests skip, with the reason, when none runs),
# on up to 4 processes (pytest-xdist; one per core): a test trains tiny models, which keep
# about one core busy each. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= auto
test: setup
	$(BIN)/pytest -m "not slow" -n $(TEST_WORKERS) --maxprocesses 4 $(ARGS)

# The slow tier alone (every experiment through `mlflow run`, long searches), and everything.
test-slow: setup
	$(BIN)/pytest -m slow $(ARGS)

test-all: setup
	$(BIN)/pytest $(ARGS)

# Speed and accuracy figures: one table, plus benchmarks/results.json. ARGS=--quick for a smoke test.
bench: setup
	$(BIN)/python benchmarks/run.py $(ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks

# The MLflow UI on the same store that the commands write to; prints the experiment's URL.
ui: setup
	$(BIN)/digitlab ui $(ARGS)

clean:
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
