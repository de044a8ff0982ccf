"""Perplexity over a long token stream with a sliding window.

The standard strided method (Hugging Face "Perplexity of fixed-length models"): windows of
`seqlen` tokens start every `stride` tokens, and each window scores only the tokens no
earlier window scored, so every token from the second on is predicted exactly once, with
up to `seqlen - stride` tokens of context carried over. `stride == seqlen` gives the
non-overlapping chunks of the GPTQ paper's wikitext2 figures. The first token of the
stream (and, with `stride == seqlen`, of each chunk) has no context and is not scored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import CalibrationError, ConfigError
from quantkit.evaluate.forward import positions_logits


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go in; tokens [first_target, end) are scored."""

    begin: int
    end: int
    first_target: int

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def n_targets(self) -> int:
        return self.end - self.first_target


def sliding_windows(n_tokens: int, seqlen: int, stride: int) -> list[Window]:
    if seqlen < 2:
        raise ConfigError(f"--seqlen {seqlen}: a window needs at least 2 tokens")
    if not 1 <= stride <= seqlen:
        raise ConfigError(f"--stride {stride}: choose 1 to --seqlen ({seqlen})")
    if n_tokens < 2:
        raise CalibrationError(f"held-out text has {n_tokens} token(s); perplexity needs 2 or more")
    windows, scored_until = [], 1  # token 0 has no context
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + seqlen, n_tokens)
        first = max(scored_until, begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
            scored_until = end
        if end == n_tokens:
            break
    return windows


def batch_windows(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Batches of windows with the same shape, so no padding is needed; order is fixed."""
    groups: dict[tuple[int, int], list[Window]] = {}
    for w in windows:
        groups.setdefault((w.length, w.n_targets), []).append(w)
    return [group[i:i + batch_size] for group in groups.values()
            for i in range(0, len(group), batch_size)]


def window_logits(model: nn.Module, ids: torch.Tensor, batch: list[Window]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits predicting the scored tokens [B, T, V], those tokens [B, T])."""
    inputs = torch.stack([ids[w.begin:w.end] for w in batch])
    w0 = batch[0]
    # The logit at position p predicts token p + 1.
    positions = torch.arange(w0.first_target - 1, w0.end - 1) - w0.begin
    targets = torch.stack([ids[w.first_target:w.end] for w in batch])
    return positions_logits(model, inputs, positions), targets


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per position, from a float32 log-softmax."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.to(logp.device).unsqueeze(-1)).squeeze(-1)


@dataclass
class NllTotal:
    """Running sum of token NLLs; perplexity = exp(mean NLL)."""

    nll_sum: float = 0.0
    tokens: int = 0

    def add(self, nll: torch.Tensor) -> None:
        self.nll_sum += float(nll.double().sum())
        self.tokens += nll.numel()

    def summary(self) -> dict:
        mean = self.nll_sum / self.tokens
        return {"ppl": math.exp(mean), "nll": mean, "tokens": self.tokens}


def iter_batches(ids: torch.Tensor, seqlen: int, stride: int, batch_size: int
                 ) -> Iterator[list[Window]]:
    yield from batch_windows(sliding_windows(ids.numel(), seqlen, stride), batch_size)


def perplexity(model: nn.Module, ids: torch.Tensor, *, seqlen: int, stride: int,
               batch_size: int = 1) -> dict:
    """{"ppl", "nll", "tokens"} of `model` on the 1-D token tensor `ids`."""
    total = NllTotal()
    for batch in iter_batches(ids, seqlen, stride, batch_size):
        logits, targets = window_logits(model, ids, batch)
        total.add(token_nll(logits, targets))
    return total.summary()
