"""`quantkit eval`: load the model (and the base for KLD), run the tasks, write one JSON.

Everything a user can get wrong (task names, a missing --base, benchmark files, a base
with another tokenizer, an unwritable --out) is checked before the first forward pass.
Perplexity and KL divergence share one pass over the held-out windows: for each batch the
base and the quantized model see the same tokens, and the quantized model's logits give
its perplexity too.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from quantkit.checkpoint import check_file_destination, open_checkpoint
from quantkit.compute import compute_dtype, computing_in, dtype_name, stored_dtype
from quantkit.errors import ConfigError, QuantizationError
from quantkit.evaluate import TASKS
from quantkit.evaluate.kld import KldTotal
from quantkit.evaluate.mcq import (
    BENCHMARKS,
    SAMPLES_DIR,
    evaluate_benchmark,
    load_benchmark,
    resolve_data_dirs,
)
from quantkit.evaluate.perplexity import NllTotal, iter_batches, token_nll, window_logits
from quantkit.evaluate.provenance import (
    RESULT_SCHEMA_VERSION,
    describe_model,
    model_dtype,
    timestamp,
    utc_now,
    versions,
    write_result,
)
from quantkit.loading import check_remote_code, load, load_tokenizer, resolve_device
from quantkit.validate import validate_source

log = logging.getLogger(__name__)

DEFAULT_SEQLEN = 2048


@dataclass(frozen=True)
class EvalConfig:
    model: Path
    out: Path
    tasks: tuple[str, ...] = ("ppl", "ceval", "cmmlu", "mmlu")
    base: Path | None = None
    text: Path | None = None  # None: the held-out split of calib_data
    text_format: str = "plain"  # chat: held-out conversations in the model's chat template
    seqlen: int | None = None  # None: min(2048, the model's context length)
    stride: int | None = None  # None: seqlen (non-overlapping windows)
    max_tokens: int | None = None  # per held-out text, for quick runs
    shots: int = 5
    limit: int | None = None
    data_dirs: tuple[str, ...] = ()
    batch_size: int = 4
    max_length: int | None = None  # MCQ prompt budget; None: the model's context length
    device: str = "auto"
    dtype: str | None = None
    trust_remote_code: bool = False


def parse_tasks(value: str | tuple[str, ...] | list[str], *, has_base: bool) -> tuple[str, ...]:
    """'ppl,kld' -> ('ppl', 'kld'); unknown names and kld without a base are user errors."""
    names = value.split(",") if isinstance(value, str) else list(value)
    tasks = tuple(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"--tasks {','.join(names)}: choose from {', '.join(TASKS)}")
    if "kld" in tasks and not has_base:
        raise ConfigError("--tasks kld needs --base BF16_MODEL (the unquantized model whose "
                          "next-token distributions the KL divergence is measured from)")
    return tasks


def _check_config(cfg: EvalConfig) -> None:
    for flag, value, low in (("--shots", cfg.shots, 0), ("--limit", cfg.limit, 1),
                             ("--batch-size", cfg.batch_size, 1), ("--seqlen", cfg.seqlen, 2),
                             ("--stride", cfg.stride, 1), ("--max-length", cfg.max_length, 2),
                             ("--max-tokens", cfg.max_tokens, 2)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}")
    if cfg.text is not None and not Path(cfg.text).is_file():
        raise ConfigError(f"--text {cfg.text}: no such file; pass a UTF-8 text file")
    check_file_destination(cfg.out, inputs=_inputs(cfg))


def _inputs(cfg: EvalConfig) -> list[Path]:
    """What eval reads; its --out may be none of them, nor inside one."""
    return [p for p in (cfg.model, cfg.base, cfg.text) if p is not None]


def context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "model_max_length", "max_sequence_length",
                "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def window_settings(cfg: EvalConfig, model: nn.Module) -> tuple[int, int]:
    limit = context_length(model)
    seqlen = cfg.seqlen or min(DEFAULT_SEQLEN, limit or DEFAULT_SEQLEN)
    if limit and seqlen > limit:
        raise ConfigError(f"--seqlen {seqlen}: longer than the model's context "
                          f"({limit} tokens); pass --seqlen {limit} or less")
    stride = cfg.stride or seqlen
    if stride > seqlen:
        raise ConfigError(f"--stride {stride}: longer than --seqlen {seqlen}")
    return seqlen, stride


def heldout_ids(tokenizer, text: Path | None, text_format: str = "plain"
                ) -> dict[str, torch.Tensor]:
    from quantkit.data import heldout_tokens

    return heldout_tokens(tokenizer, text_file=text, text_format=text_format)


def check_same_tokenizer(tokenizer, base_tokenizer, base: Path, model: Path) -> None:
    if tokenizer.get_vocab() != base_tokenizer.get_vocab():
        raise ConfigError(
            f"--base {base}: its tokenizer differs from {model}'s ({len(base_tokenizer)} vs "
            f"{len(tokenizer)} tokens); KL divergence compares models over the same tokens, "
            "so pass the model this one was quantized from")


def fingerprint(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


def evaluate_text(model: nn.Module, ids: torch.Tensor, *, seqlen: int, stride: int,
                  batch_size: int, base: nn.Module | None = None, desc: str = "text"
                  ) -> tuple[dict, KldTotal | None]:
    """Perplexity of `model` on `ids`, and the KL totals against `base` on the same windows."""
    nll = NllTotal()
    kld = KldTotal() if base is not None else None
    batches = list(iter_batches(ids, seqlen, stride, batch_size))
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        logits, targets = window_logits(model, ids, batch)
        nll.add(token_nll(logits, targets))
        if kld is not None:
            base_logits, _ = window_logits(base, ids, batch)
            if base_logits.shape[-1] != logits.shape[-1]:
                raise ConfigError(f"--base: its output vocabulary ({base_logits.shape[-1]}) "
                                  f"differs from the model's ({logits.shape[-1]})")
            kld.add(base_logits, logits)
    return dict(nll.summary(), windows=sum(map(len, batches))), kld


def heldout_texts(cfg: EvalConfig, tokenizer, use_base: bool) -> dict[str, torch.Tensor]:
    """The held-out token streams, checked to be the same under the base's tokenizer."""
    texts = heldout_ids(tokenizer, cfg.text, cfg.text_format)
    if use_base:
        base_tokenizer = load_tokenizer(cfg.base, trust_remote_code=cfg.trust_remote_code)
        check_same_tokenizer(tokenizer, base_tokenizer, cfg.base, cfg.model)
        base_texts = heldout_ids(base_tokenizer, cfg.text, cfg.text_format)
        if any(not torch.equal(base_texts[k], texts[k]) for k in texts):
            raise ConfigError(f"--base {cfg.base}: its tokenizer encodes the held-out text "
                              f"differently from {cfg.model}'s; pass the model's own base")
    return {k: v[:cfg.max_tokens] for k, v in texts.items()}


