"""Data-parallel GPTQ over torch.distributed: `torchrun --nproc-per-node N -m quantkit gptq`.

Each rank captures and replays the current decoder layer on its own share of the
calibration rows (whole batches, so a rank's forwards are the single-process forwards of
those batches). GPTQ needs only the sum of X^T X over all rows, so the Hessians are summed
across ranks after each true-sequential stage, in one of two ways:

- `allreduce`: every rank gets the sum and solves every group itself (the solves are
  repeated, the weights stay identical on every rank, nothing else moves);
- `owner`: each Linear group's Hessian is reduced to the one rank that owns it (groups are
  spread over ranks by solve cost, llm-compressor's weight-parallel scheme), which solves
  it and broadcasts the quantized weights and packed tensors.

Rank 0 alone writes the artifact, logs and shows progress. A failure on any rank reaches
the others through the next collective (or torchrun's SIGTERM): the failing rank prints
its one `error:` line; the others unwind through the atomic writers and exit non-zero
without a message. NCCL on CUDA (one GPU per rank, `LOCAL_RANK`), gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import signal
import sys
from collections.abc import Iterator

import torch
from torch import nn

from quantkit.errors import ConfigError, QuantizationError

log = logging.getLogger(__name__)

REDUCE_MODES = ("allreduce", "owner")
FAULT_ENV = "QUANTKIT_FAULT"  # "RANK:LAYER:exit|raise", for the failure tests


def launched_ranks() -> int:
    """WORLD_SIZE as torchrun (or any env:// launcher) sets it; 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}: not a number; launch "
                          "with torchrun --nproc-per-node N") from None


class SingleProcess:
    """The one-process case: every hook is a no-op."""

    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, device: str = "cpu"):
        self.device = device

    def rows(self, input_ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
        return input_ids, batch_size

    def reduce_hessians(self, hessians: dict[str, torch.Tensor], rows: dict[str, int],
                        modules: dict[str, nn.Module], groups: list[list[str]],
                        layer: int) -> dict[str, int | None]:
        """Sum each group's Hessian over ranks; return the rank that solves each group
        (None: every rank)."""
        return dict.fromkeys(hessians)

    def solves(self, owner: int | None) -> bool:
        return owner is None or owner == self.rank

    def share_group(self, modules, names, prefix, owner, result) -> None:
        """Give every rank the solution of a group solved on `owner` alone."""

    def barrier(self) -> None:
        """Return when every rank got here (before rank 0 commits the artifact)."""


class PeerFailed(BaseException):
    """Another rank failed (or torchrun stopped this one): unwind quietly, exit non-zero."""


class Distributed(SingleProcess):
    """One rank of a torchrun job; see the module docstring for the two reduce modes."""

    def __init__(self, mode: str, device: str):
        import torch.distributed as dist

        super().__init__(device)
        self.dist = dist
        self.mode = mode
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_main = self.rank == 0
        self.load = [0.0] * self.world_size  # solve cost assigned to each rank so far

    def rows(self, input_ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
        """This rank's rows: a contiguous run of whole batches (smaller batches when there
        are fewer batches than ranks)."""
        total = len(input_ids)
        if total < self.world_size:
            raise ConfigError(f"--nsamples {total}: fewer calibration rows than the "
                              f"{self.world_size} ranks; use at least {self.world_size}")
        n_batches = -(-total // batch_size)
        if n_batches < self.world_size:
            batch_size = -(-total // self.world_size)
            n_batches = -(-total // batch_size)
        first = self.rank * n_batches // self.world_size
        last = (self.rank + 1) * n_batches // self.world_size
        return input_ids[first * batch_size:last * batch_size], batch_size

    def _owners(self, modules: dict[str, nn.Module], groups: list[list[str]]
                ) -> dict[str, int]:
        owners = {}
        costs = [(sum(modules[n].out_features for n in g) * modules[g[0]].in_features ** 2,
                  g[0]) for g in groups]
        for cost, key in sorted(costs, key=lambda c: -c[0]):  # largest first, least loaded
            owner = min(range(self.world_size), key=lambda r: (self.load[r], r))
            self.load[owner] += cost
            owners[key] = owner
        return owners

    def reduce_hessians(self, hessians, rows, modules, groups, layer):
        inject_fault(self.rank, layer)
        counts = torch.tensor([rows[g[0]] for g in groups], dtype=torch.float64,
                              device=self.device)
        self.dist.all_reduce(counts)
        for g, count in zip(groups, counts.tolist(), strict=True):
            rows[g[0]] = int(count)
        if self.mode == "allreduce":
            for g in groups:
                self.dist.all_reduce(hessians[g[0]])
            return dict.fromkeys(hessians)
        owners = self._owners(modules, groups)
        for key, owner in owners.items():
            self.dist.reduce(hessians[key], dst=owner)
        return owners

    def share_group(self, modules, names, prefix, owner, result) -> None:
        if owner is None:
            return
        for name in names:
            weight = modules[name].weight.data
            self.dist.broadcast(weight, src=owner)
        if self.rank == owner:
            payload = [{n: result.packed[f"{prefix}.{n}"] for n in names},
                       result.reports[-len(names):]]
        else:
            payload = [None, None]
        self.dist.broadcast_object_list(payload, src=owner, device=self._object_device())
        if self.rank != owner:
            packed, reports = payload
            result.packed.update({f"{prefix}.{n}": p for n, p in packed.items()})
            result.reports.extend(reports)

    def _object_device(self):
        return torch.device(self.device) if self.device.startswith("cuda") else None

    def barrier(self) -> None:
        self.dist.barrier()


def inject_fault(rank: int, layer: int) -> None:
    """QUANTKIT_FAULT=RANK:LAYER:exit kills this rank abruptly at that layer (as the OOM
    killer would); `raise` fails it with an ordinary error. Used by the failure tests."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault_rank, fault_layer, kind = spec.split(":")
    if int(fault_rank) == rank and int(fault_layer) == layer:
        if kind == "exit":
            os._exit(17)
        raise QuantizationError(f"injected failure on rank {rank} at layer {layer} "
                                f"({FAULT_ENV})")


def _is_peer_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and any(
            word in str(exc) for word in ("Connection closed by peer", "Connection reset",
                                          "NCCL", "gloo")))


@contextlib.contextmanager
def process_group(device: str, mode: str) -> Iterator[SingleProcess]:
    """Join the torchrun job (or stay one process) for one GPTQ run.

    Yields the hooks `calibrate.quantize_layers` calls; `.device` is this rank's device.
    """
    if mode not in REDUCE_MODES:
        raise ConfigError(f"--hessian-reduce {mode}: choose {' or '.join(REDUCE_MODES)}")
    if launched_ranks() <= 1:
        yield SingleProcess(device)
        return
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(backend, timeout=_dt.timedelta(minutes=30))
    parallel = Distributed(mode, device)
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if not parallel.is_main:
        logging.getLogger("quantkit").setLevel(logging.ERROR)
        logging.getLogger("transformers").setLevel(logging.ERROR)
    log.info("rank 0 of %d (%s); Hessians reduced with %s", parallel.world_size, backend, mode)
    try:
        yield parallel
    except PeerFailed:
        raise SystemExit(1) from None
    except Exception as exc:
        if _is_peer_failure(exc):
            log.debug("rank %d: stopping, another rank failed: %s", parallel.rank, exc)
            raise SystemExit(1) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _stop_on_sigterm(signum, frame):
    sys.stderr.flush()
    raise PeerFailed()
