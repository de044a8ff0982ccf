"""Combine `quantkit eval` and `quantkit mem` results into the tables model teams publish.

The main table is the one Baichuan2's README hand-assembles, `Precision | GPU Mem (GB) |
C-Eval | MMLU | CMMLU`, with each quantized row's change against the base row, plus
perplexity and KL divergence columns. Each result JSON says which model it measured and
with which quantization settings, so rows, labels and the base row (the unquantized model)
come from the files alone. `markdown_table` is also what `quantkit push` puts in the card.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.checkpoint import PNG_MARK, REPORT_MARK, atomic_file, check_file_destination
from quantkit.errors import ConfigError, require
from quantkit.evaluate.provenance import precision_label

log = logging.getLogger(__name__)

BENCHMARK_TITLES = {"ceval": "C-Eval", "mmlu": "MMLU", "cmmlu": "CMMLU"}  # Baichuan2's order
GIB, MIB = 1024 ** 3, 1024 ** 2


@dataclass
class ModelRow:
    """Everything the results say about one model folder."""

    path: str
    name: str
    precision: str
    quantized: bool
    quantization_config: dict | None
    evals: dict[str, dict] = field(default_factory=dict)  # task -> result block
    eval_settings: dict[str, dict] = field(default_factory=dict)  # task -> settings used
    mem: dict | None = None  # the mem result's "results" block
    weight_bytes: int | None = None
    label: str = ""


@dataclass(frozen=True)
class ReportConfig:
    results: tuple[Path, ...]
    out: Path
    html: bool = False
    plot: Path | None = None
    title: str = "Quantization report"


# ----------------------------------------------------------------------------- reading


def read_result(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such result file; pass JSON written by `quantkit eval` "
                          "or `quantkit mem`")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); pass a `quantkit eval` or "
                          "`quantkit mem` result") from exc
    if not isinstance(result, dict) or result.get("kind") not in ("eval", "mem") \
            or not isinstance(result.get("model"), dict) or "results" not in result:
        raise ConfigError(f"{path}: not a `quantkit eval` or `quantkit mem` result")
    _check_values(path, result)
    return result


_NUMERIC_KEYS = {"ppl", "tokens", "windows", "mean", "median", "p99", "max", "same_top1",
                 "average", "questions", "weight_bytes", "bytes_on_disk"}


def _check_values(path: Path, result: dict) -> None:
    """The figures a table shows are finite numbers, so a damaged result fails in one line."""
    def walk(obj, where: str) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                here = f"{where}.{key}"
                if isinstance(value, dict | list):
                    walk(value, here)
                elif key in _NUMERIC_KEYS or str(key).endswith(("_gib", "_seconds")):
                    number = isinstance(value, int | float) and not isinstance(value, bool)
                    if value is not None and (not number or not math.isfinite(value)):
                        raise ConfigError(f"{path}: {here} is {value!r}, not a finite number; "
                                          "rerun the `quantkit eval` or `quantkit mem` that "
                                          "wrote it")
        elif isinstance(obj, list):
            for i, value in enumerate(obj):
                walk(value, f"{where}[{i}]")

    if not isinstance(result["results"], dict) or (result["kind"] == "eval" and not all(
            isinstance(block, dict) for block in result["results"].values())):
        raise ConfigError(f"{path}: results is not a mapping of task -> figures; rerun the "
                          "`quantkit eval` or `quantkit mem` that wrote it")
    if result["kind"] == "mem" and result["results"].get("device") not in ("cuda", "cpu"):
        raise ConfigError(f"{path}: results.device is {result['results'].get('device')!r}; "
                          "rerun the `quantkit mem` that wrote it")
    walk(result["results"], "results")
    walk({k: v for k, v in result["model"].items() if k in _NUMERIC_KEYS}, "model")


def collect_rows(results: Sequence[dict]) -> list[ModelRow]:
    """One row per model folder, base (unquantized) row first, then in the order given."""
    rows: dict[str, ModelRow] = {}
    for result in results:
        model = result["model"]
        row = rows.get(model["path"])
        if row is None:
            row = rows[model["path"]] = ModelRow(
                path=model["path"], name=model.get("name") or Path(model["path"]).name,
                precision=model.get("precision") or precision_label(
                    model.get("quantization_config"), model.get("loaded_dtype")),
                quantized=bool(model.get("quantization_config")),
                quantization_config=model.get("quantization_config"),
                weight_bytes=model.get("weight_bytes"))
        if result["kind"] == "mem":
            if row.mem is not None:
                log.warning("%s: several mem results; using the last one", row.name)
            row.mem = result["results"]
            continue
        for task, block in result["results"].items():
            if task in row.evals:
                log.warning("%s: several %s results; using the last one", row.name, task)
            row.evals[task] = block
            row.eval_settings[task] = result.get("settings", {})
    ordered = list(rows.values())
    base = find_base(ordered, results)
    if base is not None:
        ordered.remove(base)
        ordered.insert(0, base)
    _label_rows(ordered)
    _check_mem_devices(ordered)
    return ordered


def find_base(rows: Sequence[ModelRow], results: Sequence[dict]) -> ModelRow | None:
    """The unquantized row; with several, the one KLD results name as their base."""
    candidates = [r for r in rows if not r.quantized]
    if len(candidates) > 1:
        named = {(res.get("base") or {}).get("path") for res in results}
        candidates = [r for r in candidates if r.path in named] or candidates
    return candidates[0] if candidates else None


def _label_rows(rows: Sequence[ModelRow]) -> None:
    """The precision names a row, unless two rows share it: then the folder name is added."""
    for row in rows:
        same = sum(r.precision == row.precision for r in rows)
        row.label = row.precision if same == 1 else f"{row.precision} ({row.name})"


def _check_mem_devices(rows: Sequence[ModelRow]) -> None:
    devices = {r.mem["device"] for r in rows if r.mem}
    if len(devices) > 1:
        raise ConfigError("report: the mem results mix --device cuda and cpu; GPU memory and "
                          "CPU weight sizes do not share a column, so pass results from one")


# ----------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[ModelRow], float | None]
    fmt: Callable[[float], str]
    delta: bool  # show the change against the base row


def _mem_column(rows: Sequence[ModelRow]) -> Column | None:
    measured = [r for r in rows if r.mem]
    if not measured:
        return None
    cuda = measured[0].mem["device"] == "cuda"
    key = "allocated_after_load_gib" if cuda else "weights_in_memory_gib"
    largest = max(r.mem[key] for r in measured)
    unit, scale = ("GB", 1) if largest >= 1 else ("MB", GIB / MIB)
    header = f"GPU Mem ({unit})" if cuda else f"Weights in RAM ({unit})"
    return Column(header, lambda r: r.mem[key] * scale if r.mem else None,
                  lambda v: f"{v:.2f}", delta=False)


def _kld_split(row: ModelRow) -> dict | None:
    kld = row.evals.get("kld")
    if not kld:
        return None
    return kld.get("all") or next(iter(kld.values()))


def _fmt_kld(v: float) -> str:
    return f"{v:.2e}" if 0 < abs(v) < 1e-4 else f"{v:.4f}"


def columns(rows: Sequence[ModelRow]) -> list[Column]:
    """The columns some row has data for, in the published tables' order."""
    cols = []
    mem = _mem_column(rows)
    if mem:
        cols.append(mem)
    for task, title in BENCHMARK_TITLES.items():
        if any(task in r.evals for r in rows):
            cols.append(Column(title, lambda r, t=task: (r.evals.get(t) or {}).get("average"),
                               lambda v: f"{v:.2f}", delta=True))
    splits = list(dict.fromkeys(s for r in rows for s in r.evals.get("ppl", {})))
    for split in sorted(splits, key=lambda s: ({"zh": 0, "en": 1}.get(s, 2), s)):
        cols.append(Column(f"PPL {split}" if split != "text" else "PPL",
                           lambda r, s=split: (r.evals.get("ppl", {}).get(s) or {}).get("ppl"),
                           lambda v: f"{v:.2f}", delta=True))
    if any("kld" in r.evals for r in rows):
        cols.append(Column("KLD", lambda r: (_kld_split(r) or {}).get("mean"), _fmt_kld,
                           delta=False))
    return cols


def _cell(col: Column, row: ModelRow, base: ModelRow | None) -> str:
    value = col.value(row)
    if value is None:
        return "–"
    text = col.fmt(value)
    base_value = col.value(base) if base is not None and base is not row else None
    if col.delta and base_value is not None:
        text += f" ({value - base_value:+.2f})"
    return text


def _base_of(rows: Sequence[ModelRow]) -> ModelRow | None:
    return rows[0] if rows and not rows[0].quantized else None


def table_cells(rows: Sequence[ModelRow]) -> tuple[list[str], list[list[str]]]:
    """(headers, one list of cell strings per row) of the main table."""
    cols = columns(rows)
    base = _base_of(rows)
    return (["Precision", *[c.header for c in cols]],
            [[row.label, *[_cell(c, row, base) for c in cols]] for row in rows])


def _pipe_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "&#124;") for c in cells) + " |"
              for cells in body]
    return "\n".join(lines)


def markdown_table(results: Sequence[dict | str | os.PathLike]) -> str:
    """The main table (markdown) for eval/mem results, given as dicts or JSON paths."""
    loaded = [r if isinstance(r, dict) else read_result(r) for r in results]
    return _pipe_table(*table_cells(collect_rows(loaded)))


def kld_rows(rows: Sequence[ModelRow]) -> tuple[list[str], list[list[str]]] | None:
    """Per-split KL detail: mean, median, 99th percentile, max, same top-1."""
    body = []
    for row in rows:
        for split, k in (row.evals.get("kld") or {}).items():
            body.append([row.label, split, str(k["tokens"]), _fmt_kld(k["mean"]),
                         _fmt_kld(k["median"]), _fmt_kld(k["p99"]), _fmt_kld(k["max"]),
                         f"{100 * k['same_top1']:.2f}%"])
    if not body:
        return None
    return ["Precision", "Text", "Tokens", "Mean", "Median", "P99", "Max", "Same top-1"], body


# ----------------------------------------------------------------------------- notes


def notes(rows: Sequence[ModelRow]) -> list[str]:
    """What each column measures, and anything that makes rows not comparable."""
    base = _base_of(rows)
    out = []
    measured = [r for r in rows if r.mem]
    if measured and measured[0].mem["device"] == "cuda":
        out.append("GPU Mem: `torch.cuda.memory_allocated` after loading, in GiB (MiB for "
                   f"small models), on {measured[0].mem.get('gpu', 'CUDA')}; the peak during "
                   "a forward pass is in each mem JSON.")
    elif measured:
        out.append("Weights in RAM: bytes of parameters, buffers and quantization state "
                   "once loaded on CPU, in GiB (MiB for small models); no GPU was measured.")
    for task, title in BENCHMARK_TITLES.items():
        done = [r for r in rows if task in r.evals]
        if not done:
            continue
        settings = {(r.eval_settings[task].get("shots"), r.eval_settings[task].get("limit"),
                     (r.eval_settings[task].get("data_dirs") or {}).get(task)) for r in done}
        shots, limit, _ = next(iter(settings))
        line = (f"{title}: {shots}-shot accuracy (%), mean of the subject accuracies, "
                f"{done[0].evals[task]['questions']} questions")
        if limit:
            line += f" (at most {limit} per subject)"
        fewer = max(sum(s.get("fewer_shots", 0) for s in r.evals[task]["subjects"].values())
                    for r in done)
        if fewer:
            line += f"; up to {fewer} prompts per model had fewer shots to fit the context"
        if any(r.evals[task].get("sample_data") for r in done):
            line += "; **sample questions shipped with quantkit, not the official set**"
        if len(settings) > 1:
            line += "; **rows used different shots, limits or data**"
        out.append(line + ".")
    if any("ppl" in r.evals for r in rows):
        s = next(r.eval_settings["ppl"] for r in rows if "ppl" in r.evals)
        first = f" (first {s['max_tokens']} tokens of each text)" if s.get("max_tokens") else ""
        out.append(f"PPL: perplexity on {s.get('text')}{first}, windows of {s.get('seqlen')} "
                   f"tokens every {s.get('stride')}, each token scored once.")
        keys = {json.dumps([r.eval_settings["ppl"].get(k) for k in
                            ("text_fingerprint", "seqlen", "stride", "max_tokens")])
                for r in rows if "ppl" in r.evals}
        if len(keys) > 1:
            out.append("**Perplexities were measured on different tokens or windows and do "
                       "not compare across rows.**")
    if any("kld" in r.evals for r in rows):
        ref = base.label if base else "the base model"
        out.append(f"KLD: mean KL({ref} ‖ row) of next-token distributions over the same "
                   "tokens as PPL (all held-out texts together).")
    if base is not None:
        out.append(f"(±x): change against the {base.label} row.")
    return out


def models_list(rows: Sequence[ModelRow]) -> list[str]:
    """Each row's folder, quantization in words, and weight bytes on disk."""
    from quantkit.card import format_size, quantization_summary

    out = []
    for row in rows:
        what = (quantization_summary({"quantization_config": row.quantization_config})[0]
                if row.quantized else "unquantized")
        size = f", {format_size(row.weight_bytes)} of weights" if row.weight_bytes else ""
        out.append(f"{row.label}: `{row.path}` ({what}{size})")
    return out


# ----------------------------------------------------------------------------- output


def render_markdown(rows: Sequence[ModelRow], title: str, plot: Path | None = None) -> str:
    parts = [f"# {title}", _pipe_table(*table_cells(rows)),
             "\n".join(f"- {n}" for n in notes(rows))]
    kld = kld_rows(rows)
    if kld:
        ref = rows[0].label if _base_of(rows) else "the base model"
        parts += [f"## KL divergence from {ref}", _pipe_table(*kld)]
    if plot is not None:
        parts.append(f"![memory against accuracy change]({plot.as_posix()})")
    parts += ["## Models", "\n".join(f"- {m}" for m in models_list(rows))]
    return "\n\n".join(parts) + "\n"


def _html_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
                   for cells in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def render_html(rows: Sequence[ModelRow], title: str, plot: Path | None = None) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>", _html_table(*table_cells(rows)),
             "<ul>" + "".join(f"<li>{html.escape(n).replace('**', '')}</li>"
                              for n in notes(rows)) + "</ul>"]
    kld = kld_rows(rows)
    if kld:
        parts += ["<h2>KL divergence</h2>", _html_table(*kld)]
    if plot is not None:
        parts.append(f'<img src="{html.escape(plot.as_posix())}" alt="memory against accuracy">')
    parts += ["<h2>Models</h2>", "<ul>" + "".join(f"<li>{html.escape(m)}</li>"
                                                 for m in models_list(rows)) + "</ul>"]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(parts)
            + "\n</body></html>\n")


def plot_series(rows: Sequence[ModelRow]) -> tuple[str, dict[str, list[tuple[float, float, str]]]]:
    """(y-axis label, series name -> [(memory, y, label)]): accuracy change against the base
    per benchmark; without benchmarks, KL divergence."""
    mem = _mem_column(rows)
    if mem is None:
        raise ConfigError("--plot: no `quantkit mem` result among the inputs; the chart puts "
                          "memory on the x axis")
    base = _base_of(rows)
    series: dict[str, list[tuple[float, float, str]]] = {}
    for task, title in BENCHMARK_TITLES.items():
        ref = (base.evals.get(task) or {}).get("average") if base else None
        points = [(mem.value(r), r.evals[task]["average"] - ref, r.label) for r in rows
                  if r.mem and task in r.evals and ref is not None]
        if points:
            series[title] = points
    if series:
        return "accuracy change against the base (points)", series
    points = [(mem.value(r), _kld_split(r)["mean"], r.label) for r in rows
              if r.mem and _kld_split(r)]
    if not points:
        raise ConfigError("--plot: needs benchmark results with a base row, or kld results, "
                          "for the y axis")
    return "KL divergence from the base", {"KLD": points}


def write_plot(rows: Sequence[ModelRow], dest: Path, inputs: Sequence[Path] = ()) -> None:
    """memory (x) against accuracy change (y), one marker per model and benchmark."""
    require("matplotlib", "plot")
    from matplotlib.figure import Figure

    ylabel, series = plot_series(rows)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    labelled: set[str] = set()
    for (name, points), marker in zip(series.items(), "os^D", strict=False):
        xs, ys, _ = zip(*points, strict=True)
        ax.plot(xs, ys, marker, label=name, alpha=0.8)
        for x, y, label in points:
            if label not in labelled:  # one name per model, not one per benchmark
                labelled.add(label)
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 6),
                            fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel(_mem_column(rows).header.replace("GPU Mem", "GPU memory"))
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(dest, "--plot", inputs=inputs) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Software": PNG_MARK.decode()})


def write_report(cfg: ReportConfig) -> list[Path]:
    """Write report.md (and report.html, the chart); return what was written."""
    rows = collect_rows([read_result(p) for p in cfg.results])
    html_path = cfg.out.with_suffix(".html") if cfg.html else None
    outputs = [(cfg.out, "--out"), (html_path, "--html"), (cfg.plot, "--plot")]
    outputs = [(path, flag) for path, flag in outputs if path is not None]
    for i, (path, flag) in enumerate(outputs):
        others = [other for j, (other, _) in enumerate(outputs) if j != i]
        check_file_destination(path, flag, inputs=[*cfg.results, *others])
    if cfg.plot is not None:
        require("matplotlib", "plot")
        plot_series(rows)  # fail before writing anything
    written = []
    if cfg.plot is not None:
        write_plot(rows, cfg.plot, cfg.results)
        written.append(cfg.plot)
    plot_ref = _relative(cfg.plot, cfg.out) if cfg.plot is not None else None
    with atomic_file(cfg.out, inputs=cfg.results) as tmp:
        tmp.write_text(render_markdown(rows, cfg.title, plot_ref) + REPORT_MARK + "\n",
                       encoding="utf-8")
    written.append(cfg.out)
    if html_path is not None:
        with atomic_file(html_path, "--html", inputs=cfg.results) as tmp:
            tmp.write_text(render_html(rows, cfg.title, plot_ref) + REPORT_MARK + "\n",
                           encoding="utf-8")
        written.append(html_path)
    return written


def _relative(target: Path, doc: Path) -> Path:
    """How the markdown/HTML file refers to the chart: a path relative to its folder."""
    return Path(os.path.relpath(Path(target).absolute(), Path(doc).absolute().parent))
