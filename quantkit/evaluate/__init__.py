"""Measure what quantization cost: perplexity, KL divergence, multiple-choice accuracy, memory.

Each measure is a module of plain functions on a loaded model and token tensors
(`perplexity`, `kld`, `mcq`, `memory`); `runner` loads models through `quantkit.load`, runs
the requested tasks and writes one self-describing JSON that `quantkit report` combines.
"""

TASKS = ("ppl", "kld", "ceval", "cmmlu", "mmlu")
