"""Data-parallel GPTQ under torchrun (gloo, 2 CPU processes) against one process.

The ranks split the calibration rows and sum their Hessians, so the artifact must be the
one-process artifact up to float summation order; and a rank that dies mid-run must
leave nothing behind and fail every rank.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import quantkit
from quantkit.evaluate.perplexity import perplexity
from quantkit.loading import load_tokenizer
from tests.helpers import run_cli

TRAINED = Path(quantkit.__file__).parent / "assets" / "tiny-baichuan2"
REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--nsamples", "8", "--seqlen", "64", "--batch-size", "2", "--device", "cpu",
         "--trust-remote-code"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    return dict(env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)


def torchrun(*args, timeout: int = 240, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "quantkit", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=child_env(**env), cwd=REPO)


def packed_words(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys() if n.endswith("qweight")})
    return out


def heldout_ppl(folder: Path) -> float:
    tokenizer = load_tokenizer(folder, trust_remote_code=True)
    text = (REPO / "calib_data" / "heldout" / "en.txt").read_text(encoding="utf-8")[:6000]
    ids = torch.tensor(tokenizer(text)["input_ids"])
    model = quantkit.load(folder, trust_remote_code=True)
    with torch.no_grad():
        return perplexity(model, ids, seqlen=128, stride=128, batch_size=4)["ppl"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference run, one thread like each rank: the thread count changes CPU matmul
    blocking, and so the last bits of every bf16 activation, in a way ranks do not."""
    out = tmp_path_factory.mktemp("single") / "gptq"
    run = subprocess.run([sys.executable, "-m", "quantkit", "gptq", str(TRAINED), "--out",
                          str(out), *FLAGS], capture_output=True, text=True, timeout=240,
                         env=child_env(), cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.mark.parametrize("reduce", ["allreduce", "owner"])
def test_two_ranks_give_the_one_process_artifact(reduce, one_process, tmp_path):
    out = tmp_path / "gptq"
    run = torchrun("gptq", TRAINED, "--out", out, *FLAGS, "--hessian-reduce", reduce)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((out / "quantkit.json").read_text())["gptq"]
    assert manifest["ranks"] == 2 and manifest["hessian_reduce"] == reduce
    assert manifest["calibration"]["nsamples"] == 8  # all rows, not one rank's share
    assert run.stdout.count("wrote ") == 1  # only rank 0 reports

    single, double = packed_words(one_process), packed_words(out)
    assert single.keys() == double.keys() and len(single) == 4 * 5  # W_pack, o, gate, up, down
    same = sum(int((single[k] == double[k]).sum()) for k in single)
    total = sum(t.numel() for t in single.values())
    assert same / total >= 0.999, f"{total - same} of {total} packed words differ"

    ppl_single, ppl_double = heldout_ppl(one_process), heldout_ppl(out)
    assert abs(ppl_double / ppl_single - 1) < 0.005, (ppl_single, ppl_double)


def _launch_rank(rank: int, port: int, args: list[str], **env) -> subprocess.Popen:
    """One rank the way torchrun starts it (env:// rendezvous), without torchrun, so the
    surviving rank must stop on its own and each rank's exit status is visible."""
    rank_env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                         LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(port), **env)
    return subprocess.Popen([sys.executable, "-m", "quantkit", *args], env=rank_env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_a_rank_dying_mid_run_leaves_no_output_and_fails_every_rank(tmp_path):
    out = tmp_path / "gptq"
    port = free_port()
    args = ["gptq", str(TRAINED), "--out", str(out), *FLAGS]
    ranks = [_launch_rank(r, port, args, QUANTKIT_FAULT="1:2:exit") for r in (0, 1)]
    results = [p.communicate(timeout=180) for p in ranks]
    codes = [p.returncode for p in ranks]
    assert codes[1] == 17  # the injected hard death (no cleanup on that rank)
    assert codes[0] != 0, results[0][1][-2000:]
    assert "Traceback" not in results[0][1], results[0][1][-3000:]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder either


def test_a_rank_failing_under_torchrun_prints_one_error_and_writes_nothing(tmp_path):
    out = tmp_path / "gptq"
    run = torchrun("gptq", TRAINED, "--out", out, *FLAGS, QUANTKIT_FAULT="1:1:raise")
    assert run.returncode != 0
    # Rank 1's line may land in the middle of rank 0's progress bar (no newline there).
    ours = re.findall(r"error: [^\n]*", run.stderr)
    assert len(ours) == 1 and "injected failure on rank 1 at layer 1" in ours[0], run.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_recipe_step_runs_on_two_ranks(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {TRAINED}\ntrust_remote_code: true\nsteps:\n"
                      "  - step: gptq\n    ranks: 2\n    nsamples: 8\n    seqlen: 64\n"
                      "    batch_size: 2\n    device: cpu\n", encoding="utf-8")
    result = run_cli(capsys, "run", recipe, "--out", tmp_path / "run")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "run" / "models" / "gptq" / "quantkit.json").read_text())
    assert manifest["gptq"]["ranks"] == 2
