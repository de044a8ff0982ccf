"""bench/gptq_speed.py runs the real engine on a random model and reports sane figures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import quantkit

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("gptq_speed", REPO / "bench" / "gptq_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_shape_runs_from_disk_with_phase_timings_and_a_loadable_artifact(tmp_path):
    out = tmp_path / "results" / "tiny.json"
    artifact = tmp_path / "artifact"
    checkpoint = tmp_path / "random-tiny"
    bench = _bench()
    assert bench.main(["--shape", "tiny", "--device", "cpu", "--nsamples", "4",
                       "--seqlen", "64", "--checkpoint", str(checkpoint), "--build-only",
                       "--out", str(out)]) == 0
    built = json.loads(out.read_text())
    assert built["built_here"] and (checkpoint / "model.safetensors").is_file()
    assert quantkit.load(checkpoint).config.hidden_size == bench.SHAPES["tiny"]["hidden_size"]
    assert bench.main(["--shape", "tiny", "--device", "cpu", "--nsamples", "4",
                       "--seqlen", "64", "--checkpoint", str(checkpoint), "--out", str(out),
                       "--artifact", str(artifact)]) == 0
    result = json.loads(out.read_text())
    assert not result["built_here"]  # the checkpoint on disk was reused, and loaded
    phases = result["phases_seconds"]
    assert set(phases) == {"load", "capture", "forwards", "hessians", "solve", "pack", "write"}
    assert all(v >= 0 for v in phases.values())
    assert phases["load"] > 0 and phases["solve"] > 0 and phases["write"] > 0
    assert sum(phases.values()) <= result["total_seconds"] * 1.05
    assert result["total_seconds"] < 60
    assert (result["nsamples"], result["seqlen"], result["bits"], result["group_size"]) == (
        4, 64, 4, 128)
    assert result["peak_gpu_gib"] is None and result["device"] == "cpu"
    assert result["triton_solve"] is False
    assert 0 < result["host_peak_gib"] < 64
    assert 0 < result["mean_error"] < result["mean_rtn_error"]
    assert len(result["layer_errors"]) == 2
    assert result["artifact_bytes"] == sum(p.stat().st_size for p in artifact.iterdir())
    model = quantkit.load(artifact)
    assert sum(1 for n, _ in model.named_buffers() if n.endswith(".qweight")) == 14


def test_real_shapes_are_baichuan2s():
    shapes = _bench().SHAPES
    assert (shapes["baichuan2-7b"]["hidden_size"], shapes["baichuan2-7b"]["num_hidden_layers"],
            shapes["baichuan2-7b"]["intermediate_size"]) == (4096, 32, 11008)
    assert (shapes["baichuan2-13b"]["hidden_size"], shapes["baichuan2-13b"]["num_hidden_layers"],
            shapes["baichuan2-13b"]["intermediate_size"]) == (5120, 40, 13696)
    assert {s["vocab_size"] for n, s in shapes.items() if n != "tiny"} == {125696}
    assert {(s["nsamples"], s["seqlen"]) for n, s in shapes.items() if n != "tiny"} == {
        (128, 2048)}


@pytest.mark.gpu
def test_tiny_shape_on_cuda_reports_gpu_memory_and_solves_with_triton(tmp_path):
    out = tmp_path / "tiny.json"
    assert _bench().main(["--shape", "tiny", "--device", "cuda", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["peak_gpu_gib"] > 0
    assert result["triton_solve"] is True
    assert 0 < result["mean_error"] < result["mean_rtn_error"]


def test_max_gpu_memory_keeps_activations_on_the_host_when_they_do_not_fit():
    from quantkit.gptq.run import activations_fit

    # One Baichuan2-7B-shaped layer and 128 x 2048 bf16 calibration activations (4 GiB in
    # and out): they fit in 24 GiB, not in 5 GiB, where the host holds them instead.
    layer = dict(tokens=128 * 2048, hidden=4096, layer_bytes=404_750_336,
                 widest_input=11008, widest_rows=3 * 4096 + 4096 + 2 * 11008 + 4096)
    assert activations_fit(None, **layer)
    assert activations_fit("24GiB", **layer)
    assert not activations_fit("5GiB", **layer)
