"""bitsandbytes NF4 / FP4 / int8: quantize once, ship the serialized folder.

Baichuan2 and Aquila2 publish 4-bit variants as "load with BitsAndBytesConfig", so every
user script re-quantizes on load. This module quantizes through transformers' own
bitsandbytes integration (the code that will later read the folder back), writes the
serialized safetensors with `quantization_config` in config.json, and refuses to write an
artifact whose forward pass on real text is not finite (the NaNs Baichuan2 users met with
8-bit models).

Order matters on CPU: bitsandbytes repacks 4-bit weights in place on the first CPU forward
(AVX512-BF16 kernels) and its inverse drops double quantization, so the weights are saved
*before* the finite check runs.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from quantkit.checkpoint import (
    Checkpoint,
    atomic_output,
    copy_non_weight_files,
    parse_size,
    read_json,
    write_json,
    write_manifest,
)
from quantkit.data import calibration_samples
from quantkit.errors import CheckpointError, ConfigError, QuantizationError, require
from quantkit.families import family_for
from quantkit.loading import (
    load_tokenizer,
    open_quantization_source,
)
from quantkit.validate import meta_model

log = logging.getLogger(__name__)

MODES = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MANIFEST_KEY = "bnb"


@dataclass(frozen=True)
class BnbConfig:
    """Everything `quantkit bnb` needs; the CLI and recipes build one of these."""

    source: Path
    dest: Path
    mode: str = "nf4"
    double_quant: bool = True  # 4-bit only: quantize the per-block absmax too (QLoRA)
    compute_dtype: str = "bf16"  # 4-bit only: dtype of the dequantized matmul
    skip_modules: tuple[str, ...] | None = None  # None: the model's output head
    device: str = "auto"
    trust_remote_code: bool = False
    force: bool = False
    max_shard_size: str = "5GB"
    check_samples: int = 4  # calibration sequences for the finite-output check
    check_seqlen: int = 256

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"bnb mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"--compute-dtype {self.compute_dtype}: choose one of "
                              f"{', '.join(COMPUTE_DTYPES)}")

    @property
    def four_bit(self) -> bool:
        return self.mode != "int8"


@dataclass
class BnbResult:
    dest: Path
    summary: dict


# ----------------------------------------------------------------------------- modules


def module_matches(pattern: str, module_name: str) -> bool:
    """Whether a --skip-modules entry names this module: the full path, or a dotted suffix.

    A subset of what transformers accepts (it also takes regexes and bare suffixes), so a
    module this matches is certainly kept in full precision.
    """
    return (module_name == pattern or module_name.startswith(pattern + ".")
            or module_name.endswith("." + pattern))


def output_head_name(model: nn.Module, ckpt: Checkpoint) -> str:
    """The module producing logits, found on the model (remote code may not call it lm_head)."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if head is not None:
        return next(name for name, module in model.named_modules() if module is head)
    family = family_for(ckpt.config)
    return family.lm_head if family else "lm_head"


def resolve_skip_modules(model: nn.Module, ckpt: Checkpoint,
                         requested: tuple[str, ...] | None) -> list[str]:
    """Default to the output head; reject names that match no module of this model."""
    if requested is None:
        return [output_head_name(model, ckpt)]
    names = [name for name, _ in model.named_modules() if name]
    for pattern in requested:
        if not any(module_matches(pattern, name) for name in names):
            example = next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)), "")
            raise ConfigError(
                f"--skip-modules {pattern}: {ckpt.path} has no module by that name; use a "
                f"module path or its last part (e.g. {example} or "
                f"{example.rsplit('.', 1)[-1]})"
            )
    return list(requested)


def convertible_linears(model: nn.Module, skip_modules: list[str]) -> list[str]:
    """Modules transformers will swap for bitsandbytes layers: exact nn.Linear, not skipped."""
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear
            and not any(module_matches(p, name) for p in skip_modules)]


def weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own a 2-D weight matrix (Linear, NormHead, ...), embeddings excluded."""
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (isinstance(weight, torch.Tensor) and weight.dim() == 2
                and not isinstance(module, nn.Embedding)):
            out[name] = module
    return out


def is_bnb_layer(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


# ----------------------------------------------------------------------------- quantize


def hf_quantization_config(cfg: BnbConfig, skip_modules: list[str]):
    """The transformers BitsAndBytesConfig for `cfg`; its to_dict() lands in config.json."""
    from transformers import BitsAndBytesConfig

    if not cfg.four_bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.mode,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[cfg.compute_dtype],
        llm_int8_skip_modules=skip_modules,
    )


def quantize_model(ckpt: Checkpoint, cfg: BnbConfig, skip_modules: list[str], device: str):
    """Load `ckpt` with bitsandbytes quantization applied tensor by tensor while reading.

    One device for the whole model: `device_map="auto"` spreading layers over devices is
    how Baichuan2 users got broken 8-bit artifacts.
    """
    from transformers import AutoModelForCausalLM

    if not cfg.four_bit:
        quiet_int8_cast_logs()
    model = AutoModelForCausalLM.from_pretrained(
        ckpt.path, quantization_config=hf_quantization_config(cfg, skip_modules),
        dtype="auto", device_map={"": device}, trust_remote_code=cfg.trust_remote_code,
    )
    return model.eval()


class _Int8CastLogFilter(logging.Filter):
    """LLM.int8 logs "inputs will be cast ... to float16" on *every* matmul of a bf16 model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


_INT8_CAST_FILTER = _Int8CastLogFilter()


def quiet_int8_cast_logs() -> None:
    """Say it once here instead of thousands of times during a forward or an eval."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _INT8_CAST_FILTER not in bnb_logger.filters:
        bnb_logger.addFilter(_INT8_CAST_FILTER)
        log.info("int8: bitsandbytes casts bf16 activations to fp16 for the int8 matmul")


@torch.no_grad()
def check_finite(model, input_ids: torch.Tensor, *, label: str) -> float:
    """Run the quantized model on real text; NaN/Inf anywhere is a QuantizationError.

    Returns the mean next-token loss, a cheap sign the model still models text.
    """
    device = next(p.device for p in model.parameters())
    losses = []
    for row in tqdm(input_ids, desc="finite check", unit="seq", leave=False):
        ids = row.unsqueeze(0).to(device)
        logits = model(input_ids=ids).logits
        if not torch.isfinite(logits).all():
            first = first_nonfinite_module(model, ids)
            raise QuantizationError(
                f"{label}: the quantized model gives NaN/Inf logits on calibration text "
                f"(first in {first or 'the embeddings'}), so nothing was written; try "
                "another --compute-dtype, or keep that module with --skip-modules"
            )
        loss = nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        losses.append(loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def first_nonfinite_module(model, input_ids: torch.Tensor) -> str | None:
    """Rerun one sequence and name the first weight module whose output is NaN/Inf."""
    found: list[str] = []

    def hook(name):
        def record(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if not found and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
                found.append(name)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in weight_modules(model).items()]
    try:
        model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def check_inputs(ckpt: Checkpoint, cfg: BnbConfig) -> torch.Tensor:
    """A few calibration sequences, no longer than the model's context."""
    limit = ckpt.config.get("max_position_embeddings") or ckpt.config.get("model_max_length")
    seqlen = min(cfg.check_seqlen, int(limit)) if limit else cfg.check_seqlen
    tokenizer = load_tokenizer(ckpt.path, trust_remote_code=cfg.trust_remote_code)
    return calibration_samples(tokenizer, nsamples=cfg.check_samples, seqlen=seqlen)


# ----------------------------------------------------------------------------- write


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def source_weight_bytes(ckpt: Checkpoint) -> int:
    return sum((ckpt.path / name).stat().st_size for name in ckpt.weight_files)


def bnb_summary(model, cfg: BnbConfig, skip_modules: list[str], *, source_bytes: int,
                output_bytes: int, check_loss: float | None = None,
                check_shape: tuple[int, int] | None = None) -> dict:
    """What quantkit.json records: settings, what stayed full precision, and sizes."""
    modules = weight_modules(model)
    quantized = [name for name, m in modules.items() if is_bnb_layer(m)]
    summary = {
        "mode": cfg.mode,
        "double_quant": cfg.double_quant if cfg.four_bit else None,
        "compute_dtype": cfg.compute_dtype if cfg.four_bit else None,
        "skip_modules": list(skip_modules),
        "quantized_modules": len(quantized),
        "full_precision_modules": [name for name in modules if name not in quantized],
        "source_weight_bytes": source_bytes,
        "output_weight_bytes": output_bytes,
        "size_ratio": round(output_bytes / source_bytes, 4) if source_bytes else None,
    }
    if check_loss is not None:
        summary["check"] = {"sequences": check_shape[0], "seqlen": check_shape[1],
                            "mean_loss": round(check_loss, 4),
                            "perplexity": round(math.exp(min(check_loss, 50.0)), 3)}
    return summary


