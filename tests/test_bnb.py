"""quantkit bnb: NF4 / FP4 / int8 artifacts reload in a fresh process with the expected error.

The expected error of each mode comes from an independent fake-quantization written here in
plain torch (round each weight to the nearest of bitsandbytes' 16 code values per 64-weight
block; LLM.int8's row-wise absmax for weights and activations): the artifact's logits must sit
about as far from the bf16 model as that reference does, and close to the reference itself.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers.utils import logging as transformers_logging

from quantkit.bnb import BnbConfig, quantize_model
from quantkit.checkpoint import MANIFEST_NAME, open_checkpoint, sha256_file
from quantkit.cli import main
from quantkit.loading import load_plain_model
from tests.helpers import assert_one_line_error, leftovers, run_cli

pytest.importorskip("bitsandbytes")
# transformers binds its log handler to the sys.stderr of its first log call; make that
# pytest's session-wide capture rather than one test's capsys stream, closed after the test.
transformers_logging.get_logger("transformers")

REPO = Path(__file__).resolve().parents[1]
MODES = ("nf4", "fp4", "int8")
FAMILIES = ("llama", "baichuan2-7b")
REMOTE = {"baichuan2-7b"}

# bitsandbytes' 4-bit code books, normalized to [-1, 1]: NF4 from the QLoRA paper; FP4 is
# E2M1 with bias 2 and one subnormal (magnitudes 0, 0.0625, 2, 3, 4, 6, 8, 12 over 12).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
_FP4_MAGNITUDES = torch.tensor([0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]) / 12
FP4_CODE = torch.cat([-_FP4_MAGNITUDES.flip(0), _FP4_MAGNITUDES])


def _input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(3, 512, (4, 48), generator=generator)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=_input_ids()).logits.float()


# ----------------------------------------------------------------------------- reference


def fake_quant_4bit(weight: torch.Tensor, code: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Round each weight to the nearest code value times its block's absmax."""
    blocks = weight.float().reshape(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    index = ((blocks / absmax).unsqueeze(-1) - code).abs().argmin(dim=-1)
    return (code[index] * absmax).reshape(weight.shape).to(weight.dtype)


def fake_quant_rows_int8(x: torch.Tensor) -> torch.Tensor:
    absmax = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return (x.float() / absmax * 127).round() * absmax / 127


class FakeInt8Linear(nn.Module):
    """LLM.int8 without outliers: int8 rows of the weight times int8 rows of the input."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = fake_quant_rows_int8(linear.weight)
        self.bias = linear.bias

    def forward(self, x):
        out = nn.functional.linear(fake_quant_rows_int8(x), self.weight)
        return (out if self.bias is None else out + self.bias.float()).to(x.dtype)


def fake_quantized(model, mode: str, skip: tuple[str, ...] = ("lm_head",)):
    """A copy of a bf16 model with every plain nn.Linear fake-quantized as `mode` would."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.split(".")[-1] in skip:
            continue
        if mode == "int8":
            model.set_submodule(name, FakeInt8Linear(module))
        else:
            code = NF4_CODE if mode == "nf4" else FP4_CODE
            module.weight.data = fake_quant_4bit(module.weight.data, code)
    return model


# ----------------------------------------------------------------------------- artifacts

RELOAD_SCRIPT = """
import json, sys, torch
import quantkit
from transformers import AutoModelForCausalLM
jobs, ids, out = json.loads(sys.argv[1]), torch.load(sys.argv[2]), sys.argv[3]
result = {}
with torch.no_grad():
    for name, path, trust in jobs:
        via_quantkit = quantkit.load(path, trust_remote_code=trust)
        via_hf = AutoModelForCausalLM.from_pretrained(path, device_map={"": "cpu"},
                                                      trust_remote_code=trust).eval()
        result[name] = {"quantkit": via_quantkit(input_ids=ids).logits.float(),
                        "transformers": via_hf(input_ids=ids).logits.float(),
                        "loaded_in_4bit": bool(getattr(via_hf, "is_loaded_in_4bit", False)),
                        "loaded_in_8bit": bool(getattr(via_hf, "is_loaded_in_8bit", False))}
torch.save(result, out)
"""


def reload_in_fresh_process(jobs: list[tuple[str, Path, bool]], work: Path) -> dict:
    """Logits of each artifact loaded by a new Python process (quantkit.load and transformers)."""
    ids_file, out_file = work / "ids.pt", work / "logits.pt"
    torch.save(_input_ids(), ids_file)
    payload = json.dumps([(name, str(path), trust) for name, path, trust in jobs])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, payload, str(ids_file),
                           str(out_file)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out_file)


