"""`quantkit export onnx`: a BF16 checkpoint or a quantkit GPTQ artifact as an ONNX model.

The output folder holds `model.onnx` (inputs `input_ids` and `attention_mask`, output
`logits`, dynamic batch and sequence axes, no KV cache), the source's tokenizer and config
files, and `quantkit.json`. A GPTQ artifact's quantized Linears become
`com.microsoft::MatMulNBits` nodes built from the artifact's own packed codes, scales and zero
points (see `nbits.py`), so ONNX Runtime runs exactly the quantization GPTQ chose.

Before anything is written, ONNX Runtime runs the graph on calibration text and its logits are
compared with the PyTorch model's (`quantkit.load`, in float32); beyond tolerance the export
fails and leaves nothing behind.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from quantkit.checkpoint import (
    Checkpoint,
    atomic_output,
    check_destination,
    copy_non_weight_files,
    open_checkpoint,
    write_manifest,
)
from quantkit.data import calibration_samples
from quantkit.errors import CheckpointError, ConfigError, QuantizationError, require
from quantkit.gptq.qlinear import QuantLinear, gptq_settings
from quantkit.loading import check_remote_code, check_tokenizer_files, load, load_tokenizer
from quantkit.onnx_export.graph import NBitsLinear, export_graph, replace_module
from quantkit.onnx_export.nbits import SUPPORTED_BITS, gptq_to_nbits
from quantkit.onnx_export.validate import Validation, compare, onnx_logits, onnx_session
from quantkit.validate import validate_source

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MIN_OPSET = 18  # torch's exporter writes 18 natively and silently ignores lower requests
DEFAULT_OPSET = 18
MODEL_FILE = "model.onnx"
MANIFEST_KEY = "onnx_export"
FP16_MAX = 65504.0


@dataclass(frozen=True)
class OnnxExportConfig:
    """Everything `quantkit export onnx` needs; the CLI and recipes build one of these."""

    source: Path
    dest: Path
    opset: int = DEFAULT_OPSET
    dtype: str = "fp32"  # of activations and float weights (scales included)
    trust_remote_code: bool = False
    force: bool = False
    check_samples: int = 2  # calibration sequences for the built-in validation
    check_seqlen: int = 64
    accuracy_level: int = 0  # MatMulNBits: compute in the activation dtype, no int8 shortcut

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")


@dataclass
class OnnxExportResult:
    dest: Path
    summary: dict


def require_onnx_stack(opset: int) -> None:
    """Fail early, naming the extra, before any model is loaded; then check the opset."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, "onnx")
    import onnx.defs

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ConfigError(f"--opset {opset}: choose an opset from {MIN_OPSET} to {newest} "
                          "(the installed onnx package's newest)")


# ----------------------------------------------------------------------------- inputs


def export_settings(ckpt: Checkpoint) -> dict | None:
    """The GPTQ settings, checked for what MatMulNBits can carry; None for a float model."""
    qcfg = ckpt.quantization_config or {}
    method = qcfg.get("quant_method")
    if method is None:
        return None
    if method != "gptq":
        raise ConfigError(f"{ckpt.path}: quant_method {method!r} cannot be exported to ONNX; "
                          "export the BF16 checkpoint or a quantkit GPTQ artifact")
    settings = gptq_settings(ckpt)
    if settings["bits"] not in SUPPORTED_BITS:
        raise ConfigError(
            f"{ckpt.path}: GPTQ bits={settings['bits']}, but ONNX Runtime's MatMulNBits runs "
            f"{'/'.join(map(str, SUPPORTED_BITS))}-bit weights; quantize with --bits 4")
    return {**settings, "desc_act": qcfg.get("desc_act"), "sym": qcfg.get("sym")}


def validation_inputs(ckpt: Checkpoint, tokenizer, cfg: OnnxExportConfig) -> torch.Tensor:
    """A few calibration sequences, no longer than the model's context."""
    limit = ckpt.config.get("max_position_embeddings") or ckpt.config.get("model_max_length")
    seqlen = min(cfg.check_seqlen, int(limit)) if limit else cfg.check_seqlen
    return calibration_samples(tokenizer, nsamples=cfg.check_samples, seqlen=seqlen)


def _tokenizer(ckpt: Checkpoint, trust_remote_code: bool):
    try:
        return load_tokenizer(ckpt.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{ckpt.path}: cannot load its tokenizer ({first_line}); the "
                              "export needs it to validate and to ship beside model.onnx") from exc


# ----------------------------------------------------------------------------- model


def check_fp16_range(model: nn.Module) -> None:
    """BF16 weights beyond float16's range would become inf in an fp16 graph."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.numel() and \
                float(tensor.abs().max()) > FP16_MAX:
            raise ConfigError(f"{name} holds values beyond float16's range (±{FP16_MAX:g}); "
                              "export with --dtype fp32")


def to_nbits_model(model: nn.Module, dtype: torch.dtype, accuracy_level: int) -> dict:
    """Swap each GPTQ QuantLinear for an NBitsLinear built from its own packed tensors."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    blocks, permuted = set(), 0
    for name, layer in tqdm(layers.items(), desc="MatMulNBits", unit="linear", leave=False):
        try:
            weight = gptq_to_nbits(layer.packed(), layer.bits, layer.zero_offset, dtype)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from exc
        bias = None if layer.bias is None else layer.bias.to(dtype)
        replace_module(model, name, NBitsLinear(weight, bias, accuracy_level))
        blocks.add(weight.block_size)
        permuted += weight.perm is not None
    return {"matmulnbits_nodes": len(layers), "block_sizes": sorted(blocks),
            "act_order_gathers": permuted, "accuracy_level": accuracy_level}


