"""GPTQ quality on real trained weights: every method side by side on identical data.

    python bench/quality.py --results-md          # the committed tables (hours on 2 cores)
    python bench/quality.py --settings 4g64 --methods default,gptqmodel --windows 16

One run, one model (SmolLM2-135M-Instruct, built by scripts/real_models.py), the same
calibration rows for every method (token ids written once and handed to each quantizer,
GPTQModel included) and the same held-out windows for every score. Each quantizer runs in
a child process of its own, so its seconds and peak RSS are its own; GPTQModel 7.6.0 runs
inside the interop venv (`.ci/interop.sh` builds it). Scores: held-out perplexity and its
rise over the bf16 model, mean KL divergence from the bf16 model and top-1 agreement, on
plain English held-out windows and on held-out conversations rendered with the model's
chat template. The default plan has three parts in one run: quantkit's default, GPTQModel
and RTN at every setting; quantkit's levers at 4-bit g64, each removed from the default on
its own; and quantkit's default calibrated on plain prose, chat rows and the mixed set
(issue 16). Writes JSON to bench/results/ and, with --results-md, the tables of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench.common import peak_rss_bytes  # noqa: E402

log = logging.getLogger("quality")

DEFAULT_INTEROP = Path(os.environ.get("INTEROP_VENV", REPO / ".venv-interop"))
GPTQMODEL_CHILD = REPO / "bench" / "gptqmodel_child.py"
SETTINGS = {"4g64": (4, 64), "3g64": (3, 64), "4g32": (4, 32), "4g128": (4, 128)}
# Calibration kinds: "english" is the main tables' (quantkit's English prose sampler); the
# others are `quantkit gptq --calib-format` values on the built-in bilingual set.
CALIBRATIONS = ("english", "text", "chat", "mixed")

# name -> (label, GPTQConfig overrides). "default" is `quantkit gptq` with no algorithm
# flag; "v0.1.0" is the previous release's algorithm; the levers between them can be
# measured one at a time on top of v0.1.0 ("+...") and removed one at a time from the
# default ("default-..."; the default plan's).
OLD = dict(damp=0.01, group_aware=False, scale_search="minmax", block_start_scales=False,
           compute_dtype="bf16")
QUANTKIT_METHODS = {
    "v0.1.0": ("quantkit 0.1.0 default (bf16)", OLD),
    "v0.1.0-fp32": ("0.1.0 + fp32 forwards", {**OLD, "compute_dtype": "fp32"}),
    "+block-start": ("0.1.0 + block-start group grids", {**OLD, "block_start_scales": True}),
    "+damp.05": ("0.1.0 + damp 0.05", {**OLD, "damp": 0.05}),
    "+static-act": ("0.1.0 + desc-act + static groups + damp 0.05",
                    {**OLD, "damp": 0.05, "desc_act": True, "static_groups": True}),
    "+gar": ("0.1.0 + group-aware order + damp 0.05",
             {**OLD, "damp": 0.05, "group_aware": True}),
    "+mse": ("0.1.0 + MSE scale search", {**OLD, "scale_search": "mse"}),
    "+hessian": ("0.1.0 + Hessian-weighted scale search", {**OLD, "scale_search": "hessian"}),
    "default": ("**quantkit default**", {}),
    "default-bf16": ("default, bf16 forwards", {"compute_dtype": "bf16"}),
    "default-fp32": ("default, fp32 forwards", {"compute_dtype": "fp32"}),
    "default-mse": ("default with --scale-search mse", {"scale_search": "mse"}),
    "default-no-block-start": ("default with grids from updated columns (0.1.0's)",
                               {"block_start_scales": False}),
    "default-minmax": ("default with --scale-search minmax", {"scale_search": "minmax"}),
    "default-no-gar": ("default with --no-group-aware", {"group_aware": False}),
    "default-static-act": ("default with --desc-act --static-groups",
                           {"desc_act": True, "static_groups": True}),
    "default-damp.01": ("default with --damp 0.01", {"damp": 0.01}),
}
ALL_METHODS = ["rtn", *QUANTKIT_METHODS, "gptqmodel"]
# The default run: the three methods the bound needs in every setting first, then the
# levers and the calibrations (4-bit g64), so a run cut short still has what matters most.
CORE = ["default", "gptqmodel", "rtn"]
LEVERS = {"4g64": ["v0.1.0", "default-no-block-start", "default-minmax", "default-no-gar",
                   "default-static-act", "default-damp.01"]}
CALIBRATION_ROWS = {"4g64": ["text", "chat", "mixed"]}


@dataclass(frozen=True)
class Job:
    """One row: a quantizer at a setting, calibrated on one kind of rows."""

    setting: str
    method: str
    calib: str = "english"

    @property
    def name(self) -> str:
        return f"{self.setting}-{self.method}-{self.calib}"


def plan(settings: list[str], methods: list[str] | None,
         calibrations: list[str] | None = None) -> list[Job]:
    if methods:
        return [Job(s, m, c) for c in calibrations or ["english"] for s in settings
                for m in methods]
    jobs = [Job(s, m) for s in settings for m in CORE]
    jobs += [Job(s, m) for s in settings for m in LEVERS.get(s, [])]
    jobs += [Job(s, "default", c) for s in settings for c in CALIBRATION_ROWS.get(s, [])
             if calibrations is None or c in calibrations]
    return jobs


def unquantized_for(model_dir: Path, group: int) -> tuple[str, ...]:
    """Layer-relative names of the decoder Linears whose input width `group` does not
    divide (SmolLM2 at g128: every projection reading the 576-wide hidden state). The
    g128 setting leaves them unquantized for every method, so it compares the methods on
    the Linears that g128 fits (quantkit refuses a ragged last group; README)."""
    from quantkit.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir)
    names = set()
    for name in ckpt.tensor_names():
        parts = name.split(".")
        if name.endswith(".weight") and ".layers." in name and len(parts) > 4:
            _, shape = ckpt.tensor_meta(name)
            if len(shape) == 2 and shape[1] % group:
                names.add(".".join(parts[parts.index("layers") + 2:-1]))
    return tuple(sorted(names))


# --------------------------------------------------------------------------- data


def calibration_rows(kind: str, tokenizer, *, nsamples: int, seqlen: int,
                     seed: int = 0) -> tuple[torch.Tensor, dict]:
    """[nsamples, seqlen] calibration token ids of one kind, the same for every method,
    and quantkit's calibration report on them (languages, sources, sha256).

    "english": plain English prose from quantkit's own sampler (calib_data/train/en.txt).
    "text", "chat", "mixed": what `quantkit gptq --calib-format KIND` builds from the
    built-in bilingual set (chat rows in the model's own chat template).
    """
    from quantkit.data import (
        build_calibration,
        calib_dir,
        calibration_report,
        calibration_samples,
    )

    if kind == "english":
        path = calib_dir() / "train" / "en.txt"
        ids = calibration_samples(tokenizer, calib_file=path, nsamples=nsamples,
                                  seqlen=seqlen, seed=seed)
        report = calibration_report(tokenizer, ids, [[("en", path.name, seqlen)]] * len(ids),
                                    fmt="text", cut_turns=0, source=str(path))
        return ids, report
    if kind in CALIBRATIONS:
        calib = build_calibration(tokenizer, fmt=kind, nsamples=nsamples, seqlen=seqlen,
                                  seed=seed)
        return calib.ids, calib.report
    raise ValueError(f"calibration kind {kind!r}: choose from {', '.join(CALIBRATIONS)}")


def heldout_windows(tokenizer, *, windows: int, seqlen: int) -> torch.Tensor:
    """[windows, seqlen] non-overlapping windows of the English held-out split."""
    from quantkit.data import heldout_tokens

    ids = heldout_tokens(tokenizer)["en"]
    if ids.numel() < windows * seqlen:
        raise SystemExit(f"held-out English has {ids.numel()} tokens; {windows} x {seqlen} "
                         "windows need more")
    return ids[:windows * seqlen].view(windows, seqlen)


def chat_windows(tokenizer, *, windows: int, seqlen: int) -> torch.Tensor | None:
    """[windows, seqlen] of held-out conversations in the model's chat template, half
    Chinese and half English (None without a chat template or with windows=0)."""
    from quantkit.chat_calib import has_chat_template
    from quantkit.data import heldout_tokens

    if not windows or not has_chat_template(tokenizer):
        return None
    streams = heldout_tokens(tokenizer, text_format="chat")
    per_lang = {"zh-chat": windows // 2, "en-chat": windows - windows // 2}
    parts = []
    for key, count in per_lang.items():
        ids = streams[key]
        if ids.numel() < count * seqlen:
            raise SystemExit(f"held-out {key} has {ids.numel()} tokens; {count} x {seqlen} "
                             "windows need more")
        parts.append(ids[:count * seqlen].view(count, seqlen))
    return torch.cat(parts)


# --------------------------------------------------------------------------- scoring


@dataclass
class Scorer:
    """Scores models on fixed window sets against the base model's logits (kept as fp16).

    `sets` maps a name ("plain", "chat") to [windows, seqlen] token ids; every model sees
    the same windows in the same batches.
    """

    sets: dict[str, torch.Tensor]
    batch_size: int = 4
    base_logits: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def _batches(self, windows: torch.Tensor):
        for i in range(0, len(windows), self.batch_size):
            yield windows[i:i + self.batch_size]

    def _logits(self, model, batch: torch.Tensor) -> torch.Tensor:
        from quantkit.evaluate.forward import positions_logits

        return positions_logits(model, batch, torch.arange(batch.shape[1] - 1))

    @torch.inference_mode()
    def score(self, model, *, is_base: bool = False) -> dict:
        """{"plain": {...}, "chat": {...}} with ppl, KLD from the base and top-1 agreement."""
        from quantkit.compute import compute_dtype, computing_in, dtype_name, stored_dtype
        from quantkit.evaluate.kld import KldTotal
        from quantkit.evaluate.perplexity import NllTotal, token_nll

        dtype = compute_dtype("cpu", stored_dtype(model))
        scores = {}
        with computing_in(model, dtype):
            for name, windows in self.sets.items():
                nll, kld = NllTotal(), KldTotal()
                t0 = time.perf_counter()
                base = self.base_logits.setdefault(name, [])
                for i, batch in enumerate(self._batches(windows)):
                    logits = self._logits(model, batch)
                    nll.add(token_nll(logits, batch[:, 1:]))
                    if is_base:
                        base.append(logits.half())
                    kld.add(base[i].float(), logits)
                out, summary = nll.summary(), kld.summary()
                scores[name] = {"ppl": out["ppl"], "nll": out["nll"], "tokens": out["tokens"],
                                "kld_mean": summary["mean"], "kld_p99": summary["p99"],
                                "top1_agree": summary["same_top1"],
                                "eval_seconds": time.perf_counter() - t0,
                                "eval_compute_dtype": dtype_name(dtype)}
        return scores


# --------------------------------------------------------------------------- quantizers


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def run_quantkit(method: str, model: Path, out: Path, ids_file: Path, bits: int,
                 group: int, skip: tuple[str, ...]) -> dict:
    """Quantize in a child process (this file, `--child`); returns its timing and RSS."""
    spec = {"method": method, "model": str(model), "out": str(out), "ids": str(ids_file),
            "bits": bits, "group_size": group, "skip_modules": list(skip)}
    report = out.with_suffix(".json")
    subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--report",
                    str(report)], check=True, env=_child_env())
    return json.loads(report.read_text())


def _child(spec: dict, report: Path) -> None:
    """The quantizer side of `run_quantkit`: one `gptq_quantize` call, then measure."""
    from quantkit.gptq.run import GPTQConfig, gptq_quantize

    ids = torch.load(spec["ids"])
    common = dict(source=Path(spec["model"]), dest=Path(spec["out"]), bits=spec["bits"],
                  group_size=spec["group_size"], nsamples=ids.shape[0], seqlen=ids.shape[1],
                  device="cpu", force=True, skip_modules=tuple(spec["skip_modules"]))
    if spec["method"] == "rtn":
        cfg = GPTQConfig(**common, solver="rtn")
    else:
        cfg = GPTQConfig(**common, **QUANTKIT_METHODS[spec["method"]][1])
    t0 = time.perf_counter()
    result = gptq_quantize(cfg, input_ids=ids)
    report.write_text(json.dumps({
        "seconds": time.perf_counter() - t0,
        "peak_rss_gb": peak_rss_bytes() / 2**30, "peak_rss_source": "VmHWM",
        "settings": result.manifest["settings"],
        "compute_dtype": result.manifest["compute_dtype"],
    }))


def rtn_in_memory(model_dir: Path, bits: int, group: int, skip: tuple[str, ...]):
    """Round-to-nearest on every decoder Linear not in `skip`, in memory: the codes
    `quantkit gptq --method rtn` writes (same function, same grid) without its calibration
    forwards, which only feed its error report."""
    import quantkit
    from quantkit.gptq.algorithm import QuantSpec, rtn_quantize
    from quantkit.gptq.calibrate import find_decoder_layers
    from quantkit.gptq.skip import is_skipped

    t0 = time.perf_counter()
    model = quantkit.load(model_dir)
    _, layers = find_decoder_layers(model, None, str(model_dir))
    spec = QuantSpec(bits=bits, group_size=group)
    with torch.no_grad():
        for name, module in layers.named_modules():
            if isinstance(module, torch.nn.Linear) and not is_skipped(name, skip):
                w = module.weight
                w.copy_(rtn_quantize(w, spec).dequantize().to(w.dtype))
    return model, {"seconds": time.perf_counter() - t0, "peak_rss_gb": None,
                   "compute_dtype": None}


def run_gptqmodel(interop: Path, model: Path, out: Path, ids_file: Path, bits: int,
                  group: int, skip: tuple[str, ...]) -> dict:
    python = interop / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python}: missing; build the interop venv with .ci/interop.sh")
    report = out.with_suffix(".json")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # its own stack only
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
    # It sizes its CPU pool as (cores + 1) // 2 and then asks that pool for 2 loader workers,
    # so on a 2-core machine it refuses to start without this (tests/interop sets it too).
    env.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    subprocess.run([str(python), str(GPTQMODEL_CHILD), "--model", str(model), "--out",
                    str(out), "--ids", str(ids_file), "--bits", str(bits), "--group-size",
                    str(group), "--report", str(report), "--skip", ",".join(skip)],
                   check=True, env=env)
    return json.loads(report.read_text())


# --------------------------------------------------------------------------- run


def run(args) -> dict:
    import quantkit
    from quantkit.loading import load_tokenizer

    model_dir = args.model
    if model_dir is None:
        from real_models import build

        model_dir = build("smollm2-135m")
    tokenizer = load_tokenizer(model_dir)
    jobs = plan(args.settings, args.methods, args.calibrations)
    sets = {"plain": heldout_windows(tokenizer, windows=args.windows, seqlen=args.window_len)}
    chat = chat_windows(tokenizer, windows=args.chat_windows, seqlen=args.window_len)
    if chat is not None:
        sets["chat"] = chat
    scorer = Scorer(sets)
    skips = {s: unquantized_for(model_dir, SETTINGS[s][1]) for s in args.settings}
    rows, calibrations = [], {}
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        ids_files = {}
        for kind in dict.fromkeys(job.calib for job in jobs):
            ids, report = calibration_rows(kind, tokenizer, nsamples=args.nsamples,
                                           seqlen=args.seqlen)
            ids_files[kind] = Path(tmp) / f"calibration-{kind}.pt"
            torch.save(ids, ids_files[kind])
            calibrations[kind] = report

        def quantize(job: Job) -> dict:
            bits, group = SETTINGS[job.setting]
            out = Path(tmp) / job.name
            run_one = (functools.partial(run_gptqmodel, args.interop)
                       if job.method == "gptqmodel" else
                       functools.partial(run_quantkit, job.method))
            return run_one(model_dir, out, ids_files[job.calib], bits, group,
                           skips[job.setting])

        # Quantizers run `--jobs` at a time in their own processes; scoring follows the
        # plan's order in this one.
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {job: pool.submit(quantize, job) for job in jobs if job.method != "rtn"}
            base = quantkit.load(model_dir)
            base_score = scorer.score(base, is_base=True)
            del base
            log.info("bf16: %s", _summary(base_score))
            for job in jobs:
                bits, group = SETTINGS[job.setting]
                log.info("%s ...", job.name)
                try:
                    if job.method == "rtn":
                        model, made = rtn_in_memory(model_dir, bits, group, skips[job.setting])
                    else:
                        made = futures[job].result()
                        model = quantkit.load(Path(tmp) / job.name)
                except subprocess.CalledProcessError as exc:
                    log.error("%s failed: %s", job.name, exc)
                    rows.append({"setting": job.setting, "method": job.method,
                                 "calib": job.calib, "failed": str(exc)})
                    continue
                score = scorer.score(model)
                del model
                row = {"setting": job.setting, "bits": bits, "group_size": group,
                       "unquantized": list(skips[job.setting]), "method": job.method,
                       "calib": job.calib, "label": _label(job.method), **made,
                       **score["plain"], "ppl_rise": score["plain"]["ppl"] -
                       base_score["plain"]["ppl"], "scores": score}
                rows.append(row)
                log.info("%s: %s, %.0f s", job.name, _summary(score), row["seconds"])
                _write(args, model_dir, base_score, rows, calibrations, skips, partial=True)
                if args.keep:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    if (Path(tmp) / job.name).exists():
                        shutil.copytree(Path(tmp) / job.name, args.keep / job.name,
                                        dirs_exist_ok=True)
    return _write(args, model_dir, base_score, rows, calibrations, skips, partial=False)


def _summary(score: dict) -> str:
    return "; ".join(f"{name} ppl {s['ppl']:.3f} kld {s['kld_mean']:.4f} top1 "
                     f"{s['top1_agree']:.3f}" for name, s in score.items())


def _label(method: str) -> str:
    if method == "rtn":
        return "round-to-nearest"
    if method == "gptqmodel":
        return "GPTQModel 7.6.0, its defaults"
    return QUANTKIT_METHODS[method][0]


def _write(args, model_dir, base_score, rows, calibrations, skips, *, partial: bool) -> dict:
    from quantkit.checkpoint import write_json

    result = {
        "kind": "gptq_quality",
        "partial": partial,
        "command": " ".join(["python", "bench/quality.py", *sys.argv[1:]]),
        "model": str(model_dir),
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen,
                        "reports": calibrations},
        "heldout": {"plain": {"windows": args.windows, "seqlen": args.window_len,
                              "text": "calib_data/heldout/en.txt"},
                    "chat": {"windows": args.chat_windows, "seqlen": args.window_len,
                             "text": "calib_data/heldout chat.jsonl in the model's chat "
                                     "template, half zh, half en"}},
        "unquantized_per_setting": {k: list(v) for k, v in skips.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "jobs": args.jobs, "load_average_at_end": os.getloadavg()},
        "base": base_score,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
    }
    write_json(args.out, result)
    if not partial and args.results_md:
        write_results_md(result, REPO / "bench" / "RESULTS.md")
    return result


def _ratio(row: dict, reference: dict | None) -> str:
    if reference is None or reference["ppl_rise"] <= 0:
        return ""
    return f"{row['ppl_rise'] / reference['ppl_rise']:.2f}x"


def _find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if "ppl" in r and all(r[k] == v for k, v in match.items())),
                None)


def methods_table(result: dict) -> str:
    """Per setting: quantkit's default, GPTQModel, RTN and the levers (English rows)."""
    base = result["base"]["plain"]
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["setting"] == setting and
                r.get("calib", "english") == "english"]
        gptqmodel = _find(rows, method="gptqmodel")
        bits, group = SETTINGS[setting]
        skipped = result.get("unquantized_per_setting", {}).get(setting)
        title = f"**{bits}-bit, group {group}, sym**"
        if skipped:
            title += f" (left in bf16 for every method, as g{group} divides no width of " \
                     f"theirs: {', '.join(skipped)})"
        lines += [title, "",
                  "| method | held-out ppl | rise | rise / GPTQModel's | mean KLD | top-1 agree "
                  "| chat ppl | chat KLD | seconds | peak RSS GB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| bf16 base | {base['ppl']:.2f} | | | | | "
                  f"{_chat(result['base'], 'ppl', '.2f')} | | | |"]
        for r in rows:
            if "ppl" not in r:
                lines.append(f"| {_label(r['method'])} | failed | | | | | | | | |")
                continue
            # rows from before the VmHWM fix carry the parent's peak (ru_maxrss survives exec)
            rss = f"{r['peak_rss_gb']:.2f}" if r.get("peak_rss_source") else "–"
            lines.append(f"| {r['label']} | {r['ppl']:.2f} | +{r['ppl_rise']:.2f} | "
                         f"{_ratio(r, gptqmodel)} | {r['kld_mean']:.4f} | "
                         f"{100 * r['top1_agree']:.1f}% | {_chat(r['scores'], 'ppl', '.2f')} | "
                         f"{_chat(r['scores'], 'kld_mean', '.4f')} | {r['seconds']:.0f} | "
                         f"{rss} |")
        lines.append("")
    return "\n".join(lines)


