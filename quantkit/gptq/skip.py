"""`--skip-modules`: decoder-layer Linears that stay in the source dtype.

Users keep sensitive projections unquantized (a model's first or last layer, a projection
whose width no group size divides), as GPTQModel's `dynamic` and llm-compressor's `ignore`
allow. A pattern names a module by its full name or by a dotted part of it: `down_proj`,
`mlp.down_proj`, `model.layers.0` (every Linear of layer 0) and
`model.layers.3.self_attn.q_proj` all match the way a user reads the names.

Loaders learn which modules are plain Linears from the checkpoint itself: quantkit,
transformers and gptqmodel replace only modules with a `qweight`; GPTQModel and vLLM also
read `dynamic`'s negative ("-:") entries, which `dynamic_exclusions` writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence


def parse_skip_modules(value: str | None) -> tuple[str, ...]:
    """'q_proj, mlp.down_proj' -> ('q_proj', 'mlp.down_proj'); None or '' -> ()."""
    if not value:
        return ()
    return tuple(dict.fromkeys(part.strip().strip(".") for part in value.split(",")
                               if part.strip().strip(".")))


def _pattern(name: str) -> str:
    """Regex for a full module name containing `name` as whole dotted parts."""
    return rf"(?:.*\.)?{re.escape(name)}(?:\..*)?"


def is_skipped(full_name: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(_pattern(p), full_name) for p in patterns)


def unmatched(patterns: Sequence[str], names: Iterable[str]) -> list[str]:
    """The patterns that match none of `names` (a typo the user should hear about)."""
    names = list(names)
    return [p for p in patterns if not any(is_skipped(n, [p]) for n in names)]


def dynamic_exclusions(patterns: Sequence[str]) -> dict[str, dict]:
    """GPTQModel/vLLM `dynamic` entries that leave these modules unquantized.

    Both match a "-:" key with `re.match` against the full module name, so the pattern is
    anchored at both ends here.
    """
    return {f"-:{_pattern(p)}$": {} for p in patterns}