def _warn_unexpected_full_precision(summary: dict, skip_modules: list[str]) -> None:
    """Modules transformers does not convert (not a plain nn.Linear) stay silently large."""
    for name in summary["full_precision_modules"]:
        if not any(module_matches(p, name) for p in skip_modules):
            log.warning("%s stays in full precision: it is not a plain nn.Linear, so "
                        "bitsandbytes does not convert it", name)


def log_summary(summary: dict, dest: Path) -> None:
    settings = summary["mode"]
    if summary["double_quant"] is not None:
        settings += (", double quant" if summary["double_quant"] else "") + \
            f", {summary['compute_dtype']} compute"
    log.info("bnb %s: %d layers quantized; full precision: %s", settings,
             summary["quantized_modules"], ", ".join(summary["full_precision_modules"]) or "none")
    log.info("weights %.2f MB -> %.2f MB (%.2fx)", summary["source_weight_bytes"] / 1e6,
             summary["output_weight_bytes"] / 1e6, summary["size_ratio"] or 0.0)
    if "check" in summary:
        check = summary["check"]
        log.info("finite check: %d x %d calibration tokens, perplexity %.3f", check["sequences"],
                 check["seqlen"], check["perplexity"])
    log.info("wrote %s", dest)


def save_bnb_folder(model, ckpt: Checkpoint, folder: Path, max_shard_size: str) -> None:
    """Serialized weights from transformers; every other file from the source.

    config.json is the source's plus transformers' `quantization_config`, so nothing else
    the source declared (auto_map, rope settings, dtype) is rewritten.
    """
    model.save_pretrained(folder, max_shard_size=parse_size(max_shard_size))
    quantization_config = read_json(folder / "config.json")["quantization_config"]
    copy_non_weight_files(ckpt, folder)
    write_json(folder / "config.json", dict(ckpt.config, quantization_config=quantization_config))


def bnb_quantize(cfg: BnbConfig) -> BnbResult:
    """Quantize `cfg.source` into `cfg.dest` atomically; the source is only read."""
    require("bitsandbytes", "bnb")
    started = _dt.datetime.now(_dt.timezone.utc)
    ckpt, device = open_quantization_source(
        cfg.source, dest=cfg.dest, trust_remote_code=cfg.trust_remote_code, device=cfg.device,
        force=cfg.force, max_shard_size=cfg.max_shard_size)
    skeleton = meta_model(ckpt, cfg.trust_remote_code)
    skip_modules = resolve_skip_modules(skeleton, ckpt, cfg.skip_modules)
    if not convertible_linears(skeleton, skip_modules):
        raise ConfigError(f"--skip-modules {','.join(skip_modules)}: leaves no nn.Linear layer "
                          f"of {ckpt.path} to quantize; name fewer modules")
    input_ids = check_inputs(ckpt, cfg)

    log.info("quantizing %s to bnb %s on %s", ckpt.path, cfg.mode, device)
    model = quantize_model(ckpt, cfg, skip_modules, device)
    with atomic_output(cfg.dest, source=ckpt.path, force=cfg.force) as tmp:
        save_bnb_folder(model, ckpt, tmp, cfg.max_shard_size)
        loss = check_finite(model, input_ids, label=str(ckpt.path))
        summary = bnb_summary(model, cfg, skip_modules, source_bytes=source_weight_bytes(ckpt),
                              output_bytes=weight_bytes(tmp), check_loss=loss,
                              check_shape=tuple(input_ids.shape))
        write_manifest(tmp, source=ckpt, extra={MANIFEST_KEY: summary}, started=started)
    _warn_unexpected_full_precision(summary, skip_modules)
    log_summary(summary, Path(cfg.dest))
    return BnbResult(Path(cfg.dest), summary)


# ----------------------------------------------------------------------------- load


def load_bnb_model(ckpt: Checkpoint, *, device: str = "cpu", trust_remote_code: bool = False):
    """A bnb folder (ours or anyone's) through transformers, on one device."""
    require("bitsandbytes", "bnb")
    from transformers import AutoModelForCausalLM

    if (ckpt.quantization_config or {}).get("load_in_8bit"):
        quiet_int8_cast_logs()
    model, info = AutoModelForCausalLM.from_pretrained(
        ckpt.path, dtype="auto", device_map={"": device}, trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers filled them with random values
        raise CheckpointError(f"{ckpt.path}: the bnb checkpoint lacks {', '.join(missing[:3])}"
                              + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                              + "; rebuild it with quantkit bnb")
    return model.eval()

