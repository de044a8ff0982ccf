"""GPTQ math: the fast solver equals the reference, beats round-to-nearest, and its grid,
act-order groups and damping behave as the checkpoint format and users need."""

from __future__ import annotations

import pytest
import torch

from quantkit.gptq.algorithm import (
    NotPositiveDefinite,
    QuantSpec,
    choose_group_params,
    choose_qparams,
    gptq_fast,
    gptq_reference,
    group_aware_permutation,
    inverse_hessian_cholesky,
    output_errors,
    rtn_quantize,
)


def correlated_hessian(columns: int, seed: int = 0, factors: int = 32) -> torch.Tensor:
    """X^T X of inputs with correlated features (a few shared factors) and uneven scales,
    like real activations; built directly, so 4096-wide ones cost no big matmul."""
    g = torch.Generator().manual_seed(seed)
    loadings = torch.randn(columns, factors, generator=g)
    scale = torch.linspace(0.2, 3.0, columns)[torch.randperm(columns, generator=g)]
    return scale[:, None] * (torch.eye(columns) + loadings @ loadings.T / 4) * scale[None, :]


def weights(rows: tuple[int, ...], columns: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(r, columns, generator=g) * 0.02 for r in rows]


SPECS = {
    "4bit-g128": QuantSpec(),
    "4bit-g128-act-order": QuantSpec(desc_act=True),
    "4bit-g64-act-order-static": QuantSpec(group_size=64, desc_act=True, static_groups=True),
    "3bit-g64-asym": QuantSpec(bits=3, group_size=64, sym=False),
    "2bit-per-channel": QuantSpec(bits=2, group_size=-1),
    "8bit-g32-asym-act-order": QuantSpec(bits=8, group_size=32, sym=False, desc_act=True),
    "4bit-g64-minmax-plain": QuantSpec(group_size=64, group_aware=False, scale_search="minmax"),
    "4bit-g64-updated-grids": QuantSpec(group_size=64, block_start_scales=False),
    "3bit-g32-mse-asym": QuantSpec(bits=3, group_size=32, sym=False, scale_search="mse"),
    "4bit-g64-static-hessian": QuantSpec(group_size=64, desc_act=True, static_groups=True,
                                         scale_search="hessian"),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_fast_solver_matches_reference_on_shared_hessian(name):
    """q, k and v share a Hessian: one stacked fast solve equals three reference solves."""
    spec = SPECS[name]
    columns = 512
    hessian = correlated_hessian(columns)
    qkv = weights((256, 128, 128), columns)
    reference = [gptq_reference(w, hessian, spec) for w in qkv]
    fast = gptq_fast(qkv, hessian, spec)
    for w, ref, got in zip(qkv, reference, fast, strict=True):
        assert got.codes.shape == ref.codes.shape == w.shape
        # Float rounding can flip a code at a tie and the error feedback carries it on;
        # that is rare, and costs nothing measurable.
        assert float((got.codes != ref.codes).float().mean()) <= 5e-3
        assert torch.allclose(got.scales, ref.scales, rtol=2e-3)  # a float16 ulp at most
        assert float((got.zeros != ref.zeros).float().mean()) <= 5e-3
        assert torch.equal(got.g_idx, ref.g_idx)
        err_ref, err_fast, err_rtn = output_errors(
            w, [ref.dequantize(), got.dequantize(), rtn_quantize(w, spec).dequantize()],
            hessian)
        assert err_fast == pytest.approx(err_ref, rel=1e-3)
        assert err_fast < err_rtn


def test_gptq_beats_round_to_nearest_and_act_order_helps():
    columns = 256
    hessian = correlated_hessian(columns, seed=3)
    (w,) = weights((192,), columns, seed=4)
    plain, act = (gptq_fast([w], hessian, QuantSpec(desc_act=d))[0] for d in (False, True))
    rtn = rtn_quantize(w, QuantSpec())
    e_plain, e_act, e_rtn = output_errors(w, [plain.dequantize(), act.dequantize(),
                                              rtn.dequantize()], hessian)
    assert e_plain < 0.9 * e_rtn
    assert e_act < e_plain


def test_results_decode_to_the_grid_they_store():
    """Codes are in range, scales are float16 values, and dequantize uses g_idx."""
    spec = QuantSpec(bits=3, group_size=64, sym=False, desc_act=True)
    columns = 256
    hessian = correlated_hessian(columns, seed=5)
    (w,) = weights((64,), columns, seed=6)
    result = gptq_fast([w], hessian, spec)[0]
    assert int(result.codes.max()) <= spec.maxq
    assert torch.equal(result.scales, result.scales.half().float())
    assert ((result.zeros >= 1) & (result.zeros <= spec.maxq)).all()
    manual = torch.empty_like(w)
    for col in range(columns):
        g = int(result.g_idx[col])
        manual[:, col] = result.scales[g] * (result.codes[:, col].float() - result.zeros[g])
    assert torch.equal(result.dequantize(), manual)


def test_act_order_groups_follow_processing_order():
    columns, group = 256, 64
    hessian = correlated_hessian(columns, seed=7)
    diag_order = torch.argsort(torch.diag(hessian), descending=True, stable=True)
    (w,) = weights((32,), columns)
    act = gptq_fast([w], hessian, QuantSpec(group_size=group, desc_act=True))[0]
    # The `group` columns with the largest Hessian diagonal form group 0, and so on.
    assert torch.equal(act.g_idx[diag_order].long(), torch.arange(columns) // group)
    assert torch.bincount(act.g_idx.long()).tolist() == [group] * (columns // group)
    static = gptq_fast([w], hessian, QuantSpec(group_size=group, desc_act=True,
                                               static_groups=True))[0]
    assert torch.equal(static.g_idx.long(), torch.arange(columns) // group)


def test_symmetric_grid_centres_zero_and_asymmetric_zero_never_underflows_v1():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    scale, zero = choose_qparams(w, 4, sym=True)
    assert (zero == 8).all()
    assert torch.allclose(scale * 7.5, w.abs().amax(dim=1), rtol=1e-3)
    positive = w.abs() + 0.5  # every weight > 0: plain min/max would give zero point 0
    scale, zero = choose_qparams(positive, 4, sym=False)
    assert (zero == 1).all()
    top = scale * (15 - zero)
    assert (top >= positive.amax(dim=1) * (1 - 1e-3)).all()


def test_damping_is_raised_until_cholesky_succeeds():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 32, generator=g)
    h = a @ a.T  # rank 32 of 64: singular
    h -= 0.05 * torch.diag(h).mean() * torch.eye(64)  # and slightly indefinite
    upper, damp = inverse_hessian_cholesky(h, 0.01, retries=3)
    assert damp == pytest.approx(0.1)
    assert torch.allclose(upper, torch.triu(upper))
    with pytest.raises(NotPositiveDefinite) as failed:
        inverse_hessian_cholesky(-torch.eye(8), 0.01, retries=2)
    assert failed.value.damps == pytest.approx((0.01, 0.1, 1.0)) and not failed.value.nonfinite
    nan = torch.eye(8)
    nan[0, 0] = float("nan")
    with pytest.raises(NotPositiveDefinite) as failed:
        gptq_reference(torch.ones(4, 8), nan, QuantSpec(group_size=-1))
    assert failed.value.nonfinite


def test_dead_inputs_are_zeroed():
    """An input column that never fires has no Hessian mass; GPTQ sets its weights to 0."""
    columns = 128
    hessian = correlated_hessian(columns, seed=2)
    hessian[5, :] = 0
    hessian[:, 5] = 0
    (w,) = weights((32,), columns)
    result = gptq_fast([w], hessian, QuantSpec())[0]
    assert torch.equal(result.dequantize()[:, 5], torch.zeros(32))


@pytest.mark.slow
def test_fast_solver_matches_reference_at_baichuan2_7b_width():
    """Issue 8's check at a real width: 4096 inputs, the Hessian q, k and v of the 7B shape
    share. Rows are a slice (rows are solved independently); the stacked fast solve is
    checked against the reference on q."""
    columns = 4096
    hessian = correlated_hessian(columns, seed=9)
    qkv = weights((256, 128, 128), columns, seed=10)
    spec = QuantSpec()
    fast = gptq_fast(qkv, hessian, spec)[0]
    ref = gptq_reference(qkv[0], hessian, spec)
    err_ref, err_fast, err_rtn = output_errors(
        qkv[0], [ref.dequantize(), fast.dequantize(), rtn_quantize(qkv[0], spec).dequantize()],
        hessian)
    assert err_fast == pytest.approx(err_ref, rel=1e-3)
    assert err_fast < err_rtn
    assert float((fast.codes != ref.codes).float().mean()) <= 5e-3


def test_group_aware_order_keeps_groups_whole_and_g_idx_trivial():
    """Act-order's gain without a permuted g_idx: every v1 kernel loads the result."""
    columns, group = 512, 64
    hessian = correlated_hessian(columns, seed=3)
    perm = group_aware_permutation(hessian, group)
    assert sorted(perm.tolist()) == list(range(columns))
    assert perm.tolist() != list(range(columns))
    for start in range(0, columns, group):
        assert len({c // group for c in perm[start:start + group].tolist()}) == 1
    diag = torch.diag(hessian)
    peaks = [float(diag[perm[s:s + group]].max()) for s in range(0, columns, group)]
    assert peaks == sorted(peaks, reverse=True)
    (w,) = weights((128,), columns)
    spec = QuantSpec(group_size=group)
    result = gptq_fast([w], hessian, spec)[0]
    assert torch.equal(result.g_idx, (torch.arange(columns) // group).int())
    plain = gptq_fast([w], hessian, QuantSpec(group_size=group, group_aware=False))[0]
    errors = output_errors(w, [result.dequantize(), plain.dequantize()], hessian)
    assert errors[0] < errors[1]


def test_group_grids_come_from_the_block_start():
    """Two groups of 64 in one block of 128: the second group's grid is chosen from the
    weights before the first group's errors reach it (the paper's code), and differs from
    the grid of the already-updated columns."""
    columns, group = 256, 64
    hessian = correlated_hessian(columns, seed=4)
    (w,) = weights((64,), columns, seed=5)
    common = dict(group_size=group, group_aware=False, scale_search="minmax")
    start = gptq_reference(w, hessian, QuantSpec(**common))
    expected, _ = choose_qparams(w[:, group:2 * group], 4, sym=True)
    assert torch.equal(start.scales[1], expected)
    updated = gptq_reference(w, hessian, QuantSpec(**common, block_start_scales=False))
    assert torch.equal(updated.scales[0], start.scales[0])  # nothing updated it yet
    assert not torch.equal(updated.scales[1], start.scales[1])


@pytest.mark.parametrize("search", ["mse", "hessian"])
def test_scale_search_lowers_the_rounding_error_it_measures(search):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(256, 64, generator=g) * 0.02
    w[::7, 3] *= 6  # outliers: min/max wastes most of the grid on them
    importance = torch.rand(64, generator=g) * 4
    weight = importance if search == "hessian" else torch.ones(64)

    def error(scale, zero):
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 15)
        return (((q - zero[:, None]) * scale[:, None] - w) ** 2 * weight).sum(1)

    base = error(*choose_qparams(w, 4, sym=True))
    found = error(*choose_group_params(w, QuantSpec(scale_search=search), importance))
    assert bool((found <= base + 1e-12).all())
    assert float(found.sum()) < 0.9 * float(base.sum())
    minmax = choose_group_params(w, QuantSpec(scale_search="minmax"), importance)
    assert all(torch.equal(a, b) for a, b in zip(minmax, choose_qparams(w, 4, True),
                                                 strict=True))


def test_group_size_that_does_not_divide_is_refused_with_the_sizes_that_do():
    """Ragged last groups load in the torch kernels but not in vLLM's Marlin: refuse."""
    from torch import nn

    from quantkit.errors import ConfigError
    from quantkit.gptq.run import check_layers

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(192, 128, bias=False)
            self.down = nn.Linear(128, 192, bias=False)

    model = nn.Module()
    model.layers = nn.ModuleList([Block(), Block()])
    check_layers(model, None, QuantSpec(group_size=64), "toy")
    with pytest.raises(ConfigError, match=r"192 of layers\.0\.up.*: 32, 64, -1"):
        check_layers(model, None, QuantSpec(group_size=128), "toy")
