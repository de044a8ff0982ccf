# quantkit developer entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the CPU build of torch that these machines keep on local disk
# (a bare `pip install torch` would download several GB of CUDA wheels), then quantkit,
# resolving every package through .ci/constraints.txt (the versions CI last verified), so
# an upstream release cannot turn a green CI red. `make test-latest` tries the newest
# releases on purpose, in its own venv.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
TORCH       ?= torch==2.13.0
CONSTRAINTS := .ci/constraints.txt
STAMP       := $(VENV)/.installed
LATEST      ?= .venv-latest

.PHONY: install test demo lint bench-tiny test-latest constraints clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) "$(TORCH)"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main suite, then the GPTQ interop suite in its own venv (gptqmodel + optimum, and
# transformers 5.23: the remote-code tests run there too, on the other side of the 5.24
# `past_key_values` -> `cache` rename).
test: install
	$(BIN)/python -m pytest -q
	bash .ci/interop.sh

demo: install
	$(BIN)/quantkit run recipes/demo.yaml --out runs/demo --force

lint: install
	$(BIN)/ruff check quantkit tests bench scripts

bench-tiny: install
	$(BIN)/python bench/gptq_speed.py --shape tiny --out bench/results/gptq_tiny_cpu.json

# Not part of CI: the same suite against the newest release of every dependency, past
# pyproject's tested upper bounds (torch stays at the local CPU build). Writes the versions
# it ran with to $(LATEST)/versions.txt; record the outcome in docs/compatibility.md.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q "$(TORCH)"
	$(LATEST)/bin/python -m pip install -q --no-deps -e .
	$(LATEST)/bin/python -m pip install -q --upgrade "$(TORCH)" \
		$$($(PYTHON) scripts/dependency_names.py --extra test)
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider

# After a green `make test-latest`: adopt its versions as the new verified set.
constraints:
	test -f $(LATEST)/versions.txt
	$(LATEST)/bin/python scripts/dependency_names.py --constraints $(LATEST)/versions.txt > $(CONSTRAINTS)

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache
