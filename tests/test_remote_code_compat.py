"""Remote code on both sides of transformers 5.24's `past_key_values` -> `cache` rename.

Real Baichuan2 / Qwen-1 / ChatGLM folders ship modeling code written for one name. The
bundled Baichuan2-style code accepts both; quantkit's own paths (evaluation forwards, GPTQ
layer capture) must work whichever name a folder's code was written for.
"""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from quantkit.evaluate.forward import positions_logits
from tests.helpers import run_cli

NEW_NAME_AVAILABLE = "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                dtype=torch.float32)


def _rewrite_remote_code(src, dest, style: str):
    """A copy of `src` whose modeling code knows only one name for the cache.

    "past_key_values": code written before 5.24 (no `cache` argument at all).
    "cache": code written for 5.24 and later (every `past_key_values` renamed).
    """
    shutil.copytree(src, dest)
    code_file = dest / "modeling_baichuan.py"
    code = code_file.read_text()
    code, removed = re.subn(r"\n\s*past_key_values = resolve_cache\(past_key_values, kwargs\)",
                            "", code)
    assert removed == 2
    if style == "cache":
        code = code.replace("past_key_values", "cache")
    code_file.write_text(code)
    return dest


@pytest.fixture(params=["past_key_values", "cache"])
def one_name_model(request, tiny_model, tmp_path):
    if request.param == "cache" and not NEW_NAME_AVAILABLE:
        pytest.skip("this transformers predates the `cache` name")
    return _rewrite_remote_code(tiny_model("baichuan2-7b"), tmp_path / request.param,
                                request.param), tiny_model("baichuan2-7b")


def test_quantkit_forward_matches_on_code_written_for_either_name(one_name_model):
    rewritten, bundled = one_name_model
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(4, 24)
    expected = positions_logits(_load(bundled), ids, positions)
    torch.testing.assert_close(positions_logits(_load(rewritten), ids, positions), expected)


def test_gptq_runs_on_code_written_for_either_name(one_name_model, tmp_path, capsys):
    rewritten, _ = one_name_model
    out = tmp_path / "gptq"
    result = run_cli(capsys, "gptq", rewritten, "--out", out, "--nsamples", "4", "--seqlen",
                     "32", "--group-size", "32", "--device", "cpu", "--trust-remote-code")
    assert result.code == 0, result.err
    assert (out / "quantize_config.json").is_file()


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_bundled_code_decodes_incrementally_with_either_name(tiny_model, name):
    """Token-by-token decoding through an explicit cache equals one full forward."""
    model = _load(tiny_model("baichuan2-7b"))
    ids = torch.randint(3, 512, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :6], use_cache=True, **{name: cache}).logits]
        for i in range(6, 10):
            steps.append(model(ids[:, i:i + 1], use_cache=True, **{name: cache}).logits)
    assert cache.get_seq_length() == 10
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_bundled_code_refuses_two_different_caches(tiny_model):
    model = _load(tiny_model("baichuan2-7b"))
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="not both"):
        model(ids, past_key_values=DynamicCache(config=model.config),
              cache=DynamicCache(config=model.config))
