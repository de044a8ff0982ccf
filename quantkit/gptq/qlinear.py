"""Run GPTQ checkpoints (ours or another tool's) with no package beyond torch.

`QuantLinear` keeps the checkpoint's packed tensors as they are and dequantizes on the fly
in each forward, so eval and memory measurement work on any machine. On CUDA, 4-bit layers
whose groups fit PyTorch's built-in int4 kernel (tinygemm: group 32-256) are repacked for
it once at load, checked against the dequantizing path, and run through it.

`load_gptq_model` builds the model skeleton without allocating its weights, swaps every
Linear the checkpoint quantized (the modules with a `qweight`) for a `QuantLinear`, and
assigns the stored tensors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from quantkit.checkpoint import Checkpoint
from quantkit.errors import CheckpointError
from quantkit.gptq.algorithm import SUPPORTED_BITS
from quantkit.gptq.naming import key_renamer
from quantkit.gptq.pack import FORMATS, PackedLinear, unpack_rows, unpack_weight, unpack_zeros

log = logging.getLogger(__name__)

_INT4_GROUPS = (32, 64, 128, 256)
_INT4_CHECK_TOLERANCE = 2e-2  # bf16 scales in tinygemm vs float16 in the checkpoint


class QuantLinear(nn.Module):
    """A Linear stored in the GPTQ layout; `forward` computes x @ W^T + b like nn.Linear."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int,
                 bias: bool, zero_offset: int = 1, dtype: torch.dtype = torch.float16,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.zero_offset = bits, zero_offset
        self.group_size = in_features if group_size == -1 else group_size
        groups = math.ceil(in_features / self.group_size)
        self.register_buffer("qweight", torch.empty(
            (in_features * bits // 32, out_features), dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(
            (groups, out_features * bits // 32), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty((groups, out_features), dtype=torch.float16,
                                                   device=device))
        self.register_buffer("g_idx", (torch.arange(in_features, device=device)
                                       // self.group_size).int())
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device)
                             if bias else None)
        self._int4: dict | None = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, "
                f"int4_kernel={self._int4 is not None}")

    def packed(self) -> PackedLinear:
        return PackedLinear(self.qweight, self.qzeros, self.scales, self.g_idx)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight `[out, in]` this layer stands for."""
        return unpack_weight(self.packed(), self.bits, self.zero_offset, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._int4 is not None:
            return self._int4_forward(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize(x.dtype), bias)

    # ----------------------------------------------------------------- int4 kernels

    def int4_layout(self) -> dict | None:
        """Codes, grid and input permutation for tinygemm, or None where it cannot run.

        tinygemm computes (q - 8) * scale + zero per group of consecutive inputs. GPTQ's
        (q - z) * scale is that with zero = (8 - z) * scale; act-order groups become
        consecutive once the inputs are sorted by group.
        """
        if self.bits != 4 or self.group_size not in _INT4_GROUPS or self.out_features % 8 \
                or self.in_features % 128:
            return None
        g_idx = self.g_idx.long()
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(self.in_features, device=g_idx.device)
                           // self.group_size):
            return None  # groups of unequal size: no contiguous layout exists
        codes = unpack_rows(self.qweight, 4).T[:, perm].contiguous()  # [out, in]
        zeros = unpack_zeros(self.qzeros, 4, self.zero_offset).float()  # [groups, out]
        scales = self.scales.float()
        scales_and_zeros = torch.stack([scales, (8 - zeros) * scales], dim=-1)
        identity = torch.equal(perm, torch.arange(self.in_features, device=perm.device))
        return {"codes": codes, "scales_and_zeros": scales_and_zeros.to(torch.bfloat16),
                "perm": None if identity else perm}

    def enable_int4_kernel(self) -> bool:
        """Repack for PyTorch's int4 kernel if the layout allows and it matches dequantizing
        on a probe input; returns whether it is in use."""
        layout = self.int4_layout()
        if layout is None:
            return False
        device_type = self.qweight.device.type
        try:
            packed = _int4_pack(layout["codes"], device_type)
        except (RuntimeError, NotImplementedError) as exc:
            log.debug("int4 kernel unavailable: %s", exc)
            return False
        self._int4 = {"packed": packed, "scales_and_zeros": layout["scales_and_zeros"],
                      "perm": layout["perm"], "device_type": device_type}
        probe = torch.randn(4, self.in_features, generator=torch.Generator().manual_seed(0))
        probe = probe.to(self.qweight.device, torch.bfloat16)
        try:
            fast = self._int4_forward(probe).float()
        except (RuntimeError, NotImplementedError) as exc:
            log.debug("int4 kernel failed: %s", exc)
            self._int4 = None
            return False
        slow = F.linear(probe.float(), self.dequantize(torch.float32),
                        self.bias.float() if self.bias is not None else None)
        if float((fast - slow).norm() / slow.norm().clamp_min(1e-12)) > _INT4_CHECK_TOLERANCE:
            log.warning("PyTorch's int4 kernel disagrees with dequantization; not using it")
            self._int4 = None
            return False
        return True

    def _int4_forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._int4
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if state["perm"] is not None:
            x2 = x2[:, state["perm"]]
        mm = (torch.ops.aten._weight_int4pack_mm if state["device_type"] == "cuda"
              else torch.ops.aten._weight_int4pack_mm_for_cpu)
        out = mm(x2.contiguous(), state["packed"], self.group_size, state["scales_and_zeros"])
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)


def _int4_pack(codes: torch.Tensor, device_type: str) -> torch.Tensor:
    """Codes `[out, in]` in tinygemm's tiled layout (CUDA takes two codes per byte)."""
    if device_type == "cuda":
        as_bytes = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(as_bytes, 8)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


# --------------------------------------------------------------------------- loading


def gptq_settings(ckpt: Checkpoint) -> dict:
    """bits, group size and zero offset from `quantization_config` (or quantize_config.json)."""
    qcfg = dict(ckpt.quantization_config or {})
    extra = ckpt.path / "quantize_config.json"
    if extra.is_file():
        from quantkit.checkpoint import read_json

        qcfg = {**read_json(extra), **qcfg}
    bits = qcfg.get("bits")
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{ckpt.path}: GPTQ bits {bits!r} in quantization_config; "
                              f"quantkit reads {', '.join(map(str, SUPPORTED_BITS))}")
    fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
    if fmt not in FORMATS:
        raise CheckpointError(f"{ckpt.path}: GPTQ checkpoint_format {fmt!r}; quantkit reads "
                              f"{' and '.join(FORMATS)} (repack {fmt} checkpoints with their tool)")
    return {"bits": int(bits), "group_size": int(qcfg.get("group_size", 128)),
            "zero_offset": 1 if fmt == "gptq" else 0, "format": fmt}


