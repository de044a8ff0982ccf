"""Checkpoint tensor names versus the model's parameter names.

transformers 5 renames some checkpoints' keys while loading (GPT-NeoX stores `embed_out`,
the model calls it `lm_head`). GPTQ artifacts keep the checkpoint's own names, so loaders
rename them the same way; quantkit matches its quantized modules to source tensors, and
loads stored tensors into models, through the renaming transformers itself applies.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from quantkit.errors import CheckpointError


def key_renamer(model: nn.Module) -> Callable[[str], str]:
    """checkpoint tensor name -> the model's parameter name (identity when nothing applies)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without key conversions renames nothing
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    if not transforms:
        return lambda key: key
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]

    def rename(key: str) -> str:
        renamed, merged = rename_source_key(key, renamings, converters)
        if merged is not None:
            raise CheckpointError(f"tensor {key} is merged with others when transformers loads "
                                  f"{type(model).__name__}; quantkit cannot map it")
        return renamed

    return rename
