"""baichuan2-to-1: a Baichuan2 NormHead model and its converted plain-Linear twin agree."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from quantkit.checkpoint import open_checkpoint, sha256_file, write_checkpoint
from quantkit.describe import describe
from quantkit.loading import load_plain_model
from tests.helpers import assert_one_line_error, leftovers, run_cli

INPUT_IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def _with_plain_linear_head(model, weight: torch.Tensor):
    """What Baichuan-1 tooling does: use lm_head.weight as an ordinary Linear."""
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    head.weight.data.copy_(weight)
    model.lm_head = head
    return model


@pytest.mark.parametrize("family", ["baichuan2-7b", "baichuan2-13b"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_converted_checkpoint_matches_normhead_logits(family, dtype, tiny_model, tmp_path,
                                                      capsys):
    src = tiny_model(family, dtype=dtype) if dtype != torch.bfloat16 else tiny_model(family)
    reference = _logits(load_plain_model(src, trust_remote_code=True).eval())

    result = run_cli(capsys, "convert", "baichuan2-to-1", src, tmp_path / "b1")
    assert result.code == 0, result.err
    converted = open_checkpoint(tmp_path / "b1")
    head = converted.get_tensor("lm_head.weight")
    assert head.dtype == dtype
    plain = _with_plain_linear_head(load_plain_model(tmp_path / "b1", trust_remote_code=True),
                                    head)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2 * reference.abs().max().item()
    torch.testing.assert_close(_logits(plain.eval()), reference, atol=tolerance, rtol=0)
    # Without normalization the plain head would be far off: the test can fail.
    raw = open_checkpoint(src).get_tensor("lm_head.weight")
    unconverted = _with_plain_linear_head(load_plain_model(src, trust_remote_code=True), raw)
    assert (_logits(unconverted.eval()) - reference).abs().max() > 10 * tolerance


def test_only_lm_head_changes_and_marks(tiny_model, tmp_path, capsys):
    src = tiny_model("baichuan2-7b")
    assert run_cli(capsys, "convert", "baichuan2-to-1", src, tmp_path / "b1").code == 0
    before, after = open_checkpoint(src), open_checkpoint(tmp_path / "b1")
    assert before.tensor_names() == after.tensor_names()
    for name in before.tensor_names():
        same = torch.equal(before.get_tensor(name), after.get_tensor(name))
        assert same == (name != "lm_head.weight"), name
    norms = after.get_tensor("lm_head.weight").float().norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2)
    assert after.config["quantkit_conversion"] == "baichuan2-to-1"
    manifest = json.loads((tmp_path / "b1" / "quantkit.json").read_text())
    assert manifest["conversion"]["changed_tensors"] == ["lm_head.weight"]
    for py in before.remote_code_files:
        assert sha256_file(tmp_path / "b1" / py) == sha256_file(src / py)
    assert describe(before).baichuan2["lm_head_unit_norm"] is False
    assert describe(after).baichuan2["lm_head_unit_norm"] is True


def test_second_run_says_so_and_writes_nothing(tiny_model, tmp_path, capsys):
    src = tiny_model("baichuan2-13b")
    assert run_cli(capsys, "convert", "baichuan2-to-1", src, tmp_path / "once").code == 0
    again = run_cli(capsys, "convert", "baichuan2-to-1", tmp_path / "once", tmp_path / "twice")
    assert again.code == 0
    assert "already converted" in again.out
    assert leftovers(tmp_path, "twice") == []


def test_bin_source_and_bin_output(tiny_model, tmp_path, capsys):
    src = open_checkpoint(tiny_model("baichuan2-7b"))
    as_bin = write_checkpoint(tmp_path / "bin_src", src.iter_tensors(), source=src,
                              weight_format="bin")
    result = run_cli(capsys, "convert", "baichuan2-to-1", as_bin, tmp_path / "out", "--bin")
    assert result.code == 0, result.err
    out = open_checkpoint(tmp_path / "out")
    assert out.weight_format == "bin"
    from_safetensors = tmp_path / "from_st"
    assert run_cli(capsys, "convert", "baichuan2-to-1", src.path, from_safetensors).code == 0
    assert torch.equal(out.get_tensor("lm_head.weight"),
                       open_checkpoint(from_safetensors).get_tensor("lm_head.weight"))


def test_streams_shard_by_shard(tiny_model, tmp_path, capsys):
    src = open_checkpoint(tiny_model("baichuan2-7b"))
    sharded = write_checkpoint(tmp_path / "sharded", src.iter_tensors(), source=src,
                               max_shard_size="150KB")
    assert len(open_checkpoint(sharded).weight_files) > 2
    assert run_cli(capsys, "convert", "baichuan2-to-1", sharded, tmp_path / "out",
                   "--max-shard-size", "150KB").code == 0
    out = open_checkpoint(tmp_path / "out")
    assert len(out.weight_files) == len(open_checkpoint(sharded).weight_files)


def test_refuses_non_baichuan2(tiny_model, tmp_path, capsys):
    result = run_cli(capsys, "convert", "baichuan2-to-1", tiny_model("llama"), tmp_path / "out")
    assert_one_line_error(result, "not a Baichuan2 checkpoint", "--force")
    assert leftovers(tmp_path, "out") == []
