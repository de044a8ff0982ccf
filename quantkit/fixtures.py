"""Tiny random checkpoints of each supported family, built on demand.

Tests, benchmarks and the demo need real checkpoint folders (config, safetensors,
tokenizer, and for Baichuan2 the remote code loaded through `auto_map`) without any
download. Shapes keep every Linear's input a multiple of 128 so group-size-128
quantization applies, and outputs a multiple of 32 so 2/3/4/8-bit packing does.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

# A little bilingual text so the fixture tokenizer has merges for both scripts.
_TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization trades precision for memory. "
    "滚滚长江东逝水，浪花淘尽英雄。是非成败转头空，青山依旧在，几度夕阳红。"
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
)

NATIVE_FAMILIES = ("llama", "qwen2", "mistral")
FIXTURE_FAMILIES = NATIVE_FAMILIES + ("baichuan2-7b", "baichuan2-13b")

_SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, vocab_size=512, max_position_embeddings=256)


def build_tokenizer(vocab_size: int = 512, texts: Iterable[str] | None = None):
    """A byte-level BPE tokenizer trained on `texts` (default: a built-in bilingual
    snippet), as a transformers fast tokenizer. No download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_TOKENIZER_TEXT * 4] if texts is None else texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


def _native_config(family: str, overrides: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    settings = dict(_SMALL, num_key_value_heads=2, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
    settings.update(overrides)
    return cls(**settings)


def build_tiny_model(family: str, dest: str | Path, *, seed: int = 0,
                     dtype: torch.dtype = torch.bfloat16, **config_overrides) -> Path:
    """Write a random tiny checkpoint of `family` (see FIXTURE_FAMILIES) into `dest`."""
    from transformers import AutoModelForCausalLM

    dest = Path(dest)
    if family not in FIXTURE_FAMILIES:
        raise ValueError(f"unknown fixture family {family!r}; choose from {FIXTURE_FAMILIES}")
    torch.manual_seed(seed)
    if family in NATIVE_FAMILIES:
        config = _native_config(family, config_overrides)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.to(dtype).save_pretrained(dest)
    else:
        from quantkit.remote_code import build_baichuan2

        build_baichuan2(dest, alibi=family == "baichuan2-13b", dtype=dtype,
                        **dict(_SMALL, **config_overrides))
    build_tokenizer(vocab_size=min(512, config_overrides.get("vocab_size", 512))).save_pretrained(
        dest)
    return dest
