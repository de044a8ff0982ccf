"""quantkit export onnx: float and GPTQ graphs that ONNX Runtime runs like the PyTorch model.

The MatMulNBits mapping is checked against weights quantized here, independently, by a
round-to-nearest quantizer that writes the GPTQ layout (qweight/qzeros/scales/g_idx, v1 or
v2 zeros, act-order permutations): ONNX Runtime's MatMulNBits on the rearranged tensors must
compute x @ W.T for exactly the dequantized W. The end-to-end tests export real fixtures and
compare ONNX Runtime's logits with the PyTorch model's at batch 1 and 2, lengths 16 and 40.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import quantkit
from quantkit.checkpoint import MANIFEST_NAME
from quantkit.errors import ConfigError
from quantkit.gptq.pack import PackedLinear
from quantkit.loading import load_plain_model
from quantkit.onnx_export.graph import NBitsLinear
from quantkit.onnx_export.nbits import NBitsWeight, gptq_to_nbits
from quantkit.onnx_export.validate import onnx_logits, onnx_session
from tests.helpers import assert_one_line_error, leftovers, run_cli

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# A Llama whose Linear layers dominate its size (embeddings and head are ~4% of it), so the
# 4-bit file size reflects what quantization does to a real model. vocab 320 still covers the
# fixture tokenizer (byte alphabet + merges, ~300 tokens).
SIZE_SHAPE = dict(vocab_size=320, hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
SHAPES = [(1, 16), (2, 40)]
TRAINED = Path(quantkit.__file__).parent / "assets" / "tiny-baichuan2"  # Baichuan2-7B layout


# ----------------------------------------------------------------------------- GPTQ layout


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """GPTQ packing: 32 // bits codes per int32 along `dim`, lowest bits first."""
    per_word = 32 // bits
    codes = codes.to(torch.int64)
    if dim == 0:
        codes = codes.reshape(-1, per_word, codes.shape[1]).transpose(1, 2)
    else:
        codes = codes.reshape(codes.shape[0], -1, per_word)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (codes << shifts).sum(-1)  # disjoint bit fields: sum == or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def rtn_gptq(weight: torch.Tensor, bits: int = 4, group_size: int = 32, sym: bool = True,
             act_order: bool = False, v2: bool = False) -> tuple[PackedLinear, torch.Tensor]:
    """Round-to-nearest into the GPTQ layout; returns the tensors and the dequantized weight."""
    n, k = weight.shape
    maxq = 2**bits - 1
    size = k if group_size == -1 else group_size
    order = torch.randperm(k, generator=torch.Generator().manual_seed(k)) if act_order \
        else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // size).to(torch.int32)  # groups follow quantization order
    w = weight.float().T  # [K, N]
    rows = g_idx.long().unsqueeze(1).expand(k, n)
    lo = torch.zeros(-(-k // size), n).scatter_reduce(0, rows, w, "amin")  # includes 0
    hi = torch.zeros(-(-k // size), n).scatter_reduce(0, rows, w, "amax")
    if sym:
        scales = (2 * torch.maximum(-lo, hi) / maxq).clamp(min=1e-6)
        zeros = torch.full_like(scales, (maxq + 1) // 2)
    else:
        scales = ((hi - lo) / maxq).clamp(min=1e-6)
        zeros = torch.round(-lo / scales)
    scales = scales.half()
    s, z = scales.float()[g_idx.long()], zeros[g_idx.long()]
    codes = torch.clamp(torch.round(w / s) + z, 0, maxq)
    dequantized = ((codes - z) * s).T
    stored = (zeros if v2 else zeros - 1).to(torch.int64) & maxq  # v1: zero - 1, wrapped
    packed = PackedLinear(qweight=pack_int32(codes, bits, 0), qzeros=pack_int32(stored, bits, 1),
                          scales=scales, g_idx=g_idx)
    return packed, dequantized


def ort_matmul_nbits(weight: NBitsWeight, x: np.ndarray) -> np.ndarray:
    """One MatMulNBits node (after a Gather for act-order) run by ONNX Runtime's CPU kernel."""
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.FLOAT16
    inits = [numpy_helper.from_array(weight.b.numpy(), "B"),
             numpy_helper.from_array(weight.scales.numpy(), "scales")]
    inputs = ["A", "B", "scales"]
    if weight.zero_points is not None:
        inits.append(numpy_helper.from_array(weight.zero_points.numpy(), "zero_points"))
        inputs.append("zero_points")
    nodes = []
    if weight.perm is not None:
        inits.append(numpy_helper.from_array(weight.perm.numpy(), "perm"))
        nodes.append(helper.make_node("Gather", ["X", "perm"], ["A"], axis=-1))
    else:
        nodes.append(helper.make_node("Identity", ["X"], ["A"]))
    nodes.append(helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft",
                                  K=weight.k, N=weight.n, bits=weight.bits,
                                  block_size=weight.block_size, accuracy_level=0))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", elem, x.shape)],
                              [helper.make_tensor_value_info("Y", elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})[0]


CASES = [  # bits, group size, sym, act-order, v2
    (4, 32, True, False, False), (4, 32, False, True, False), (4, 128, False, False, True),
    (4, 128, True, True, True), (4, -1, False, False, False), (2, 64, False, True, False),
    (8, 32, False, True, True), (8, 128, True, False, False),
]


@pytest.mark.parametrize("bits,group_size,sym,act_order,v2", CASES)
def test_matmulnbits_computes_the_gptq_weight(bits, group_size, sym, act_order, v2):
    torch.manual_seed(bits * 1000 + group_size)
    weight = torch.randn(96, 256) * 0.05
    packed, dequantized = rtn_gptq(weight, bits, group_size, sym, act_order, v2)
    nbits = gptq_to_nbits(packed, bits, 0 if v2 else 1, torch.float32)
    assert (nbits.perm is not None) == (act_order and group_size != -1)
    assert (nbits.zero_points is None) == sym  # symmetric zeros are the operator's default
    assert nbits.b.shape == (96, 256 // nbits.block_size, nbits.block_size * bits // 8)
    x = torch.randn(2, 5, 256)
    expected = (x @ dequantized.T).numpy()
    scale = np.abs(expected).max()
    got = ort_matmul_nbits(nbits, x.numpy())
    assert np.abs(got - expected).max() < 1e-5 * scale
    with torch.no_grad():  # the PyTorch twin used while tracing computes the same
        torch_side = NBitsLinear(nbits, None, 0)(x).numpy()
    assert np.abs(torch_side - expected).max() < 1e-5 * scale
    # a wrong mapping would be far off: dropping the zero points or the permutation
    assert np.abs(x.numpy() @ weight.T.numpy() - expected).max() > 1e-3 * scale


def test_v1_zero_of_zero_reads_back_as_loaders_do():
    """v1 cannot store a zero of 0 (it stores -1, wrapped); loaders read 2**bits back."""
    weight = torch.rand(32, 64) + 0.1  # all positive: asymmetric zeros are 0
    packed, _ = rtn_gptq(weight, 4, 32, sym=False)
    nbits = gptq_to_nbits(packed, 4, 1, torch.float32)
    assert nbits.zero_points.dtype == torch.float32 and bool((nbits.zero_points == 16).all())
    scales = packed.scales.float().repeat_interleave(32, 0).T
    loader_weight = (torch.clamp(torch.round(weight / scales), 0, 15) - 16) * scales
    x = torch.randn(3, 64)
    got = ort_matmul_nbits(nbits, x.numpy())
    np.testing.assert_allclose(got, (x @ loader_weight.T).numpy(), rtol=1e-5, atol=1e-4)


def test_group_size_without_power_of_two_blocks_is_refused():
    packed, _ = rtn_gptq(torch.randn(32, 160), 4, 40)
    with pytest.raises(ConfigError, match="power of two"):
        gptq_to_nbits(packed, 4, 1, torch.float32)


# ----------------------------------------------------------------------------- end to end


def _ids(batch: int, seqlen: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch * 100 + seqlen)
    return torch.randint(3, vocab, (batch, seqlen), generator=generator)


@torch.no_grad()
def assert_runs_like(onnx_dir: Path, model, vocab: int, tolerance: float) -> float:
    """ONNX Runtime at batch 1 and 2, lengths 16 and 40 (the second row left-padded) gives the
    PyTorch model's logits within `tolerance` (relative to their size); returns the worst."""
    session = onnx_session(onnx_dir / "model.onnx")
    worst, agree = 0.0, []
    for batch, seqlen in SHAPES:
        ids = _ids(batch, seqlen, vocab)
        mask = torch.ones_like(ids)
        if batch == 2:
            mask[1, :7] = 0  # padding must reach the graph, not be folded away
        got = onnx_logits(session, ids, mask)
        expected = model(input_ids=ids, attention_mask=mask).logits.float().numpy()
        keep = mask.bool().numpy()
        diff = float(np.abs(got - expected)[keep].max())
        assert diff <= tolerance * max(1.0, float(np.abs(expected).max())), (batch, seqlen, diff)
        agree.extend((got.argmax(-1) == expected.argmax(-1))[keep].tolist())
        worst = max(worst, diff)
    assert np.mean(agree) >= 0.95  # over 89 positions; within tolerance only near-ties flip
    return worst


@pytest.fixture(scope="module")
def size_llama(tiny_model):
    return tiny_model("llama", **SIZE_SHAPE)


@pytest.fixture(scope="module")
def float_export(size_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "llama-fp32"
    code = _cli("export", "onnx", size_llama, out)
    assert code == 0
    return out


def _cli(*args) -> int:
    from quantkit.cli import main

    return main([str(a) for a in args])


def test_float_export_runs_like_pytorch(float_export, size_llama):
    model = load_plain_model(size_llama, dtype=torch.float32).eval()
    assert assert_runs_like(float_export, model, SIZE_SHAPE["vocab_size"], 1e-4) < 1e-4
    graph = onnx.load(float_export / "model.onnx")
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert not any(n.op_type == "MatMulNBits" for n in graph.graph.node)
    manifest = json.loads((float_export / MANIFEST_NAME).read_text())["onnx_export"]
    assert manifest["dtype"] == "fp32" and manifest["kv_cache"] is False
    assert manifest["validation"]["passed"] and manifest["validation"]["max_abs_diff"] < 1e-4
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (float_export / name).is_file()
    assert not list(float_export.glob("*.safetensors"))


def write_rtn_artifact(source: Path, dest: Path, **quant) -> dict[str, torch.Tensor]:
    """A GPTQ-layout folder from `rtn_gptq` (every decoder Linear); returns the dequantized
    weights, so a float model holding them is the reference."""
    from safetensors.torch import save_file

    from quantkit.checkpoint import copy_non_weight_files, open_checkpoint

    ckpt = open_checkpoint(source)
    tensors, dequantized = {}, {}
    for name, tensor in ckpt.iter_tensors():
        module = name.removesuffix(".weight")
        if ".layers." in name and name.endswith("proj.weight"):
            packed, dequantized[name] = rtn_gptq(tensor, **quant)
            tensors.update({f"{module}.{key}": getattr(packed, key)
                            for key in ("qweight", "qzeros", "scales", "g_idx")})
        else:
            tensors[name] = tensor
    dest.mkdir()
    copy_non_weight_files(ckpt, dest)
    save_file(tensors, dest / "model.safetensors")
    config = dict(ckpt.config, quantization_config={
        "quant_method": "gptq", "bits": quant.get("bits", 4),
        "group_size": quant.get("group_size", 32), "desc_act": quant.get("act_order", False),
        "sym": quant.get("sym", True),
        "checkpoint_format": "gptq_v2" if quant.get("v2") else "gptq"})
    (dest / "config.json").write_text(json.dumps(config))
    return dequantized


@pytest.fixture(scope="module")
def rtn_export(size_llama, tmp_path_factory):
    """A v1, asymmetric, act-order GPTQ-layout artifact and its ONNX export."""
    root = tmp_path_factory.mktemp("rtn")
    write_rtn_artifact(size_llama, root / "gptq", bits=4, group_size=32, sym=False,
                       act_order=True)
    assert _cli("export", "onnx", root / "gptq", root / "onnx") == 0
    return root


def test_gptq_export_runs_like_quantkit_load(rtn_export, float_export):
    """The artifact's own tensors become MatMulNBits nodes that compute what quantkit.load does,
    in a file at most a third of the fp32 export's size."""
    from quantkit.loading import load

    model = load(rtn_export / "gptq").float()
    assert assert_runs_like(rtn_export / "onnx", model, SIZE_SHAPE["vocab_size"], 1e-4) < 1e-4
    graph = onnx.load(rtn_export / "onnx" / "model.onnx")
    linears = 7 * SIZE_SHAPE["num_hidden_layers"]
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == linears and all(n.domain == "com.microsoft" for n in nbits)
    weights = {i.name for i in graph.graph.initializer}
    float_matmuls = [n for n in graph.graph.node
                     if n.op_type == "MatMul" and weights.intersection(n.input)]
    assert len(float_matmuls) == 1  # only lm_head keeps a float weight
    summary = json.loads((rtn_export / "onnx" / MANIFEST_NAME).read_text())["onnx_export"]
    assert summary["quantization"]["act_order_gathers"] == linears
    assert summary["quantization"]["block_sizes"] == [32]
    size = (rtn_export / "onnx" / "model.onnx").stat().st_size
    float_size = (float_export / "model.onnx").stat().st_size
    assert size <= float_size / 3, (size, float_size)


def test_validation_catches_one_layer_off_by_ten_percent(rtn_export):
    """The gate is tight enough for a small mistake: the export checked against a model whose
    one Linear has 10% larger scales fails, at either dtype's tolerance."""
    from quantkit.errors import QuantizationError
    from quantkit.loading import load
    from quantkit.onnx_export.export import reference_logits, validate_export

    model = load(rtn_export / "gptq").float()
    ids = _ids(2, 32, SIZE_SHAPE["vocab_size"])
    onnx_file = rtn_export / "onnx" / "model.onnx"
    assert validate_export(onnx_file, ids, reference_logits(model, ids), "fp32").passed
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    layer.scales.mul_(1.1)
    for dtype in ("fp32", "fp16"):
        with pytest.raises(QuantizationError, match="differ"):
            validate_export(onnx_file, ids, reference_logits(model, ids), dtype)


@pytest.fixture(scope="module")
def trained_gptq(tmp_path_factory):
    """`quantkit gptq` (4-bit, sym, group 32) of the tiny trained Baichuan2-style model."""
    out = tmp_path_factory.mktemp("gptq") / "tiny-baichuan2-gptq"
    assert _cli("gptq", TRAINED, "--out", out, "--bits", 4, "--group-size", 32, "--nsamples", 8,
                "--seqlen", 64, "--device", "cpu", "--trust-remote-code") == 0
    return out


def test_trained_model_gptq_export_runs_like_quantkit_load(trained_gptq, tmp_path, capsys):
    from quantkit.loading import load

    out = tmp_path / "onnx"
    result = run_cli(capsys, "export", "onnx", trained_gptq, out)
    assert_one_line_error(result, "--trust-remote-code")
    assert _cli("export", "onnx", trained_gptq, out, "--trust-remote-code") == 0
    model = load(trained_gptq, trust_remote_code=True).float()
    vocab = model.config.vocab_size
    assert assert_runs_like(out, model, vocab, 1e-4) < 1e-4
    summary = json.loads((out / MANIFEST_NAME).read_text())["onnx_export"]
    quantization = summary["quantization"]
    assert quantization["matmulnbits_nodes"] == 5 * model.config.num_hidden_layers  # W_pack..
    assert quantization["act_order_gathers"] == 0 and quantization["sym"] is True
    assert summary["validation"]["passed"] and summary["validation"]["top1_agreement"] > 0.95
    for name in ("modeling_baichuan.py", "tokenizer.json", "quantize_config.json"):
        assert (out / name).is_file()


def test_trained_model_fp16_export_runs_like_pytorch(tmp_path):
    out = tmp_path / "fp16"
    assert _cli("export", "onnx", TRAINED, out, "--dtype", "fp16", "--opset", "21",
                "--trust-remote-code") == 0
    graph = onnx.load(out / "model.onnx")
    assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {21}
    weights = [i for i in graph.graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    model = load_plain_model(TRAINED, dtype=torch.float32, trust_remote_code=True).eval()
    assert assert_runs_like(out, model, model.config.vocab_size, 3e-2) > 1e-4  # fp16, not fp32


def test_gptq_bits_matmulnbits_cannot_run_are_refused(trained_gptq, tmp_path, capsys):
    source = tmp_path / "three-bit"
    shutil.copytree(trained_gptq, source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (source / "config.json").write_text(json.dumps(config))
    result = run_cli(capsys, "export", "onnx", source, tmp_path / "out", "--trust-remote-code")
    assert_one_line_error(result, "bits=3", "MatMulNBits", "--bits 4")
    assert leftovers(tmp_path, "out") == []


def test_fp16_overflow_fails_validation_and_writes_nothing(tiny_model, tmp_path, capsys):
    """Activations past float16's range: the fp32 reference is fine, the fp16 graph is not."""
    source = tmp_path / "loud"
    shutil.copytree(tiny_model("llama"), source)
    model = load_plain_model(source, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.fill_(30000.0)  # every weight stays within float16's range,
        model.lm_head.weight.mul_(8.0)  # the logits (~3e4 unscaled) do not
    model.to(torch.bfloat16).save_pretrained(source)
    result = run_cli(capsys, "export", "onnx", source, tmp_path / "out", "--dtype", "fp16")
    assert_one_line_error(result, "ONNX Runtime's logits differ", "--dtype fp32")
    assert leftovers(tmp_path, "out") == []


# ----------------------------------------------------------------------------- bad input


def test_unknown_export_format(tiny_model, tmp_path, capsys):
    result = run_cli(capsys, "export", "tflite", tiny_model("llama"), tmp_path / "out")
    assert_one_line_error(result, "tflite", "onnx")


def test_unsupported_quantization_is_refused(tiny_model, tmp_path, capsys):
    source = tmp_path / "awq"
    shutil.copytree(tiny_model("llama"), source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (source / "config.json").write_text(json.dumps(config))
    result = run_cli(capsys, "export", "onnx", source, tmp_path / "out")
    assert_one_line_error(result, "awq", "BF16")
    assert leftovers(tmp_path, "out") == []


def test_bad_opset(tiny_model, tmp_path, capsys):
    result = run_cli(capsys, "export", "onnx", tiny_model("llama"), tmp_path / "out",
                     "--opset", "17")
    assert_one_line_error(result, "--opset 17", "18")


def test_missing_onnxruntime_names_the_extra(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    result = run_cli(capsys, "export", "onnx", tiny_model("llama"), tmp_path / "out")
    assert_one_line_error(result, "onnxruntime", "quantkit[onnx]")
    assert leftovers(tmp_path, "out") == []
