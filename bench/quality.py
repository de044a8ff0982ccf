"""GPTQ quality on real trained weights: every method side by side on identical data.

    python bench/quality.py                       # the committed table (about an hour on 2 cores)
    python bench/quality.py --settings 4g64 --methods default,gptqmodel --windows 16

One run, one model (SmolLM2-135M-Instruct, built by scripts/real_models.py), the same
calibration rows for every method (token ids written once and handed to each quantizer,
GPTQModel included) and the same held-out windows for every score. Each quantizer runs in
a child process of its own, so its seconds and peak RSS are its own; GPTQModel 7.6.0 runs
inside the interop venv (`.ci/interop.sh` builds it). Scores: held-out perplexity and its
rise over the bf16 model, mean KL divergence from the bf16 model and top-1 agreement.
Writes JSON to bench/results/ and, with --results-md, the quality section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
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

log = logging.getLogger("quality")

DEFAULT_INTEROP = Path(os.environ.get("INTEROP_VENV", REPO / ".venv-interop"))
GPTQMODEL_CHILD = REPO / "bench" / "gptqmodel_child.py"
SETTINGS = {"4g64": (4, 64), "3g64": (3, 64), "4g32": (4, 32), "4g128": (4, 128)}

# name -> (label, GPTQConfig overrides). "default" is `quantkit gptq` with no algorithm
# flag; "v0.1.0" is the previous release's algorithm; the levers between them are measured
# one at a time on top of v0.1.0 and, for the defaults kept, removed one at a time.
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
    "default-minmax": ("default with --scale-search minmax", {"scale_search": "minmax"}),
    "default-no-gar": ("default with --no-group-aware", {"group_aware": False}),
    "default-static-act": ("default with --desc-act --static-groups",
                           {"desc_act": True, "static_groups": True}),
    "default-damp.01": ("default with --damp 0.01", {"damp": 0.01}),
}
ALL_METHODS = ["rtn", *QUANTKIT_METHODS, "gptqmodel"]
# The default run: the three methods the bound needs in every setting first, then the
# levers (4-bit g64), so a run cut short still has the comparison that matters.
CORE = ["default", "gptqmodel", "rtn"]
LEVERS = {"4g64": ["default-minmax", "v0.1.0", "default-static-act", "default-bf16"]}


def plan(settings: list[str], methods: list[str] | None) -> list[tuple[str, str]]:
    if methods:
        return [(s, m) for s in settings for m in methods]
    return [(s, m) for s in settings for m in CORE] + [
        (s, m) for s in settings for m in LEVERS.get(s, [])]


# --------------------------------------------------------------------------- data


def calibration_rows(kind: str, tokenizer, *, nsamples: int, seqlen: int,
                     seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] calibration token ids of one kind, the same for every method.

    "english": plain English prose from quantkit's own sampler (calib_data/train/en.txt).
    Other kinds (chat-formatted, mixed) plug in here.
    """
    from quantkit.data import calib_dir, calibration_samples

    if kind == "english":
        return calibration_samples(tokenizer, calib_file=calib_dir() / "train" / "en.txt",
                                   nsamples=nsamples, seqlen=seqlen, seed=seed)
    raise ValueError(f"calibration kind {kind!r}: this benchmark knows 'english'")


def heldout_windows(tokenizer, *, windows: int, seqlen: int) -> torch.Tensor:
    """[windows, seqlen] non-overlapping windows of the English held-out split."""
    from quantkit.data import heldout_tokens

    ids = heldout_tokens(tokenizer)["en"]
    if ids.numel() < windows * seqlen:
        raise SystemExit(f"held-out English has {ids.numel()} tokens; {windows} x {seqlen} "
                         "windows need more")
    return ids[:windows * seqlen].view(windows, seqlen)


# --------------------------------------------------------------------------- scoring


@dataclass
class Scorer:
    """Scores models on fixed windows against the base model's logits (kept as fp16)."""

    windows: torch.Tensor
    batch_size: int = 4
    base_logits: list[torch.Tensor] = field(default_factory=list)

    def _batches(self):
        for i in range(0, len(self.windows), self.batch_size):
            yield self.windows[i:i + self.batch_size]

    def _logits(self, model, batch: torch.Tensor) -> torch.Tensor:
        from quantkit.evaluate.forward import positions_logits

        return positions_logits(model, batch, torch.arange(batch.shape[1] - 1))

    @torch.inference_mode()
    def score(self, model, *, is_base: bool = False) -> dict:
        from quantkit.compute import compute_dtype, computing_in, dtype_name, stored_dtype
        from quantkit.evaluate.kld import KldTotal
        from quantkit.evaluate.perplexity import NllTotal, token_nll

        dtype = compute_dtype("cpu", stored_dtype(model))
        nll, kld = NllTotal(), KldTotal()
        t0 = time.perf_counter()
        with computing_in(model, dtype):
            for i, batch in enumerate(self._batches()):
                logits = self._logits(model, batch)
                nll.add(token_nll(logits, batch[:, 1:]))
                if is_base:
                    self.base_logits.append(logits.half())
                kld.add(self.base_logits[i].float(), logits)
        out = nll.summary()
        summary = kld.summary()
        return {"ppl": out["ppl"], "nll": out["nll"], "tokens": out["tokens"],
                "kld_mean": summary["mean"], "kld_p99": summary["p99"],
                "top1_agree": summary["same_top1"], "eval_seconds": time.perf_counter() - t0,
                "eval_compute_dtype": dtype_name(dtype)}