def text_results(cfg: EvalConfig, tasks: tuple[str, ...], model: nn.Module,
                 base: nn.Module | None, texts: dict[str, torch.Tensor]
                 ) -> tuple[dict, dict]:
    """(results, settings) of ppl and kld: one pass per held-out text."""
    seqlen, stride = window_settings(cfg, model)
    settings = {"seqlen": seqlen, "stride": stride, "max_tokens": cfg.max_tokens,
                "text": str(Path(cfg.text).absolute()) if cfg.text else "calib_data/heldout",
                "text_format": cfg.text_format,
                "text_tokens": {k: int(v.numel()) for k, v in texts.items()},
                "text_fingerprint": {k: fingerprint(v) for k, v in texts.items()}}
    ppl, klds = {}, {}
    for split, ids in texts.items():
        ppl[split], klds[split] = evaluate_text(model, ids, seqlen=seqlen, stride=stride,
                                                batch_size=cfg.batch_size, base=base,
                                                desc=f"text {split}")
        log.info("%s: ppl %.4f over %d tokens", split, ppl[split]["ppl"], ppl[split]["tokens"])
    results: dict = {"ppl": ppl} if "ppl" in tasks else {}
    if base is not None:
        results["kld"] = {split: total.summary() for split, total in klds.items()}
        if len(klds) > 1:
            merged = KldTotal()
            for total in klds.values():
                merged = merged.merged(total)
            results["kld"]["all"] = merged.summary()
    return results, settings


