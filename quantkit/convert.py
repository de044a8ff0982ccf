"""Baichuan2 -> Baichuan-1 conversion: normalize the NormHead `lm_head` once, offline.

Baichuan2's remote code wraps `lm_head` in a NormHead that L2-normalizes each row of the
weight at run time. Tools written for Baichuan-1 (a plain Linear head) produce wrong logits
on a Baichuan2 checkpoint unless those rows are normalized first — the migration step the
Baichuan2 README describes as a hand-edited `torch.load` script. Normalizing is idempotent,
so the converted checkpoint still runs unchanged under the Baichuan2 code too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from quantkit.checkpoint import check_destination, open_checkpoint, parse_size, write_checkpoint
from quantkit.describe import UNIT_NORM_TOLERANCE, lm_head_row_norm_deviation
from quantkit.errors import CheckpointError, ConfigError
from quantkit.families import is_baichuan2
from quantkit.validate import validate_source

log = logging.getLogger(__name__)

LM_HEAD = "lm_head.weight"
CONVERTED_MARK = "quantkit_conversion"  # key added to config.json
CONVERSION_NAME = "baichuan2-to-1"


@dataclass(frozen=True)
class ConvertConfig:
    source: Path
    dest: Path
    bin_format: bool = False
    force: bool = False
    max_shard_size: str = "5GB"


@dataclass
class ConvertResult:
    dest: Path | None  # None when there was nothing to do
    deviation_before: float
    message: str


def normalize_rows(weight: torch.Tensor) -> torch.Tensor:
    """L2-normalize each row in float32 (as NormHead does), then back to the source dtype."""
    return F.normalize(weight.float(), dim=-1).to(weight.dtype)


def _converted_tensors(ckpt) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor unchanged except lm_head; streamed one shard at a time."""
    for name, tensor in ckpt.iter_tensors():
        yield name, normalize_rows(tensor) if name == LM_HEAD else tensor


def baichuan2_to_1(cfg: ConvertConfig) -> ConvertResult:
    """Write a copy of `cfg.source` whose lm_head rows are unit-norm."""
    ckpt = open_checkpoint(cfg.source)
    if ckpt.config.get(CONVERTED_MARK) == CONVERSION_NAME:
        return ConvertResult(None, 0.0, f"{ckpt.path}: already converted by quantkit "
                                        "(lm_head normalized); nothing to do")
    if ckpt.quantization_config:
        raise ConfigError(f"{ckpt.path}: is quantized; convert the BF16 checkpoint before "
                          "quantizing it")
    if not is_baichuan2(ckpt.path, ckpt.config) and not cfg.force:
        raise ConfigError(
            f"{ckpt.path}: not a Baichuan2 checkpoint (model_type "
            f"{ckpt.model_type or '?'}, no NormHead in modeling_*.py), so its lm_head is used "
            "as stored; pass --force to normalize lm_head rows anyway"
        )
    if LM_HEAD not in ckpt.weight_map:
        raise CheckpointError(f"{ckpt.path}: has no {LM_HEAD} tensor to normalize "
                              "(tied embeddings?)")
    check_destination(Path(cfg.dest), source=ckpt.path, force=cfg.force, flag="DEST")
    parse_size(cfg.max_shard_size)
    validate_source(ckpt, trust_remote_code=False, copies_files=True, build_model=False)
    deviation = lm_head_row_norm_deviation(ckpt.get_tensor(LM_HEAD))
    if deviation < UNIT_NORM_TOLERANCE and not cfg.force:
        return ConvertResult(None, deviation, f"{ckpt.path}: lm_head rows are already unit-norm "
                                              f"(max |norm-1| = {deviation:.2e}); nothing to do")
    ckpt.release()
    config = dict(ckpt.config, **{CONVERTED_MARK: CONVERSION_NAME})
    dest = write_checkpoint(
        cfg.dest, _converted_tensors(ckpt), source=ckpt, config=config, force=cfg.force,
        max_shard_size=cfg.max_shard_size, weight_format="bin" if cfg.bin_format else
        "safetensors", flag="DEST",
        manifest_extra={"conversion": {
            "name": CONVERSION_NAME,
            "changed_tensors": [LM_HEAD],
            "lm_head_max_row_norm_deviation_before": deviation,
        }},
    )
    return ConvertResult(Path(dest), deviation,
                         f"wrote {dest} (lm_head rows normalized; max |norm-1| was "
                         f"{deviation:.4f})")


def convert(kind: str, source: str | os.PathLike, dest: str | os.PathLike, **options
            ) -> ConvertResult:
    """Entry point shared by the CLI and recipes."""
    if kind != CONVERSION_NAME:
        raise ConfigError(f"conversion {kind!r} is unknown; available: {CONVERSION_NAME}")
    return baichuan2_to_1(ConvertConfig(Path(source), Path(dest), **options))
