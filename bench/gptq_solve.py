"""How long the GPTQ column solve takes, and how many kernels it launches per column.

    python bench/gptq_solve.py --rows 4096 --columns 4096 --out bench/results/solve_cpu.json
    git show 4870f3a:quantkit/gptq/algorithm.py > /tmp/algorithm_before.py
    python bench/gptq_solve.py --baseline /tmp/algorithm_before.py --solvers reference fast \
        baseline-fast --out bench/results/solve_cpu_4096_ab.json   # before/after, interleaved

The solve is the part of GPTQ that cannot be one big matmul: each column's rounding error
feeds the next column. Issue 17 found the fast solver launch-bound on a GPU (about 6 small
kernels per column, ~10^5 per 7B layer), so besides seconds this counts the tensor
operations each solver dispatches per column (views excluded: they launch nothing). On
CUDA each such operation is at least one kernel launch; the Triton path (`--device cuda`)
runs a whole block of columns in one launch, which is what the count shows there.
Weights and Hessian are random with the shapes given (values do not change time).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import emit_json  # noqa: E402
from quantkit.gptq import solve_triton  # noqa: E402
from quantkit.gptq.algorithm import QuantSpec, gptq_fast, gptq_reference  # noqa: E402

log = logging.getLogger("gptq_solve")


class OpCounter(TorchDispatchMode):
    """Counts the non-view aten operations dispatched while active (a launch proxy)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def problem(rows: int, columns: int, device: str, seed: int = 0):
    """A weight and a correlated, well-conditioned Hessian (as in tests/test_gptq_algorithm)."""
    g = torch.Generator().manual_seed(seed)
    loadings = torch.randn(columns, 32, generator=g)
    scale = torch.linspace(0.2, 3.0, columns)[torch.randperm(columns, generator=g)]
    hessian = scale[:, None] * (torch.eye(columns) + loadings @ loadings.T / 4) * scale[None, :]
    weight = torch.randn(rows, columns, generator=g) * 0.02
    return weight.to(device), hessian.to(device)


def _fast(mode: str):
    def solve(w, h, spec):
        with solve_triton.use(mode):
            return gptq_fast([w], h, spec)[0]
    return solve


# fast: what runs by default (the kernel on CUDA); fast-torch / fast-triton force the
# in-block loop (fast-triton on CPU runs under Triton's interpreter: count, do not time).
SOLVERS = {
    "reference": gptq_reference,
    "fast": _fast("auto"),
    "fast-torch": _fast("torch"),
    "fast-triton": _fast("triton"),
}


def add_baseline(path: str) -> None:
    """`baseline-fast`: gptq_fast from another copy of algorithm.py (an older revision)."""
    spec = importlib.util.spec_from_file_location("baseline_algorithm", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    SOLVERS["baseline-fast"] = lambda w, h, s: module.gptq_fast(
        [w], h, module.QuantSpec(bits=s.bits, group_size=s.group_size))[0]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_solver(name: str, weight, hessian, spec: QuantSpec, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    SOLVERS[name](weight, hessian, spec)
    _sync(device)
    return time.perf_counter() - start


def ops_per_column(name: str, weight, hessian, spec: QuantSpec) -> dict:
    counter = OpCounter()
    with counter:
        SOLVERS[name](weight, hessian, spec)
    columns = weight.shape[1]
    total = sum(counter.ops.values())
    return {"total_ops": total, "ops_per_column": round(total / columns, 2),
            "top_ops": dict(counter.ops.most_common(8))}


def run(args: argparse.Namespace) -> dict:
    spec = QuantSpec(bits=args.bits, group_size=args.group_size)
    weight, hessian = problem(args.rows, args.columns, args.device)
    SOLVERS["fast"](weight[:8], hessian, spec)  # warm-up: kernel compilation, allocator
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "rows": args.rows,
        "columns": args.columns,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "baseline": args.baseline,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "solvers": {},
    }
    small = weight[:, :args.count_columns], hessian[:args.count_columns, :args.count_columns]
    # Interleaved, so a machine whose load changes treats every solver alike.
    timings = {name: [] for name in args.solvers}
    for _ in range(args.repeat):
        for name in args.solvers:
            timings[name].append(time_solver(name, weight, hessian, spec, args.device))
    for name, seconds in timings.items():
        result["solvers"][name] = {"seconds": round(min(seconds), 4),
                                   "all_seconds": [round(s, 4) for s in seconds],
                                   "counted_on_columns": args.count_columns,
                                   **ops_per_column(name, *small, spec)}
        log.info("%s: %.3f s, %.1f ops per column", name, min(seconds),
                 result["solvers"][name]["ops_per_column"])
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--columns", type=int, default=4096)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--solvers", nargs="+", default=["reference", "fast"],
                        help=f"of {', '.join(SOLVERS)}, and baseline-fast with --baseline")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs; the best is kept")
    parser.add_argument("--count-columns", type=int, default=512,
                        help="columns of the (smaller) problem whose operations are counted")
    parser.add_argument("--baseline", help="an algorithm.py to time as `baseline-fast`")
    parser.add_argument("--out", help="JSON file to write (stdout when omitted)")
    args = parser.parse_args(argv)
    if args.baseline:
        add_baseline(args.baseline)
    unknown = [name for name in args.solvers if name not in SOLVERS]
    if unknown:
        parser.error(f"--solvers: unknown {', '.join(unknown)}; choose from {', '.join(SOLVERS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    emit_json(run(args), args.out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
