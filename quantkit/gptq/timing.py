"""Where a GPTQ run spends its time, cheaply enough to leave on in every run.

The speed work (issue 8) needs per-phase seconds from the real engine, not from a copy of
it: capture, calibration forwards, Hessians, solve, pack, write. On CUDA a phase boundary
synchronizes the device so queued kernels are charged to the phase that launched them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

PHASES = ("load", "capture", "forwards", "hessians", "solve", "pack", "write")


@dataclass
class PhaseTimer:
    device: str = "cpu"
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    _active: str | None = None

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the block's time to `name`; a phase nested in another is subtracted from it.

        Hessian accumulation runs inside the calibration forwards (in hooks), so the
        forwards' figure excludes it.
        """
        outer = self._active
        self._sync()
        start = time.perf_counter()
        self._active = name
        try:
            yield
        finally:
            self._sync()
            spent = time.perf_counter() - start
            self._active = outer
            self.seconds[name] = self.seconds.get(name, 0.0) + spent
            if outer is not None:
                self.seconds[outer] -= spent

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 4) for name, value in self.seconds.items()}
