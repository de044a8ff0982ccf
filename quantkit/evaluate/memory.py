"""`quantkit mem`: memory a model holds once loaded, and at peak during one forward pass.

On CUDA the measure is `torch.cuda.memory_allocated` after load, in GiB: that is what
reproduces the Baichuan2 README's memory table (see ANCHORS.md), so the figures compare
with published ones. The peak is `max_memory_allocated` during one plain `model(input_ids)`
of `seq_len` tokens, run as transformers runs it by default (KV cache included).

On CPU there is no allocator counter, so the result holds the resident-set growth of the
process after load and its peak during the forward (sampled every millisecond), plus the
in-memory size of the weights (parameters, buffers and bitsandbytes quantization state),
which is exact and is what `quantkit report` tabulates for CPU results.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantkit.checkpoint import open_checkpoint
from quantkit.errors import ConfigError
from quantkit.evaluate.forward import model_device
from quantkit.evaluate.provenance import (
    RESULT_SCHEMA_VERSION,
    describe_model,
    model_dtype,
    timestamp,
    utc_now,
    versions,
)
from quantkit.loading import check_remote_code, load, resolve_device
from quantkit.validate import context_length, validate_source

log = logging.getLogger(__name__)

GIB = 1024 ** 3
DEFAULT_SEQ_LEN = 1024


@dataclass(frozen=True)
class MemConfig:
    model: Path
    device: str = "auto"
    seq_len: int | None = None  # None: DEFAULT_SEQ_LEN, or the model's context if shorter
    dtype: str | None = None
    trust_remote_code: bool = False


def weights_in_memory_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, plus bitsandbytes quantization state (4-bit
    absmax with its nested quantization, int8 row scales SCB), which lives beside the
    quantized weight rather than in it."""
    total = 0
    seen: set[int] = set()
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += _state_tensors(state)
        if isinstance(getattr(p, "SCB", None), torch.Tensor):
            tensors.append(p.SCB)
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _state_tensors(state) -> list[torch.Tensor]:
    out = []
    for name in ("absmax", "code"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            out.append(value)
    nested = getattr(state, "state2", None)
    return out + (_state_tensors(nested) if nested is not None else [])


def probe_input(model: nn.Module, seq_len: int) -> torch.Tensor:
    """[1, seq_len] token ids drawn with a fixed seed: values do not change memory."""
    vocab = getattr(model.config, "vocab_size", None) or model.get_output_embeddings().out_features
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, seq_len), generator=generator)


@torch.inference_mode()
def _forward(model: nn.Module, ids: torch.Tensor) -> None:
    model(ids.to(model_device(model)))


def measure_cuda(cfg: MemConfig, device: str) -> tuple[nn.Module, dict]:
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    model = load(cfg.model, device=device, dtype=cfg.dtype,
                 trust_remote_code=cfg.trust_remote_code, validate=False)
    torch.cuda.synchronize(device)
    load_seconds = time.perf_counter() - start
    after_load = torch.cuda.memory_allocated(device) - baseline
    peak_load = torch.cuda.max_memory_allocated(device) - baseline
    reserved = torch.cuda.memory_reserved(device)
    ids = probe_input(model, cfg.seq_len)
    torch.cuda.reset_peak_memory_stats(device)
    _forward(model, ids)
    torch.cuda.synchronize(device)
    peak_forward = torch.cuda.max_memory_allocated(device) - baseline
    return model, {
        "device": "cuda",
        "gpu": torch.cuda.get_device_name(device),
        "allocated_after_load_gib": after_load / GIB,
        "peak_during_load_gib": peak_load / GIB,
        "reserved_after_load_gib": reserved / GIB,
        "peak_forward_gib": peak_forward / GIB,
        "load_seconds": load_seconds,
    }


class RssSampler:
    """Highest resident set size seen while the block runs (polled every `interval` s)."""

    def __init__(self, interval: float = 0.001):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, self._process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure_cpu(cfg: MemConfig) -> tuple[nn.Module, dict]:
    gc.collect()
    before = rss()
    start = time.perf_counter()
    model = load(cfg.model, device="cpu", dtype=cfg.dtype,
                 trust_remote_code=cfg.trust_remote_code, validate=False)
    load_seconds = time.perf_counter() - start
    gc.collect()
    after_load = rss() - before
    ids = probe_input(model, cfg.seq_len)
    with RssSampler() as sampler:
        _forward(model, ids)
    return model, {
        "device": "cpu",
        "rss_after_load_gib": after_load / GIB,
        "peak_rss_forward_gib": (sampler.peak - before) / GIB,
        "load_seconds": load_seconds,
    }


def measure_memory(cfg: MemConfig) -> dict:
    """The mem result JSON for `cfg.model` (see README: `quantkit mem`)."""
    if cfg.seq_len is not None and cfg.seq_len < 1:
        raise ConfigError(f"--seq-len {cfg.seq_len}: must be at least 1")
    ckpt = open_checkpoint(cfg.model)  # a broken folder fails here, before memory is counted
    limit = context_length(ckpt.config)
    if cfg.seq_len is None:
        cfg = dataclasses.replace(cfg, seq_len=min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN))
    elif limit is not None and cfg.seq_len > limit:
        raise ConfigError(f"--seq-len {cfg.seq_len}: longer than the context of {ckpt.path} "
                          f"({limit} tokens); pass --seq-len {limit} or less")
    # Validation reads every tensor: done before the baseline, so it is not measured.
    check_remote_code(ckpt.path, ckpt.config, cfg.trust_remote_code)
    validate_source(ckpt, trust_remote_code=cfg.trust_remote_code)
    started, t0 = utc_now(), time.perf_counter()
    device = resolve_device(cfg.device)
    if device.startswith("cuda"):
        model, results = measure_cuda(cfg, device)
    else:
        model, results = measure_cpu(cfg)
    results["weights_in_memory_gib"] = weights_in_memory_bytes(model) / GIB
    info = describe_model(cfg.model, loaded_dtype=model_dtype(model))
    results.update(bytes_on_disk=info["bytes_on_disk"], weight_bytes=info["weight_bytes"])
    return {
        "kind": "mem",
        "schema_version": RESULT_SCHEMA_VERSION,
        "model": info,
        "settings": {"device": device, "seq_len": cfg.seq_len, "dtype": cfg.dtype,
                     "forward": "model(input_ids), default settings (KV cache on)"},
        "results": results,
        "versions": versions(),
        "started": timestamp(started),
        "finished": timestamp(utc_now()),
        "seconds": round(time.perf_counter() - t0, 3),
    }
