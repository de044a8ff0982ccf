"""Per-family facts: where the decoder layers are and how their Linear modules group.

Quantizers stay architecture-generic; this table only says what cannot be discovered
reliably from a model object: which Linears share an input (they can share one Hessian
and run as one true-sequential step), which fused matrices must stay whole (Baichuan's
`W_pack`, Qwen's `c_attn`, ChatGLM's `query_key_value`), and where the head is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class Family:
    """What quantkit knows about one architecture family."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str  # dotted attribute path of the decoder-layer ModuleList
    sequential_groups: tuple[tuple[str, ...], ...]  # Linears inside a layer, in forward order
    lm_head: str = "lm_head"
    embeddings: str = "model.embed_tokens"
    needs_remote_code: bool = False
    notes: str = ""

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential_groups for name in group)


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), "model.layers", _LLAMA_GROUPS),
    Family("mistral", ("mistral",), "model.layers", _LLAMA_GROUPS),
    Family("qwen2", ("qwen2", "qwen3"), "model.layers", _LLAMA_GROUPS),
    Family("aquila", ("aquila",), "model.layers", _LLAMA_GROUPS, needs_remote_code=True,
           notes="Aquila2: Llama layout behind remote code"),
    Family("internlm", ("internlm",), "model.layers", _LLAMA_GROUPS, needs_remote_code=True),
    Family(
        "internlm2", ("internlm2",), "model.layers",
        (("attention.wqkv",), ("attention.wo",), ("feed_forward.w1", "feed_forward.w3"),
         ("feed_forward.w2",)),
        lm_head="output", embeddings="model.tok_embeddings", needs_remote_code=True,
    ),
    Family(
        "baichuan", ("baichuan",), "model.layers",
        (("self_attn.W_pack",), ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"),
         ("mlp.down_proj",)),
        needs_remote_code=True,
        notes="W_pack is one fused q,k,v matrix, quantized whole; Baichuan2 has a NormHead",
    ),
    Family(
        "zhinao", ("zhinao",), "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"),
         ("mlp.down_proj",)),
        needs_remote_code=True, notes="360Zhinao: fused qkv_proj",
    ),
    Family(
        "qwen", ("qwen",), "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",)),
        embeddings="transformer.wte", needs_remote_code=True,
        notes="Qwen-1: fused c_attn",
    ),
    Family(
        "chatglm", ("chatglm",), "transformer.encoder.layers",
        (("self_attention.query_key_value",), ("self_attention.dense",),
         ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
        lm_head="transformer.output_layer", embeddings="transformer.embedding.word_embeddings",
        needs_remote_code=True, notes="ChatGLM: fused query_key_value",
    ),
)


def family_for(config: dict) -> Family | None:
    """The family of a checkpoint's config.json, or None when quantkit has no entry for it."""
    model_type = str(config.get("model_type", "")).lower()
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def supported_families() -> str:
    return ", ".join(f.name for f in FAMILIES)


def is_baichuan2(folder: str | Path, config: dict) -> bool:
    """Baichuan2 differs from Baichuan-1 only in its remote code: a NormHead lm_head."""
    if str(config.get("model_type", "")).lower() != "baichuan":
        return False
    return any("class NormHead" in p.read_text(encoding="utf-8", errors="ignore")
               for p in Path(folder).glob("modeling_*.py"))


def is_alibi_baichuan(config: dict) -> bool:
    """Baichuan 13B models use ALiBi (no rotary); their config has no rope settings."""
    return "rope_theta" not in config and "max_position_embeddings" not in config and bool(
        config.get("model_max_length"))
