"""Shared fixtures: tiny checkpoints of every tested family, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from quantkit.fixtures import FIXTURE_FAMILIES, build_tiny_model

# Remote-code modules are copied into HF_MODULES_CACHE; keep them out of the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _isolated_hf_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_home")
    old = os.environ.get("HF_HOME")
    os.environ["HF_HOME"] = str(cache)
    os.environ["HF_MODULES_CACHE"] = str(cache / "modules")
    yield
    if old is None:
        os.environ.pop("HF_HOME", None)
    else:
        os.environ["HF_HOME"] = old


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
