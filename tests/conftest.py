"""Shared fixtures: tiny checkpoints of every tested family, built once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before transformers is imported: no network, and remote-code modules (copied into
# HF_MODULES_CACHE when a Baichuan-style folder loads) stay out of the user's home.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="quantkit-test-hf-")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels (quantkit/gptq/solve_triton.py) run only under Triton's
# interpreter, which must be on before triton is first imported (transformers imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# transformers binds its log handler to the first sys.stderr it sees; make that the real
# one, not some test's capsys buffer (later warnings would print "Logging error" tracebacks).
from transformers.utils import logging as _hf_logging  # noqa: E402

from quantkit.fixtures import FIXTURE_FAMILIES, build_tiny_model  # noqa: E402

_hf_logging.get_logger("transformers")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model("llama") -> Path of a random bf16 checkpoint (built once)."""
    built: dict[tuple, Path] = {}

    def make(family: str, **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in built:
            dest = tmp_path_factory.mktemp(family.replace("-", "_")) / "model"
            built[key] = build_tiny_model(family, dest, **overrides)
        return built[key]

    return make


@pytest.fixture(params=FIXTURE_FAMILIES)
def any_family(request) -> str:
    return request.param
