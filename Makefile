# explainguide: `make run` (the main job) and `make test` (the suite) are all a fresh clone needs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help install run test test-full bench clean-outputs

help:  ## show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,gan]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its dev extras

run: $(STAMP)  ## the main job (any Hydra overrides go in ARGS='...')
	$(VENV)/bin/explainguide $(ARGS)

test: $(STAMP)  ## the fast offline suite
	$(PY) -m pytest -q

test-full: $(STAMP)  ## also the slow, network, GPU and real-weight tests
	$(PY) -m pytest -q -m ''

bench: $(STAMP)  ## relevance benchmark (JSON)
	$(PY) scripts/bench.py relevance

clean-outputs:  ## remove outputs/
	rm -rf outputs