@pytest.fixture(scope="session")
def bnb_artifacts(tiny_model, tmp_path_factory) -> dict[str, dict]:
    """family -> its source, {mode: artifact folder} and the fresh-process logits of each.

    Every artifact is reloaded by one new process, so import time is paid once.
    """
    work = tmp_path_factory.mktemp("bnb")
    built, jobs = {}, []
    for family in FAMILIES:
        src, trust = tiny_model(family), family in REMOTE
        folders = {mode: work / family / mode for mode in MODES}
        for mode, folder in folders.items():
            args = [src, "--out", folder, f"--{mode}"] + (["--trust-remote-code"] if trust else [])
            folder.parent.mkdir(exist_ok=True)
            assert main(["bnb", *map(str, args)]) == 0
            jobs.append((f"{family}/{mode}", folder, trust))
        built[family] = {"source": src, "folders": folders, "trust": trust}
    reloaded = reload_in_fresh_process(jobs, work)
    for family, art in built.items():
        art["reloaded"] = {mode: reloaded[f"{family}/{mode}"] for mode in MODES}
    return built


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_reload_has_expected_error(family, mode, bnb_artifacts):
    art = bnb_artifacts[family]
    reloaded = art["reloaded"][mode]
    assert reloaded["loaded_in_8bit" if mode == "int8" else "loaded_in_4bit"]
    torch.testing.assert_close(reloaded["quantkit"], reloaded["transformers"], rtol=0, atol=0)

    original = load_plain_model(art["source"], trust_remote_code=art["trust"]).eval()
    reference = _logits(original)
    expected = _logits(fake_quantized(original, mode))
    got = reloaded["quantkit"]
    assert torch.isfinite(got).all()
    expected_error, error = _rel(expected, reference), _rel(got, reference)
    # bf16 noise alone is ~0.5%: int8's expected error is close to it, so its band is wider.
    low, high = (0.5, 1.5) if mode == "int8" else (0.8, 1.25)
    assert low * expected_error < error < high * expected_error, (error, expected_error)
    if mode != "int8":
        # Not just the right amount of error: the same rounding as the reference code book.
        assert _rel(got, expected) < 0.25 * expected_error, (_rel(got, expected),
                                                             expected_error)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_reload_is_bit_exact_with_in_memory_model(family, mode, bnb_artifacts):
    art = bnb_artifacts[family]
    ckpt = open_checkpoint(art["source"])
    cfg = BnbConfig(source=ckpt.path, dest=Path("unused"), mode=mode,
                    trust_remote_code=art["trust"])
    in_memory = _logits(quantize_model(ckpt, cfg, ["lm_head"], "cpu"))
    torch.testing.assert_close(art["reloaded"][mode]["quantkit"], in_memory, rtol=0, atol=0)