# --------------------------------------------------------------------------- quantizers


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def run_quantkit(method: str, model: Path, out: Path, ids_file: Path, bits: int,
                 group: int) -> dict:
    """Quantize in a child process (this file, `--child`); returns its timing and RSS."""
    spec = {"method": method, "model": str(model), "out": str(out), "ids": str(ids_file),
            "bits": bits, "group_size": group}
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
                  device="cpu", force=True)
    if spec["method"] == "rtn":
        cfg = GPTQConfig(**common, solver="rtn")
    else:
        cfg = GPTQConfig(**common, **QUANTKIT_METHODS[spec["method"]][1])
    t0 = time.perf_counter()
    result = gptq_quantize(cfg, input_ids=ids)
    report.write_text(json.dumps({
        "seconds": time.perf_counter() - t0,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "settings": result.manifest["settings"],
        "compute_dtype": result.manifest["compute_dtype"],
    }))


def rtn_in_memory(model_dir: Path, bits: int, group: int):
    """Round-to-nearest on every decoder Linear, in memory: the codes `quantkit gptq
    --method rtn` writes (same function, same grid) without its calibration forwards,
    which only feed its error report."""
    import quantkit
    from quantkit.gptq.algorithm import QuantSpec, rtn_quantize
    from quantkit.gptq.calibrate import find_decoder_layers

    t0 = time.perf_counter()
    model = quantkit.load(model_dir)
    _, layers = find_decoder_layers(model, None, str(model_dir))
    spec = QuantSpec(bits=bits, group_size=group)
    with torch.no_grad():
        for module in layers.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                w.copy_(rtn_quantize(w, spec).dequantize().to(w.dtype))
    return model, {"seconds": time.perf_counter() - t0, "peak_rss_gb": None,
                   "compute_dtype": None}


def run_gptqmodel(interop: Path, model: Path, out: Path, ids_file: Path, bits: int,
                  group: int) -> dict:
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
                    str(group), "--report", str(report)], check=True, env=env)
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
    calib = calibration_rows(args.calib, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen)
    windows = heldout_windows(tokenizer, windows=args.windows, seqlen=args.window_len)
    scorer = Scorer(windows)
    rows = []
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        ids_file = Path(tmp) / "calibration.pt"
        torch.save(calib, ids_file)
        pairs = plan(args.settings, args.methods)

        def quantize(setting: str, method: str) -> dict:
            bits, group = SETTINGS[setting]
            out = Path(tmp) / f"{setting}-{method}"
            if method == "gptqmodel":
                return run_gptqmodel(args.interop, model_dir, out, ids_file, bits, group)
            return run_quantkit(method, model_dir, out, ids_file, bits, group)

        # Quantizers run `--jobs` at a time in their own processes; scoring follows the
        # plan's order in this one.
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            jobs = {pair: pool.submit(quantize, *pair) for pair in pairs if pair[1] != "rtn"}
            base = quantkit.load(model_dir)
            base_score = scorer.score(base, is_base=True)
            del base
            log.info("bf16: ppl %.3f", base_score["ppl"])
            for setting, method in pairs:
                bits, group = SETTINGS[setting]
                log.info("%s %s ...", setting, method)
                try:
                    if method == "rtn":
                        model, made = rtn_in_memory(model_dir, bits, group)
                    else:
                        made = jobs[(setting, method)].result()
                        model = quantkit.load(Path(tmp) / f"{setting}-{method}")
                except subprocess.CalledProcessError as exc:
                    log.error("%s %s failed: %s", setting, method, exc)
                    rows.append({"setting": setting, "method": method, "failed": str(exc)})
                    continue
                score = scorer.score(model)
                del model
                row = {"setting": setting, "bits": bits, "group_size": group,
                       "method": method, "label": _label(method), **made, **score,
                       "ppl_rise": score["ppl"] - base_score["ppl"]}
                rows.append(row)
                log.info("%s %-20s ppl %.3f (+%.3f) kld %.4f top1 %.3f %.0f s", setting,
                         method, row["ppl"], row["ppl_rise"], row["kld_mean"],
                         row["top1_agree"], row["seconds"])
                _write(args, model_dir, base_score, rows, partial=True)
    return _write(args, model_dir, base_score, rows, partial=False)


