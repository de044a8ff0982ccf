"""GPTQ interop with the loaders users run: transformers (+ optimum + gptqmodel) and gptqmodel.

Both directions, on a tiny fixture Llama, on CPU, nothing downloaded:
- quantkit writes (`quantkit gptq`), transformers and gptqmodel load it;
- gptqmodel writes (it quantizes on CPU too), `quantkit.load` reads it.
In each case every quantized Linear must hold the same weights in both loaders and the
logits must agree to the rounding of the dtype the models run in.

These need the `interop` extra (gptqmodel 7.6.0 pins its own stack), so CI runs them in a
separate venv built by `.ci/interop.sh`; where gptqmodel is not installed the module skips.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# gptqmodel 7.6 sizes its CPU pool as (cores + 1) // 2 workers but asks for 2 model-loader
# workers inside it, so on a 2-core machine every quantize dies with "requests 2 workers but
# parent 'cpu' only has 1". Sizing the pool explicitly avoids that; it is read at import.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("gptqmodel", reason="needs the interop extra (see .ci/interop.sh)")
pytest.importorskip("optimum", reason="needs the interop extra (see .ci/interop.sh)")

from gptqmodel import BACKEND, GPTQModel, QuantizeConfig  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, GPTQConfig  # noqa: E402

import quantkit  # noqa: E402
from quantkit.cli import main as quantkit_main  # noqa: E402
from quantkit.fixtures import build_tiny_model  # noqa: E402
from quantkit.gptq.pack import unpack_cols  # noqa: E402

GROUP_SIZE = 32
QUANTIZED_LINEARS = 14  # 2 decoder layers x (q, k, v, o, gate, up, down)
VOCAB = 512  # fixtures._SMALL

# name -> extra `quantkit gptq` flags
QUANTKIT_RUNS = {
    "sym4": ["--bits", "4"],
    "asym4": ["--bits", "4", "--asym"],
    "actorder4": ["--bits", "4", "--desc-act"],
    "sym3": ["--bits", "3"],
    # every layer's down_proj and q_proj stay bf16 (`modules_in_block_to_quantize`, `dynamic`)
    "skip4": ["--bits", "4", "--skip-modules", "down_proj,self_attn.q_proj"],
}
SKIPPED = {"skip4": 4}
# name -> gptqmodel QuantizeConfig settings
GPTQMODEL_RUNS = {
    "sym4": dict(bits=4, sym=True),
    "asym4": dict(bits=4, sym=False),
    "actorder4": dict(bits=4, sym=True, desc_act=True),
    "sym3": dict(bits=3, sym=True),
    "asym3": dict(bits=3, sym=False),
    "asym8": dict(bits=8, sym=False),
}


def _bits(flags: list[str]) -> int:
    return int(flags[flags.index("--bits") + 1])


@pytest.fixture(scope="module")
def source_model(tmp_path_factory) -> Path:
    """The tiny Llama, with the first 64 rows of every q_proj made non-negative.

    Those rows' groups have an asymmetric zero point of 0, which the v1 format's
    "zero minus one" cannot store field by field: gptqmodel writes it with a borrow from
    the neighbouring field, and quantkit must keep it out of its own files.
    """
    dest = build_tiny_model("llama", tmp_path_factory.mktemp("interop") / "llama")
    weights = dest / "model.safetensors"
    tensors = load_file(weights)
    for name, tensor in tensors.items():
        if name.endswith("self_attn.q_proj.weight"):
            tensor[:64] = tensor[:64].abs()
    save_file(tensors, weights, metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def token_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def quantkit_artifact(tmp_path_factory, source_model):
    """Factory: quantkit_artifact("sym4") -> folder written by `quantkit gptq` (once each)."""
    if importlib.util.find_spec("quantkit.cli.gptq_cmd") is None:
        pytest.skip("`quantkit gptq` is not in this checkout yet")
    made: dict[str, Path] = {}

    def make(run: str) -> Path:
        if run not in made:
            out = tmp_path_factory.mktemp(f"quantkit_{run}") / "gptq"
            code = quantkit_main([
                "gptq", str(source_model), "--out", str(out), "--group-size", str(GROUP_SIZE),
                "--nsamples", "8", "--seqlen", "64", "--device", "cpu", *QUANTKIT_RUNS[run],
            ])
            assert code == 0, f"quantkit gptq ({run}) exited with {code}"
            made[run] = out
        return made[run]

    return make


@pytest.fixture(scope="module")
def gptqmodel_artifact(tmp_path_factory, source_model):
    """Factory: gptqmodel_artifact("asym4") -> folder quantized and saved by gptqmodel on CPU."""
    generator = torch.Generator().manual_seed(0)
    calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                   for ids in torch.randint(3, VOCAB, (8, 1, 64), generator=generator)]
    made: dict[str, Path] = {}

    def make(run: str) -> Path:
        if run not in made:
            out = tmp_path_factory.mktemp(f"gptqmodel_{run}") / "gptq"
            # offload_to_disk=False keeps its scratch out of /tmp; pack_impl="original" is its
            # pure-torch packer (the default JIT-compiles a C++ one, ~25 s the first time).
            config = QuantizeConfig(group_size=GROUP_SIZE, offload_to_disk=False,
                                    pack_impl="original", **GPTQMODEL_RUNS[run])
            model = GPTQModel.load(str(source_model), config, device="cpu")
            model.quantize(calibration, batch_size=1)
            model.save(str(out))
            made[run] = out
        return made[run]

    return make


def load_ours(path: Path):
    return quantkit.load(path, dtype="fp16")


def quantized_names(model) -> list[str]:
    """Modules a GPTQ loader replaced (they carry the packed `qweight`)."""
    return [name for name, module in model.named_modules() if hasattr(module, "qweight")]


@torch.no_grad()
def effective_weight(module: torch.nn.Module, in_features: int, dtype) -> torch.Tensor:
    """What a Linear computes with, whatever its kernel: its output for the identity."""
    return module(torch.eye(in_features, dtype=dtype)).float()


def assert_same_model(theirs, ours, token_ids: torch.Tensor, skipped: int = 0) -> None:
    """Every quantized Linear holds the same weights, and the logits agree, to the rounding
    of the dtype both models run in; `skipped` Linears were left unquantized."""
    dtype = ours.dtype
    eps = torch.finfo(dtype).eps
    names = quantized_names(theirs)
    assert len(names) == QUANTIZED_LINEARS - skipped, names
    assert sorted(quantized_names(ours)) == sorted(names)
    for name in names:
        in_features = theirs.get_submodule(name).in_features
        expected = effective_weight(theirs.get_submodule(name), in_features, dtype)
        got = effective_weight(ours.get_submodule(name), in_features, dtype)
        worst = (got - expected).abs().max().item()
        assert worst <= eps * expected.abs().max().item(), (
            f"{name}: quantkit's weights differ from the other loader's by up to {worst:.3g}")
    with torch.no_grad():
        expected = theirs(token_ids).logits.float()
        got = ours(token_ids).logits.float()
    worst = (got - expected).abs().max().item()
    assert worst <= 4 * eps * expected.abs().max().item(), f"logits differ by up to {worst:.3g}"


def load_transformers(path: Path, dtype, bits: int, backend: str | None):
    """transformers' own GPTQ path (optimum + gptqmodel), with a chosen gptqmodel kernel."""
    extra = {} if backend is None else {
        "quantization_config": GPTQConfig(bits=bits, backend=backend)}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **extra)