def _compute_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_gptq_model(ckpt: Checkpoint, *, device: str = "cpu", trust_remote_code: bool = False,
                    dtype: torch.dtype | str | None = None,
                    int4_kernel: bool | None = None) -> nn.Module:
    """A GPTQ folder as an eval-mode transformers model whose quantized Linears are ours.

    `dtype` is what the unquantized tensors and activations use (default: config.json's).
    `int4_kernel` None means: on CUDA where the layout allows, never on CPU.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = gptq_settings(ckpt)
    config = AutoConfig.from_pretrained(ckpt.path, trust_remote_code=trust_remote_code)
    if not isinstance(dtype, torch.dtype):
        dtype = _compute_dtype(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 dtype=dtype)
    rename = key_renamer(model)
    names = sorted(rename(name).rpartition(".")[0] for name in ckpt.tensor_names()
                   if name.endswith(".qweight"))
    if not names:
        raise CheckpointError(f"{ckpt.path}: quant_method is gptq but no tensor ends in "
                              ".qweight; the checkpoint is incomplete")
    for name in names:
        linear = model.get_submodule(name) if _has_module(model, name) else None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{ckpt.path}: {name}.qweight names no Linear module of "
                                  f"{type(model).__name__}")
        _set_module(model, name, QuantLinear(
            linear.in_features, linear.out_features, bits=settings["bits"],
            group_size=settings["group_size"], bias=linear.bias is not None,
            zero_offset=settings["zero_offset"], dtype=dtype, device="meta"))
    _assign_tensors(model, ckpt, set(names), dtype, rename)
    model.to(device)
    if int4_kernel or (int4_kernel is None and device.startswith("cuda")):
        used = sum(m.enable_int4_kernel() for m in model.modules() if isinstance(m, QuantLinear))
        log.info("PyTorch int4 kernel on %d of %d quantized layers", used, len(names))
    return model.eval()


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _assign_tensors(model: nn.Module, ckpt: Checkpoint, quantized: set[str],
                    dtype: torch.dtype, rename: Callable[[str], str]) -> None:
    """Load every stored tensor into the skeleton, shard by shard; check nothing is left."""
    expected = model.state_dict(keep_vars=True)
    for _, tensors in ckpt.iter_shards():
        state = {}
        for stored_name, tensor in tensors.items():
            name = rename(stored_name)
            if name not in expected:
                log.debug("ignoring checkpoint tensor %s: no such parameter", name)
                continue
            target = expected[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(f"{ckpt.path}: tensor {name} has shape "
                                      f"{tuple(tensor.shape)}, the model expects "
                                      f"{tuple(target.shape)}")
            module = name.rpartition(".")[0]
            if module in quantized and name.endswith(".bias"):
                tensor = tensor.to(dtype)
            elif target.is_floating_point() and tensor.is_floating_point():
                tensor = tensor.to(target.dtype)
            state[name] = tensor
        model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.g_idx.is_meta:
            # Early GPTQ checkpoints have no g_idx: groups are consecutive inputs.
            module.g_idx = (torch.arange(module.in_features) // module.group_size).int()
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise CheckpointError(f"{ckpt.path}: no stored tensor for {left[0]}"
                              + (f" and {len(left) - 1} more" if len(left) > 1 else ""))
