"""Compute dtype: fp32 arithmetic on bf16-stored weights, one module at a time."""

from __future__ import annotations

import torch

from quantkit.compute import compute_dtype, computing_in, cpu_has_native_bf16, stored_dtype
from quantkit.loading import load


def test_bf16_model_computes_like_its_fp32_copy_and_keeps_its_weights(tiny_model):
    path = tiny_model("llama")
    model = load(path, dtype="bf16")
    reference = load(path, dtype="fp32")  # the same bf16 values, held in fp32
    stored = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        plain = model(ids).logits.float()
        with computing_in(model, torch.float32):
            upcast = model(ids).logits
    assert upcast.dtype == torch.float32
    assert torch.allclose(upcast, expected, atol=1e-4, rtol=1e-4)
    # bf16 arithmetic really is different, so the check above is not vacuous.
    assert float((plain - expected).abs().max()) > 10 * float((upcast - expected).abs().max())
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, stored[name]), name


def test_policy():
    assert compute_dtype("cpu", torch.float32) == torch.float32
    assert compute_dtype("cpu", torch.float16) == torch.float32
    assert compute_dtype("cuda", torch.bfloat16) == torch.bfloat16
    assert compute_dtype("cpu", torch.bfloat16, "fp32") == torch.float32
    assert compute_dtype("cpu", torch.bfloat16) in (torch.float32, torch.bfloat16)
    assert stored_dtype(torch.nn.Linear(2, 2).to(torch.bfloat16)) == torch.bfloat16


def test_a_onednn_isa_cap_below_bf16_means_fp32_compute(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN emulate bf16 even on a CPU that has it, so
    computing in bf16 would be the slow path there."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert not cpu_has_native_bf16()
    assert compute_dtype("cpu", torch.bfloat16) == torch.float32
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert compute_dtype("cpu", torch.bfloat16) == (
        torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