@torch.no_grad()
def reference_logits(model: nn.Module, input_ids: torch.Tensor) -> np.ndarray:
    """The PyTorch model's logits in float32: what the ONNX graph must reproduce."""
    return model(input_ids=input_ids, use_cache=False).logits.float().numpy()


# ----------------------------------------------------------------------------- export


def validate_export(path: Path, input_ids: torch.Tensor, reference: np.ndarray,
                    dtype: str) -> Validation:
    """Run the saved graph in ONNX Runtime; raise if its logits are off (nothing is kept)."""
    try:
        session = onnx_session(path)
    except Exception as exc:  # onnxruntime's pybind error types (Fail, InvalidGraph, ...)
        import onnxruntime

        first_line = str(exc).strip().splitlines()[0][:300]
        raise QuantizationError(f"ONNX Runtime {onnxruntime.__version__} cannot load the "
                                f"exported graph ({first_line}); nothing was written") from exc
    got = onnx_logits(session, input_ids)
    result = compare(reference, got, dtype)
    log.info("validation: %d x %d tokens, max |logit diff| %.3g (tolerance %.3g), "
             "top-1 agreement %.1f%%", result.sequences, result.seqlen, result.max_abs_diff,
             result.tolerance, 100 * result.top1_agreement)
    if not result.passed:
        raise QuantizationError(
            f"ONNX Runtime's logits differ from the PyTorch model's by {result.max_abs_diff:.3g} "
            f"(tolerance {result.tolerance:.3g} for {dtype}), so nothing was written"
            + ("; try --dtype fp32" if dtype == "fp16" else "")
        )
    return result


def export_onnx(cfg: OnnxExportConfig) -> OnnxExportResult:
    """Export `cfg.source` into the folder `cfg.dest` atomically; the source is only read."""
    require_onnx_stack(cfg.opset)
    started = _dt.datetime.now(_dt.timezone.utc)
    ckpt = open_checkpoint(cfg.source)
    check_remote_code(ckpt.path, ckpt.config, cfg.trust_remote_code)
    settings = export_settings(ckpt)
    check_destination(Path(cfg.dest), source=ckpt.path, force=cfg.force, flag="OUT")
    check_tokenizer_files(ckpt.path)
    validate_source(ckpt, trust_remote_code=cfg.trust_remote_code, copies_files=True)
    dtype = DTYPES[cfg.dtype]
    input_ids = validation_inputs(ckpt, _tokenizer(ckpt, cfg.trust_remote_code), cfg)

    log.info("loading %s", ckpt.path)
    model = load(ckpt.path, dtype="fp32", trust_remote_code=cfg.trust_remote_code,
                 validate=False).float()
    if cfg.dtype == "fp16":
        check_fp16_range(model)
    reference = reference_logits(model, input_ids)  # also runs Baichuan2's one-off NormHead
    quantized = to_nbits_model(model, dtype, cfg.accuracy_level) if settings else None
    model.to(dtype)

    with atomic_output(cfg.dest, source=ckpt.path, force=cfg.force, flag="OUT") as tmp:
        log.info("exporting to ONNX (opset %d, %s)", cfg.opset, cfg.dtype)
        written = export_graph(model, input_ids[:, :16], tmp / MODEL_FILE, cfg.opset)
        del model
        if written != cfg.opset:
            raise ConfigError(f"--opset {cfg.opset}: torch's exporter could not convert this "
                              f"model's graph to it (it stayed at {written}); choose a lower "
                              f"opset ({DEFAULT_OPSET} always works)")
        validation = validate_export(tmp / MODEL_FILE, input_ids, reference, cfg.dtype)
        copy_non_weight_files(ckpt, tmp)
        summary = export_summary(cfg, settings, quantized, validation, tmp)
        write_manifest(tmp, source=ckpt, extra={MANIFEST_KEY: summary}, started=started)
    log.info("wrote %s (%.2f MB of ONNX)", cfg.dest, summary["onnx_bytes"] / 1e6)
    return OnnxExportResult(Path(cfg.dest), summary)


def export_summary(cfg: OnnxExportConfig, settings: dict | None, quantized: dict | None,
                   validation: Validation, folder: Path) -> dict:
    """What quantkit.json records: settings, versions, graph interface, validation."""
    import onnx
    import onnxruntime

    onnx_files = sorted(p for p in folder.iterdir() if p.name.startswith(MODEL_FILE))
    summary = {
        "format": "onnx", "file": MODEL_FILE, "opset": cfg.opset, "dtype": cfg.dtype,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "onnx_version": onnx.__version__, "onnxruntime_version": onnxruntime.__version__,
        "inputs": ["input_ids [batch, sequence] int64", "attention_mask [batch, sequence] int64"],
        "outputs": ["logits [batch, sequence, vocab]"], "kv_cache": False,
        "onnx_bytes": sum(p.stat().st_size for p in onnx_files),
        "quantization": None, "validation": validation.as_dict(),
    }
    if settings:
        summary["quantization"] = {
            "method": "gptq", "operator": "com.microsoft::MatMulNBits",
            **{key: settings[key] for key in ("bits", "group_size", "desc_act", "sym",
                                              "format")},
            **quantized,
        }
    return summary
