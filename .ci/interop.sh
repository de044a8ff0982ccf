#!/usr/bin/env bash
# GPTQ interop tests (tests/interop) in their own venv, .venv-interop/: gptqmodel 7.6.0 and
# optimum pin a stack of their own, so they stay out of .venv. Installs need PyPI; the tests
# themselves download nothing. Exit status: 0 passed, 1 install failed, else pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${INTEROP_VENV:-.venv-interop}
BIN=$VENV/bin
STAMP=$VENV/.installed
CONSTRAINTS=.ci/interop-constraints.txt

fail() { echo "interop: $*" >&2; exit 1; }

start=$SECONDS
if [[ ! -f $STAMP || pyproject.toml -nt $STAMP || $CONSTRAINTS -nt $STAMP ]]; then
    test -x "$BIN/python" || "$PYTHON" -m venv "$VENV" || fail "cannot create $VENV"
    # torch first, from the CPU wheel these machines keep on disk: resolving gptqmodel
    # against an empty venv would pull a CUDA torch (several GB).
    "$BIN/python" -m pip install -q torch==2.13.0 \
        || fail "installing torch 2.13.0 failed"
    "$BIN/python" -m pip install -q -c "$CONSTRAINTS" -e ".[interop]" pytest \
        || fail "installing .[interop] failed (is PyPI reachable?)"
    touch "$STAMP"
fi
echo "interop: venv ready in $((SECONDS - start)) s"

# The tests skip when gptqmodel is missing; here that would hide a broken install.
"$BIN/python" -c "import gptqmodel, optimum.gptq" >/dev/null 2>&1 \
    || fail "gptqmodel or optimum does not import in $VENV"

tests_start=$SECONDS
status=0
# The remote-code tests run here as well: this venv's transformers (5.23) predates the 5.24
# `past_key_values` -> `cache` rename that the main venv has, so CI covers both sides.
"$BIN/python" -m pytest tests/interop tests/test_remote_code.py tests/test_remote_code_compat.py \
    -q -p no:cacheprovider "$@" || status=$?
echo "interop: tests took $((SECONDS - tests_start)) s"
exit "$status"
