"""`quantkit gptq`: from a BF16 checkpoint folder to a GPTQ folder, checking inputs first.

Every mistake a user can make is caught before the long part starts (flags, calibration
text, group sizes that do not divide a layer, NaN weights), and nothing is written until
the whole model is quantized, so a failure or Ctrl-C leaves no output behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from quantkit.checkpoint import (
    Checkpoint,
    checkpoint_stream,
    folder_size,
    parse_size,
)
from quantkit.compute import COMPUTE_DTYPES, compute_dtype, dtype_name, stored_dtype
from quantkit.errors import ConfigError, QuantizationError
from quantkit.families import Family, family_for
from quantkit.gptq.algorithm import SCALE_SEARCHES, SUPPORTED_BITS, QuantSpec
from quantkit.gptq.artifact import (
    MANIFEST_KEY,
    QUANTIZE_CONFIG,
    quantization_config,
    write_artifact,
)
from quantkit.gptq.calibrate import (
    SOLVERS,
    QuantizedLayers,
    StreamOptions,
    auto_batch_size,
    find_decoder_layers,
    quantize_layers,
)
from quantkit.gptq.distributed import REDUCE_MODES, SingleProcess, process_group
from quantkit.gptq.lazy_model import ArtifactSink, LazyLayers, build_skeleton
from quantkit.gptq.naming import key_renamer
from quantkit.gptq.pack import check_packable
from quantkit.gptq.skip import is_skipped, unmatched
from quantkit.gptq.timing import PhaseTimer
from quantkit.loading import (
    load_tokenizer,
    open_quantization_source,
)
from quantkit.validate import context_length

log = logging.getLogger(__name__)

GROUP_SIZES = (-1, 32, 64, 128)
LOAD_MODES = ("lazy", "whole")  # lazy: layer by layer from disk; whole: the model in RAM


@dataclass(frozen=True)
class GPTQConfig:
    """Everything `quantkit gptq` needs; the CLI, recipes and the benchmark build one."""

    source: Path
    dest: Path
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    group_aware: bool = True  # reorder whole groups by activation energy; g_idx stays trivial
    scale_search: str = "hessian"  # minmax | mse | hessian
    block_start_scales: bool = True  # False: the grid from already-updated columns (0.1.0)
    true_sequential: bool = True
    damp: float = 0.05
    calib: Path | None = None  # None: the mixed Chinese/English set in calib_data/
    calib_format: str = "auto"  # text, chat, mixed; auto: see quantkit.data.resolve_format
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int | None = None  # None: about 16k tokens per forward
    device: str = "auto"
    trust_remote_code: bool = False
    force: bool = False
    max_shard_size: str = "5GB"
    solver: str = "fast"  # "reference": the paper's loop, one matrix at a time
    max_gpu_memory: str | None = None  # e.g. "24GiB": keep activations on the host if needed
    seed: int = 0
    compute_dtype: str = "auto"  # auto: fp32 on CPU, as stored on CUDA
    load: str = "lazy"  # "whole": the model in host memory, `GPTQResult.model` fake-quantized
    hessian_reduce: str = "allreduce"  # under torchrun: "allreduce" or "owner" (distributed.py)
    skip_modules: tuple[str, ...] = ()  # decoder-layer Linears kept as they are (gptq/skip.py)

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"--bits {self.bits}: GPTQ checkpoints support "
                              f"{', '.join(map(str, SUPPORTED_BITS))} bits; choose one of them")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"--group-size {self.group_size}: choose 32, 64 or 128 (what "
                              "GPTQ kernels run), or -1 for one group per output row")
        if not 0 < self.damp < 1:
            raise ConfigError(f"--damp {self.damp}: must be between 0 and 1 (exclusive); "
                              "0.01 is the usual value, 0.1 for hard models")
        for flag, value in (("--nsamples", self.nsamples), ("--seqlen", self.seqlen),
                            ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} {value}: must be a positive number")
        if self.scale_search not in SCALE_SEARCHES:
            raise ConfigError(f"--scale-search {self.scale_search}: choose one of "
                              f"{', '.join(SCALE_SEARCHES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"--compute-dtype {self.compute_dtype}: choose one of "
                              f"{', '.join(COMPUTE_DTYPES)}")
        if self.static_groups and not self.desc_act:
            log.debug("--static-groups has no effect without --desc-act")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver {self.solver!r}: choose one of {', '.join(SOLVERS)}")
        if self.load not in LOAD_MODES:
            raise ConfigError(f"load {self.load!r}: choose one of {', '.join(LOAD_MODES)}")
        if self.hessian_reduce not in REDUCE_MODES:
            raise ConfigError(f"--hessian-reduce {self.hessian_reduce}: choose one of "
                              f"{', '.join(REDUCE_MODES)}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size, sym=self.sym,
                         desc_act=self.desc_act, static_groups=self.static_groups,
                         group_aware=self.group_aware and not self.desc_act,
                         scale_search=self.scale_search,
                         block_start_scales=self.block_start_scales, damp=self.damp)

    def settings(self) -> dict:
        spec = self.spec
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "desc_act": self.desc_act, "static_groups": self.static_groups,
                "group_aware": spec.group_aware, "scale_search": self.scale_search,
                "block_start_scales": self.block_start_scales,
                "true_sequential": self.true_sequential, "damp_percent": self.damp,
                "solver": self.solver, "checkpoint_format": "gptq",
                "skip_modules": list(self.skip_modules)}


@dataclass
class GPTQResult:
    dest: Path
    # load="whole": the source model, each quantized weight replaced by its dequantized
    # value; load="lazy": the meta-device skeleton (the weights went to disk layer by layer)
    model: nn.Module
    layers: QuantizedLayers
    manifest: dict
    seconds: float
    output_bytes: int
    is_main: bool = True  # False on torchrun ranks other than 0, which write nothing


# --------------------------------------------------------------------------- checks


def check_seqlen(ckpt: Checkpoint, seqlen: int) -> None:
    limit = context_length(ckpt.config)
    if limit is not None and seqlen > limit:
        raise ConfigError(f"--seqlen {seqlen}: longer than the context of {ckpt.path} "
                          f"({limit} tokens); pass --seqlen {limit} or less")


def check_layers(model: nn.Module, family: Family | None, spec: QuantSpec, label: str,
                 skip_modules: tuple[str, ...] = ()) -> None:
    """Every Linear to quantize must split into whole groups and pack into whole words;
    every --skip-modules pattern must name Linears, the same ones in every layer."""
    layers_path, layers = find_decoder_layers(model, family, label)
    linears = {f"{layers_path}.{index}.{name}": module
               for index, layer in enumerate(layers)
               for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
    typos = unmatched(skip_modules, linears)
    if typos:
        example = next(iter(linears), "model.layers.0.mlp.down_proj")
        raise ConfigError(f"--skip-modules {','.join(typos)}: matches no Linear in the decoder "
                          f"layers of {label}; name modules as in {example} (or a dotted "
                          "part of the name, such as its last one)")
    if skip_modules:
        per_layer = {tuple(block_modules(layer, prefix=f"{layers_path}.{index}",
                                         skip_modules=skip_modules))
                     for index, layer in enumerate(layers)}
        if len(per_layer) > 1:
            raise ConfigError(f"--skip-modules {','.join(skip_modules)}: skips a Linear in some "
                              "decoder layers only; transformers' GPTQ loader can leave only "
                              "the same Linears unquantized in every layer, so name them "
                              "without a layer (q_proj, mlp.down_proj)")
        if per_layer == {()}:
            raise ConfigError(f"--skip-modules {','.join(skip_modules)}: skips every Linear of "
                              f"{label}; nothing would be quantized")
    linears = {n: m for n, m in linears.items() if not is_skipped(n, skip_modules)}
    widths = {m.in_features for m in linears.values()}
    for full, module in linears.items():
        if spec.group_size != -1 and module.in_features % spec.group_size:
            # A ragged last group would be valid in the v1 layout and for the torch
            # kernels, but vLLM's Marlin refuses it; refusing here keeps every output
            # loadable everywhere.
            fits = [g for g in GROUP_SIZES if g != -1 and all(w % g == 0 for w in widths)]
            raise ConfigError(
                f"--group-size {spec.group_size}: does not divide the input size "
                f"{module.in_features} of {full}; group sizes that divide every layer "
                f"of this model: {', '.join(map(str, fits + [-1]))} (or leave such layers "
                "unquantized with --skip-modules)")
        reason = check_packable(module.out_features, module.in_features, spec.bits)
        if reason:
            raise QuantizationError(f"{full} cannot be stored as {spec.bits}-bit GPTQ: "
                                    f"{reason}")


def block_modules(layer: nn.Module, *, prefix: str, skip_modules: tuple[str, ...]
                  ) -> list[str]:
    """Layer-relative names of the Linears a decoder layer quantizes."""
    return [name for name, module in layer.named_modules()
            if isinstance(module, nn.Linear) and not is_skipped(f"{prefix}.{name}", skip_modules)]


def skip_settings(cfg: GPTQConfig, model: nn.Module, family: Family | None, label: str
                  ) -> dict:
    """`quantization_config` arguments for --skip-modules (see `artifact.quantization_config`);
    `check_layers` made sure every layer quantizes the same Linears."""
    if not cfg.skip_modules:
        return {}
    layers_path, layers = find_decoder_layers(model, family, label)
    return {"skip_modules": cfg.skip_modules,
            "modules_in_block": block_modules(layers[0], prefix=f"{layers_path}.0",
                                              skip_modules=cfg.skip_modules)}


def check_finite(model: nn.Module, label: str) -> None:
    """NaN/Inf weights poison every Hessian downstream; name the tensor instead."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise QuantizationError(f"{label}: tensor {name} contains NaN or Inf values; the "
                                    "checkpoint is damaged, download or convert it again")


