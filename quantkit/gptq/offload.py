"""Calibration activations kept in host memory, moved to the GPU one batch at a time.

With `--max-gpu-memory` too small for every calibration token's hidden state, the layer
inputs and outputs stay in (pinned) host memory. The copy of batch i+1 to the GPU runs on
a side stream while batch i computes, and each output goes back to the host on another
stream while the next batch computes, so the PCIe traffic hides behind the layer's
forward instead of adding to it. Without CUDA this is a plain `.to(device)`.
"""

from __future__ import annotations

import torch


class HostBatches:
    """Feeds a layer's host-resident input batches to `device`, one batch ahead."""

    def __init__(self, hidden: list[torch.Tensor], device: str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:  # pinned pages are what make non_blocking host<->device copies async
            hidden = [h if h.is_pinned() else h.pin_memory() for h in hidden]
            self.copy_in = torch.cuda.Stream(self.device)
            self.copy_out = torch.cuda.Stream(self.device)
        self.hidden = hidden
        self._ahead: tuple[int, torch.Tensor, torch.cuda.Event] | None = None

    def _start_copy(self, i: int) -> tuple[int, torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(self.copy_in):
            tensor = self.hidden[i].to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_in)
        return i, tensor, done

    def get(self, i: int) -> torch.Tensor:
        """Batch i on the device; starts copying batch i+1 behind it."""
        if not self.cuda:
            return self.hidden[i].to(self.device)
        ahead = self._ahead if self._ahead is not None and self._ahead[0] == i else None
        _, tensor, done = ahead or self._start_copy(i)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        tensor.record_stream(compute)  # allocated on copy_in, used on the compute stream
        self._ahead = self._start_copy(i + 1) if i + 1 < len(self.hidden) else None
        return tensor

    def to_host(self, output: torch.Tensor) -> torch.Tensor:
        """Copy a layer output back to pinned host memory without waiting for it."""
        if not self.cuda:
            return output.to("cpu")
        host = torch.empty(output.shape, dtype=output.dtype, pin_memory=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_out):
            self.copy_out.wait_event(ready)
            host.copy_(output, non_blocking=True)
        output.record_stream(self.copy_out)
        return host

    def wait(self) -> None:
        """Every `to_host` copy has landed (before the outputs are read)."""
        if self.cuda:
            self.copy_out.synchronize()
