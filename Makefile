# quantkit developer entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the CPU build of torch that these machines keep on local disk
# (a bare `pip install torch` would download several GB of CUDA wheels), then quantkit.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test demo lint bench-tiny clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main suite, then the GPTQ interop suite in its own venv (gptqmodel + optimum).
test: install
	$(BIN)/python -m pytest -q
	bash .ci/interop.sh

demo: install
	$(BIN)/quantkit run recipes/demo.yaml --out runs/demo --force

lint: install
	$(BIN)/ruff check quantkit tests bench scripts

bench-tiny: install
	$(BIN)/python bench/gptq_speed.py --shape tiny --out bench/results/gptq_tiny_cpu.json

clean:
	rm -rf $(VENV) runs .pytest_cache
