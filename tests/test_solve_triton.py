"""The Triton column-loop kernel computes what the torch loop and the reference compute.

Without a GPU the kernel runs under Triton's interpreter (tests/conftest.py turns it on:
the same kernel source, executed with numpy), so its indexing, masking, rounding and error
feedback are checked on CPU; with one, the same tests run the compiled kernel, and the
`gpu` tests hold the whole CUDA solve to the CPU answer.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from quantkit.gptq import algorithm, solve_triton  # noqa: E402
from quantkit.gptq.algorithm import (  # noqa: E402
    QuantSpec,
    choose_qparams,
    gptq_fast,
    gptq_reference,
    output_errors,
    rtn_quantize,
)
from tests.test_gptq_algorithm import correlated_hessian, weights  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not isinstance(solve_triton._kernel, InterpretedFunction):
    pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set; no way to run its "
                "kernels on CPU", allow_module_level=True)


def _block(n: int, rows: int, seed: int = 0):
    """A block as gptq_fast hands it over: transposed weights and an H^-1 Cholesky block."""
    g = torch.Generator().manual_seed(seed)
    hessian = correlated_hessian(n, seed=seed)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)),
                                 upper=True)
    w = torch.randn(n, rows, generator=g) * 0.02
    return w.to(DEVICE), hinv.to(DEVICE)


def _solve(solver, w, hinv, m: int, bits: int, sym: bool):
    scale, zero = choose_qparams(w[:m].T, bits, sym)
    scale, zero = scale.expand(m, -1), zero.expand(m, -1)
    block = w.clone()
    codes, err = block.new_empty((m, w.shape[1])), block.new_empty((m, w.shape[1]))
    solver(block, hinv, scale, zero, 2**bits - 1, codes, err)
    return codes, err, block[m:]


@pytest.mark.parametrize(("n", "m", "rows", "bits", "sym"), [
    (128, 128, 48, 4, True),   # a whole block, rows not a multiple of the row tile
    (128, 32, 40, 3, False),   # one group of a block: the rest of the block is updated
    (96, 64, 16, 8, False),    # a block narrower than its power-of-two tile
])
def test_kernel_matches_the_torch_loop_under_the_interpreter(n, m, rows, bits, sym):
    w, hinv = _block(n, rows)
    codes, err, rest = _solve(solve_triton.solve_columns, w, hinv, m, bits, sym)
    ref_codes, ref_err, ref_rest = _solve(algorithm.solve_columns, w, hinv, m, bits, sym)
    assert codes.shape == ref_codes.shape == (m, rows)
    assert int(codes.max()) <= 2**bits - 1 and int(codes.min()) >= 0
    assert float((codes != ref_codes).float().mean()) <= 2e-3
    assert torch.allclose(err, ref_err, rtol=1e-4, atol=1e-6)
    assert torch.allclose(rest, ref_rest, rtol=1e-4, atol=1e-6)
    assert float(err.abs().sum()) > 0
    assert m == n or not torch.equal(rest, w[m:].to(DEVICE))


def test_kernel_rounds_half_to_even_like_torch():
    """Weights that land exactly on x.5 steps of the grid must round as torch.round does."""
    rows = 16
    steps = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 6.5])
    w = (steps[:, None] * 0.25).expand(8, rows).contiguous().to(DEVICE)
    hinv = torch.eye(8, device=DEVICE)  # no feedback: each column is rounded on its own
    scale = torch.full((8, rows), 0.25, device=DEVICE)
    zero = torch.full((8, rows), 8.0, device=DEVICE)
    codes, err = torch.empty_like(w), torch.empty_like(w)
    solve_triton.solve_columns(w.clone(), hinv, scale, zero, 15, codes, err)
    assert torch.equal(codes[:, 0].cpu(), torch.round(steps) + 8)
    assert torch.equal(err[:, 0].cpu(), (steps - torch.round(steps)) * 0.25)  # half a step


SPECS = {
    "4bit-g128": QuantSpec(),
    "3bit-g64-asym": QuantSpec(bits=3, group_size=64, sym=False),
    "4bit-g64-act-order-static": QuantSpec(group_size=64, desc_act=True, static_groups=True),
    "4bit-per-channel": QuantSpec(group_size=-1),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_gptq_fast_with_the_kernel_matches_the_reference(name):
    """gptq_fast with the kernel in its block loop (as on CUDA) gives the reference's codes,
    grid and per-layer output error."""
    spec = SPECS[name]
    columns = 256
    hessian = correlated_hessian(columns, seed=3)
    qkv = weights((48, 24, 24), columns, seed=4)
    with solve_triton.use("triton"):
        assert algorithm._column_solver(torch.device(DEVICE)) is solve_triton.solve_columns
        fast = gptq_fast([w.to(DEVICE) for w in qkv], hessian.to(DEVICE), spec)
    for w, got in zip(qkv, fast, strict=True):
        ref = gptq_reference(w, hessian, spec)
        got.codes, got.scales, got.zeros, got.g_idx = (
            t.cpu() for t in (got.codes, got.scales, got.zeros, got.g_idx))
        assert float((got.codes != ref.codes).float().mean()) <= 5e-3
        assert torch.allclose(got.scales, ref.scales, rtol=2e-3)
        assert torch.equal(got.g_idx, ref.g_idx)
        err_ref, err_got, err_rtn = output_errors(
            w, [ref.dequantize(), got.dequantize(), rtn_quantize(w, spec).dequantize()], hessian)
        assert err_got == pytest.approx(err_ref, rel=1e-3)
        assert err_got < err_rtn


@pytest.mark.parametrize("row_tile", [16, 32])
def test_kernel_compiles_for_an_h200_without_one(row_tile):
    """Triton's own compiler and ptxas (in the wheel) build the kernel for sm_90 on any
    machine, so a kernel that would not compile on the GPU fails here first."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    signature = {}
    for name, param in inspect.signature(solve_triton._gptq_segment).parameters.items():
        if "constexpr" in str(param.annotation):
            signature[name] = "constexpr"
        else:
            signature[name] = "*fp32" if name.isupper() else "fp32" if name == "maxq" else "i32"
    source = ASTSource(fn=JITFunction(solve_triton._gptq_segment), signature=signature,
                       constexprs={"m": 128, "BLOCK_N": 128, "BLOCK_R": row_tile})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert len(kernel.asm["cubin"]) > 1000
    assert "div.rn.f32" in kernel.asm["ptx"]  # IEEE division, as torch's


