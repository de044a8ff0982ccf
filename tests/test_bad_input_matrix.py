"""Every class of bad input from the 2026-12-01 sweep (issue 14), against every command it
applies to.

Each case expects the same four things: exit code 2, exactly one `error:` line and no
traceback, nothing new on disk, and every file that was there (sources included)
byte-identical. `assert_refused` checks all four by hashing the whole test folder before
and after.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from quantkit.checkpoint import MANIFEST_NAME
from tests.helpers import CliResult, assert_one_line_error, run_cli

TEXT = ("The quick brown fox jumps over the lazy dog. Quantization trades precision for memory. "
        "滚滚长江东逝水，浪花淘尽英雄。是非成败转头空，青山依旧在，几度夕阳红。") * 8

LOADERS = ("gptq", "bnb", "export", "eval", "mem")  # build the model from its config
READERS = (*LOADERS, "convert", "inspect")  # read the checkpoint at all
COPIERS = ("gptq", "bnb", "convert", "export")  # copy the source's files into an output


# ----------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`: a file's sha256, a link's target, or 'dir'."""
    state = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                state[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return state


def assert_refused(capsys, root: Path, *args, fragments: tuple[str, ...] = ()) -> CliResult:
    """Exit 2, one `error:` line without traceback, nothing new or changed under `root`."""
    before = snapshot(root)
    result = run_cli(capsys, *args)
    assert_one_line_error(result, *fragments)
    assert snapshot(root) == before, "the command changed the disk"
    return result


def command_args(command: str, src: Path, work: Path) -> list:
    out = work / f"out-{command}"
    return {
        "inspect": ["inspect", src],
        "convert": ["convert", "baichuan2-to-1", src, out, "--force"],
        "gptq": ["gptq", src, "--out", out, "--device", "cpu", "--nsamples", 2, "--seqlen", 32,
                 "--calib", work / "text.txt"],
        "bnb": ["bnb", src, "--out", out, "--nf4", "--device", "cpu"],
        "export": ["export", "onnx", src, out],
        "eval": ["eval", src, "--out", work / "eval.json", "--tasks", "ppl", "--text",
                 work / "text.txt", "--seqlen", 32, "--max-tokens", 64, "--device", "cpu"],
        "mem": ["mem", src, "--device", "cpu", "--seq-len", 16, "--out", work / "mem.json"],
    }[command]


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    return tmp_path


@pytest.fixture
def model(tiny_model, work) -> Path:
    """A fresh copy of the tiny llama checkpoint, inside the test's own folder."""
    return Path(shutil.copytree(tiny_model("llama"), work / "proj" / "llama"))


def rewrite_tensors(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def rewrite_header(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


class Payload:
    """A pickle that would call a function when loaded (weights_only must refuse it)."""

    def __reduce__(self):
        return (os.getpid, ())


def damage(kind: str, folder: Path) -> str:
    """Break `folder` the way `kind` names; return what the error must mention."""
    if kind in ("int8 weights", "int32 weights"):
        dtype = torch.int8 if kind == "int8 weights" else torch.int32
        rewrite_tensors(folder, lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
        return "int"
    if kind in ("nan weight", "inf weight"):
        name = "model.layers.1.mlp.up_proj.weight"

        def poison(t):
            t[name] = t[name].clone()
            t[name][3, 5] = float("nan") if kind == "nan weight" else float("inf")
        rewrite_tensors(folder, poison)
        return name
    if kind == "missing tensor":
        rewrite_tensors(folder, lambda t: t.pop("model.layers.1.self_attn.o_proj.weight"))
        return "model.layers.1.self_attn.o_proj.weight"
    if kind == "missing lm_head":
        rewrite_tensors(folder, lambda t: t.pop("lm_head.weight"))
        return "lm_head.weight"
    if kind == "shape mismatch":
        edit_config(folder, intermediate_size=384)
        return "shape"
    if kind == "unknown model_type":
        edit_config(folder, model_type="no-such-architecture")
        return "no-such-architecture"
    if kind == "config not UTF-8":
        (folder / "config.json").write_bytes(b'{"model_type": "llama\xff\xfe"}')
        return "UTF-8"
    if kind == "config not an object":
        (folder / "config.json").write_text("[1, 2, 3]")
        return "config.json"
    if kind == "header without data_offsets":
        rewrite_header(folder, lambda h: h[_first(h)].pop("data_offsets"))
        return "data_offsets"
    if kind == "header with unknown dtype":
        rewrite_header(folder, lambda h: h[_first(h)].update(dtype="Q7"))
        return "Q7"
    if kind == "index without weight_map":
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
        return "weight_map"
    if kind == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
        return "tokenizer"
    if kind == "tokenizer remote code":
        path = folder / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config["auto_map"] = {"AutoTokenizer": ["tok.EvilTokenizer", None]}
        path.write_text(json.dumps(config))
        (folder / "tok.py").write_text("raise SystemExit('remote code ran')\n")
        return "--trust-remote-code"
    if kind == "pickle payload":
        tensors = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        torch.save({**tensors, "evil": Payload()}, folder / "pytorch_model.bin")
        return "refused"
    if kind == "symlink leaving the folder":
        secret = folder.parent.parent / "token.txt"
        secret.write_text("hf_notarealtokenbutasecretone")
        (folder / "notes.txt").symlink_to(secret)
        return "outside the model folder"
    raise AssertionError(kind)


CASES = [
    *[(k, c) for k in ("int8 weights", "int32 weights", "nan weight", "inf weight")
      for c in (*LOADERS, "convert")],
    *[(k, c) for k in ("missing tensor", "shape mismatch", "unknown model_type")
      for c in LOADERS],
    *[(k, c) for k in ("config not UTF-8", "config not an object",
                       "header without data_offsets", "header with unknown dtype",
                       "index without weight_map", "pickle payload") for c in READERS],
    *[(k, c) for k in ("no tokenizer", "tokenizer remote code")
      for c in ("gptq", "bnb", "export", "eval")],
    *[("symlink leaving the folder", c) for c in COPIERS],
]


@pytest.mark.parametrize(("kind", "command"), CASES, ids=[f"{k}-{c}" for k, c in CASES])
def test_bad_source_is_refused(kind, command, model, work, capsys):
    """Classes 6, 8-11, 13, 14 and the pickle of 16: one line naming the problem."""
    fragment = damage(kind, model)
    result = assert_refused(capsys, work, *command_args(command, model, work),
                            fragments=(fragment,))
    if kind == "pickle payload":
        assert len(result.err.strip().splitlines()) == 1, result.err
    if kind == "symlink leaving the folder":
        assert "hf_notarealtoken" not in result.err


# ----------------------------------------------------------------------------- outputs


def _dest_flag(command: str) -> list[str]:
    return [] if command in ("convert", "export") else ["--out"]


def _writer_args(command: str, src: Path, dest: Path, work: Path, force: bool) -> list:
    args = command_args(command, src, work)
    out = work / f"out-{command}"
    args = [dest if a == out else a for a in args]
    if force and "--force" not in args:
        args.append("--force")
    return args


@pytest.mark.parametrize("command", COPIERS)
@pytest.mark.parametrize("where", ["contains the source", "is the source", "inside the source",
                                   "inside through ..", "is the source through a link",
                                   "a folder quantkit did not write"])
def test_output_never_overlaps_the_source(command, where, model, work, capsys):
    """Class 1: --force never deletes a source, nor a folder that is not quantkit's."""
    proj = model.parent
    (proj / "notes.txt").write_text("my notes")
    (work / "mine").mkdir()
    (work / "mine" / "thesis.tex").write_text("years of work")
    (work / "link").symlink_to(model)
    dest = {"contains the source": proj, "is the source": model,
            "inside the source": model / "out",
            "inside through ..": model / ".." / "llama" / "sub" / ".." / "out",
            "is the source through a link": work / "link",
            "a folder quantkit did not write": work / "mine"}[where]
    fragment = "did not write" if where.startswith("a folder") else "source"
    result = assert_refused(capsys, work, *_writer_args(command, model, dest, work, True),
                            fragments=(fragment,))
    if command in ("convert", "export"):
        assert "--out" not in result.err  # their destination is positional


def test_force_replaces_a_previous_quantkit_output(model, work, capsys):
    dest = work / "converted"
    assert run_cli(capsys, "convert", "baichuan2-to-1", model, dest, "--force").code == 0
    assert (dest / MANIFEST_NAME).is_file()
    assert run_cli(capsys, "convert", "baichuan2-to-1", model, dest, "--force").code == 0


@pytest.mark.parametrize("command", ["eval", "mem"])
@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "new.json",
                                    "user file", "the text"])
def test_result_files_never_land_on_inputs(command, target, model, work, capsys):
    """Class 2: eval and mem never write into the model folder or over a file not theirs."""
    (work / "notes.json").write_text('{"mine": true}')
    out = {"user file": work / "notes.json", "the text": work / "text.txt"}.get(
        target, model / target)
    if target == "the text" and command == "mem":
        pytest.skip("mem reads no text")
    args = command_args(command, model, work)
    args[args.index("--out") + 1] = out
    assert_refused(capsys, work, *args, fragments=(str(out),))


@pytest.fixture
def results(model, work, capsys) -> list[Path]:
    paths = [work / "eval.json", work / "mem.json"]
    for command in ("eval", "mem"):
        assert run_cli(capsys, *command_args(command, model, work)).code == 0
    return paths


def test_report_never_replaces_its_inputs(results, work, capsys):
    """Class 3, and a wrong value type (class 14)."""
    a = results[0]
    assert_refused(capsys, work, "report", *results, "--out", a, fragments=("is the input",))
    assert_refused(capsys, work, "report", *results, "--out", work / "r.md", "--plot", a,
                   fragments=("--plot",))
    (work / "notes.md").write_text("# my notes\n")
    assert_refused(capsys, work, "report", *results, "--out", work / "notes.md",
                   fragments=("not a file quantkit wrote",))
    bad = json.loads(a.read_text())
    bad["results"]["ppl"]["text"]["ppl"] = "low"
    (work / "bad.json").write_text(json.dumps(bad))
    assert_refused(capsys, work, "report", work / "bad.json", "--out", work / "r.md",
                   fragments=("not a finite number",))
    # A report quantkit wrote is replaced on the next run.
    for _ in range(2):
        assert run_cli(capsys, "report", *results, "--out", work / "r.md").code == 0


# ----------------------------------------------------------------------------- recipes


def write_recipe(path: Path, model: Path, steps) -> Path:
    path.write_text(yaml.safe_dump({"model": str(model), "steps": steps}), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["../../victim", "a/b", "..", "/abs"])
def test_step_name_cannot_escape_the_run_folder(name, model, work, capsys):
    """Class 4: caught by --check as well as by a run."""
    (work / "victim").mkdir()
    (work / "victim" / "data.txt").write_text("unrelated")
    recipe = write_recipe(work / "r.yaml", model, [{"step": "convert", "name": name}])
    for extra in (["--check"], ["--force"]):
        assert_refused(capsys, work, "run", recipe, "--out", work / "runs" / "x", *extra,
                       fragments=("name",))


def test_run_folder_never_overlaps_the_source(model, work, capsys):
    """Class 5, and reusing a folder that is not a run folder."""
    recipe = write_recipe(work / "r.yaml", model, [{"step": "mem", "device": "cpu"}])
    assert_refused(capsys, work, "run", recipe, "--out", model, "--force",
                   fragments=("source", str(model)))
    assert_refused(capsys, work, "run", recipe, "--out", model.parent, "--force",
                   fragments=("contains",))
    (work / "mine").mkdir()
    (work / "mine" / "data.txt").write_text("x")
    assert_refused(capsys, work, "run", recipe, "--out", work / "mine", "--force",
                   fragments=("not a quantkit run folder",))


@pytest.mark.parametrize("content", [b"model: m\nsteps: [\xff\xfe]\n", b"model: m\nsteps: 5\n",
                                     b"- just\n- a list\n"])
def test_damaged_recipe(content, work, capsys):
    """Class 13: a recipe that is not UTF-8, or whose steps are not a list."""
    (work / "r.yaml").write_bytes(content)
    for extra in (["--check"], []):
        assert_refused(capsys, work, "run", work / "r.yaml", "--out", work / "runs", *extra)


def test_corrupt_run_state_names_the_fix(model, work, capsys):
    run_dir = work / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{not json")
    recipe = write_recipe(work / "r.yaml", model, [{"step": "mem", "device": "cpu"}])
    assert_refused(capsys, work, "run", recipe, "--out", run_dir, "--resume",
                   fragments=("run.json", "--force"))


SECRET_URL = "https://alice:pa55word@127.0.0.1:9"
SECRET_TOKEN = "hf_SeCrEt0123456789abcdefghij"


def test_secrets_never_reach_the_log_the_copy_or_the_error(model, work, capsys):
    """Class 7: credentials in an endpoint URL or a commit message are redacted."""
    recipe = write_recipe(work / "r.yaml", model, [{
        "step": "push", "input": "source", "to": "hf", "repo": "me/model", "dry_run": True,
        "endpoint": SECRET_URL, "commit_message": f"release, token {SECRET_TOKEN}"}])
    run_dir = work / "runs" / "s"
    result = run_cli(capsys, "run", recipe, "--out", run_dir)
    assert_one_line_error(result, "push")
    written = "".join(p.read_text(encoding="utf-8") for p in run_dir.rglob("*") if p.is_file())
    assert "me/model" in written  # the log and the copy are there, redacted
    for text in (written, result.err, result.out):
        assert "pa55word" not in text and SECRET_TOKEN not in text


# ----------------------------------------------------------------------------- push, links


@pytest.fixture
def artifact(model, work, capsys) -> Path:
    dest = work / "artifact"
    assert run_cli(capsys, "convert", "baichuan2-to-1", model, dest, "--force").code == 0
    return dest


def test_push_refuses_symlinks_and_files(artifact, work, capsys):
    """Classes 6 and 16: no symlink is ever uploaded; a file is not 'no such folder'."""
    common = ["--to", "hf", "--repo", "me/model", "--dry-run"]
    assert_refused(capsys, work, "push", artifact / "config.json", *common,
                   fragments=("is a file",))
    (work / "token.txt").write_text("secret")
    (artifact / "extra.txt").symlink_to(work / "token.txt")
    assert_refused(capsys, work, "push", artifact, *common, fragments=("symlink",))


def test_links_inside_the_source_are_copied_as_files(model, work, capsys):
    (model / "docs").mkdir()
    (model / "docs" / "USAGE.md").write_text("how to use")
    (model / "USAGE.md").symlink_to(model / "docs" / "USAGE.md")
    dest = work / "out"
    assert run_cli(capsys, "convert", "baichuan2-to-1", model, dest, "--force").code == 0
    copied = dest / "USAGE.md"
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_text() == "how to use"


# ----------------------------------------------------------------------------- signals, temps


_SLOW_WRITER = """
import sys, time
import quantkit.checkpoint as c
flush = c.ShardedWriter._flush
def slow(self):
    flush(self)
    print("WRITING", flush=True)
    time.sleep(60)
c.ShardedWriter._flush = slow
from quantkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_write_leaves_nothing(sig, model, work):
    """Class 12: SIGTERM (kill, timeout, container stop) is handled like Ctrl-C.

    The writer is slowed down (a sleep after the first shard) so the signal lands mid-write.
    """
    dest = work / "out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, "convert", "baichuan2-to-1", str(model),
         str(dest), "--force", "--max-shard-size", "100KB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        assert any(p.name.startswith(".out.tmp-") for p in work.iterdir())
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")], err
    assert not [p for p in work.iterdir() if p.name.startswith((".out", "out"))]


def test_stale_temp_folders_of_dead_processes_are_removed(model, work, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = work / f".out.tmp-{dead.pid}-0123abcd"
    stale.mkdir()
    (stale / "shard-00000.partial").write_bytes(b"x" * 100)
    live = work / f".out.tmp-{os.getppid()}-4567cdef"
    live.mkdir()
    assert run_cli(capsys, "convert", "baichuan2-to-1", model, work / "out", "--force").code == 0
    assert not stale.exists()
    assert live.exists()  # another running process's folder is left alone


# ----------------------------------------------------------------------------- disk full


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("command", ["convert", "gptq", "bnb"])
def test_disk_full_while_writing_weights(command, model, work, capsys, monkeypatch):
    """Class 15 (a fake ENOSPC from the shard writer): one line naming folder and size."""
    import quantkit.checkpoint

    monkeypatch.setattr(quantkit.checkpoint, "save_file", _enospc)
    # gptq streams its layers through the writer of layer-wise loading (--load lazy)
    monkeypatch.setattr(quantkit.checkpoint.StreamingShardWriter, "add", _enospc)
    if command == "bnb":  # transformers writes bnb shards itself
        import transformers.modeling_utils

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _enospc)
    assert_refused(capsys, work, *command_args(command, model, work),
                   fragments=(str(work), "no space left", "MB"))


def test_disk_full_while_writing_a_result(model, work, capsys, monkeypatch):
    real = Path.write_text

    def full(self, *args, **kwargs):
        if ".tmp-" in self.name:
            _enospc()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    assert_refused(capsys, work, *command_args("mem", model, work),
                   fragments=(str(work), "no space left"))


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the fake-ENOSPC tests cover this")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, timeout=20)


def test_disk_full_on_a_real_small_filesystem(model, tmp_path, capsys):
    """Class 15 on a real 256 KB tmpfs: the 1 MB model cannot fit."""
    with small_tmpfs(tmp_path / "small", "256k") as small:
        before = snapshot(model)
        result = run_cli(capsys, "convert", "baichuan2-to-1", model, small / "out", "--force")
        assert_one_line_error(result, str(small), "no space left")
        assert list(small.iterdir()) == []
        assert snapshot(model) == before
        (small / "filler").write_bytes(b"\0" * (256 << 10))  # fill it completely
        result = run_cli(capsys, "mem", model, "--device", "cpu", "--seq-len", 8, "--out",
                         small / "mem.json")
        assert_one_line_error(result, str(small), "no space left")
        assert [p.name for p in small.iterdir()] == ["filler"]


# ----------------------------------------------------------------------------- smaller defects


def test_smaller_defects(model, work, capsys):
    """Class 16: each one a single line that names the fix."""
    assert_refused(capsys, work, "eval", model, "--out", work / "e.json", "--tasks", "ceval",
                   "--data-dir", f"foo={work}", fragments=("'foo' is not a benchmark",))
    assert_refused(capsys, work, "mem", model, "--device", "cpu", "--seq-len", 100000,
                   fragments=("256",))
    for command in ("convert", "gptq", "bnb"):
        args = command_args(command, model, work)
        assert_refused(capsys, work, *args, "--max-shard-size", "0",
                       fragments=("--max-shard-size",))
    assert_refused(capsys, work, "push", work / "text.txt", "--to", "hf", "--repo", "a/b",
                   "--dry-run", fragments=("is a file",))


def test_inspect_tells_missing_lm_head_from_tied(model, capsys):
    damage("missing lm_head", model)
    result = run_cli(capsys, "inspect", model)
    assert result.code == 0
    assert "tied embeddings: no" in result.out and "MISSING" in result.out


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_modes_follow_the_umask(umask, model, work, capsys):
    old = os.umask(umask)
    try:
        assert run_cli(capsys, "convert", "baichuan2-to-1", model, work / "out", "--force",
                       "--max-shard-size", "300KB").code == 0
        assert run_cli(capsys, *command_args("mem", model, work)).code == 0
    finally:
        os.umask(old)
    files = [p for p in (work / "out").iterdir()] + [work / "mem.json"]
    assert any(p.suffix == ".safetensors" for p in files)
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p
    assert (work / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_hub_cache_snapshot_links_count_as_inside(model, work, capsys):
    """The Hugging Face cache stores every file as a link into the repository's blobs/."""
    repo = work / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in model.iterdir():
        blob = blobs / hashlib.sha256(p.name.encode()).hexdigest()
        shutil.copy(p, blob)
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    dest = work / "out"
    assert run_cli(capsys, "convert", "baichuan2-to-1", snap, dest, "--force").code == 0
    assert (dest / "tokenizer.json").is_file() and not (dest / "tokenizer.json").is_symlink()


@pytest.mark.parametrize("command", ["eval", "mem"])
def test_missing_tensor_in_a_bnb_artifact(command, model, work, capsys):
    """Class 9 for quantized folders: transformers would fill the hole with random values."""
    nf4 = work / "nf4"
    assert run_cli(capsys, "bnb", model, "--out", nf4, "--nf4", "--device", "cpu").code == 0
    rewrite_tensors(nf4, lambda t: t.pop("model.norm.weight"))
    assert_refused(capsys, work, *command_args(command, nf4, work),
                   fragments=("model.norm.weight",))
