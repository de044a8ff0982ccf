"""`quantkit gptq` refuses bad input with one line and exit code 2, and leaves nothing behind
-- not on a bad flag, a damaged model, a failing solve, nor on Ctrl-C."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.fixtures import build_tokenizer
from tests.helpers import assert_one_line_error, leftovers, run_cli


def gptq(capsys, src, out, *flags):
    return run_cli(capsys, "gptq", src, "--out", out, "--nsamples", 4, "--seqlen", 32,
                   "--device", "cpu", *flags)


def edited_copy(src, dest, edit):
    """A copy of a fixture checkpoint with `edit(tensors)` applied to its weights."""
    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize(("flags", "fragments"), [
    (["--bits", "5"], ["--bits 5", "2, 3, 4, 8"]),
    (["--group-size", "100"], ["--group-size 100", "32, 64 or 128"]),
    (["--damp", "0"], ["--damp 0"]),
    (["--damp", "1.5"], ["--damp 1.5"]),
    (["--nsamples", "0"], ["--nsamples 0"]),
    (["--seqlen", "4096"], ["--seqlen 4096", "256 tokens"]),
    (["--max-shard-size", "lots"], ["--max-shard-size"]),
])
def test_bad_flags(flags, fragments, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    result = run_cli(capsys, "gptq", tiny_model("llama"), "--out", out, "--device", "cpu",
                     *flags)
    assert_one_line_error(result, *fragments)
    assert leftovers(tmp_path, "out") == []


def test_no_cuda_and_existing_output_and_quantized_source(tiny_model, tmp_path, capsys):
    src = tiny_model("llama")
    if not torch.cuda.is_available():
        assert_one_line_error(gptq(capsys, src, tmp_path / "out", "--device", "cuda"),
                              "--device cuda")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert_one_line_error(gptq(capsys, src, existing), "already exists", "--force")
    assert (existing / "keep.txt").read_text() == "mine"
    quantized = tmp_path / "quantized"
    shutil.copytree(src, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(config))
    assert_one_line_error(gptq(capsys, quantized, tmp_path / "out"), "already quantized")
    assert leftovers(tmp_path, "out") == []


def test_group_size_that_does_not_divide_a_layer(tiny_model, tmp_path, capsys):
    src = tiny_model("llama", hidden_size=160)
    result = gptq(capsys, src, tmp_path / "out")
    assert_one_line_error(result, "--group-size 128", "160",
                          "model.layers.0.self_attn.q_proj")
    assert leftovers(tmp_path, "out") == []
    assert gptq(capsys, src, tmp_path / "out", "--group-size", "32").code == 0


def test_nan_weight_is_named(tiny_model, tmp_path, capsys):
    def poison(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")

    src = edited_copy(tiny_model("llama"), tmp_path / "nan", poison)
    result = gptq(capsys, src, tmp_path / "out")
    assert_one_line_error(result, "model.layers.1.mlp.up_proj.weight", "NaN")
    assert leftovers(tmp_path, "out") == []


def test_hessian_that_cannot_be_factored_names_the_layer(tiny_model, tmp_path, capsys):
    """Inputs so large their Gram matrix overflows: no damping helps, so say where."""
    def blow_up(tensors):
        tensors["model.layers.0.input_layernorm.weight"].fill_(1e30)

    src = edited_copy(tiny_model("llama"), tmp_path / "huge", blow_up)
    result = gptq(capsys, src, tmp_path / "out")
    assert_one_line_error(result, "model.layers.0.self_attn.q_proj", "positive-definite",
                          "--damp")
    assert leftovers(tmp_path, "out") == []


def test_architecture_without_decoder_layers_lists_supported_families(tmp_path, capsys):
    """GPT-2 keeps its projections in Conv1D modules: nothing quantkit can quantize."""
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    config = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=512, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(src)
    build_tokenizer().save_pretrained(src)
    result = gptq(capsys, src, tmp_path / "out")
    assert_one_line_error(result, "no decoder layers", "llama", "baichuan", "qwen")
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("where", ["solve", "write"])
def test_ctrl_c_leaves_no_output(where, tiny_model, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "solve":
        monkeypatch.setattr("quantkit.gptq.calibrate.gptq_fast", interrupt)
    else:  # after the first shard is on disk
        monkeypatch.setattr("quantkit.checkpoint.ShardedWriter.close", interrupt)
    result = gptq(capsys, tiny_model("llama"), tmp_path / "out", "--max-shard-size", "100KB")
    assert_one_line_error(result, "interrupted")
    assert leftovers(tmp_path, "out") == []


def test_calibration_file_missing_empty_or_short(tiny_model, tmp_path, capsys):
    src = tiny_model("llama")
    missing = tmp_path / "missing.txt"
    assert_one_line_error(gptq(capsys, src, tmp_path / "out", "--calib", missing),
                          "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(gptq(capsys, src, tmp_path / "out", "--calib", empty), "empty.txt")
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    result = gptq(capsys, src, tmp_path / "out", "--calib", short)
    assert_one_line_error(result, "short.txt")
    assert re.search(r"\d+ tokens", result.err)
    assert leftovers(tmp_path, "out") == []


def test_rtn_baseline_writes_the_same_format_and_says_so(tiny_model, tmp_path, capsys):
    """--method rtn: the baseline GPTQ is measured against, loadable like any GPTQ folder."""
    import torch

    import quantkit
    from quantkit.checkpoint import open_checkpoint
    from quantkit.evaluate.provenance import precision_label
    from tests.helpers import run_cli

    src = tiny_model("llama")
    outs = {}
    for method in ("gptq", "rtn"):
        out = tmp_path / method
        result = run_cli(capsys, "gptq", src, "--out", out, "--method", method, "--group-size",
                         "32", "--nsamples", "8", "--seqlen", "64", "--device", "cpu")
        assert result.code == 0, result.err
        outs[method] = open_checkpoint(out)
    qc_rtn = outs["rtn"].quantization_config
    assert qc_rtn["meta"]["method"] == "rtn" and "method" not in outs["gptq"].quantization_config[
        "meta"]
    assert precision_label(qc_rtn) == "RTN 4-bit g32"
    name = "model.layers.0.self_attn.q_proj.qweight"
    assert outs["rtn"].get_tensor(name).shape == outs["gptq"].get_tensor(name).shape
    assert not torch.equal(outs["rtn"].get_tensor(name), outs["gptq"].get_tensor(name))
    ids = torch.arange(2, 50).unsqueeze(0)
    with torch.no_grad():
        logits = quantkit.load(tmp_path / "rtn")(input_ids=ids).logits
    assert torch.isfinite(logits).all()
