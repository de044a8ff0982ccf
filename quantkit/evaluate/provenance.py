"""What a result was measured on: model, precision, sizes, library versions, time.

Every eval and mem JSON carries this block so that `quantkit report` (or a reader a year
later) can tell which row is the base model and what each quantized row is, from the file
alone.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

import torch

from quantkit.checkpoint import atomic_file, folder_size, open_checkpoint

RESULT_SCHEMA_VERSION = 1

_DTYPE_LABELS = {"bfloat16": "BF16", "float16": "FP16", "float32": "FP32"}


def precision_label(quantization_config: dict | None, dtype: str | None = None) -> str:
    """'GPTQ 4-bit g128', 'NF4', 'int8', or the unquantized dtype ('BF16')."""
    qc = quantization_config or {}
    method = qc.get("quant_method")
    if method == "gptq":
        method = "RTN" if (qc.get("meta") or {}).get("method") == "rtn" else "GPTQ"
        label = f"{method} {qc.get('bits')}-bit"
        if qc.get("group_size") not in (None, -1):
            label += f" g{qc['group_size']}"
        return label + (" act-order" if qc.get("desc_act") else "")
    if method == "bitsandbytes":
        if qc.get("load_in_4bit"):
            return str(qc.get("bnb_4bit_quant_type", "fp4")).upper()
        return "int8"
    if method:
        return str(method)
    name = str(dtype or "bfloat16").replace("torch.", "")
    return _DTYPE_LABELS.get(name, name)


def model_dtype(model: torch.nn.Module) -> str:
    """The dtype most floating-point parameters are stored in (what was actually measured)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:
        return "unknown"
    return str(max(counts, key=counts.get)).replace("torch.", "")


def describe_model(path: str | os.PathLike, *, loaded_dtype: str | None = None) -> dict:
    """Path, precision, quantization settings and bytes on disk of a checkpoint folder."""
    ckpt = open_checkpoint(path)
    qc = ckpt.quantization_config
    stored = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    return {
        "path": str(ckpt.path.absolute()),
        "name": ckpt.path.absolute().name,
        "model_type": ckpt.model_type,
        "precision": precision_label(qc, loaded_dtype or stored),
        "quantized": bool(qc),
        "quantization_config": qc,
        "stored_dtype": stored,
        "loaded_dtype": loaded_dtype,
        "bytes_on_disk": folder_size(ckpt.path),
        "weight_bytes": sum((ckpt.path / f).stat().st_size for f in ckpt.weight_files),
    }


def versions() -> dict:
    from importlib import metadata

    from quantkit import __version__

    out = {"quantkit": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for package in ("transformers", "bitsandbytes", "accelerate"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def timestamp(moment: _dt.datetime) -> str:
    return moment.isoformat(timespec="seconds")


def write_result(path: str | os.PathLike, result: dict, inputs=()) -> Path:
    """Write a result JSON atomically: a crash or Ctrl-C never leaves half a file; it never
    lands on or inside one of `inputs` (the measured model folders, the text)."""
    with atomic_file(path, inputs=inputs) as tmp:
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(path)
