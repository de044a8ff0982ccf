"""quantkit gptq end to end on the fixture families: what the folder holds, that quantkit.load
runs it as the fake-quantized model, and that GPTQ beats round-to-nearest."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import quantkit
from quantkit.checkpoint import open_checkpoint
from quantkit.families import family_for
from quantkit.gptq.algorithm import QuantSpec, rtn_quantize
from quantkit.gptq.calibrate import (
    StreamOptions,
    find_decoder_layers,
    quantize_layers,
    trace_linear_groups,
)
from quantkit.gptq.run import GPTQConfig, gptq_quantize, load_source_model
from quantkit.gptq.timing import PhaseTimer
from tests.helpers import run_cli

REMOTE = {"baichuan2-7b", "baichuan2-13b"}
TRAINED = Path(quantkit.__file__).parent / "assets" / "tiny-baichuan2"


def gptq_cli(capsys, src: Path, out: Path, *flags):
    remote = ["--trust-remote-code"] if (src / "modeling_baichuan.py").exists() else []
    return run_cli(capsys, "gptq", src, "--out", out, "--nsamples", 8, "--seqlen", 64,
                   "--device", "cpu", *remote, *flags)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{name}"]


# Each family with different settings, so that together they cover bits, group sizes,
# act-order, static groups, asymmetric grids and both Linear-ordering modes.
FAMILY_SETTINGS = {
    "llama": dict(),
    "qwen2": dict(bits=8, group_size=-1, true_sequential=False),
    "mistral": dict(bits=2, group_size=64, sym=False),
    "baichuan2-7b": dict(bits=3, group_size=32, sym=False, desc_act=True),
    "baichuan2-13b": dict(bits=4, desc_act=True, static_groups=True),
}


@pytest.mark.parametrize("family", list(FAMILY_SETTINGS))
def test_every_family_writes_a_gptq_folder_that_loads_as_the_fake_quantized_model(
        family, tiny_model, tmp_path):
    src = tiny_model(family)
    remote = family in REMOTE
    cfg = GPTQConfig(source=src, dest=tmp_path / "gptq", nsamples=8, seqlen=64, device="cpu",
                     trust_remote_code=remote, load="whole",  # result.model fake-quantized
                     **FAMILY_SETTINGS[family])
    result = gptq_quantize(cfg)
    out, bits = result.dest, cfg.bits
    group = cfg.group_size if cfg.group_size != -1 else None

    config = json.loads((out / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig == json.loads((out / "quantize_config.json").read_text())
    assert qconfig["quant_method"] == "gptq" and qconfig["checkpoint_format"] == "gptq"
    assert (qconfig["bits"], qconfig["group_size"], qconfig["sym"], qconfig["desc_act"]) == (
        bits, cfg.group_size, cfg.sym, cfg.desc_act)
    assert qconfig["meta"]["quantizer"] == [f"quantkit:{quantkit.__version__}"]
    for name in ("tokenizer.json", *(["modeling_baichuan.py"] if remote else [])):
        assert (out / name).read_bytes() == (src / name).read_bytes()

    source = open_checkpoint(src)
    tensors = _tensors(out)
    quantized = _linears(load_source_model(source, trust_remote_code=remote))
    assert len(quantized) == (10 if remote else 14)  # W_pack fuses q, k and v
    for name in quantized:
        linear = result.model.get_submodule(name)
        groups = linear.in_features // group if group else 1
        assert f"{name}.weight" not in tensors
        assert tensors[f"{name}.qweight"].dtype == torch.int32
        assert tensors[f"{name}.qweight"].shape == (linear.in_features * bits // 32,
                                                    linear.out_features)
        assert tensors[f"{name}.qzeros"].shape == (groups, linear.out_features * bits // 32)
        assert tensors[f"{name}.scales"].dtype == torch.float16
        assert tensors[f"{name}.scales"].shape == (groups, linear.out_features)
        g_idx = tensors[f"{name}.g_idx"].long()
        assert torch.bincount(g_idx).tolist() == [linear.in_features // groups] * groups
        assert torch.equal(g_idx, torch.arange(linear.in_features) * groups
                           // linear.in_features) == (not cfg.desc_act or cfg.static_groups)
    for name in source.tensor_names():  # embeddings, norms, head: untouched
        if name.rpartition(".")[0] not in quantized:
            assert torch.equal(tensors[name], source.get_tensor(name)), name

    manifest = json.loads((out / "quantkit.json").read_text())["gptq"]
    assert set(manifest["layers"]) == set(quantized)
    assert all(v["error"] < v["rtn_error"] for v in manifest["layers"].values())
    assert manifest["settings"]["bits"] == bits and manifest["calibration"]["nsamples"] == 8
    assert set(manifest["phases"]) >= {"capture", "forwards", "hessians", "solve", "pack"}

    loaded = quantkit.load(out, trust_remote_code=remote)
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = result.model(ids).logits.float()
        got = loaded(ids).logits.float()
        original = load_source_model(source, remote)(ids).logits.float()
    drift = float((got - expected).norm() / expected.norm())
    assert drift < 1e-3, drift
    assert float((original - expected).norm() / expected.norm()) > 50 * drift


def test_reference_and_fast_solvers_give_the_same_model(tiny_model):
    """Issue 8's guard: the fast path changes speed, not the result (the whole tiny model,
    act-order, true-sequential)."""
    fp = load_source_model(open_checkpoint(tiny_model("llama")), False)
    ids = torch.randint(3, 512, (12, 64), generator=torch.Generator().manual_seed(2))
    calibration, held_out = ids[:8], ids[8:]
    models = {}
    for solver in ("reference", "fast"):
        models[solver] = copy.deepcopy(fp)
        quantize_layers(models[solver], calibration, QuantSpec(desc_act=True),
                        family=family_for(fp.config.to_dict()),
                        options=StreamOptions(solver=solver), timer=PhaseTimer(), label="llama")
    ppl = {solver: perplexity(model, held_out) for solver, model in models.items()}
    assert ppl["fast"] == pytest.approx(ppl["reference"], rel=5e-3)
    assert ppl["fast"] != pytest.approx(perplexity(fp, held_out), rel=1e-4)
    ref, fast = (dict(models[s].named_parameters()) for s in ("reference", "fast"))
    differing = [n for n in ref if not torch.equal(ref[n], fast[n])]
    assert len(differing) <= 2, differing  # float rounding may flip a code, rarely


def test_traced_groups_match_the_family_table(tiny_model):
    """The generic fallback (unknown families) finds what the table says for Llama."""
    model = load_source_model(open_checkpoint(tiny_model("llama")), False)
    family = family_for(model.config.to_dict())
    _, layers = find_decoder_layers(model, None, "llama")
    hidden = torch.randn(1, 8, model.config.hidden_size, dtype=torch.bfloat16)
    position = torch.arange(8)[None]
    rotary = model.model.rotary_emb(hidden, position)
    groups = trace_linear_groups(layers[0], lambda: layers[0](
        hidden, position_embeddings=rotary, position_ids=position, attention_mask=None))
    assert [sorted(g) for g in groups] == [sorted(g) for g in family.sequential_groups]


def test_unknown_family_is_quantized_through_traced_groups(tmp_path, capsys):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from quantkit.fixtures import build_tokenizer

    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, vocab_size=512, max_position_embeddings=256)
    src = tmp_path / "neox"
    GPTNeoXForCausalLM(config).to(torch.bfloat16).save_pretrained(src)
    build_tokenizer().save_pretrained(src)
    result = gptq_cli(capsys, src, tmp_path / "gptq")
    assert result.code == 0, result.err
    tensors = _tensors(tmp_path / "gptq")
    assert len([n for n in tensors if n.endswith(".qweight")]) == 8  # qkv, dense, 2 mlp
    loaded = quantkit.load(tmp_path / "gptq")
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.tensor([[5, 6, 7, 8]])).logits).all()


# --------------------------------------------------------------------------- quality


def outlier_llama(tiny_model) -> nn.Module:
    """A random Llama with what trained LLMs have and random ones lack: a few input channels
    carrying most of the activation energy. That is where GPTQ's error feedback pays off."""
    model = load_source_model(open_checkpoint(tiny_model("llama", initializer_range=0.1)),
                              False)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :4] *= 10
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 2.5
            layer.post_attention_layernorm.weight[:4] *= 2.5
    return model


