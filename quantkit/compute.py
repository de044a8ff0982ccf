"""The dtype arithmetic runs in, apart from the dtype weights are stored in.

Checkpoints are stored in bf16, but bf16 arithmetic is only fast where the hardware has
it: GPUs, and CPUs with AVX512-BF16 or AMX. A CPU without them emulates every bf16
matmul (measured 16.7 GFLOPS in bf16 against 77.9 in fp32 on one such 2-core machine)
and rounds every activation to 8 mantissa bits on top. There, calibration forwards and
evaluation compute in fp32 while the weights stay bf16 in host memory: `upcast_module`
and `computing_in` convert one module's parameters for the length of its forward and
put the stored values back after (bf16 -> fp32 -> bf16 is exact), so memory stays what
the checkpoint needs plus one layer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

COMPUTE_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16,
                  "fp16": torch.float16}


# oneDNN ISA caps below the first with bf16 dot products: with ONEDNN_MAX_CPU_ISA set to
# one of them, torch's CPU matmuls emulate bf16 even on hardware that has it (measured on
# an AVX512-BF16 EPYC, 1 thread: bf16 197 -> 18 GFLOPS at AVX2, fp32 82 either way).
_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                      "AVX512_CORE_VNNI"}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 in hardware, and oneDNN may use it."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ISAS_WITHOUT_BF16:
        return False
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except RuntimeError:
                continue
    return False


def compute_dtype(device: str | torch.device, stored: torch.dtype,
                  requested: str = "auto") -> torch.dtype:
    """What forwards on `device` compute in for weights stored as `stored`.

    On CUDA the stored half precision (GPTQ keeps its Hessians in fp32 regardless). On a
    CPU, fp32 unless the CPU has native bf16 and the weights are bf16; fp16 is always
    emulated on CPUs.
    """
    if requested not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {requested!r}: choose one of {sorted(COMPUTE_DTYPES)}")
    if COMPUTE_DTYPES[requested] is not None:
        return COMPUTE_DTYPES[requested]
    if not stored.is_floating_point or stored == torch.float32:
        return torch.float32
    if torch.device(device).type == "cpu":
        if stored == torch.bfloat16 and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return stored


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def stored_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most floating-point parameters are stored in."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _cast_floats(obj, dtype: torch.dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast_floats(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def _swap_params(module: nn.Module, dtype: torch.dtype) -> list[tuple[nn.Parameter, torch.dtype]]:
    """Convert `module`'s own floating parameters to `dtype`; returns what to restore."""
    changed = []
    for p in module._parameters.values():
        if p is not None and p.is_floating_point() and p.dtype != dtype:
            changed.append((p, p.dtype))
            p.data = p.data.to(dtype)
    return changed


@contextlib.contextmanager
def computing_in(model: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """Every forward inside computes in `dtype`, one module's parameters at a time.

    Modules owning parameters convert them (and their floating inputs) on entry and
    restore them on exit; tied parameters are one object, so they are converted once per
    use. Nothing changes when the model is already stored in `dtype`.
    """
    if stored_dtype(model) == dtype and all(
            p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        yield model
        return
    handles = []
    saved: dict[int, list] = {}

    def before(module, args, kwargs):
        saved[id(module)] = _swap_params(module, dtype)
        return _cast_floats(args, dtype), _cast_floats(kwargs, dtype)

    def after(module, args, kwargs, output):
        for p, original in saved.pop(id(module), []):
            p.data = p.data.to(original)
        return output

    for module in model.modules():
        if any(p is not None and p.is_floating_point() for p in module._parameters.values()):
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True,
                                                        always_call=True))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for changed in saved.values():  # a forward interrupted by an exception
            for p, original in changed:
                p.data = p.data.to(original)
