"""The GPTQ in-block column loop as one Triton kernel, so a GPU solve is not launch-bound.

In torch every column of the loop is a handful of tiny kernels (quantize, residual,
rank-1 update): a 7B layer has ~23k columns to solve (q, k, v stacked; gate, up stacked),
so ~10^5 launches, about a second per layer of pure launch latency. Rows of the weight
are independent given the inverse Hessian, so one kernel can take a tile of rows, keep the
block's columns for those rows in registers, and walk the columns in order with no launch
and no trip to memory between them. What is a large matmul (a block's errors reaching the
rest of the matrix) stays in torch, where cuBLAS does it well.

The kernel does only quantize-dequantize and error feedback: each column's scale and zero
arrive precomputed (`algorithm.gptq_fast` chooses them, with the same function as every
other path), so grid choices never fork between the paths. It computes what
`algorithm.solve_columns` computes, with IEEE division and round-half-to-even, so codes
differ from torch's only where float summation order decides a tie.

With `TRITON_INTERPRET=1` set before triton is imported, the kernel runs on CPU tensors
under Triton's interpreter (the test suite does this without a GPU); that is slow and only
for checking: `algorithm.gptq_fast` uses the kernel on CUDA only.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

log = logging.getLogger(__name__)

try:  # an optional dependency: torch's CUDA wheels bring it, CPU installs do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

_MAX_BLOCK = 256  # columns a row tile holds in registers; blocks are 128 by default


def _gptq_segment(W, HINV, SCALE, ZERO, CODES, ERR, rows, n, stride_w, stride_h, stride_hc,
                  stride_s, stride_c, stride_e, maxq, m: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """One program: `BLOCK_R` rows of the block's `n` columns; solves the first `m`.

    W [n, rows] is the rest of the block, transposed (column j of the weight is W[j]);
    HINV [n, n] its block of the upper Cholesky factor of H^-1; SCALE, ZERO [m, rows]
    each solved column's grid. Writes CODES [m, rows] (zero point included), ERR [m, rows]
    = (w - dequantized) / HINV[j, j], and W[m:] updated by the segment's errors. `m` is a
    compile-time constant (a group or a block: a few values per run), because Triton's
    interpreter cannot loop to a runtime bound under numpy 2.
    """
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    c = tl.arange(0, BLOCK_N)
    cmask = c < n
    offsets = c[:, None] * stride_w + r[None, :]
    tile = tl.load(W + offsets, mask=cmask[:, None] & rmask[None, :], other=0.0)
    for j in range(0, m):
        # Register tiles cannot be indexed by a runtime column: select it and reduce.
        w = tl.sum(tl.where((c == j)[:, None], tile, 0.0), axis=0)
        s = tl.load(SCALE + j * stride_s + r, mask=rmask, other=1.0)
        z = tl.load(ZERO + j * stride_s + r, mask=rmask, other=0.0)
        x = tl.math.div_rn(w, s)  # IEEE division, as torch's: a code flips at x.5 otherwise
        # Round half to even (torch.round) from floor: libdevice's rint has no interpreter
        # implementation, and a floor-based rint is exact for every float.
        fl = tl.floor(x)
        frac = x - fl
        odd = (fl - 2.0 * tl.floor(fl * 0.5)) == 1.0
        x = tl.where((frac > 0.5) | ((frac == 0.5) & odd), fl + 1.0, fl)
        q = tl.minimum(tl.maximum(x + z, 0.0), maxq)
        d = tl.load(HINV + j * stride_h + j * stride_hc)
        e = tl.math.div_rn(w - s * (q - z), d)
        tl.store(CODES + j * stride_c + r, q, mask=rmask)
        tl.store(ERR + j * stride_e + r, e, mask=rmask)
        h = tl.load(HINV + j * stride_h + c * stride_hc, mask=cmask & (c > j), other=0.0)
        tile = tile - h[:, None] * e[None, :]
    tl.store(W + offsets, tile, mask=(cmask & (c >= m))[:, None] & rmask[None, :])


# Decorated here, not with @: the module must import (and fall back) without Triton.
_kernel = triton.jit(_gptq_segment) if triton is not None else None


def _row_tile(rows: int) -> int:
    # Small tiles give a 4096-row matrix enough programs to fill an H200's 132 SMs; wide
    # stacks (q,k,v; gate,up) afford wider tiles. Not tuned on hardware yet (issue 17).
    return 32 if rows >= 16384 else 16


def solve_columns(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor, maxq: int, codes: torch.Tensor,
                  err: torch.Tensor) -> None:
    """`algorithm.solve_columns` in one launch: same arguments, same outputs.

    All float32 with contiguous rows; `w[:m]` is left as it was (the torch loop uses it as
    scratch), `w[m:]` is updated as there.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    n, rows = w.shape
    m = scale.shape[0]
    if n > _MAX_BLOCK:  # a tile this tall would spill registers; a custom --block-size
        from quantkit.gptq.algorithm import solve_columns as torch_solve

        torch_solve(w, hinv, scale, zero, maxq, codes, err)
        return
    if not m <= n or zero.shape[0] != m or codes.shape[0] != m or err.shape[0] != m:
        raise ValueError(f"{m} columns to solve in a block of {n}: shapes do not agree")
    for name, t in (("w", w), ("scale", scale), ("zero", zero),
                    ("codes", codes), ("err", err)):
        if t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError(f"{name}: expected float32 with contiguous rows")
    if hinv.dtype != torch.float32:
        raise ValueError("hinv: expected float32")
    if scale.stride(0) != zero.stride(0):
        raise ValueError("scale and zero must share a layout")
    block_r = _row_tile(rows)
    grid = (triton.cdiv(rows, block_r),)
    _kernel[grid](
        w, hinv, scale, zero, codes, err, rows, n, w.stride(0), hinv.stride(0), hinv.stride(1),
        scale.stride(0), codes.stride(0), err.stride(0), float(maxq), m=m,
        BLOCK_N=triton.next_power_of_2(n), BLOCK_R=block_r)


