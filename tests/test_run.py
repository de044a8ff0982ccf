"""`quantkit run`: the demo recipe end to end, and --resume after an interruption."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantkit.recipe import load_recipe, run_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "quantkit" / "assets" / "tiny-baichuan2"


def _table_rows(report: str) -> dict[str, list[str]]:
    """Main report table: precision label -> cells."""
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("| Precision"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0], cells)
        if rows and not line.startswith("|"):
            break
    return rows


def _number(cell: str) -> float:
    return float(cell.split(" ")[0])


@pytest.mark.slow
def test_demo_recipe_end_to_end(tmp_path):
    run_dir = tmp_path / "demo"
    run_recipe(load_recipe(REPO / "recipes" / "demo.yaml"), run_dir)
    report = (run_dir / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| Precision"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = _table_rows(report)
    assert set(rows) == {"BF16", "GPTQ 4-bit g128", "RTN 4-bit g128", "NF4", "FP4", "int8"}
    evals = {}
    for path in (run_dir / "results").glob("eval-*.json"):
        result = json.loads(path.read_text())
        evals[result["model"]["precision"]] = result
    assert set(evals) == set(rows)
    for label, result in evals.items():
        cells = dict(zip(columns, rows[label], strict=True))
        assert _number(cells["PPL zh"]) == pytest.approx(result["results"]["ppl"]["zh"]["ppl"],
                                                         abs=0.006)
        assert _number(cells["PPL en"]) == pytest.approx(result["results"]["ppl"]["en"]["ppl"],
                                                         abs=0.006)
        assert _number(cells["C-Eval"]) == pytest.approx(result["results"]["ceval"]["average"],
                                                         abs=0.006)
    kld = {label: r["results"]["kld"]["all"]["mean"] for label, r in evals.items()}
    assert kld["BF16"] == 0
    # The point of GPTQ: closer to the base model than round-to-nearest on the same grid.
    assert kld["GPTQ 4-bit g128"] < kld["RTN 4-bit g128"]
    ppl = {label: r["results"]["ppl"]["zh"]["ppl"] for label, r in evals.items()}
    assert ppl["GPTQ 4-bit g128"] < ppl["RTN 4-bit g128"]
    assert (run_dir / "run.log").read_text().count("step ") >= 5
    assert (run_dir / "report.png").is_file()


def _mini_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(f"""
model: {TINY}
trust_remote_code: true
steps:
  - step: gptq
    bits: 4
    nsamples: 8
    seqlen: 64
    device: cpu
  - step: bnb
    nf4: true
    device: cpu
  - step: eval
    tasks: [ppl]
    seqlen: 128
    max_tokens: 2048
  - step: report
""")
    return recipe


def _done_steps(run_dir: Path) -> set[str]:
    try:
        return set(json.loads((run_dir / "run.json").read_text())["done"])
    except (FileNotFoundError, json.JSONDecodeError):
        return set()


def _log_has(run_dir: Path, line_start: str) -> bool:
    """Whether run.log has a complete line (newline-terminated) containing `line_start`."""
    try:
        text = (run_dir / "run.log").read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    return any(line_start in line for line in text.splitlines(keepends=True)
               if line.endswith("\n"))


def _wait_until(proc: subprocess.Popen, condition, what: str, limit_s: float = 600) -> None:
    """Poll `condition` while the process runs. The limit only bounds a hang: the test's
    outcome depends on the state reached, never on how long reaching it took."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended before {what}: exit {proc.returncode}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {limit_s} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_interrupted_run_resumes_without_redoing_gptq(tmp_path):
    recipe, run_dir = _mini_recipe(tmp_path), tmp_path / "run"
    command = [sys.executable, "-m", "quantkit", "run", str(recipe), "--out", str(run_dir)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    # Signal only once the step boundary is behind us, as observed on disk: gptq recorded
    # as done in run.json AND the runner has logged the start of the next step, so the
    # interrupt lands inside `bnb`, whatever the machine's load.
    _wait_until(proc, lambda: "gptq" in _done_steps(run_dir)
                and _log_has(run_dir, "step bnb: quantkit bnb"), "start of step bnb")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "interrupted" in err
    assert _done_steps(run_dir) == {"gptq"}
    assert not (run_dir / "report.md").exists()
    leftovers = [p for p in (run_dir / "models").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the step that was cut short left no half-written folder
    gptq_manifest = (run_dir / "models" / "gptq" / "quantkit.json").read_bytes()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    log = (run_dir / "run.log").read_text()
    assert re.search(r"step gptq: outputs complete, skipped", log)
    assert (run_dir / "models" / "gptq" / "quantkit.json").read_bytes() == gptq_manifest
    assert _done_steps(run_dir) == {"gptq", "bnb", "eval:gptq", "eval:bnb", "eval:source",
                                    "report"}
    assert "GPTQ 4-bit g128" in (run_dir / "report.md").read_text()


def test_failed_step_is_named_and_earlier_outputs_stay(tmp_path, capsys):
    from tests.helpers import assert_one_line_error, run_cli

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"""
model: {TINY}
trust_remote_code: true
steps:
  - step: bnb
    nf4: true
    device: cpu
  - step: gptq
    seqlen: 100000
    device: cpu
""")
    result = run_cli(capsys, "run", recipe, "--out", tmp_path / "run")
    assert_one_line_error(result, "step 'gptq' failed", "--resume")
    assert (tmp_path / "run" / "models" / "bnb" / "quantkit.json").is_file()
    assert not (tmp_path / "run" / "models" / "gptq").exists()