@pytest.mark.slow
@pytest.mark.parametrize("run", list(QUANTKIT_RUNS))
def test_transformers_loads_quantkit_gptq(quantkit_artifact, token_ids, run):
    # gptq_torch dequantizes in the model's dtype, so the comparison holds to fp16 rounding.
    path = quantkit_artifact(run)
    ours = load_ours(path)
    theirs = load_transformers(path, ours.dtype, _bits(QUANTKIT_RUNS[run]), "gptq_torch")
    assert_same_model(theirs, ours, token_ids, SKIPPED.get(run, 0))


@pytest.mark.slow
def test_transformers_default_cpu_kernel_runs_quantkit_gptq(quantkit_artifact, token_ids):
    """What a user gets from a plain `from_pretrained` on CPU: gptqmodel picks its ATen int4
    kernel, which computes in bfloat16 whatever the model dtype, so bf16 tolerance."""
    path = quantkit_artifact("sym4")
    ours = load_ours(path)
    theirs = load_transformers(path, ours.dtype, 4, None)
    with torch.no_grad():
        expected = theirs(token_ids).logits.float()
        got = ours(token_ids).logits.float()
    tolerance = 4 * torch.finfo(torch.bfloat16).eps * expected.abs().max().item()
    assert (got - expected).abs().max().item() <= tolerance


@pytest.mark.slow
@pytest.mark.parametrize("run", ["sym4", "actorder4", "sym3", "skip4"])
def test_gptqmodel_loads_quantkit_gptq(quantkit_artifact, token_ids, run):
    path = quantkit_artifact(run)
    ours = load_ours(path)
    theirs = GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH, dtype=ours.dtype)
    assert_same_model(theirs.model, ours, token_ids, SKIPPED.get(run, 0))


@pytest.mark.slow
def test_gptqmodel_refuses_asymmetric_v1_from_other_tools(quantkit_artifact):
    """gptqmodel's own loader accepts sym=False with checkpoint_format "gptq" only from
    gptqmodel >= 0.9 (it checks meta.quantizer); docs/interop.md says so, and this test
    tells us when that changes. transformers loads the same folder (tested above)."""
    with pytest.raises(ValueError, match="sym=False"):
        GPTQModel.load(str(quantkit_artifact("asym4")), device="cpu", backend=BACKEND.TORCH)


def stored_zero_of_zero(path: Path, bits: int) -> int:
    """How many v1 qzeros fields hold 2**bits - 1, i.e. a zero point of 0 stored minus one
    (for 2/4/8 bits gptqmodel subtracts 1 from the whole int32, borrowing from the next
    field; for 3 bits it subtracts 1 from each field modulo 8)."""
    tensors = load_file(path / "model.safetensors")
    return sum(int((unpack_cols(packed, bits) == 2**bits - 1).sum())
               for name, packed in tensors.items() if name.endswith(".qzeros"))


@pytest.mark.slow
@pytest.mark.parametrize("run", list(GPTQMODEL_RUNS))
def test_quantkit_loads_gptqmodel_gptq(gptqmodel_artifact, token_ids, run):
    path = gptqmodel_artifact(run)
    settings = GPTQMODEL_RUNS[run]
    if not settings["sym"]:
        # Zero points of 0 are where readers of v1 disagree; make sure they are exercised.
        assert stored_zero_of_zero(path, settings["bits"]) > 0
    ours = load_ours(path)
    theirs = GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH, dtype=ours.dtype)
    assert_same_model(theirs.model, ours, token_ids)
