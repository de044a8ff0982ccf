"""KL divergence of a quantized model's next-token distribution from its base model's.

Perplexity only sees the probability of the one true token; KL(base || quantized) sees the
whole distribution at every position, so it separates quantizations whose perplexities
tie (llama.cpp's `--kl-divergence`). Reported: the mean over tokens, its 99th percentile
(the rare positions where quantization breaks the model), and the share of positions whose
most likely token did not change. Computed in float32 from log-softmax, so a model
compared with itself gives exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def kl_per_token(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum_v p_base(v) * (log p_base(v) - log p(v)) for each position (last dim = vocab)."""
    base_logp = F.log_softmax(base_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float().to(base_logp.device), dim=-1)
    return (base_logp.exp() * (base_logp - logp)).sum(-1)


def same_top1(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return base_logits.argmax(-1) == logits.argmax(-1).to(base_logits.device)


@dataclass
class KldTotal:
    """Per-token KL values (kept for the percentile) and top-1 agreement counts."""

    values: list[torch.Tensor] = field(default_factory=list)
    same: int = 0

    def add(self, base_logits: torch.Tensor, logits: torch.Tensor) -> None:
        self.values.append(kl_per_token(base_logits, logits).flatten().cpu())
        self.same += int(same_top1(base_logits, logits).sum())

    def merged(self, other: KldTotal) -> KldTotal:
        return KldTotal(self.values + other.values, self.same + other.same)

    def summary(self) -> dict:
        kl = torch.cat(self.values).double().sort().values
        return {
            "mean": float(kl.mean()),
            "median": quantile(kl, 0.5),
            "p99": quantile(kl, 0.99),
            "max": float(kl[-1]),
            "same_top1": self.same / kl.numel(),
            "tokens": kl.numel(),
        }


def quantile(sorted_values: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile of sorted values (torch.quantile refuses > 16M values)."""
    pos = q * (sorted_values.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, sorted_values.numel() - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))
