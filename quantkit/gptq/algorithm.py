"""GPTQ (Frantar et al., 2022) and round-to-nearest, as pure functions on tensors.

Two solvers compute the same thing. `gptq_reference` is the paper's algorithm written to be
read: one matrix, the blocked column loop, the rank-1 error update. `gptq_fast` solves every
matrix that shares an input (q, k and v; gate and up) in one pass over the columns by
stacking their rows, because each row's update depends only on the shared Hessian; the
column loop is what costs time, so running it once instead of three times is the saving.
Tests hold the two to the same answer.

Conventions (the GPTQ checkpoint layout, see ANCHORS.md): a weight is `[out, in]`; groups
run along `in`; a code `q` in `[0, 2**bits - 1]` stands for `scale * (q - zero)`. Scales are
rounded to float16 *before* rounding the weights, so the grid the solver compensates for is
exactly the grid the checkpoint stores. Asymmetric zero points are kept in `[1, 2**bits - 1]`
so that the v1 format's "zero minus one" never underflows (see `choose_qparams`).

No files, flags or logging here.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_FP16_MAX = torch.finfo(torch.float16).max
_MIN_SCALE = 2.0**-20  # scales below this round to a few float16 subnormal bits


SCALE_SEARCHES = ("minmax", "mse", "hessian")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight matrix.

    The defaults are the combination that measured best on real trained weights
    (bench/quality.py, bench/RESULTS.md): damping 0.05, group-aware reordering, and each
    group's grid searched to minimize its Hessian-weighted rounding error, chosen from the
    weights as they stand at the start of their block (the paper's code does the same).
    """

    bits: int = 4
    group_size: int = 128  # -1: one group for the whole row (per-channel)
    sym: bool = True
    desc_act: bool = False  # act-order: quantize columns by decreasing Hessian diagonal
    static_groups: bool = False  # with desc_act: groups fixed from the unpermuted weight
    group_aware: bool = True  # reorder whole groups (and columns inside them): g_idx trivial
    scale_search: str = "hessian"  # minmax | mse | hessian (see `choose_group_params`)
    block_start_scales: bool = True  # False: a group's grid from its already-updated columns
    damp: float = 0.05  # fraction of the mean Hessian diagonal added before inverting
    block_size: int = 128  # columns per lazy-update block
    damp_retries: int = 3  # each retry multiplies the damping by 10

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, columns: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(columns / self.group_size)

    def block_for(self, columns: int) -> int:
        """Blocks hold whole groups, so every group's grid is chosen at one block start."""
        if self.group_size == -1:
            return self.block_size
        return self.group_size * max(1, self.block_size // self.group_size)


@dataclass
class QuantResult:
    """One quantized matrix: codes and grid in original column order, plus how it went."""

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float32 holding float16 values [groups, out]
    zeros: torch.Tensor  # int32 [groups, out], the zero point itself (not minus one)
    g_idx: torch.Tensor  # int32 [in]: the group of each input column
    damp: float = 0.0  # damping that made the Hessian invertible (0 for RTN)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight `[out, in]` these codes stand for."""
        g = self.g_idx.long()
        return self.scales[g].T * (self.codes.float() - self.zeros[g].T.float())


class NotPositiveDefinite(Exception):
    """The damped Hessian could not be Cholesky-factored with any damping tried."""

    def __init__(self, damps: Sequence[float], nonfinite: bool):
        self.damps = tuple(damps)
        self.nonfinite = nonfinite
        super().__init__(f"not positive-definite with damping {', '.join(map(str, damps))}")


# --------------------------------------------------------------------------- the grid


def choose_qparams(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point covering `w` `[rows, cols]` (min/max, like GPTQ).

    Symmetric: zero is 2**(bits-1) and the scale spans [-max|w|, max|w|]. Asymmetric: the
    range always includes 0; a zero point that would round to 0 (all weights >= -scale/2)
    is moved to 1 with the scale widened to keep the top of the range, because v1
    checkpoints store zero - 1 and loaders add the 1 back with an unsigned carry.
    """
    w = w.float()
    return _range_params(w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0), bits, sym)


def _range_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int,
                  sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero covering [xmin, xmax] (xmin <= 0 <= xmax), as `choose_qparams`."""
    maxq = 2**bits - 1
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = _fp16_grid((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
        return scale, zero
    zero = torch.round(-xmin / scale)
    low = zero < 1
    scale = torch.where(low, _fp16_grid(xmax / (maxq - 1)), scale)
    zero = torch.where(low, 1.0, zero).clamp(1, maxq)
    return scale, zero


def _fp16_grid(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(_MIN_SCALE, _FP16_MAX).half().float()


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   maxq: int) -> torch.Tensor:
    """Nearest code for each weight; `scale`/`zero` broadcast against `w`."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


_SEARCH_GRID = 40  # candidate ranges tried by the error-minimizing search
_SEARCH_MAX_SHRINK = 0.4  # the narrowest candidate keeps 60% of the min/max range
_SEARCH_CHUNK = 8  # candidates evaluated at once, so memory stays a few copies of the group


def choose_group_params(columns: torch.Tensor, spec: QuantSpec,
                        importance: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero of one group from its weight columns `[rows, n]`.

    A pure function of the group's values, so a fused solver can compute every group of a
    block at the block's start and pass the grids in. "minmax" covers each row's range.
    The searches shrink that range (clipping the extremes, which usually costs less than
    the coarser grid covering them) and keep, per row, the candidate with the least
    squared rounding error; "hessian" weights each column's error by `importance` (the
    Hessian diagonal: how much activation energy the column carries), so the error
    measured is an estimate of the output error rather than of the weight error.
    """
    scale, zero = choose_qparams(columns, spec.bits, spec.sym)
    if spec.scale_search == "minmax":
        return scale, zero
    w = columns.float()
    if spec.scale_search == "hessian" and importance is not None:
        weight = importance.float().clamp_min(0)[None, :]
    else:
        weight = torch.ones((1, w.shape[1]), device=w.device)
    best = _weighted_error(w, scale, zero, spec.maxq, weight)
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    shrinks = torch.linspace(1 - _SEARCH_MAX_SHRINK, 1, _SEARCH_GRID)[:-1].tolist()
    for start in range(0, len(shrinks), _SEARCH_CHUNK):
        factors = shrinks[start:start + _SEARCH_CHUNK]
        cand = [_range_params(xmin * f, xmax * f, spec.bits, spec.sym) for f in factors]
        c_scale = torch.stack([c[0] for c in cand])  # [k, rows]
        c_zero = torch.stack([c[1] for c in cand])
        err = _weighted_error(w[None], c_scale, c_zero, spec.maxq, weight[None])  # [k, rows]
        err_min, which = err.min(dim=0)
        better = err_min < best
        rows = torch.arange(w.shape[0], device=w.device)
        scale = torch.where(better, c_scale[which, rows], scale)
        zero = torch.where(better, c_zero[which, rows], zero)
        best = torch.where(better, err_min, best)
    return scale, zero


def _weighted_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                    weight: torch.Tensor) -> torch.Tensor:
    """sum_j weight_j (w_ij - dequant(quant(w_ij)))^2 per row (leading dims broadcast)."""
    s, z = scale[..., None], zero[..., None]
    q = quantize_codes(w, s, z, maxq)
    return (((q - z) * s - w) ** 2 * weight).sum(-1)


def _group_starts(spec: QuantSpec, columns: int) -> range:
    step = columns if spec.group_size == -1 else spec.group_size
    return range(0, columns, step)


# --------------------------------------------------------------------------- RTN


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Round-to-nearest with the same grid as GPTQ: the baseline GPTQ must beat."""
    w = weight.float()
    rows, cols = w.shape
    step = cols if spec.group_size == -1 else spec.group_size
    codes = torch.empty_like(w)
    scales, zeros = [], []
    for start in _group_starts(spec, cols):
        block = w[:, start:start + step]
        scale, zero = choose_qparams(block, spec.bits, spec.sym)
        codes[:, start:start + step] = quantize_codes(block, scale[:, None], zero[:, None],
                                                      spec.maxq)
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(cols, device=w.device) // step
    return QuantResult(codes.to(torch.uint8), torch.stack(scales), torch.stack(zeros).int(),
                       g_idx.int())


# --------------------------------------------------------------------------- shared steps


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float,
                             retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of the damped inverse Hessian, raising damping on failure.

    Real calibration Hessians are often numerically singular (Baichuan2-13B users meet
    "not positive-definite"); adding a larger multiple of the mean diagonal fixes that at
    a small cost in accuracy, so retry before giving up.
    """
    tried = []
    nonfinite = not bool(torch.isfinite(hessian).all())
    mean_diag = torch.mean(torch.diag(hessian))
    for attempt in range(retries + 1):
        d = damp * 10**attempt
        tried.append(d)
        if nonfinite:
            break
        h = hessian.clone()
        h.diagonal().add_(d * mean_diag)
        lower, info = torch.linalg.cholesky_ex(h)
        del h  # at most two Hessian-sized temporaries at once (host memory on big layers)
        if info.item() != 0:
            continue
        hinv = torch.cholesky_inverse(lower)
        del lower
        upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
        del hinv
        if info.item() == 0 and bool(torch.isfinite(upper).all()):
            return upper, d
    raise NotPositiveDefinite(tried, nonfinite)


def act_order_permutation(hessian: torch.Tensor) -> torch.Tensor:
    """Columns with the largest Hessian diagonal (most activation energy) go first."""
    return torch.argsort(torch.diag(hessian), descending=True, stable=True)


def _prepare(weight: torch.Tensor, hessian: torch.Tensor):
    """Float32 copies with dead inputs (never activated) zeroed and made invertible."""
    w = weight.float().clone()
    h = hessian.float()
    dead = torch.diag(h) == 0
    if bool(dead.any()):  # copy the Hessian only to change it: it is the largest matrix
        h = h.clone()
        h[dead, dead] = 1
        w[:, dead] = 0
    return w, h


def group_aware_permutation(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """Act-order that keeps groups whole (GPTQModel's `act_group_aware`).

    Groups go in decreasing order of their largest Hessian diagonal entry and, inside a
    group, columns by decreasing diagonal. Most of act-order's gain is kept, yet every group
    is still a run of consecutive original inputs, so `g_idx` stays `i // group_size` and
    the checkpoint loads in every v1 kernel (exllama, Marlin) without reordering.
    """
    diag = torch.diag(hessian)
    cols = diag.numel()
    order = []
    starts = list(range(0, cols, group_size))
    peaks = torch.stack([diag[s:s + group_size].max() for s in starts])
    for g in torch.argsort(peaks, descending=True, stable=True).tolist():
        s = starts[g]
        inner = torch.argsort(diag[s:s + group_size], descending=True, stable=True)
        order.append(inner + s)
    return torch.cat(order)


@dataclass(frozen=True)
class ColumnPlan:
    """In what order the solve visits columns and which stored group each position uses.

    `perm[p]` is the original column processed at position `p` (None: natural order);
    `group_of[p]` indexes the stored scales/zeros. Dynamic grids are chosen per run of
    `group_size` positions; static grids come from the unpermuted weight.
    """

    perm: torch.Tensor | None
    group_of: list[int]
    static: bool

    def g_idx(self, device) -> torch.Tensor:
        g = torch.tensor(self.group_of, dtype=torch.int32, device=device)
        if self.perm is None:
            return g
        out = torch.empty_like(g)
        out[self.perm] = g
        return out


def plan_columns(hessian: torch.Tensor, spec: QuantSpec) -> ColumnPlan:
    cols = hessian.shape[0]
    if spec.group_size == -1:
        perm = act_order_permutation(hessian) if spec.desc_act else None
        return ColumnPlan(perm, [0] * cols, static=True)
    gs = spec.group_size
    position = list(range(cols))
    if spec.desc_act:
        perm = act_order_permutation(hessian)
        if spec.static_groups:
            return ColumnPlan(perm, [c // gs for c in perm.tolist()], static=True)
        return ColumnPlan(perm, [p // gs for p in position], static=False)
    if spec.group_aware:
        perm = group_aware_permutation(hessian, gs)
        return ColumnPlan(perm, [c // gs for c in perm.tolist()], static=False)
    return ColumnPlan(None, [p // gs for p in position], static=False)


def static_group_params(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group's grid from the unpermuted weight before any update: [groups, rows]."""
    step = w.shape[1] if spec.group_size == -1 else spec.group_size
    params = [choose_group_params(w[:, s:s + step], spec, importance[s:s + step])
              for s in range(0, w.shape[1], step)]
    return torch.stack([p[0] for p in params]), torch.stack([p[1] for p in params])


@contextlib.contextmanager
def one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """The column loop is thousands of small kernels. On CPU, OpenMP's fork/join per kernel
    costs more than the work, and stalls for whole time slices when cores are shared (50x
    slower on a busy 2-core machine; the Cholesky factorizations and the error metrics on
    layer-sized matrices suffer the same), so solving runs on one thread. On CUDA nothing
    changes."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _one_thread_solver(fn):
    """Run a solver single-threaded on CPU (see `one_thread_on_cpu`)."""
    @functools.wraps(fn)
    def wrapper(weight, hessian, spec):
        with one_thread_on_cpu(hessian.device):
            return fn(weight, hessian, spec)
    return wrapper


def check_spec(spec: QuantSpec, columns: int) -> None:
    if spec.bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {spec.bits}")
    if spec.group_size != -1 and (spec.group_size <= 0 or columns % spec.group_size):
        raise ValueError(f"group size {spec.group_size} does not divide {columns} columns")


# --------------------------------------------------------------------------- reference


@_one_thread_solver
def gptq_reference(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """GPTQ on one matrix, written the way the paper's Algorithm 1 reads.

    `hessian` is X^T X (any positive multiple) of the matrix's inputs X `[tokens, in]`.
    """
    rows, cols = weight.shape
    check_spec(spec, cols)
    w, h = _prepare(weight, hessian)
    plan = plan_columns(h, spec)
    groups = max(plan.group_of) + 1
    scales = torch.zeros((groups, rows), device=w.device)
    zeros = torch.zeros_like(scales)
    if plan.static:
        scales, zeros = static_group_params(w, spec, torch.diag(h))
    if plan.perm is not None:
        w, h = w[:, plan.perm], h[plan.perm][:, plan.perm]
    importance = torch.diag(h)
    hinv, damp = inverse_hessian_cholesky(h, spec.damp, spec.damp_retries)

    codes = torch.zeros_like(w)
    block = spec.block_for(cols)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        if not plan.static and spec.block_start_scales:
            # The paper's code: each group's grid from the block as it stands now, before
            # the errors of the block's earlier columns are spread into it.
            for g1 in range(i1, i2, spec.group_size):
                g2 = g1 + spec.group_size
                scales[plan.group_of[g1]], zeros[plan.group_of[g1]] = choose_group_params(
                    w[:, g1:g2], spec, importance[g1:g2])
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = plan.group_of[col]
            if not plan.static and not spec.block_start_scales and col % spec.group_size == 0:
                scales[g], zeros[g] = choose_group_params(
                    w1[:, i:i + spec.group_size], spec, importance[col:col + spec.group_size])
            q = quantize_codes(w1[:, i], scales[g], zeros[g], spec.maxq)
            codes[:, col] = q
            dequantized = scales[g] * (q - zeros[g])
            err = (w1[:, i] - dequantized) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if plan.perm is not None:
        codes = codes[:, torch.argsort(plan.perm)]
    return QuantResult(codes.to(torch.uint8), scales, zeros.int(), plan.g_idx(w.device), damp)


# --------------------------------------------------------------------------- fast


def solve_columns(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor, maxq: int, codes: torch.Tensor,
                  err: torch.Tensor) -> None:
    """Quantize the first `len(scale)` columns of a block in order, feeding each column's
    error to every later column of the block.

    `w` [n, rows] is the rest of the block, transposed (column j of the weight is `w[j]`);
    `hinv` [n, n] its block of the upper Cholesky factor of H^-1; `scale`, `zero`
    [m, rows] the grid of each of the m <= n columns to solve. Writes `codes` and `err`
    [m, rows] (err = (w - dequantized) / hinv[j, j], which the caller propagates past the
    block with one matmul) and leaves `w[m:]` updated, ready for the next segment.

    Six tensor operations per column (the launches a GPU pays for), down from nine: the
    zero point is folded into the clamp bounds and added back once for the segment, and
    the dequantize-subtract is one fused op. The float operations are the reference's, in
    its order, so codes differ from it only where stacking rows changes a rounding.
    `solve_triton.solve_columns` is the same loop as one kernel.
    """
    diag = torch.diagonal(hinv)
    low, high = -zero, maxq - zero
    for j in range(scale.shape[0]):
        q = codes[j]
        torch.div(w[j], scale[j], out=q)
        q.round_().clamp_(low[j], high[j])
        torch.addcmul(w[j], q, scale[j], value=-1, out=err[j]).div_(diag[j])
        if j + 1 < w.shape[0]:
            w[j + 1:].addr_(hinv[j, j + 1:], err[j], alpha=-1)
    codes.add_(zero)


def _column_solver(device: torch.device):
    """The Triton kernel on CUDA when it works there (see `solve_triton`), else torch."""
    from quantkit.gptq import solve_triton

    return solve_triton.solve_columns if solve_triton.usable(device) else solve_columns


@_one_thread_solver
def gptq_fast(weights: Sequence[torch.Tensor], hessian: torch.Tensor,
              spec: QuantSpec) -> list[QuantResult]:
    """GPTQ on every matrix that shares `hessian`, in one column loop over stacked rows.

    Same result as `gptq_reference` on each matrix, up to float rounding. Besides running
    the column loop once for q, k and v together, it works on the transposed weight, so
    each column the loop touches is contiguous memory. A block is solved in segments
    whose grid is known when the segment starts (one group; the whole block for static
    groups or one group per row), each by one `solve_columns` call (one Triton launch on
    CUDA); errors reach the rest of the matrix as one matmul per block.
    """
    sizes = [w.shape[0] for w in weights]
    cols = weights[0].shape[1]
    check_spec(spec, cols)
    w, h = _prepare(torch.cat(list(weights)) if len(weights) > 1 else weights[0], hessian)
    plan = plan_columns(h, spec)
    rows = w.shape[0]
    if plan.static:
        scales, zeros = static_group_params(w, spec, torch.diag(h))
    else:
        scales = torch.empty((max(plan.group_of) + 1, rows), device=w.device)
        zeros = torch.empty_like(scales)
    if plan.perm is not None:
        w, h = w[:, plan.perm], h[plan.perm][:, plan.perm]
    importance = torch.diag(h)
    hinv, damp = inverse_hessian_cholesky(h, spec.damp, spec.damp_retries)
    hinv = hinv.contiguous()  # the factor comes column-major; the loop reads its rows

    wt = w.T.contiguous()  # [cols, rows]: column `c` of the weight is row `c` here
    del w
    codes_t = torch.empty_like(wt)
    group_of = torch.tensor(plan.group_of, device=wt.device)
    gs = spec.group_size
    # 0.1.0's choice (grids from already-updated columns) needs one segment per group;
    # otherwise every grid of a block is known when the block starts.
    per_group = not plan.static and not spec.block_start_scales

    solve = _column_solver(wt.device)
    block = spec.block_for(cols)
    err_buf = torch.empty((block, rows), device=wt.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        if not plan.static and spec.block_start_scales:
            for g1 in range(i1, i2, gs):
                scales[group_of[g1]], zeros[group_of[g1]] = choose_group_params(
                    wt[g1:g1 + gs].T, spec, importance[g1:g1 + gs])
        w1 = wt[i1:i2]  # a view: updates land in `wt` directly
        hinv1 = hinv[i1:i2, i1:i2]
        err1 = err_buf[:i2 - i1]
        segment = gs if per_group else i2 - i1
        for s1 in range(0, i2 - i1, segment):
            s2 = min(s1 + segment, i2 - i1)
            if per_group:
                g = group_of[i1 + s1]
                scales[g], zeros[g] = choose_group_params(w1[s1:s2].T, spec,
                                                          importance[i1 + s1:i1 + s2])
            index = group_of[i1 + s1:i1 + s2]
            solve(w1[s1:], hinv1[s1:, s1:], scales[index], zeros[index], spec.maxq,
                  codes_t[i1 + s1:i1 + s2], err1[s1:s2])
        wt[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1)

    codes = codes_t.T
    if plan.perm is not None:
        codes = codes[:, torch.argsort(plan.perm)]
    codes = codes.to(torch.uint8)
    g_idx = plan.g_idx(codes.device)
    results, start = [], 0
    for size in sizes:
        part = slice(start, start + size)
        results.append(QuantResult(codes[part].contiguous(), scales[:, part].contiguous(),
                                   zeros[:, part].int().contiguous(), g_idx, damp))
        start += size
    return results


# --------------------------------------------------------------------------- errors


def output_errors(weight: torch.Tensor, candidates: Sequence[torch.Tensor],
                  hessian: torch.Tensor) -> list[float]:
    """Relative output error ||(W - Q) X^T||^2 / ||W X^T||^2 of each candidate Q, from
    H = X^T X alone (no second pass over the calibration data)."""
    w = weight.float()
    h = hessian.float()
    den = float(torch.sum((w @ h) * w))
    errors = []
    for quantized in candidates:
        delta = w - quantized.float()
        num = float(torch.sum((delta @ h) * delta))
        errors.append(num / den if den > 0 else num)
    return errors
