"""`quantkit gptq --skip-modules`: the named Linears stay exactly as the source stored them,
the rest is quantized, and every loader is told which is which."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import quantkit
from quantkit.gptq.skip import dynamic_exclusions, is_skipped, parse_skip_modules, unmatched
from tests.helpers import assert_one_line_error, leftovers, run_cli

NARROW = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


def test_patterns_match_whole_dotted_parts():
    name = "model.layers.3.mlp.down_proj"
    assert parse_skip_modules(" down_proj, ,mlp.down_proj,down_proj ") == (
        "down_proj", "mlp.down_proj")
    assert parse_skip_modules(None) == ()
    for pattern in ("down_proj", "mlp.down_proj", "model.layers.3", name):
        assert is_skipped(name, [pattern]), pattern
    for pattern in ("proj", "down", "layers.30", "model.layers.3.mlp.up_proj"):
        assert not is_skipped(name, [pattern]), pattern
    assert unmatched(["down_proj", "dwn_proj"], [name]) == ["dwn_proj"]
    # GPTQModel and vLLM use re.match on the module name with the key after "-:"
    (key,) = dynamic_exclusions(["mlp.down_proj"])
    assert key.startswith("-:")
    assert re.match(key[2:], name)
    assert not re.match(key[2:], "model.layers.3.mlp.down_proj_extra")
    assert not re.match(key[2:], "model.layers.3.self_attn.o_proj")


@pytest.mark.parametrize("load", ["lazy", "whole"])
def test_skipped_linears_are_written_as_stored(load, tiny_model, tmp_path, capsys):
    src = tiny_model("llama")
    out = tmp_path / "out"
    result = run_cli(capsys, "gptq", src, "--out", out, "--nsamples", 4, "--seqlen", 32,
                     "--device", "cpu", "--load", load,
                     "--skip-modules", "mlp.down_proj,self_attn.q_proj")
    assert result.code == 0, result.err
    source, written = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    skipped = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj",
                                                                 "self_attn.q_proj")]
    for name in skipped:
        assert torch.equal(written[f"{name}.weight"], source[f"{name}.weight"]), name
        assert written[f"{name}.weight"].dtype == torch.bfloat16
        assert f"{name}.qweight" not in written
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.gate_proj"):
        assert f"{name}.qweight" in written and f"{name}.weight" not in written
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(qconfig["dynamic"]) == sorted(dynamic_exclusions(
        ["mlp.down_proj", "self_attn.q_proj"]))
    assert sorted(qconfig["modules_in_block_to_quantize"][0]) == [
        "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
        "self_attn.v_proj"]
    assert json.loads((out / "quantize_config.json").read_text()) == qconfig
    manifest = json.loads((out / "quantkit.json").read_text())
    assert manifest["gptq"]["settings"]["skip_modules"] == ["mlp.down_proj",
                                                            "self_attn.q_proj"]
    reported = set(manifest["gptq"]["layers"])
    assert "model.layers.0.self_attn.k_proj" in reported
    assert not reported & set(skipped)

    model = quantkit.load(out)
    layer0, layer1 = model.model.layers
    assert type(layer0.mlp.down_proj) is torch.nn.Linear
    assert type(layer1.self_attn.q_proj) is torch.nn.Linear
    assert type(layer0.self_attn.k_proj).__name__ == "QuantLinear"
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_skip_lets_a_group_size_fit_the_layers_it_divides(tiny_model, tmp_path, capsys):
    # hidden 96: the attention and gate/up Linears read 96 inputs, down_proj reads 256
    src = tiny_model("llama", hidden_size=96)
    out = tmp_path / "out"
    refused = run_cli(capsys, "gptq", src, "--out", out, "--nsamples", 4, "--seqlen", 32,
                      "--device", "cpu", "--group-size", "64")
    assert_one_line_error(refused, "--group-size 64", "96", "32, -1", "--skip-modules")
    assert leftovers(tmp_path, "out") == []
    result = run_cli(capsys, "gptq", src, "--out", out, "--nsamples", 4, "--seqlen", 32,
                     "--device", "cpu", "--group-size", "64", "--skip-modules",
                     ",".join(NARROW))
    assert result.code == 0, result.err
    written = load_file(out / "model.safetensors")
    assert written["model.layers.0.mlp.down_proj.scales"].shape == (256 // 64, 96)
    assert "model.layers.0.self_attn.q_proj.weight" in written


def test_skip_patterns_that_match_nothing_or_everything_are_refused(tiny_model, tmp_path,
                                                                    capsys):
    src = tiny_model("llama")
    for flags, fragments in (
            (["--skip-modules", "down_prj"], ["--skip-modules down_prj", "matches no Linear",
                                              "model.layers.0."]),
            (["--skip-modules", "model.layers"], ["skips every Linear"]),
            (["--skip-modules", "model.layers.1.self_attn.q_proj"],
             ["in some decoder layers only", "q_proj, mlp.down_proj"])):
        result = run_cli(capsys, "gptq", src, "--out", tmp_path / "out", "--nsamples", 4,
                         "--seqlen", 32, "--device", "cpu", *flags)
        assert_one_line_error(result, *fragments)
        assert leftovers(tmp_path, "out") == []
