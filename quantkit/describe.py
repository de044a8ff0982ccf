"""What a checkpoint is, read from its files alone (no model is built, no code is run).

`quantkit inspect` answers the questions users otherwise answer with ad-hoc scripts:
which family, how big, which dtypes, is it quantized and how, does it need remote code,
and for Baichuan2 whether the NormHead `lm_head` is already normalized.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from quantkit.checkpoint import Checkpoint, folder_size
from quantkit.families import family_for, is_alibi_baichuan, is_baichuan2

# bf16 keeps 8 bits of mantissa: a normalized row's norm is 1 within a few 1e-3.
UNIT_NORM_TOLERANCE = 1e-2


@dataclass
class Description:
    path: str
    model_type: str
    architectures: list[str]
    family: str | None
    parameters: int
    dtypes: dict[str, int]  # dtype -> number of tensors
    shards: dict[str, int]  # file -> bytes
    bytes_on_disk: int
    tied_embeddings: bool
    lm_head_missing: bool
    remote_code: list[str]
    quantization: dict = field(default_factory=dict)
    baichuan2: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def lm_head_row_norm_deviation(weight: torch.Tensor) -> float:
    """Largest |‖row‖ - 1| over the rows of a head matrix, computed in float32."""
    norms = weight.float().norm(dim=-1)
    return float((norms - 1).abs().max())


def describe_quantization(ckpt: Checkpoint) -> dict:
    """none, gptq with its settings, or bitsandbytes with its mode."""
    qc = ckpt.quantization_config
    if not qc:
        return {"method": "none"}
    method = qc.get("quant_method", "unknown")
    if method == "gptq":
        keys = ("bits", "group_size", "sym", "desc_act", "static_groups", "true_sequential",
                "damp_percent", "checkpoint_format")
        return {"method": "gptq", **{k: qc[k] for k in keys if k in qc}}
    if method == "bitsandbytes":
        if qc.get("load_in_4bit"):
            return {"method": "bitsandbytes", "mode": qc.get("bnb_4bit_quant_type", "fp4"),
                    "double_quant": qc.get("bnb_4bit_use_double_quant", False),
                    "compute_dtype": qc.get("bnb_4bit_compute_dtype")}
        return {"method": "bitsandbytes", "mode": "int8"}
    return {"method": method}


# Quantization side tensors (GPTQ zeros/scales/g_idx, bitsandbytes absmax/quant_map/SCB...)
# hold no parameters of the original model.
_SIDE_TENSOR_MARKERS = (".qzeros", ".scales", ".g_idx", ".absmax", ".quant_map", ".quant_state",
                        ".nested_", ".SCB", ".weight_format")


def _logical_parameter_count(ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]]) -> int:
    """Parameters of the original model, counting packed weights as the values they hold."""
    bits = (ckpt.quantization_config or {}).get("bits")
    names = set(shapes)
    total = 0
    for name, shape in shapes.items():
        if any(marker in name for marker in _SIDE_TENSOR_MARKERS):
            continue
        count = 1
        for dim in shape:
            count *= dim
        if name.endswith(".qweight") and bits:
            count = count * 32 // bits  # int32 words of `bits`-wide values
        elif any(n.startswith(f"{name}.quant_state.bitsandbytes__") for n in names):
            count *= 2  # bitsandbytes 4-bit: two values per uint8
        total += count
    return total


def describe(ckpt: Checkpoint) -> Description:
    shapes, dtypes = {}, Counter()
    for name in ckpt.tensor_names():
        dtype, shape = ckpt.tensor_meta(name)
        shapes[name] = shape
        dtypes[str(dtype).removeprefix("torch.")] += 1
    family = family_for(ckpt.config)
    names = set(shapes)
    # Tied only when the config says so: a head absent without it is a missing tensor.
    head = f"{family.lm_head}.weight" if family else None
    tied = ckpt.config.get("tie_word_embeddings") is True
    head_missing = (family is not None and not tied and head not in names
                    and not ckpt.quantization_config)
    baichuan2 = None
    if is_baichuan2(ckpt.path, ckpt.config) and "lm_head.weight" in names:
        deviation = lm_head_row_norm_deviation(ckpt.get_tensor("lm_head.weight"))
        baichuan2 = {
            "layout": "13B (ALiBi)" if is_alibi_baichuan(ckpt.config) else "7B (RoPE)",
            "lm_head_max_row_norm_deviation": deviation,
            "lm_head_unit_norm": deviation < UNIT_NORM_TOLERANCE,
        }
    ckpt.release()
    return Description(
        path=str(ckpt.path),
        model_type=ckpt.model_type,
        architectures=ckpt.architectures,
        family=family.name if family else None,
        parameters=_logical_parameter_count(ckpt, shapes),
        dtypes=dict(dtypes),
        shards={f: (ckpt.path / f).stat().st_size for f in ckpt.weight_files},
        bytes_on_disk=folder_size(ckpt.path),
        tied_embeddings=tied,
        lm_head_missing=head_missing,
        remote_code=ckpt.remote_code_files if ckpt.has_remote_code else [],
        quantization=describe_quantization(ckpt),
        baichuan2=baichuan2,
    )


def format_description(d: Description) -> str:
    """Human-readable lines for the terminal."""
    def size(n: int) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"

    quant = ", ".join(f"{k}={v}" for k, v in d.quantization.items())
    lines = [
        f"path:            {d.path}",
        f"architecture:    {', '.join(d.architectures) or '?'} (model_type {d.model_type})",
        f"family:          {d.family or 'unknown to quantkit'}",
        f"parameters:      {d.parameters:,} ({d.parameters / 1e6:.1f} M)",
        f"dtypes:          {', '.join(f'{k} x{v}' for k, v in sorted(d.dtypes.items()))}",
        f"on disk:         {size(d.bytes_on_disk)} in {len(d.shards)} weight file(s)",
        *[f"  {name}: {size(n)}" for name, n in d.shards.items()],
        f"tied embeddings: {'yes' if d.tied_embeddings else 'no'}"
        + (" (and lm_head.weight is MISSING: the checkpoint is incomplete)"
           if d.lm_head_missing else ""),
        f"remote code:     {', '.join(d.remote_code) if d.remote_code else 'none'}",
        f"quantization:    {quant}",
    ]
    if d.baichuan2:
        b = d.baichuan2
        state = "unit-norm (converted)" if b["lm_head_unit_norm"] else "not normalized (NormHead)"
        lines.append(f"baichuan2:       {b['layout']}, lm_head rows {state}, "
                     f"max |norm-1| = {b['lm_head_max_row_norm_deviation']:.4f}")
    return "\n".join(lines)
