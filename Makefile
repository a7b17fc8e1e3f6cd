# Everything a new clone needs: `make demo` and `make test` create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test test-slow test-browser lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "installing slotsweep and its dependencies into $(VENV) (about 3 minutes; pip's lines follow)"
	$(BIN)/python -m pip install --progress-bar off -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The quickstart sweep: 4 tiny trials, 2 at a time, on a CPU (~1 minute after installing),
# exactly `slotsweep sweep quickstart`: runs/sweeps/quickstart, promoted as `quickstart`. A
# sweep's name is its folder and is never reused: again with `make demo NAME=quickstart-2`.
demo: $(STAMP)
	$(BIN)/slotsweep sweep quickstart $(if $(NAME),name=$(NAME))

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -m "not slow and not gpu and not browser"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow"

# The report in a real browser: Debian's chromium (apt-get install -y chromium) via Playwright.
test-browser: $(STAMP)
	$(BIN)/python -m pytest -m "browser"

bench: $(STAMP)
	$(BIN)/python bench/metrics_bench.py
	$(BIN)/python bench/loader_bench.py
	$(BIN)/python bench/train_speed.py tiny --steps 20 --warmup 5
	$(BIN)/python bench/sweep_overhead.py --trials 4
	$(BIN)/python bench/throughput.py tiny
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/downstream.py

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs .pytest_cache .ruff_cache