def check_tensor_names(model: nn.Module, ckpt: Checkpoint, family: Family | None) -> None:
    """Each Linear we will quantize must be a tensor of the checkpoint, by the same name."""
    layers_path, layers = find_decoder_layers(model, family, str(ckpt.path))
    rename = key_renamer(model)
    stored = {rename(name) for name in ckpt.weight_map}
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            tensor = f"{layers_path}.{index}.{name}.weight"
            if isinstance(module, nn.Linear) and tensor not in stored:
                raise QuantizationError(
                    f"{ckpt.path}: the model's module {tensor} has no tensor of that name "
                    "in the checkpoint; quantkit cannot map it")


def activations_fit(max_gpu_memory: str | None, *, tokens: int, hidden: int,
                    layer_bytes: int, widest_input: int, widest_rows: int,
                    dtype_bytes: int = 2) -> bool:
    """Whether the calibration activations can stay on the GPU under `--max-gpu-memory`.

    Counts the layer's inputs and outputs, the layer itself, and the solve's float32
    workspace (Hessian, its inverse, the stacked weights being solved).
    """
    if max_gpu_memory is None:
        return True
    budget = parse_size(max_gpu_memory)
    activations = 2 * tokens * hidden * dtype_bytes
    solve = 3 * widest_input**2 * 4 + 3 * widest_rows * widest_input * 4
    return activations + 2 * layer_bytes + solve <= budget


