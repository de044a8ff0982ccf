"""quantkit report: the tables (numbers straight from the result JSONs), notes, HTML, chart."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from quantkit.card import report_tables
from quantkit.evaluate.provenance import precision_label
from quantkit.report import markdown_table
from tests.helpers import assert_one_line_error, run_cli
from tests.test_eval import text_file  # noqa: F401  (fixture)
from tests.test_mem import nf4_model

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_use_double_quant": True}
INT8 = {"quant_method": "bitsandbytes", "load_in_8bit": True}


def model_block(path: str, qc: dict | None, precision: str) -> dict:
    return {"path": path, "name": Path(path).name, "precision": precision,
            "quantized": bool(qc), "quantization_config": qc}


def eval_result(path: str, qc: dict | None, precision: str, rng: random.Random, *,
                base: str | None = None) -> dict:
    results = {b: {"average": rng.uniform(20, 80), "questions": 10, "subjects": {}}
               for b in ("ceval", "mmlu", "cmmlu")}
    results["ppl"] = {s: {"ppl": rng.uniform(3, 30), "tokens": 100} for s in ("zh", "en")}
    if base:
        results["kld"] = {"all": {"mean": rng.uniform(0.001, 0.2), "median": 0.01, "p99": 0.5,
                                  "max": 1.0, "same_top1": 0.9, "tokens": 200}}
    return {"kind": "eval", "model": model_block(path, qc, precision),
            "base": {"path": base} if base else None,
            "settings": {"shots": 5, "limit": None, "text": "calib_data/heldout",
                         "seqlen": 2048, "stride": 2048}, "results": results}


def mem_result(path: str, qc: dict | None, precision: str, rng: random.Random,
               device: str = "cuda") -> dict:
    key = "allocated_after_load_gib" if device == "cuda" else "weights_in_memory_gib"
    return {"kind": "mem", "model": model_block(path, qc, precision),
            "results": {"device": device, key: rng.uniform(0.001, 20), "gpu": "H100"}}


def parse_table(markdown: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    end = next((i for i in range(2, len(cells)) if len(cells[i]) != len(cells[0])), len(cells))
    return cells[0], cells[2:end]


def test_table_numbers_and_changes_equal_the_inputs():
    rng = random.Random(7)
    models = [("/m/gptq", GPTQ, "GPTQ 4-bit g128"), ("/m/nf4", NF4, "NF4"),
              ("/m/bf16", None, "BF16"), ("/m/int8", INT8, "int8")]
    results = []
    for path, qc, precision in models:
        results.append(eval_result(path, qc, precision, rng, base="/m/bf16" if qc else None))
        results.append(mem_result(path, qc, precision, rng))
    headers, rows = parse_table(markdown_table(results))
    assert headers == ["Precision", "GPU Mem (GB)", "C-Eval", "MMLU", "CMMLU", "PPL zh",
                       "PPL en", "KLD"]
    assert [r[0] for r in rows] == ["BF16", "GPTQ 4-bit g128", "NF4", "int8"]  # base first
    by_path = {r["model"]["path"]: r for r in results if r["kind"] == "eval"}
    mems = {r["model"]["path"]: r["results"] for r in results if r["kind"] == "mem"}
    base = by_path["/m/bf16"]["results"]
    for row, path in zip(rows, ["/m/bf16", "/m/gptq", "/m/nf4", "/m/int8"], strict=True):
        res = by_path[path]["results"]
        assert row[1] == f"{mems[path]['allocated_after_load_gib']:.2f}"
        values = [res["ceval"]["average"], res["mmlu"]["average"], res["cmmlu"]["average"],
                  res["ppl"]["zh"]["ppl"], res["ppl"]["en"]["ppl"]]
        refs = [base["ceval"]["average"], base["mmlu"]["average"], base["cmmlu"]["average"],
                base["ppl"]["zh"]["ppl"], base["ppl"]["en"]["ppl"]]
        for cell, value, ref in zip(row[2:7], values, refs, strict=True):
            expected = f"{value:.2f}" if path == "/m/bf16" else f"{value:.2f} ({value - ref:+.2f})"
            assert cell == expected
        assert row[7] == ("–" if path == "/m/bf16" else f"{res['kld']['all']['mean']:.4f}")


def test_base_is_the_unquantized_model_the_kld_results_name():
    rng = random.Random(1)
    results = [eval_result("/m/fp32", None, "FP32", rng),
               eval_result("/m/gptq", GPTQ, "GPTQ 4-bit g128", rng, base="/m/bf16"),
               eval_result("/m/bf16", None, "BF16", rng)]
    _, rows = parse_table(markdown_table(results))
    assert [r[0] for r in rows] == ["BF16", "FP32", "GPTQ 4-bit g128"]
    assert "(" not in rows[0][1] and "(" in rows[1][1]


def test_rows_with_the_same_precision_are_told_apart_by_folder():
    rng = random.Random(2)
    results = [eval_result("/m/bf16", None, "BF16", rng),
               eval_result("/runs/a/gptq", GPTQ, "GPTQ 4-bit g128", rng),
               eval_result("/runs/b/gptq-actorder", GPTQ, "GPTQ 4-bit g128", rng)]
    _, rows = parse_table(markdown_table(results))
    assert [r[0] for r in rows][1:] == ["GPTQ 4-bit g128 (gptq)",
                                        "GPTQ 4-bit g128 (gptq-actorder)"]


def test_cpu_results_fill_the_memory_column_with_weight_sizes():
    rng = random.Random(3)
    results = [mem_result("/m/bf16", None, "BF16", rng, device="cpu"),
               mem_result("/m/nf4", NF4, "NF4", rng, device="cpu")]
    for r in results:
        r["results"]["weights_in_memory_gib"] /= 100  # small model: the column is in MB
    headers, rows = parse_table(markdown_table(results))
    assert headers == ["Precision", "Weights in RAM (MB)"]
    for row, r in zip(rows, results, strict=True):
        assert row[1] == f"{r['results']['weights_in_memory_gib'] * 1024:.2f}"


def test_precision_labels_come_from_the_quantization_config():
    assert precision_label(GPTQ) == "GPTQ 4-bit g128"
    assert precision_label(dict(GPTQ, bits=3, group_size=-1, desc_act=True)) == \
        "GPTQ 3-bit act-order"
    assert precision_label(NF4) == "NF4"
    assert precision_label(dict(NF4, bnb_4bit_quant_type="fp4")) == "FP4"
    assert precision_label(INT8) == "int8"
    assert precision_label(None, "bfloat16") == "BF16"
    assert precision_label({}, "torch.float16") == "FP16"


def test_bad_report_input(tmp_path, capsys):
    rng = random.Random(4)
    mixed = [mem_result("/m/a", None, "BF16", rng, "cuda"), mem_result("/m/b", NF4, "NF4", rng,
                                                                        "cpu")]
    paths = []
    for i, r in enumerate(mixed):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    out = tmp_path / "report.md"
    assert_one_line_error(run_cli(capsys, "report", *paths, "--out", out), "cuda and cpu")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    assert_one_line_error(run_cli(capsys, "report", tmp_path / "other.json", "--out", out),
                          "other.json", "not a `quantkit eval`")
    (tmp_path / "broken.json").write_text("{")
    assert_one_line_error(run_cli(capsys, "report", tmp_path / "broken.json", "--out", out),
                          "broken.json", "not valid JSON")
    assert_one_line_error(run_cli(capsys, "report", tmp_path / "missing.json", "--out", out),
                          "missing.json", "no such result file")
    assert_one_line_error(run_cli(capsys, "report", paths[0], "--out", out, "--plot",
                                  tmp_path / "p.png"), "--plot", "y axis")
    assert not out.exists() and not (tmp_path / "p.png").exists()


@pytest.mark.slow
def test_bf16_against_nf4_end_to_end(tiny_model, tmp_path_factory, text_file,  # noqa: F811
                                     tmp_path, capsys):
    base = tiny_model("llama")
    nf4 = nf4_model(base, tmp_path_factory)
    common = ["--text", text_file, "--seqlen", 64, "--stride", 32, "--limit", 1, "--shots", 0]
    files = {}
    for name, model, extra in (("bf16", base, ["--tasks", "ppl,ceval"]),
                               ("nf4", nf4, ["--base", base, "--tasks", "ppl,kld,ceval"])):
        files[name] = tmp_path / f"eval-{name}.json"
        assert run_cli(capsys, "eval", model, *extra, *common, "--out", files[name]).code == 0
        files[f"mem-{name}"] = tmp_path / f"mem-{name}.json"
        assert run_cli(capsys, "mem", model, "--device", "cpu", "--seq-len", 32, "--out",
                       files[f"mem-{name}"]).code == 0
    out, plot = tmp_path / "report.md", tmp_path / "report.png"
    result = run_cli(capsys, "report", *files.values(), "--out", out, "--html", "--plot", plot)
    assert result.code == 0, result.err
    report = out.read_text(encoding="utf-8")
    headers, rows = parse_table(report)
    assert headers == ["Precision", "Weights in RAM (MB)", "C-Eval", "PPL", "KLD"]
    assert [r[0] for r in rows] == ["BF16", "NF4"]
    data = {k: json.loads(v.read_text()) for k, v in files.items()}
    ppl = [data[k]["results"]["ppl"]["text"]["ppl"] for k in ("bf16", "nf4")]
    assert rows[0][3] == f"{ppl[0]:.2f}"
    assert rows[1][3] == f"{ppl[1]:.2f} ({ppl[1] - ppl[0]:+.2f})"
    kld = data["nf4"]["results"]["kld"]["text"]["mean"]
    assert kld > 0 and rows[1][4] == (f"{kld:.4f}" if kld >= 1e-4 else f"{kld:.2e}")
    for row, key in zip(rows, ("mem-bf16", "mem-nf4"), strict=True):
        assert row[1] == f"{data[key]['results']['weights_in_memory_gib'] * 1024:.2f}"
    assert float(rows[1][1]) < float(rows[0][1])
    assert "sample questions shipped with quantkit" in report
    # What `quantkit push` embeds: the same table, found by the card builder.
    assert markdown_table(list(files.values())) in report
    assert report_tables(report)[0].endswith(markdown_table(list(files.values())))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report.png" in report
    html = out.with_suffix(".html").read_text(encoding="utf-8")
    assert "<table>" in html and f"<td>{rows[1][3]}</td>" in html