def _chat(score: dict, key: str, fmt: str) -> str:
    return format(score["chat"][key], fmt) if "chat" in score else "–"


def calibrations_table(result: dict) -> str:
    """quantkit's default at 4-bit g64, one row per calibration kind (issue 16)."""
    rows = [r for r in result["rows"] if "ppl" in r and r["method"] == "default"
            and r["setting"] == "4g64"]
    if len({r["calib"] for r in rows}) < 2:
        return ""
    base = result["base"]
    reports = result["calibration"]["reports"]
    lines = ["| calibration (4-bit g64, quantkit default) | CJK share | plain ppl | plain KLD "
             "| plain top-1 | chat ppl | chat KLD | chat top-1 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| bf16 base | | {base['plain']['ppl']:.2f} | | | {_chat(base, 'ppl', '.2f')} "
             "| | |"]
    names = {"english": "plain English prose (calib_data/train/en.txt; the tables above)",
             "text": "`--calib-format text`: bilingual prose",
             "chat": "`--calib-format chat`: chat rows in the model's template",
             "mixed": "`--calib-format mixed`: prose and chat rows"}
    for r in rows:
        sc = r["scores"]
        chat_top1 = f"{100 * sc['chat']['top1_agree']:.1f}%" if "chat" in sc else "–"
        lines.append(f"| {names[r['calib']]} | {100 * reports[r['calib']]['cjk_share']:.1f}% | "
                     f"{sc['plain']['ppl']:.2f} | {sc['plain']['kld_mean']:.4f} | "
                     f"{100 * sc['plain']['top1_agree']:.1f}% | {_chat(sc, 'ppl', '.2f')} | "
                     f"{_chat(sc, 'kld_mean', '.4f')} | {chat_top1} |")
    return "\n".join(lines) + "\n"