def sampled_text(model: nn.Module, sequences: int, length: int, seed: int) -> torch.Tensor:
    """Text the model itself writes: held-out data whose perplexity means something for a
    random model."""
    torch.manual_seed(seed)
    start = torch.randint(3, model.config.vocab_size, (sequences, 1))
    with torch.no_grad():
        return model.generate(start, do_sample=True, top_k=0, max_new_tokens=length - 1,
                              min_new_tokens=length - 1, pad_token_id=2)


def perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return float(torch.exp(nn.functional.cross_entropy(logits.flatten(0, 1),
                                                       ids[:, 1:].flatten())))


def held_out_linear_errors(fp: nn.Module, candidates: dict[str, nn.Module], names: list[str],
                           ids: torch.Tensor) -> dict[str, dict[str, float]]:
    """Each Linear's relative output error on the full-precision model's held-out inputs."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [fp.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: inputs.__setitem__(n, args[0].reshape(-1, args[0].shape[-1])))
        for n in names]
    with torch.no_grad():
        fp(ids)
    for handle in handles:
        handle.remove()
    errors = {}
    with torch.no_grad():
        for name in names:
            x = inputs[name].float()
            reference = x @ fp.get_submodule(name).weight.float().T
            errors[name] = {
                label: float((x @ m.get_submodule(name).weight.float().T - reference).norm()
                             / reference.norm())
                for label, m in candidates.items()}
    return errors


def quality_check(fp: nn.Module, calibration: torch.Tensor, held_out: torch.Tensor,
                  spec: QuantSpec):
    gptq, rtn = copy.deepcopy(fp), copy.deepcopy(fp)
    result = quantize_layers(gptq, calibration, spec, family=family_for(fp.config.to_dict()),
                             options=StreamOptions(), timer=PhaseTimer(), label="fixture")
    for name in result.packed:
        weight = rtn.get_submodule(name).weight
        weight.data.copy_(rtn_quantize(weight.data, spec).dequantize().to(weight.dtype))
    base = perplexity(fp, held_out)
    raise_gptq = perplexity(gptq, held_out) - base
    raise_rtn = perplexity(rtn, held_out) - base
    errors = held_out_linear_errors(fp, {"gptq": gptq, "rtn": rtn}, list(result.packed),
                                    held_out)
    return raise_gptq, raise_rtn, errors


def test_gptq_beats_round_to_nearest_on_held_out_text(tiny_model):
    """4-bit, group 128 on a random model (until the trained one exists): GPTQ raises
    held-out perplexity less than round-to-nearest and every Linear errs less."""
    fp = outlier_llama(tiny_model)
    text = sampled_text(fp, 24, 64, seed=0)
    raise_gptq, raise_rtn, errors = quality_check(fp, text[:16], text[16:], QuantSpec())
    assert raise_rtn > 0
    assert raise_gptq < raise_rtn
    for name, e in errors.items():
        assert e["gptq"] < e["rtn"], (name, e)


@pytest.mark.slow
@pytest.mark.skipif(not TRAINED.is_dir(), reason="the tiny trained model is not built yet")
def test_gptq_halves_the_perplexity_cost_on_the_trained_model():
    """The issue's bar, on the model trained on real text: GPTQ 4-bit g128 raises held-out
    perplexity by at most half of what round-to-nearest does, and every Linear errs less.
    (Calibration seeds 0-3 give ratios of -0.4 to 0.2.)"""
    from quantkit.data import calibration_samples, heldout_tokens
    from quantkit.loading import load_tokenizer

    # float32: bf16 matmuls are slow on CPU, and the comparison does not depend on dtype
    fp = load_source_model(open_checkpoint(TRAINED), trust_remote_code=True).float()
    tokenizer = load_tokenizer(TRAINED, trust_remote_code=True)
    calibration = calibration_samples(tokenizer, nsamples=32, seqlen=256, seed=0)
    held_out = torch.cat([ids[: 32 * 256].reshape(32, 256)  # 16k tokens, zh and en
                          for ids in heldout_tokens(tokenizer).values()])
    raise_gptq, raise_rtn, errors = quality_check(fp, calibration, held_out, QuantSpec())
    assert raise_rtn > 0 and raise_gptq <= 0.5 * raise_rtn, (raise_gptq, raise_rtn)
    for name, e in errors.items():
        assert e["gptq"] < e["rtn"], (name, e)


@pytest.mark.slow
@pytest.mark.skipif(not TRAINED.is_dir(), reason="the tiny trained model is not built yet")
def test_cpu_quantizes_the_tiny_model_with_default_calibration(tmp_path, capsys):
    """Defaults (128 calibration sequences, 4-bit g128), at the model's full 512 context.

    Its time (under a minute on 2 cores) is a benchmark figure, not a test assertion:
    bench/RESULTS.md records it with the command that measures it.
    """
    result = run_cli(capsys, "gptq", TRAINED, "--out", tmp_path / "gptq", "--device", "cpu",
                     "--trust-remote-code", "--seqlen", 512)
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "gptq" / "quantkit.json").read_text())["gptq"]
    assert manifest["calibration"]["nsamples"] == 128
