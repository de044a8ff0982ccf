"""Layer-wise loading from disk: the meta skeleton, one decoder layer in memory at a time,
and the streamed shard writer. The lazy artifact must be the whole-model artifact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantkit.checkpoint import (
    SAFETENSORS_INDEX,
    StreamingShardWriter,
    checkpoint_stream,
    open_checkpoint,
)
from quantkit.errors import QuantkitError
from quantkit.families import family_for
from quantkit.gptq.algorithm import QuantSpec
from quantkit.gptq.calibrate import StreamOptions, find_decoder_layers, quantize_layers
from quantkit.gptq.lazy_model import LazyLayers, build_skeleton
from quantkit.gptq.naming import key_renamer
from quantkit.gptq.run import GPTQConfig, gptq_quantize
from quantkit.gptq.timing import PhaseTimer

REMOTE = {"baichuan2-7b", "baichuan2-13b"}


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _ids(n=8, seqlen=64, seed=0):
    return torch.randint(3, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "baichuan2-7b", "baichuan2-13b"])
def test_lazy_artifact_is_the_whole_model_artifact(family, tiny_model, tmp_path):
    src = tiny_model(family)
    settings = dict(source=src, nsamples=8, seqlen=64, device="cpu",
                    trust_remote_code=family in REMOTE, max_shard_size="300KB")
    whole = gptq_quantize(GPTQConfig(dest=tmp_path / "whole", load="whole", **settings),
                          input_ids=_ids())
    lazy = gptq_quantize(GPTQConfig(dest=tmp_path / "lazy", **settings), input_ids=_ids())
    a, b = _tensors(whole.dest), _tensors(lazy.dest)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert len(list(lazy.dest.glob("*.safetensors"))) > 1  # really sharded
    index = json.loads((lazy.dest / SAFETENSORS_INDEX).read_text())
    assert set(index["weight_map"]) == set(b)
    manifest = json.loads((lazy.dest / "quantkit.json").read_text())["gptq"]
    assert manifest["load"] == "lazy" and len(manifest["layer_seconds"]) == 2
    assert manifest["layers"] == json.loads((whole.dest / "quantkit.json").read_text())[
        "gptq"]["layers"]
    assert not lazy.layers.packed  # streamed out, nothing kept
    assert all(p.device.type == "meta" for p in lazy.model.parameters())


def test_only_the_layer_being_processed_is_in_memory(tiny_model):
    ckpt = open_checkpoint(tiny_model("llama", num_hidden_layers=3))
    model = build_skeleton(ckpt, trust_remote_code=False)
    assert all(p.device.type == "meta" for p in model.parameters())
    family = family_for(ckpt.config)
    layers_path, layers = find_decoder_layers(model, family, "llama")
    seen = []

    def inspect(index, result):
        real = [name for name, p in model.named_parameters() if p.device.type != "meta"]
        seen.append(real)
        assert {n.split(".")[2] for n in real} == {str(index)}  # model.layers.<i>.*
        assert not any("embed_tokens" in n or n.startswith("lm_head") for n in real)

    lazy = LazyLayers(model, ckpt, key_renamer(model), device="cpu", layers_path=layers_path,
                      sink=inspect)
    result = quantize_layers(model, _ids(), QuantSpec(), family=family,
                             options=StreamOptions(), timer=PhaseTimer(), label="llama",
                             source=lazy)
    assert len(seen) == 3 and all(len(real) == 9 for real in seen)  # 7 Linears + 2 norms
    assert len(result.reports) == 3 * 7 and not result.packed
    assert all(p.device.type == "meta" for p in model.parameters())


def test_a_damaged_tensor_is_named_and_nothing_is_written(tiny_model, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    clean = tiny_model("llama")
    for p in clean.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    tensors = _tensors(src)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    # Caught by source validation before any work (or, were it skipped, as the layer loads).
    with pytest.raises(QuantkitError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        gptq_quantize(GPTQConfig(source=src, dest=tmp_path / "out", nsamples=8, seqlen=64,
                                 device="cpu"), input_ids=_ids())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_streaming_writer_round_trips_every_dtype_across_shards(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(64, 33, generator=gen).bfloat16(),
        "b.f32": torch.randn(7, generator=gen),
        "c.i32": torch.randint(-2**31, 2**31 - 1, (40, 16), dtype=torch.int32, generator=gen),
        "d.f16": torch.randn(3, 5, 2, generator=gen).half(),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 4),
        "g.bool": torch.rand(9, generator=gen) > 0.5,
        "h.view": torch.arange(24, dtype=torch.int64).reshape(4, 6)[:, 1:4],  # not contiguous
    }
    writer = StreamingShardWriter(tmp_path, max_shard_size=3000)
    writer.add_all(tensors.items())
    files = writer.close()
    assert len(files) >= 2
    for f in files:  # a shard holds at most 3000 bytes of data, or one bigger tensor
        with safe_open(tmp_path / f, framework="pt") as shard:
            sizes = [shard.get_tensor(n).nbytes for n in shard.keys()]
        assert sum(sizes) <= 3000 or len(sizes) == 1, (f, sizes)
    back = _tensors(tmp_path)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    index = json.loads((tmp_path / SAFETENSORS_INDEX).read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert not list(tmp_path.glob("*.partial"))


def test_checkpoint_stream_leaves_nothing_when_the_producer_fails(tiny_model, tmp_path):
    source = open_checkpoint(tiny_model("llama"))
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="producer failed"), \
            checkpoint_stream(dest, source=source, max_shard_size="1KB") as out:
        out.add("x", torch.ones(1000))
        out.add("y", torch.ones(1000))
        raise RuntimeError("producer failed")
    assert list(tmp_path.iterdir()) == []
    with checkpoint_stream(dest, source=source) as out:
        out.add_all(source.iter_tensors())
        out.manifest_extra = {"note": 1}
    assert json.loads((dest / "quantkit.json").read_text())["note"] == 1
    assert (dest / "tokenizer.json").is_file()
    assert _tensors(dest).keys() == set(source.tensor_names())


@pytest.mark.gpu
def test_host_resident_activations_give_the_same_codes_on_cuda(tiny_model):
    """--max-gpu-memory path: batches copied ahead on a side stream, outputs copied back
    while the next batch computes; the codes must not change."""
    ckpt = open_checkpoint(tiny_model("llama", num_hidden_layers=3))
    family = family_for(ckpt.config)
    packed = {}
    for on_host in (False, True):
        model = build_skeleton(ckpt, trust_remote_code=False)
        layers_path, _ = find_decoder_layers(model, family, "llama")
        lazy = LazyLayers(model, ckpt, key_renamer(model), device="cuda",
                          layers_path=layers_path)
        kept = {}
        lazy.sink = lambda index, result, kept=kept: kept.update(result.packed)
        quantize_layers(model, _ids(16), QuantSpec(), family=family,
                        options=StreamOptions(device="cuda", batch_size=2,
                                              activations_on_host=on_host),
                        timer=PhaseTimer("cuda"), label="llama", source=lazy)
        packed[on_host] = kept
    assert packed[False].keys() == packed[True].keys()
    for name in packed[False]:
        assert torch.equal(packed[False][name].qweight, packed[True][name].qweight), name
