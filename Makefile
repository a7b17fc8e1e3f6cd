# Everything a new clone needs: `make demo` and `make test` create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= runs/demo

.PHONY: install demo test test-slow lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/slotsweep make-data synthetic --out $(DEMO)/data --videos 24 --frames 8 --size 64 --seed 0
	$(BIN)/slotsweep check-data --data-dir $(DEMO)/data --ep-length 8 --img-size 64
	$(BIN)/slotsweep train tiny --log-dir $(DEMO)/logs

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -m "not slow and not gpu and not browser"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow"

bench: $(STAMP)
	$(BIN)/python bench/metrics_bench.py
	$(BIN)/python bench/loader_bench.py

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
