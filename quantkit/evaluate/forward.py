"""One forward pass that returns only the logits a measure reads.

A full [batch, seq, vocab] logits tensor is the largest allocation of an evaluation
(125,696 vocab x 2,048 tokens is 1 GiB per row in float32). Models that accept an integer
`logits_to_keep` (transformers models, our Baichuan2 code) compute the head on the last
positions only; the others return the full tensor and the positions are picked afterwards,
so the results are the same either way. Only the integer form is used: model code written
before the tensor form existed slices with `-logits_to_keep`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.inference_mode()
def positions_logits(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits at `positions` (1-D, same for every row): [batch, len(positions), vocab]."""
    device = model_device(model)
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(device)
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    seq_len = input_ids.shape[1]
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = seq_len - int(positions.min())
    logits = model(input_ids.to(device), **kwargs).logits
    offset = seq_len - logits.shape[1]  # 0 when the model returned every position
    return logits[:, positions.to(logits.device) - offset].float()