def run_eval(cfg: EvalConfig) -> dict:
    """Run the tasks of `cfg`, write the result JSON to `cfg.out`, and return it."""
    started, t0 = utc_now(), time.perf_counter()
    tasks = parse_tasks(cfg.tasks, has_base=cfg.base is not None)
    use_base = "kld" in tasks
    if cfg.base is not None and not use_base:
        log.warning("--base is only used by the kld task, which --tasks leaves out")
    _check_config(cfg)
    for path in (cfg.model, cfg.base) if use_base else (cfg.model,):
        ckpt = open_checkpoint(path)  # a broken folder or unreviewed remote code fails now,
        check_remote_code(ckpt.path, ckpt.config, cfg.trust_remote_code)  # not after an hour
        validate_source(ckpt, trust_remote_code=cfg.trust_remote_code)
    benches = [t for t in tasks if t in BENCHMARKS]
    data_dirs = resolve_data_dirs(cfg.data_dirs, benches)
    subject_sets = {b: load_benchmark(BENCHMARKS[b], data_dirs[b], shots=cfg.shots,
                                      limit=cfg.limit) for b in benches}
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    texts = heldout_texts(cfg, tokenizer, use_base) if {"ppl", "kld"} & set(tasks) else {}

    model = load(cfg.model, device=device, dtype=cfg.dtype,
                 trust_remote_code=cfg.trust_remote_code, validate=False)
    # fp32 arithmetic where bf16 is emulated (CPUs without AVX512-BF16/AMX), one module's
    # weights upcast at a time; see quantkit.compute.
    compute = compute_dtype(device, stored_dtype(model))
    settings: dict = {"tasks": list(tasks), "device": device, "dtype": cfg.dtype,
                      "compute_dtype": dtype_name(compute), "batch_size": cfg.batch_size}
    with computing_in(model, compute):
        results = _run_tasks(cfg, tasks, model, tokenizer, texts, benches, subject_sets,
                             data_dirs, device, compute, settings)
    result = {
        "kind": "eval",
        "schema_version": RESULT_SCHEMA_VERSION,
        "model": describe_model(cfg.model, loaded_dtype=model_dtype(model)),
        "base": describe_model(cfg.base) if use_base else None,
        "settings": settings,
        "results": results,
        "versions": versions(),
        "started": timestamp(started),
        "finished": timestamp(utc_now()),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    check_finite_results(results, cfg)
    write_result(cfg.out, result, inputs=_inputs(cfg))
    return result


def check_finite_results(results: dict, cfg: EvalConfig) -> None:
    """A NaN perplexity is a broken model or dtype, never a figure to publish."""
    for task in ("ppl", "kld"):
        for split, block in results.get(task, {}).items():
            value = block.get("ppl" if task == "ppl" else "mean")
            if value is not None and not math.isfinite(value):
                raise QuantizationError(
                    f"{cfg.model}: {task} on {split} is {value}; the model's logits are not "
                    "finite (try --dtype fp32), so no result was written")


def _run_tasks(cfg: EvalConfig, tasks, model: nn.Module, tokenizer, texts: dict,
               benches: list, subject_sets: dict, data_dirs: dict, device: str,
               compute: torch.dtype, settings: dict) -> dict:
    use_base = "kld" in tasks
    results: dict = {}
    if texts:
        base = None
        if use_base:  # the base against itself (recipes measure every model): load it once
            same = Path(cfg.base).resolve() == Path(cfg.model).resolve()
            base = model if same else load(cfg.base, device=device, dtype=cfg.dtype,
                                           trust_remote_code=cfg.trust_remote_code,
                                           validate=False)
        separate = base is not None and base is not model
        with computing_in(base, compute) if separate else contextlib.nullcontext():
            text_out, text_settings = text_results(cfg, tasks, model, base, texts)
        results.update(text_out)
        settings.update(text_settings)
        del base
    if benches:
        max_length = cfg.max_length or context_length(model) or DEFAULT_SEQLEN
        settings.update(shots=cfg.shots, limit=cfg.limit, max_length=max_length,
                        data_dirs={b: str(Path(data_dirs[b]).absolute()) for b in benches})
    for b in benches:
        results[b] = evaluate_benchmark(model, tokenizer, BENCHMARKS[b], subject_sets[b],
                                        batch_size=cfg.batch_size, max_length=max_length)
        results[b].update(shots=cfg.shots, limit=cfg.limit, sample_data=_is_sample(data_dirs[b]))
        log.info("%s: average %.2f over %d questions", BENCHMARKS[b].title,
                 results[b]["average"], results[b]["questions"])
    return results


def _is_sample(path: Path) -> bool:
    """Results on the shipped sample questions must not pass for the official benchmark."""
    return SAMPLES_DIR in Path(path).absolute().resolve().parents
