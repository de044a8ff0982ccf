"""Checkpoint I/O: reading every layout, atomic sharded writing, manifest, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from quantkit.checkpoint import (
    ShardedWriter,
    atomic_output,
    open_checkpoint,
    parse_size,
    sha256_file,
    write_checkpoint,
)
from quantkit.errors import CheckpointError, OutputError
from tests.helpers import assert_one_line_error, leftovers, run_cli, unwritable_dir


def _all_tensors(ckpt) -> dict[str, torch.Tensor]:
    return {name: ckpt.get_tensor(name).clone() for name in ckpt.tensor_names()}


def test_parse_size_uses_hub_units():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5KB") == 1500
    assert parse_size(1234) == 1234
    with pytest.raises(OutputError):
        parse_size("lots")


def test_sharded_write_round_trips_and_indexes(tiny_model, tmp_path):
    source = open_checkpoint(tiny_model("llama"))
    original = _all_tensors(source)
    dest = write_checkpoint(tmp_path / "out", source.iter_tensors(), source=source,
                            max_shard_size="200KB")
    out = open_checkpoint(dest)
    assert len(out.weight_files) > 1
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in original.values())
    for name, tensor in original.items():
        assert torch.equal(out.get_tensor(name), tensor), name
    with open(dest / out.weight_files[0], "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}
    # Non-weight files are copied and the manifest hashes every output file.
    assert (dest / "tokenizer.json").read_bytes() == (source.path / "tokenizer.json").read_bytes()
    manifest = json.loads((dest / "quantkit.json").read_text())
    assert manifest["source"]["weight_files"] == {
        "model.safetensors": sha256_file(source.path / "model.safetensors")}
    on_disk = {p.name for p in dest.iterdir()} - {"quantkit.json"}
    assert set(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert sha256_file(dest / name) == digest


def test_bin_checkpoints_load_weights_only(tiny_model, tmp_path):
    source = open_checkpoint(tiny_model("qwen2"))
    original = _all_tensors(source)
    dest = write_checkpoint(tmp_path / "bin", source.iter_tensors(), source=source,
                            weight_format="bin", max_shard_size="300KB")
    assert (dest / "pytorch_model.bin.index.json").is_file()
    ckpt = open_checkpoint(dest)
    assert ckpt.weight_format == "bin"
    for name, tensor in original.items():
        assert torch.equal(ckpt.get_tensor(name), tensor)


def test_bin_with_code_in_pickle_is_refused(tmp_path, tiny_model):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(tiny_model("llama") / "config.json", folder)

    class Payload:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    torch.save({"w": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        open_checkpoint(folder)


def test_source_is_never_modified(tiny_model, tmp_path):
    src = tiny_model("mistral")
    before = {p.name: sha256_file(p) for p in src.iterdir()}
    source = open_checkpoint(src)
    write_checkpoint(tmp_path / "copy", source.iter_tensors(), source=source)
    assert {p.name: sha256_file(p) for p in src.iterdir()} == before


def test_failed_write_leaves_nothing(tiny_model, tmp_path):
    source = open_checkpoint(tiny_model("llama"))

    def exploding():
        yield from list(source.iter_tensors())[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "out", exploding(), source=source)
    assert leftovers(tmp_path, "out") == []


def test_force_replaces_existing_only_on_success(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("keep me")
    (dest / "quantkit.json").write_text('{"tool": "quantkit"}')  # a previous quantkit output
    with pytest.raises(OutputError, match="--force"):
        with atomic_output(dest):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output(dest, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert (dest / "old.txt").read_text() == "keep me"
    with atomic_output(dest, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    assert leftovers(tmp_path, "dest") == [dest]


def test_writer_never_splits_one_tensor(tmp_path):
    writer = ShardedWriter(tmp_path, max_shard_size=100)
    writer.add("a", torch.zeros(10))  # 40 bytes
    writer.add("b", torch.zeros(100))  # 400 bytes: alone in its shard
    writer.add("c", torch.zeros(5))
    names = writer.close()
    assert len(names) == 3
    assert set(load_file(tmp_path / names[1])) == {"b"}


# ----------------------------------------------------------------------------- bad input


def test_missing_path(capsys, tmp_path):
    result = run_cli(capsys, "inspect", tmp_path / "nope")
    assert_one_line_error(result, str(tmp_path / "nope"), "no such")


def test_folder_that_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    result = run_cli(capsys, "inspect", tmp_path)
    assert_one_line_error(result, str(tmp_path), "config.json")


def test_config_without_weights(capsys, tmp_path, tiny_model):
    shutil.copy(tiny_model("llama") / "config.json", tmp_path)
    assert_one_line_error(run_cli(capsys, "inspect", tmp_path), "no weights")


def test_truncated_safetensors(capsys, tmp_path, tiny_model):
    src = tmp_path / "trunc"
    shutil.copytree(tiny_model("llama"), src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = run_cli(capsys, "convert", "baichuan2-to-1", src, tmp_path / "out", "--force")
    assert_one_line_error(result, "model.safetensors", "truncated", "download it again")
    assert leftovers(tmp_path, "out") == []


def test_shard_listed_in_index_but_absent(capsys, tmp_path, tiny_model):
    source = open_checkpoint(tiny_model("llama"))
    sharded = write_checkpoint(tmp_path / "sharded", source.iter_tensors(), source=source,
                               max_shard_size="200KB")
    missing = open_checkpoint(sharded).weight_files[-1]
    (sharded / missing).unlink()
    result = run_cli(capsys, "inspect", sharded)
    assert_one_line_error(result, missing, "missing")


def test_unwritable_destination(capsys, tmp_path, tiny_model):
    parent = unwritable_dir(tmp_path)
    result = run_cli(capsys, "convert", "baichuan2-to-1", tiny_model("llama"), parent / "out",
                     "--force")
    assert_one_line_error(result, str(parent), "choose another DEST")
    assert not (parent / "out").exists()


def test_existing_destination(capsys, tmp_path, tiny_model):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("precious")
    result = run_cli(capsys, "convert", "baichuan2-to-1", tiny_model("baichuan2-7b"),
                     tmp_path / "out")
    assert_one_line_error(result, str(tmp_path / "out"), "already exists", "--force")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_destination_inside_source(capsys, tmp_path, tiny_model):
    src = tmp_path / "src"
    shutil.copytree(tiny_model("llama"), src)
    result = run_cli(capsys, "convert", "baichuan2-to-1", src, src / "out", "--force")
    assert_one_line_error(result, "inside the source")
    assert not (src / "out").exists()
