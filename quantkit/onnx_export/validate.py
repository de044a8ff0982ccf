"""Run the exported graph in ONNX Runtime and compare its logits with the PyTorch model's.

The gate is the largest absolute logit difference, relative to the size of the reference
logits. Top-1 agreement is reported but not gated: when every logit is within `tol` of the
reference, two tokens can only swap places if the reference had them within 2 * tol of each
other, a near-tie that says nothing about the export (random test models are full of them).

Tolerances, as a fraction of max(1, max |reference logit|):
- fp32: 1e-3. Both sides compute in float32 and differ only in operation order and kernels
  (4e-7 to 1e-6 on the test models, 4-bit ones included): a thousandfold headroom for deep
  models.
- fp16: 3e-2. The graph computes in float16 (unit roundoff 4.9e-4) against a float32
  reference; rounding accumulates with depth (3e-4 to 6e-4 on the 2- to 4-layer test models).

What a wrong export costs, measured on a 4-layer 4-bit act-order model: one layer's scales 10%
off moves the logits by 7.5e-2 of their size, one lost act-order permutation by 0.8, all zero
points dropped by 1.2 -- every one beyond both tolerances.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from quantkit.onnx_export.graph import INPUT_NAMES, OUTPUT_NAME

TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}


@dataclass(frozen=True)
class Validation:
    """How the ONNX graph's logits compare with the PyTorch model's on the same tokens."""

    sequences: int
    seqlen: int
    max_abs_diff: float
    reference_max_abs: float
    tolerance: float  # absolute: the relative tolerance times max(1, reference_max_abs)
    top1_agreement: float
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def onnx_session(path):
    """A CPU ONNX Runtime session (contrib ops such as MatMulNBits included)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_logits(session, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> np.ndarray:
    """Logits from the graph, as float32 numpy [batch, seq, vocab]."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    feeds = dict(zip(INPUT_NAMES, (input_ids.to(torch.int64).numpy(),
                                   attention_mask.to(torch.int64).numpy()), strict=True))
    return session.run([OUTPUT_NAME], feeds)[0].astype(np.float32)


def compare(reference: np.ndarray, got: np.ndarray, dtype: str) -> Validation:
    """Gate `got` against `reference` with the tolerance for `dtype` (see module doc)."""
    ref_max = float(np.abs(reference).max())
    tolerance = TOLERANCE[dtype] * max(1.0, ref_max)
    finite = bool(np.isfinite(got).all())
    diff = float(np.abs(got - reference).max()) if finite else math.inf
    top1 = float((got.argmax(-1) == reference.argmax(-1)).mean())
    return Validation(sequences=reference.shape[0], seqlen=reference.shape[1],
                      max_abs_diff=diff, reference_max_abs=ref_max, tolerance=tolerance,
                      top1_agreement=top1, passed=finite and diff <= tolerance)
