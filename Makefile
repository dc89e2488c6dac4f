# `make demo` and `make test` each create .venv if it is missing and install genvis into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Train a DiT on the bundled digits, sample a class-balanced grid, and score the samples.
DEMO_RUN := runs/digits-dit
demo: $(STAMP)
	$(VENV)/bin/genvis train configs/digits/dit.yaml output_dir=$(DEMO_RUN)
	$(VENV)/bin/genvis sample $(DEMO_RUN) --num-samples 100 --balanced --out $(DEMO_RUN)/grid.png
	$(VENV)/bin/genvis sample $(DEMO_RUN) --num-samples 1000 --balanced --out $(DEMO_RUN)/samples.npz
	$(VENV)/bin/genvis eval digits $(DEMO_RUN)/samples.npz

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile tests

bench: $(STAMP)
	$(PY) benchmarks/dit_speed.py
	$(PY) benchmarks/sampler_error.py

clean:
	rm -rf $(DEMO_RUN)