def stream_options(cfg: GPTQConfig, model: nn.Module, family: Family | None, device: str,
                   label: str, input_ids: torch.Tensor) -> StreamOptions:
    nsamples, seqlen = input_ids.shape
    on_host = False
    if device != "cpu" and cfg.max_gpu_memory is not None:
        _, layers = find_decoder_layers(model, family, label)
        linears = [m for m in layers[0].modules() if isinstance(m, nn.Linear)]
        layer_bytes = sum(p.numel() * p.element_size() for p in layers[0].parameters())
        hidden = model.get_input_embeddings().embedding_dim
        on_host = not activations_fit(
            cfg.max_gpu_memory, tokens=nsamples * seqlen, hidden=hidden,
            layer_bytes=layer_bytes, widest_input=max(m.in_features for m in linears),
            widest_rows=sum(m.out_features for m in linears))
        if on_host:
            log.info("calibration activations stay in host memory to fit --max-gpu-memory %s",
                     cfg.max_gpu_memory)
    return StreamOptions(device=device, batch_size=cfg.batch_size or auto_batch_size(seqlen),
                         true_sequential=cfg.true_sequential, solver=cfg.solver,
                         activations_on_host=on_host,
                         compute_dtype=calibration_dtype(cfg, model, device),
                         skip_modules=cfg.skip_modules)


