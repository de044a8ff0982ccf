"""Our own Baichuan2-style remote code, and a writer for checkpoint folders that use it.

quantkit has to handle Baichuan2 the way users download it: a config.json with `auto_map`,
modeling code beside the weights, loadable only with `trust_remote_code=True`, and a
NormHead `lm_head`. The code in `baichuan2/` reproduces that (RoPE 7B layout, ALiBi 13B
layout) so tests, benchmarks and the demo model never need a download.
"""

from __future__ import annotations

import inspect
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.checkpoint import write_json
from quantkit.remote_code.baichuan2.configuration_baichuan import BaichuanConfig
from quantkit.remote_code.baichuan2.modeling_baichuan import BaichuanForCausalLM

log = logging.getLogger(__name__)

CODE_DIR = Path(__file__).parent / "baichuan2"
CODE_FILES = ("configuration_baichuan.py", "modeling_baichuan.py")
AUTO_MAP = {
    "AutoConfig": "configuration_baichuan.BaichuanConfig",
    "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
}
# Token ids of quantkit's byte-level BPE tokenizers (<unk>, <s>, </s>; pad is </s>).
TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
_CONFIG_KEYS = frozenset(inspect.signature(BaichuanConfig.__init__).parameters) - {
    "self", "kwargs", "max_position_embeddings"}


def baichuan2_config(*, alibi: bool, max_position_embeddings: int = 4096,
                     **settings) -> BaichuanConfig:
    """A config of the 7B layout (RoPE) or, with `alibi`, the 13B layout (ALiBi).

    Both record `model_max_length`; only the RoPE layout records `max_position_embeddings`,
    as the real Baichuan2-7B and -13B configs do. Settings BaichuanConfig does not take
    (e.g. `num_key_value_heads` from a Llama-style shape table) are ignored.
    """
    ignored = sorted(set(settings) - _CONFIG_KEYS)
    if ignored:
        log.debug("Baichuan2 config: ignoring %s (not Baichuan2 settings)", ", ".join(ignored))
    kept = {k: v for k, v in settings.items() if k in _CONFIG_KEYS}
    kept.setdefault("model_max_length", max_position_embeddings)
    if not alibi:
        kept["max_position_embeddings"] = max_position_embeddings
    return BaichuanConfig(**dict(TOKEN_IDS, **kept))


def config_json(config: BaichuanConfig, dtype: torch.dtype) -> dict:
    """config.json as a Baichuan2 folder has it: architectures, auto_map, dtype."""
    data = config.to_diff_dict()
    data.update(architectures=["BaichuanForCausalLM"], auto_map=dict(AUTO_MAP),
                dtype=str(dtype).removeprefix("torch."))
    return dict(sorted(data.items()))


def save_baichuan2(model: BaichuanForCausalLM, folder: str | Path,
                   dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `model` into an existing or new `folder` as a remote-code checkpoint.

    Writes config.json, generation_config.json, the two code files and model.safetensors
    (every tensor in `dtype`). Tokenizer files are the caller's business.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    write_json(folder / "config.json", config_json(config, dtype))
    write_json(folder / "generation_config.json", {
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    })
    for name in CODE_FILES:
        shutil.copyfile(CODE_DIR / name, folder / name)
    tensors = {name: t.detach().to(dtype).contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def build_baichuan2(dest: str | Path, *, alibi: bool, dtype: torch.dtype = torch.bfloat16,
                    **shape) -> Path:
    """A random-weight Baichuan2-style checkpoint in `dest` (seed with torch.manual_seed first).

    `shape` takes BaichuanConfig settings (hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, vocab_size, max_position_embeddings, ...); others are ignored.
    """
    model = BaichuanForCausalLM(baichuan2_config(alibi=alibi, **shape)).float()
    return save_baichuan2(model, dest, dtype)