def test_the_kernel_is_used_only_on_cuda():
    assert algorithm._column_solver(torch.device("cpu")) is algorithm.solve_columns
    assert not solve_triton.usable(torch.device("cpu"))


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_kernel_compiles_and_is_chosen_on_cuda():
    assert solve_triton.available()
    assert algorithm._column_solver(torch.device("cuda")) is solve_triton.solve_columns
    with solve_triton.use("torch"):
        assert algorithm._column_solver(torch.device("cuda")) is algorithm.solve_columns


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SPECS))
def test_cuda_solve_matches_the_cpu_path_at_7b_width(name):
    """Issue 17: per-layer output errors unchanged from the CPU path, at the width of the
    7B q/k/v input, on the stacked q, k, v rows (a slice of them: rows are independent)."""
    spec = SPECS[name]
    columns = 4096
    hessian = correlated_hessian(columns, seed=9)
    qkv = weights((512, 256, 256), columns, seed=10)
    cpu = gptq_fast(qkv, hessian, spec)
    cuda = gptq_fast([w.cuda() for w in qkv], hessian.cuda(), spec)
    with solve_triton.use("torch"):
        cuda_torch = gptq_fast([w.cuda() for w in qkv], hessian.cuda(), spec)
    for w, a, b, c in zip(qkv, cpu, cuda, cuda_torch, strict=True):
        got, loop = b.dequantize().cpu(), c.dequantize().cpu()
        err_cpu, err_cuda, err_loop = output_errors(w, [a.dequantize(), got, loop], hessian)
        assert err_cuda == pytest.approx(err_cpu, rel=1e-3)
        assert err_loop == pytest.approx(err_cpu, rel=1e-3)
        assert float((b.codes.cpu() != a.codes).float().mean()) <= 5e-3