def calibration_dtype(cfg: GPTQConfig, model: nn.Module, device: str) -> torch.dtype:
    """fp32 forwards on any CPU unless asked otherwise: even where bf16 is native, its
    rounded activations cost GPTQ measurable quality (bench/RESULTS.md), and CPU runs are
    for models small enough to afford it. CUDA: bf16 forwards, fp32 Hessians."""
    if cfg.compute_dtype == "auto" and device == "cpu":
        return torch.float32
    return compute_dtype(device, stored_dtype(model), cfg.compute_dtype)


# --------------------------------------------------------------------------- run


def build_calibration(ckpt: Checkpoint, cfg: GPTQConfig):
    """The calibration rows and their report (quantkit.data.Calibration)."""
    from quantkit.data import build_calibration

    tokenizer = load_tokenizer(ckpt.path, trust_remote_code=cfg.trust_remote_code)
    return build_calibration(tokenizer, fmt=cfg.calib_format, calib_file=cfg.calib,
                             nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed)


def load_source_model(ckpt: Checkpoint, trust_remote_code: bool) -> nn.Module:
    """The BF16 model in host memory, in its stored dtype; layers go to the device one by one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        ckpt.path, dtype="auto", device_map=None, trust_remote_code=trust_remote_code)
    return model.eval()


def gptq_quantize(cfg: GPTQConfig, *, input_ids: torch.Tensor | None = None,
                  on_layer: Callable[[int, float], None] | None = None,
                  timer: PhaseTimer | None = None) -> GPTQResult:
    """Quantize `cfg.source` into `cfg.dest` atomically; the source is only read.

    `input_ids` replaces the calibration text (tests, benchmarks); by default it comes from
    `quantkit.data.calibration_samples`. Under torchrun every rank calls this and gets its
    share of the rows (see `distributed`). `on_layer(index, seconds)` is called after each
    decoder layer with load="lazy", and `timer` receives per-phase seconds (benchmarks).
    """
    started = _dt.datetime.now(_dt.timezone.utc)
    ckpt, device = open_quantization_source(
        cfg.source, dest=cfg.dest, trust_remote_code=cfg.trust_remote_code, device=cfg.device,
        force=cfg.force, max_shard_size=cfg.max_shard_size)
    if cfg.max_gpu_memory is not None:
        parse_size(cfg.max_gpu_memory)
    check_seqlen(ckpt, cfg.seqlen)
    with process_group(device, cfg.hessian_reduce) as parallel:
        report = None
        if input_ids is None:
            calibration = build_calibration(ckpt, cfg)
            input_ids, report = calibration.ids, calibration.report
        timer = timer or PhaseTimer(parallel.device)
        family = family_for(ckpt.config)
        label = str(ckpt.path)
        if cfg.load == "lazy":
            with timer.phase("load"):
                model = build_skeleton(ckpt, cfg.trust_remote_code)
            check_layers(model, family, cfg.spec, label, cfg.skip_modules)
            check_tensor_names(model, ckpt, family)  # values are checked as layers are read
            return quantize_lazily(model, input_ids, ckpt, cfg, family=family, timer=timer,
                                   parallel=parallel, started=started, on_layer=on_layer,
                                   calibration_report=report)
        with timer.phase("load"):
            model = load_source_model(ckpt, cfg.trust_remote_code)
        check_layers(model, family, cfg.spec, label, cfg.skip_modules)
        check_tensor_names(model, ckpt, family)
        check_finite(model, label)
        return quantize_and_write(model, input_ids, ckpt, ckpt.iter_tensors(), cfg,
                                  device=parallel.device, family=family, timer=timer,
                                  started=started, parallel=parallel,
                                  calibration_report=report)


def run_manifest(cfg: GPTQConfig, input_ids: torch.Tensor, options: StreamOptions, device: str,
                 layers: QuantizedLayers, timer: PhaseTimer, seconds: float,
                 parallel: SingleProcess, model: nn.Module,
                 calibration_report: dict | None = None) -> dict:
    """The `gptq` block of quantkit.json: settings, calibration, per-Linear errors, time.

    `calibration_report` (quantkit.data.calibration_report) says what the artifact was
    calibrated on; given input_ids have none.
    """
    return {
        "settings": cfg.settings(),
        "calibration": {"file": str(cfg.calib) if cfg.calib else "default",
                        "nsamples": int(input_ids.shape[0]), "seqlen": int(input_ids.shape[1]),
                        "batch_size": options.batch_size, "seed": cfg.seed,
                        **({"report": calibration_report} if calibration_report else {})},
        "device": device,
        "stored_dtype": dtype_name(stored_dtype(model)),
        "compute_dtype": dtype_name(options.compute_dtype),
        "load": cfg.load,
        "ranks": parallel.world_size,
        **({"hessian_reduce": cfg.hessian_reduce} if parallel.world_size > 1 else {}),
        "layers": {r.name: {"error": round(r.error, 6), "rtn_error": round(r.rtn_error, 6),
                            "damp": r.damp} for r in layers.reports},
        "mean_error": round(_mean(r.error for r in layers.reports), 6),
        "mean_rtn_error": round(_mean(r.rtn_error for r in layers.reports), 6),
        "seconds": round(seconds, 3),
        "phases": {k: v for k, v in timer.rounded().items() if k != "write"},  # not done yet
    }


def _rank_plan(cfg: GPTQConfig, model: nn.Module, family: Family | None, device: str,
               label: str, input_ids: torch.Tensor, parallel: SingleProcess
               ) -> tuple[StreamOptions, torch.Tensor]:
    """The streaming options and this rank's share of the calibration rows (all of them in
    a single process), logged once."""
    options = stream_options(cfg, model, family, device, label, input_ids)
    _log_start(cfg, device, input_ids, parallel, options.compute_dtype)
    rows, batch_size = parallel.rows(input_ids, options.batch_size)
    return replace(options, batch_size=batch_size), rows


def _log_start(cfg: GPTQConfig, device: str, input_ids: torch.Tensor,
               parallel: SingleProcess, compute: torch.dtype) -> None:
    ranks = f" x {parallel.world_size} ranks" if parallel.world_size > 1 else ""
    log.info("GPTQ %d-bit, group %d%s%s on %s%s computing in %s: %d x %d calibration tokens",
             cfg.bits, cfg.group_size, "" if cfg.sym else ", asym",
             ", act-order" if cfg.desc_act else "", device, ranks, dtype_name(compute),
             input_ids.shape[0], input_ids.shape[1])


def quantize_and_write(model: nn.Module, input_ids: torch.Tensor, source: Checkpoint,
                       source_tensors: Iterable[tuple[str, torch.Tensor]], cfg: GPTQConfig,
                       *, device: str, family: Family | None, timer: PhaseTimer,
                       started: _dt.datetime | None = None,
                       parallel: SingleProcess | None = None,
                       calibration_report: dict | None = None) -> GPTQResult:
    """The part the CLI and the speed benchmark share: quantize in place, then write."""
    parallel = parallel or SingleProcess(device)
    t0 = time.perf_counter()
    label = str(source.path)
    options, rows = _rank_plan(cfg, model, family, device, label, input_ids, parallel)
    layers = quantize_layers(model, rows, cfg.spec, family=family, options=options,
                             timer=timer, label=label, parallel=parallel)
    manifest = run_manifest(cfg, input_ids, options, device, layers, timer,
                            time.perf_counter() - t0, parallel, model, calibration_report)
    parallel.barrier()  # every rank finished: only now may rank 0 publish the artifact
    if not parallel.is_main:
        return GPTQResult(Path(cfg.dest), model, layers, manifest, 0.0, 0, is_main=False)
    with timer.phase("write"):
        dest = write_artifact(Path(cfg.dest), source, source_tensors, layers=layers,
                              spec=cfg.spec, true_sequential=cfg.true_sequential,
                              manifest=manifest, force=cfg.force,
                              max_shard_size=cfg.max_shard_size, rename=key_renamer(model),
                              method=_method(cfg),
                              **skip_settings(cfg, model, family, str(source.path)))
    seconds = time.perf_counter() - t0
    result = GPTQResult(dest, model, layers, manifest, seconds, folder_size(dest))
    log_summary(result, timer)
    return result


def _method(cfg: GPTQConfig) -> str:
    return "rtn" if cfg.solver == "rtn" else "gptq"


def quantize_lazily(model: nn.Module, input_ids: torch.Tensor, ckpt: Checkpoint,
                    cfg: GPTQConfig, *, family: Family | None, timer: PhaseTimer,
                    parallel: SingleProcess, started: _dt.datetime | None = None,
                    on_layer: Callable[[int, float], None] | None = None,
                    calibration_report: dict | None = None) -> GPTQResult:
    """Quantize a meta skeleton layer by layer from `ckpt`, streaming the artifact out.

    Rank 0 opens the output; every finished layer's tensors go to it and leave memory.
    The folder is renamed into place only after every rank has finished.
    """
    device = parallel.device
    t0 = time.perf_counter()
    label = str(ckpt.path)
    options, rows = _rank_plan(cfg, model, family, device, label, input_ids, parallel)
    rename = key_renamer(model)
    layers_path, _ = find_decoder_layers(model, family, label)
    output = (checkpoint_stream(cfg.dest, source=ckpt, force=cfg.force,
                                max_shard_size=cfg.max_shard_size)
              if parallel.is_main else contextlib.nullcontext())
    with output as out:
        sink = ArtifactSink(out, ckpt, rename, layers_path) if out is not None else None
        source = LazyLayers(model, ckpt, rename, device=device, layers_path=layers_path,
                            sink=sink.write_layer if sink else None, on_layer=on_layer)
        layers = quantize_layers(model, rows, cfg.spec, family=family, options=options,
                                 timer=timer, label=label, source=source, parallel=parallel)
        manifest = run_manifest(cfg, input_ids, options, device, layers, timer,
                                time.perf_counter() - t0, parallel, model, calibration_report)
        manifest["layer_seconds"] = [round(source.seconds[i], 3) for i in sorted(source.seconds)]
        if out is not None:
            with timer.phase("write"):
                sink.finish()
            qconfig = quantization_config(cfg.spec, true_sequential=cfg.true_sequential,
                                          method=_method(cfg),
                                          **skip_settings(cfg, model, family, label))
            out.config = dict(ckpt.config, quantization_config=qconfig)
            out.extra_files = {QUANTIZE_CONFIG: qconfig}
            out.manifest_extra = {MANIFEST_KEY: manifest}
        parallel.barrier()  # every rank finished: only now may rank 0 publish the artifact
    if not parallel.is_main:
        return GPTQResult(Path(cfg.dest), model, layers, manifest, 0.0, 0, is_main=False)
    dest = Path(cfg.dest)
    result = GPTQResult(dest, model, layers, manifest, time.perf_counter() - t0,
                        folder_size(dest))
    log_summary(result, timer)
    return result


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def log_summary(result: GPTQResult, timer: PhaseTimer) -> None:
    for index, error, rtn_error in result.layers.layer_errors():
        log.info("layer %3d: output error %.5f (round-to-nearest %.5f)", index, error, rtn_error)
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in timer.seconds.items() if v >= 0.05)
    log.info("GPTQ done in %.1f s (%s); mean output error %.5f vs %.5f for round-to-nearest",
             result.seconds, phases, result.manifest["mean_error"],
             result.manifest["mean_rtn_error"])
    log.info("wrote %s (%.1f MB)", result.dest, result.output_bytes / 1e6)