def _stored(folder: Path) -> dict[str, tuple[str, list[int]]]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.parametrize("family", FAMILIES)
def test_artifact_layout_and_sizes(family, bnb_artifacts):
    art = bnb_artifacts[family]
    source = open_checkpoint(art["source"])
    linears = [n.removesuffix(".weight") for n in source.tensor_names()
               if n.endswith(("_proj.weight", ".W_pack.weight"))]
    assert linears
    sizes = {}
    for mode, folder in art["folders"].items():
        config = json.loads((folder / "config.json").read_text())
        qc = config.pop("quantization_config")
        assert config == source.config  # nothing else in config.json changes
        assert qc["quant_method"] == "bitsandbytes"
        assert qc["llm_int8_skip_modules"] == ["lm_head"]
        assert qc["load_in_4bit"] == (mode != "int8") and qc["load_in_8bit"] == (mode == "int8")
        stored = _stored(folder)
        head_shape = list(source.tensor_meta("lm_head.weight")[1])
        assert stored["lm_head.weight"] == ("BF16", head_shape)  # NormHead / head unquantized
        # Saved before any forward: Baichuan2's NormHead has not normalized itself in place.
        assert torch.equal(open_checkpoint(folder).get_tensor("lm_head.weight"),
                           source.get_tensor("lm_head.weight"))
        for name in linears:
            dtype, shape = source.tensor_meta(f"{name}.weight")
            numel = shape[0] * shape[1]
            if mode == "int8":
                assert stored[f"{name}.weight"] == ("I8", list(shape))
                assert stored[f"{name}.SCB"] == ("F32", [shape[0]])
            else:
                assert qc["bnb_4bit_quant_type"] == mode
                assert qc["bnb_4bit_use_double_quant"] is True
                assert qc["bnb_4bit_compute_dtype"] == "bfloat16"
                assert stored[f"{name}.weight"] == ("U8", [numel // 2, 1])  # two codes a byte
                assert stored[f"{name}.weight.absmax"] == ("U8", [numel // 64])  # double quant
                assert f"{name}.weight.quant_state.bitsandbytes__{mode}" in stored
        for py in source.remote_code_files:
            assert sha256_file(folder / py) == sha256_file(source.path / py)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).is_file()
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        summary = manifest["bnb"]
        assert summary["mode"] == mode
        assert summary["full_precision_modules"] == ["lm_head"]
        assert summary["quantized_modules"] == len(linears)
        assert summary["output_weight_bytes"] == (folder / "model.safetensors").stat().st_size
        assert summary["source_weight_bytes"] == sum(
            (source.path / f).stat().st_size for f in source.weight_files)
        assert summary["check"]["perplexity"] > 1
        sizes[mode] = summary["output_weight_bytes"]
    source_bytes = sum((source.path / f).stat().st_size for f in source.weight_files)
    assert sizes["nf4"] < sizes["int8"] < source_bytes
    assert abs(sizes["nf4"] - sizes["fp4"]) < 0.01 * sizes["nf4"]


def test_skip_modules_stay_full_precision_after_reload(tiny_model, tmp_path, capsys):
    src, out = tiny_model("llama"), tmp_path / "nf4-skip"
    result = run_cli(capsys, "bnb", src, "--out", out, "--nf4", "--no-double-quant",
                     "--compute-dtype", "fp32", "--skip-modules", "lm_head, down_proj")
    assert result.code == 0, result.err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["lm_head", "down_proj"]
    assert qc["bnb_4bit_use_double_quant"] is False and qc["bnb_4bit_compute_dtype"] == "float32"
    stored = _stored(out)
    assert stored["model.layers.0.mlp.down_proj.weight"] == ("BF16", [128, 256])
    assert stored["model.layers.0.mlp.up_proj.weight.absmax"][0] == "F32"  # no double quant
    summary = json.loads((out / MANIFEST_NAME).read_text())["bnb"]
    assert summary["full_precision_modules"] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]

    from quantkit import load

    model = load(out)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    original = load_plain_model(src).eval()
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight,
                               original.model.layers[1].mlp.down_proj.weight, rtol=0, atol=0)
    assert torch.isfinite(_logits(model)).all()


def test_sharded_output_loads_like_one_file(bnb_artifacts, tiny_model, tmp_path, capsys):
    out = tmp_path / "sharded"
    result = run_cli(capsys, "bnb", tiny_model("llama"), "--out", out, "--nf4",
                     "--max-shard-size", "150KB")
    assert result.code == 0, result.err
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    summary = json.loads((out / MANIFEST_NAME).read_text())["bnb"]
    assert summary["output_weight_bytes"] == sum((out / s).stat().st_size for s in shards)

    from quantkit import load

    one_file = bnb_artifacts["llama"]["reloaded"]["nf4"]["quantkit"]
    torch.testing.assert_close(_logits(load(out)), one_file, rtol=0, atol=0)


def test_normhead_is_never_quantized_and_says_so(tiny_model, tmp_path, capsys):
    """With nothing skipped, plain Linears (W_pack included) quantize; NormHead cannot."""
    out = tmp_path / "all"
    result = run_cli(capsys, "bnb", tiny_model("baichuan2-7b"), "--out", out, "--int8",
                     "--skip-modules", "", "--trust-remote-code")
    assert result.code == 0, result.err
    assert "lm_head stays in full precision: it is not a plain nn.Linear" in result.err
    assert json.loads((out / "config.json").read_text())["quantization_config"][
        "llm_int8_skip_modules"] == []
    summary = json.loads((out / MANIFEST_NAME).read_text())["bnb"]
    assert summary["full_precision_modules"] == ["lm_head"]
    stored = _stored(out)
    assert stored["lm_head.weight"][0] == "BF16"
    assert stored["model.layers.0.self_attn.W_pack.weight"][0] == "I8"


# ----------------------------------------------------------------------------- failures


@pytest.fixture(scope="session")
def overflowing_model(tiny_model, tmp_path_factory):
    """A bf16 model whose MLP inputs exceed fp16's range (65504): fine in bf16, not in fp16."""
    from safetensors.torch import load_file, save_file

    from quantkit.fixtures import build_tiny_model

    dest = build_tiny_model("llama", tmp_path_factory.mktemp("hot") / "model")
    tensors = load_file(dest / "model.safetensors")
    norm = "model.layers.1.post_attention_layernorm.weight"
    tensors[norm] = torch.full_like(tensors[norm], 3e5)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_nonfinite_output_fails_and_writes_nothing(overflowing_model, tmp_path, capsys):
    assert torch.isfinite(_logits(load_plain_model(overflowing_model))).all()
    result = run_cli(capsys, "bnb", overflowing_model, "--out", tmp_path / "broken", "--nf4",
                     "--compute-dtype", "fp16")
    assert_one_line_error(result, "NaN/Inf", "model.layers.1.mlp", "nothing was written")
    assert leftovers(tmp_path, "broken") == []
    # bf16 compute has the range: the same model quantizes fine.
    assert run_cli(capsys, "bnb", overflowing_model, "--out", tmp_path / "ok", "--nf4").code == 0


@pytest.mark.parametrize("flags, fragments", [
    ([], ["exactly one of --nf4", "got none"]),
    (["--nf4", "--int8"], ["exactly one of", "--nf4 and --int8"]),
    (["--int8", "--no-double-quant"], ["--double-quant", "--int8"]),
    (["--int8", "--compute-dtype", "fp16"], ["--compute-dtype", "--int8"]),
    (["--nf4", "--skip-modules", "lm_head,mlp.gate"], ["--skip-modules mlp.gate",
                                                       "no module by that name"]),
    (["--nf4", "--max-shard-size", "lots"], ["--max-shard-size"]),
    (["--int8", "--skip-modules", "model,lm_head"], ["leaves no nn.Linear layer"]),
])
def test_bad_flags(flags, fragments, tiny_model, tmp_path, capsys):
    result = run_cli(capsys, "bnb", tiny_model("llama"), "--out", tmp_path / "out", *flags)
    assert_one_line_error(result, *fragments)
    assert leftovers(tmp_path, "out") == []


def test_already_quantized_source(bnb_artifacts, tmp_path, capsys):
    nf4 = bnb_artifacts["llama"]["folders"]["nf4"]
    result = run_cli(capsys, "bnb", nf4, "--out", tmp_path / "again", "--int8")
    assert_one_line_error(result, str(nf4), "already quantized (bitsandbytes)")
    assert leftovers(tmp_path, "again") == []


def test_remote_code_needs_the_flag(tiny_model, tmp_path, capsys):
    result = run_cli(capsys, "bnb", tiny_model("baichuan2-7b"), "--out", tmp_path / "o", "--nf4")
    assert_one_line_error(result, "--trust-remote-code")
    assert leftovers(tmp_path, "o") == []


def test_bitsandbytes_missing(bnb_artifacts, tiny_model, tmp_path, capsys, monkeypatch):
    nf4 = bnb_artifacts["llama"]["folders"]["nf4"]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    result = run_cli(capsys, "bnb", tiny_model("llama"), "--out", tmp_path / "o", "--nf4")
    assert_one_line_error(result, "bitsandbytes is not installed", "pip install 'quantkit[bnb]'")
    assert leftovers(tmp_path, "o") == []

    from quantkit import load
    from quantkit.errors import DependencyError

    with pytest.raises(DependencyError, match=r"quantkit\[bnb\]"):
        load(nf4)