def _label(method: str) -> str:
    if method == "rtn":
        return "round-to-nearest"
    if method == "gptqmodel":
        return "GPTQModel 7.6.0, its defaults"
    return QUANTKIT_METHODS[method][0]


def _write(args, model_dir, base_score, rows, *, partial: bool) -> dict:
    from quantkit.checkpoint import write_json

    result = {
        "kind": "gptq_quality",
        "partial": partial,
        "command": " ".join(["python", "bench/quality.py", *sys.argv[1:]]),
        "model": str(model_dir),
        "calibration": {"kind": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen},
        "heldout": {"windows": args.windows, "seqlen": args.window_len, "text": "calib_data "
                    "heldout/en.txt"},
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


def markdown_table(result: dict) -> str:
    base = result["base"]
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["setting"] == setting]
        gptqmodel = next((r for r in rows if r["method"] == "gptqmodel" and "ppl" in r), None)
        bits, group = SETTINGS[setting]
        lines += [f"**{bits}-bit, group {group}, sym**", "",
                  "| method | held-out ppl | rise | rise / GPTQModel's | mean KLD | top-1 agree "
                  "| seconds | peak RSS GB |", "|---|---:|---:|---:|---:|---:|---:|---:|",
                  f"| bf16 base | {base['ppl']:.2f} | | | | | | |"]
        for r in rows:
            if "ppl" not in r:
                lines.append(f"| {_label(r['method'])} | failed | | | | | | |")
                continue
            ratio = (f"{r['ppl_rise'] / gptqmodel['ppl_rise']:.2f}x" if gptqmodel else "")
            rss = f"{r['peak_rss_gb']:.2f}" if r.get("peak_rss_gb") else "–"
            lines.append(f"| {r['label']} | {r['ppl']:.2f} | +{r['ppl_rise']:.2f} | {ratio} | "
                         f"{r['kld_mean']:.4f} | {100 * r['top1_agree']:.1f}% | "
                         f"{r['seconds']:.0f} | {rss} |")
        lines.append("")
    return "\n".join(lines)


_BEGIN, _END = "<!-- quality table: begin -->", "<!-- quality table: end -->"


def write_results_md(result: dict, path: Path) -> None:
    """Replace the generated table between the markers (the prose around it is kept)."""
    text = path.read_text()
    table = f"{_BEGIN}\n{markdown_table(result)}\n{_END}"
    if _BEGIN in text and _END in text:
        head, rest = text.split(_BEGIN, 1)
        text = head + table + rest.split(_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + table + "\n"
    path.write_text(text)


def merge(paths: list[Path], out: Path, results_md: bool) -> dict:
    """One table from invocations run side by side on the same rows and windows.

    Refuses inputs whose calibration, windows or bf16 scores differ, so the merged rows are
    as comparable as rows of one invocation.
    """
    from quantkit.checkpoint import write_json

    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    for part in parts[1:]:
        for key in ("model", "calibration", "heldout"):
            if part[key] != first[key]:
                raise SystemExit(f"--merge: {key} differs between the inputs")
        if part["base"]["ppl"] != first["base"]["ppl"]:
            raise SystemExit("--merge: the bf16 scores differ, so the windows do")
    order = {s: i for i, s in enumerate(SETTINGS)}
    rows = sorted((dict(r, command=p["command"]) for p in parts for r in p["rows"]
                   if "ppl" in r), key=lambda r: order[r["setting"]])
    # Rows that did not finish in one invocation (stopped, or done in another) are listed,
    # not scored.
    dropped = [dict(r, command=p["command"]) for p in parts for r in p["rows"] if "ppl" not in r]
    result = dict(first, rows=rows, dropped=dropped, partial=any(p["partial"] for p in parts),
                  command=" && ".join(p["command"] for p in parts),
                  merged_from=[str(p) for p in paths])
    write_json(out, result)
    if results_md:
        write_results_md(result, REPO / "bench" / "RESULTS.md")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="bf16 folder (default: SmolLM2-135M from scripts/real_models.py)")
    parser.add_argument("--settings", type=lambda s: s.split(","), default=["4g64", "3g64"],
                        help=f"comma-separated, from {','.join(SETTINGS)}")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated, from {','.join(ALL_METHODS)} "
                             "[default: the full run's list per setting]")
    parser.add_argument("--calib", default="english")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--interop", type=Path, default=DEFAULT_INTEROP)
    parser.add_argument("--jobs", type=int, default=1,
                        help="quantizers running at once (seconds then include contention)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.json")
    parser.add_argument("--results-md", action="store_true",
                        help="write the table into bench/RESULTS.md")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="combine result JSONs of side-by-side invocations into --out")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.child:
        _child(json.loads(args.child), args.report)
        return 0
    if args.merge:
        merge(args.merge, args.out, args.results_md)
        return 0
    for method in args.methods or []:
        if method not in ALL_METHODS:
            parser.error(f"--methods {method}: choose from {', '.join(ALL_METHODS)}")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