_BEGIN, _END = "<!-- quality table: begin -->", "<!-- quality table: end -->"
_CALIB_BEGIN, _CALIB_END = "<!-- calibration table: begin -->", "<!-- calibration table: end -->"


def _replace_between(text: str, begin: str, end: str, body: str) -> str:
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + block + "\n"


def write_results_md(result: dict, path: Path) -> None:
    """Replace the generated tables between their markers (the prose around is kept)."""
    text = _replace_between(path.read_text(), _BEGIN, _END, methods_table(result))
    calib = calibrations_table(result)
    if calib:
        text = _replace_between(text, _CALIB_BEGIN, _CALIB_END, calib)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="bf16 folder (default: SmolLM2-135M from scripts/real_models.py)")
    parser.add_argument("--settings", type=lambda s: s.split(","),
                        default=["4g64", "3g64", "4g128"],
                        help=f"comma-separated, from {','.join(SETTINGS)}; Linears a group "
                             "size does not divide stay bf16 for every method")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated, from {','.join(ALL_METHODS)} "
                             "[default: the full run's list per setting]")
    parser.add_argument("--calibrations", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated, from {','.join(CALIBRATIONS)}: with --methods, "
                             "the rows' calibrations (default english); without, which of "
                             "the default plan's calibration rows to run")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--chat-windows", type=int, default=16,
                        help="held-out chat windows (half zh, half en); 0: none")
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--interop", type=Path, default=DEFAULT_INTEROP)
    parser.add_argument("--jobs", type=int, default=1,
                        help="quantizers running at once (seconds then include contention)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.json")
    parser.add_argument("--results-md", action="store_true",
                        help="write the table into bench/RESULTS.md")
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy every artifact into this folder (for inspection)")
    parser.add_argument("--render", type=Path, default=None,
                        help="write bench/RESULTS.md's tables from this result JSON, measuring "
                             "nothing")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.child:
        _child(json.loads(args.child), args.report)
        return 0
    if args.render:
        write_results_md(json.loads(args.render.read_text()), REPO / "bench" / "RESULTS.md")
        return 0
    for method in args.methods or []:
        if method not in ALL_METHODS:
            parser.error(f"--methods {method}: choose from {', '.join(ALL_METHODS)}")
    for kind in args.calibrations or []:
        if kind not in CALIBRATIONS:
            parser.error(f"--calibrations {kind}: choose from {', '.join(CALIBRATIONS)}")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
