"""Source checks every command makes before any work, so bad input fails in one line.

transformers loads almost anything: integer weights are cast, missing tensors are filled
with random values (a "newly initialized" table in the log), NaN weights go through. Each
of those gives figures that look normal and are wrong. So before a command quantizes,
converts, exports or measures a checkpoint, it passes it through `validate_source`:

- the model type is one transformers knows (or the folder ships its code);
- an unquantized checkpoint holds floating-point tensors only;
- every floating-point tensor is finite (the first bad one is named);
- every parameter the model builds from config.json is in the checkpoint, with the shape
  the config implies (checked on a meta-device model: no memory, no weights);
- for commands that copy the source's files into an output, no symlink leaves the folder.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn
from tqdm.auto import tqdm

from quantkit.checkpoint import Checkpoint
from quantkit.errors import CheckpointError

log = logging.getLogger(__name__)

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                torch.float8_e4m3fn, torch.float8_e5m2)
# Integer buffers some checkpoints store beside the weights (never parameters).
_INTEGER_BUFFERS = ("position_ids", "token_type_ids")


def context_length(config: dict) -> int | None:
    """The longest sequence config.json allows, under the names families use for it."""
    for key in ("max_position_embeddings", "model_max_length", "seq_length", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_model_type(ckpt: Checkpoint) -> None:
    """transformers must know the architecture, or the folder must ship its own code."""
    if ckpt.config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING, __version__

    model_type = ckpt.config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: no model_type; restore the "
                              "config.json the model was published with")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: model_type {model_type!r} is not "
                              f"known to transformers {__version__}; upgrade transformers or "
                              "check the config")


def check_float_dtypes(ckpt: Checkpoint) -> None:
    """An unquantized checkpoint stores floats; integer weights would be cast silently."""
    for name in ckpt.tensor_names():
        dtype, _ = ckpt.tensor_meta(name)
        if dtype not in FLOAT_DTYPES and not name.endswith(_INTEGER_BUFFERS):
            raise CheckpointError(
                f"{ckpt.path}: tensor {name} is {str(dtype).replace('torch.', '')}; an "
                "unquantized checkpoint holds floating-point weights (bf16, fp16, fp32), so "
                "pass the original checkpoint")
    ckpt.release()


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """torch.isfinite in slices: on a whole embedding matrix its temporaries cost more host
    memory than the matrix."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all())
               for i in range(0, flat.numel(), chunk))


def check_finite(ckpt: Checkpoint) -> None:
    """NaN or Inf in any floating-point tensor, named.

    One tensor at a time, and the file's memory map is dropped after each: pages of a
    mapped shard count as resident, so keeping a 5 GB shard open while scanning it would
    cost 5 GB of RSS before any work starts (measured: 2.07 GB peak on a 1.2B model whose
    layers then need 1.43 GB).
    """
    names = ckpt.tensor_names()
    for file_name in tqdm(ckpt.weight_files, desc="check weights", unit="file", leave=False,
                          disable=None):
        for name in (n for n in names if ckpt.weight_map[n] == file_name):
            tensor = ckpt.get_tensor(name)
            finite = not tensor.is_floating_point() or all_finite(tensor)
            del tensor
            ckpt.release(file_name)
            if not finite:
                raise CheckpointError(f"{ckpt.path}: tensor {name} contains NaN or Inf values; "
                                      "the checkpoint is damaged, download or convert it again")


def meta_model(ckpt: Checkpoint, trust_remote_code: bool) -> nn.Module:
    """The model config.json describes, on the meta device: names, types and shapes only."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(ckpt.path, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=True):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, ImportError) as exc:
        text = str(exc).strip()
        first = text.splitlines()[0][:300] if text else type(exc).__name__
        raise CheckpointError(f"{ckpt.path}: transformers cannot build a causal LM from its "
                              f"config.json ({first}); check the config") from exc


def check_expected_tensors(ckpt: Checkpoint, model: nn.Module) -> None:
    """Every parameter of `model` is a checkpoint tensor of the same shape: no random init."""
    from quantkit.gptq.naming import key_renamer

    rename = key_renamer(model)
    stored = {rename(name): name for name in ckpt.tensor_names()}
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None)
              or []]
    missing = []
    for name, param in model.named_parameters():  # deduplicated: a tied head is not listed
        if name not in stored:
            if not any(p.search(name) for p in ignore):
                missing.append(name)
            continue
        _, shape = ckpt.tensor_meta(stored[name])
        if tuple(shape) != tuple(param.shape):
            raise CheckpointError(
                f"{ckpt.path}: tensor {stored[name]} has shape {list(shape)}, but config.json "
                f"makes it {list(param.shape)}; the config does not belong to these weights")
    ckpt.release()
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{ckpt.path}: the checkpoint lacks {', '.join(missing[:3])}{more}; transformers "
            "would fill the gap with random values, so quantkit stops. Download the checkpoint "
            "again (every shard) or pass the complete folder")


def validate_source(ckpt: Checkpoint, *, trust_remote_code: bool, copies_files: bool = False,
                    build_model: bool = True) -> None:
    """Everything above, in order of cost; raises the first problem as a CheckpointError."""
    if copies_files:
        ckpt.non_weight_files()  # raises on a symlink leaving the folder
    quantized = bool(ckpt.quantization_config)
    if build_model:
        check_model_type(ckpt)
    if not quantized:
        check_float_dtypes(ckpt)
        if build_model:
            check_expected_tensors(ckpt, meta_model(ckpt, trust_remote_code))
    check_finite(ckpt)
