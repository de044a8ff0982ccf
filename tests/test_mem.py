"""quantkit mem: memory after load and at peak during a forward, on CPU (and CUDA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantkit.cli import main
from quantkit.evaluate.memory import GIB, MemConfig, measure_memory, weights_in_memory_bytes
from quantkit.loading import load
from tests.helpers import assert_one_line_error, run_cli

_NF4: dict[Path, Path] = {}


def nf4_model(source: Path, tmp_path_factory) -> Path:
    """`source` quantized to NF4 on CPU by `quantkit bnb`, built once per session."""
    pytest.importorskip("bitsandbytes")
    if source not in _NF4:
        out = tmp_path_factory.mktemp("nf4") / "model"
        assert main(["bnb", str(source), "--out", str(out), "--nf4", "--device", "cpu"]) == 0
        _NF4[source] = out
    return _NF4[source]


def file_tensor_bytes(folder: Path) -> int:
    return sum(t.numel() * t.element_size() for path in folder.glob("*.safetensors")
               for t in load_file(path).values())


def test_cpu_mem_result(tiny_model, tmp_path, capsys):
    path = tiny_model("llama")
    out = tmp_path / "mem.json"
    result = run_cli(capsys, "mem", path, "--device", "cpu", "--seq-len", 64, "--out", out)
    assert result.code == 0, result.err
    data = json.loads(out.read_text())
    assert data["kind"] == "mem" and data["model"]["precision"] == "BF16"
    assert data["settings"] == {"device": "cpu", "seq_len": 64, "dtype": None,
                                "forward": data["settings"]["forward"]}
    r = data["results"]
    # Weights in memory: what the file holds, plus buffers computed at load (RoPE inv_freq).
    model = load(path)
    runtime_buffers = sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                          if name not in model.state_dict())
    assert round(r["weights_in_memory_gib"] * GIB) == file_tensor_bytes(path) + runtime_buffers
    assert r["weight_bytes"] == (path / "model.safetensors").stat().st_size
    assert r["bytes_on_disk"] == sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert r["load_seconds"] > 0 and r["peak_rss_forward_gib"] >= 0
    assert set(data["versions"]) >= {"quantkit", "torch", "transformers"}
    assert "weights in memory" in result.out


def test_nf4_weights_take_a_quarter_of_bf16_plus_quantization_state(tiny_model,
                                                                    tmp_path_factory):
    source = tiny_model("llama")
    nf4 = measure_memory(MemConfig(nf4_model(source, tmp_path_factory), device="cpu",
                                   seq_len=16))
    bf16 = measure_memory(MemConfig(source, device="cpu", seq_len=16))
    assert nf4["model"]["precision"] == "NF4"
    linear = sum(m.weight.numel() for name, m in load(source).named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    saved = (bf16["results"]["weights_in_memory_gib"] - nf4["results"]["weights_in_memory_gib"])
    # 2 bytes -> half a byte per quantized weight, minus absmax/code state (< 0.1 B/weight).
    assert 1.4 * linear < saved * GIB <= 1.5 * linear


def test_weights_in_memory_counts_parameters_and_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    # 8*4 + 4 weights/bias, 4 + 4 affine, 4 + 4 running stats (float32), 1 int64 counter
    assert weights_in_memory_bytes(model) == (36 + 8 + 8) * 4 + 8
    model.half()
    assert weights_in_memory_bytes(model) == (36 + 8 + 8) * 2 + 8


def test_bad_mem_input(tiny_model, tmp_path, capsys):
    path = tiny_model("llama")
    assert_one_line_error(run_cli(capsys, "mem", path, "--seq-len", 0), "--seq-len 0")
    assert_one_line_error(run_cli(capsys, "mem", path, "--out", tmp_path / "no" / "m.json"),
                          "--out", "create it first")
    assert_one_line_error(run_cli(capsys, "mem", tmp_path / "missing"), "no such file")
    if not torch.cuda.is_available():
        assert_one_line_error(run_cli(capsys, "mem", path, "--device", "cuda"), "--device cuda")


@pytest.mark.gpu
def test_cuda_mem_counts_the_weights_and_the_forward(tiny_model, tmp_path, capsys):
    path = tiny_model("llama")
    out = tmp_path / "mem.json"
    assert run_cli(capsys, "mem", path, "--device", "cuda", "--seq-len", 128, "--out",
                   out).code == 0
    r = json.loads(out.read_text())["results"]
    assert r["device"] == "cuda" and r["gpu"]
    # The caching allocator rounds each tensor up to 512 bytes; 21 tensors + buffers.
    assert r["weights_in_memory_gib"] <= r["allocated_after_load_gib"] \
        <= r["weights_in_memory_gib"] + 64 * 1024 / GIB
    assert r["peak_forward_gib"] > r["allocated_after_load_gib"]
    assert r["peak_during_load_gib"] >= r["allocated_after_load_gib"]
