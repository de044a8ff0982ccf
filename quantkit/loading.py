"""Load a checkpoint folder into a transformers model, whatever quantized it.

Evaluation and memory measurement need one entry point that takes a BF16 folder, our GPTQ
or bnb artifacts, or another tool's GPTQ folder. Quantized formats are dispatched on
`quantization_config.quant_method` to the module that owns the format.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from quantkit.checkpoint import TOKENIZER_FILES, open_checkpoint, read_json
from quantkit.errors import CheckpointError, ConfigError
from quantkit.validate import validate_source

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
           "auto": "auto"}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | str | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ConfigError(f"dtype {name!r}: choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_device(device: str) -> str:
    """'auto' means CUDA when present; asking for CUDA without one is a user error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device {device}: choose auto, cuda or cpu")
    return device


def check_remote_code(path: Path, config: dict, trust_remote_code: bool) -> None:
    """Remote code runs only when the user said so; say which flag to pass otherwise.

    The tokenizer can name code of its own in tokenizer_config.json alone.
    """
    if trust_remote_code:
        return
    if config.get("auto_map"):
        raise ConfigError(
            f"{path}: the model ships its own code (auto_map in config.json); "
            "review it, then pass --trust-remote-code"
        )
    tokenizer_config = Path(path) / "tokenizer_config.json"
    if tokenizer_config.is_file() and read_json(tokenizer_config).get("auto_map"):
        raise ConfigError(
            f"{path}: the tokenizer ships its own code (auto_map in tokenizer_config.json); "
            "review it, then pass --trust-remote-code"
        )


def open_quantization_source(source: str | os.PathLike, *, dest: str | os.PathLike,
                             trust_remote_code: bool, device: str, force: bool,
                             max_shard_size: str):
    """Checks every quantizer makes before any work: an unquantized source, remote code
    allowed, a usable device and destination, a valid source (see `validate`). Returns the
    opened checkpoint and device."""
    from quantkit.checkpoint import check_destination, parse_size

    ckpt = open_checkpoint(source)
    if ckpt.quantization_config:
        method = ckpt.quantization_config.get("quant_method", "unknown")
        raise ConfigError(f"{ckpt.path}: already quantized ({method}); quantize the BF16 "
                          "checkpoint instead")
    check_remote_code(ckpt.path, ckpt.config, trust_remote_code)
    resolved = resolve_device(device)
    check_destination(Path(dest), source=ckpt.path, force=force)
    parse_size(max_shard_size)
    check_tokenizer_files(ckpt.path)
    validate_source(ckpt, trust_remote_code=trust_remote_code, copies_files=True)
    return ckpt, resolved


def load(path: str | os.PathLike, *, device: str = "cpu", dtype=None,
         trust_remote_code: bool = False, validate: bool = True):
    """Return an eval-mode causal LM for any checkpoint quantkit understands.

    The checkpoint is validated first (`validate=False` when the caller already did).
    """
    ckpt = open_checkpoint(path)
    check_remote_code(ckpt.path, ckpt.config, trust_remote_code)
    device = resolve_device(device)
    if validate:
        validate_source(ckpt, trust_remote_code=trust_remote_code)
    method = (ckpt.quantization_config or {}).get("quant_method")
    if method == "gptq":
        from quantkit.gptq.qlinear import load_gptq_model

        model = load_gptq_model(ckpt, device=device, trust_remote_code=trust_remote_code,
                                dtype=parse_dtype(dtype))
    elif method == "bitsandbytes":
        from quantkit.bnb import load_bnb_model

        model = load_bnb_model(ckpt, device=device, trust_remote_code=trust_remote_code)
    elif method is None:
        model = load_plain_model(ckpt.path, device=device, dtype=parse_dtype(dtype),
                                 trust_remote_code=trust_remote_code)
    else:
        raise CheckpointError(f"{ckpt.path}: quant_method {method!r} is not supported by quantkit")
    return model.eval()


def load_plain_model(path: Path, *, device: str = "cpu", dtype=None,
                     trust_remote_code: bool = False):
    """An unquantized checkpoint through transformers, in its stored dtype by default."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or "auto", trust_remote_code=trust_remote_code,
        device_map=None,
    )
    return model.to(device)


def check_tokenizer_files(path: str | os.PathLike) -> None:
    """A folder without tokenizer files makes transformers blame a missing package."""
    folder = Path(path)
    if any((folder / name).is_file() for name in TOKENIZER_FILES) or any(
            folder.glob("*.tiktoken")) or any(folder.glob("*tokenizer*.model")):
        return
    raise CheckpointError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                          "...); copy them from the model this one was made from")


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_tokenizer_files(path)
    check_remote_code(Path(path), {}, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        text = str(exc).strip()
        first = text.splitlines()[0][:300] if text else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load its tokenizer ({first}); check the "
                              "tokenizer files") from exc