@functools.cache
def available(device_index: int = 0) -> bool:
    """Whether the kernel compiles and agrees with torch on this CUDA device (checked once).

    A Triton that does not match the installed torch or GPU fails at compile time, not at
    import; this turns that into a fallback to the torch loop instead of a failed run.
    """
    if triton is None or not torch.cuda.is_available():
        return False
    from quantkit.gptq.algorithm import solve_columns as torch_solve

    try:
        device = torch.device("cuda", device_index)
        g = torch.Generator(device=device).manual_seed(0)
        n, m, rows = 8, 5, 48
        w = torch.randn((n, rows), device=device, generator=g)
        a = torch.randn((n, n), device=device, generator=g)
        hinv = torch.linalg.cholesky(torch.linalg.inv(a @ a.T + n * torch.eye(n, device=device)),
                                     upper=True)
        scale = torch.full((m, rows), 0.25, device=device)
        zero = torch.full((m, rows), 8.0, device=device)
        outputs = []
        for solve in (solve_columns, torch_solve):
            block, codes, err = w.clone(), w.new_empty((m, rows)), w.new_empty((m, rows))
            solve(block, hinv, scale, zero, 15, codes, err)
            outputs.append((codes, err, block[m:]))
        (codes, err, rest), (ref_codes, ref_err, ref_rest) = outputs
        agree = (torch.equal(codes, ref_codes) and torch.allclose(err, ref_err, atol=1e-5)
                 and torch.allclose(rest, ref_rest, atol=1e-5))
    except Exception as exc:  # noqa: BLE001 - any compile/launch failure means "fall back"
        log.warning("Triton GPTQ kernel unusable (%s); solving with torch instead", exc)
        return False
    if not agree:
        log.warning("Triton GPTQ kernel disagrees with torch on this device; using torch")
    return agree


_MODES = ("auto", "torch", "triton")
_mode = "auto"


@contextlib.contextmanager
def use(mode: str):
    """Pick the in-block loop for `gptq_fast` inside the block: "auto" (the kernel on CUDA
    when it works there), "torch", or "triton" (also on CPU, under the interpreter). For
    comparing the two paths and counting their launches; runs never need it."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"mode {mode!r}: expected one of {_MODES}")
    before, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = before


def usable(device: torch.device) -> bool:
    """Whether `gptq_fast` runs the kernel for tensors on `device`."""
    if _mode != "auto":
        return _mode == "triton" and triton is not None
    return device.type == "cuda" and available(device.index or 0)
