"""The tiny checkpoints every other test builds on: each family loads, runs, and has
Linear shapes that group-128 quantization and 2/3/4/8-bit packing accept."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import quantkit
from quantkit.checkpoint import folder_size
from quantkit.families import is_alibi_baichuan, is_baichuan2
from quantkit.fixtures import FIXTURE_FAMILIES, NATIVE_FAMILIES, build_tiny_model


def _load(path, family: str):
    return AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=family not in NATIVE_FAMILIES, dtype=torch.float32)


def test_every_family_loads_and_runs(tiny_model, any_family):
    path = tiny_model(any_family)
    model = _load(path, any_family)
    tokenizer = AutoTokenizer.from_pretrained(path,
                                              trust_remote_code=any_family not in NATIVE_FAMILIES)
    ids = tokenizer("量化 trades precision for memory。", return_tensors="pt").input_ids
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(out.logits).all()
    # Untrained: the loss sits near log(vocab), not at zero and not exploding.
    assert abs(out.loss.item() - torch.log(torch.tensor(512.0)).item()) < 1.0


def test_weights_are_stored_in_bf16(tiny_model, any_family):
    path = tiny_model(any_family)
    with safe_open(path / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"


def test_linear_shapes_fit_group_128_and_bit_packing(tiny_model, any_family):
    model = _load(tiny_model(any_family), any_family)
    linears = [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]
    per_layer = 5 if any_family.startswith("baichuan") else 7  # W_pack fuses q, k, v
    assert len(linears) == per_layer * model.config.num_hidden_layers
    for linear in linears:
        assert linear.in_features % 128 == 0 and linear.out_features % 32 == 0, linear


def test_overrides_and_seed(tmp_path):
    a = build_tiny_model("baichuan2-7b", tmp_path / "a", seed=3, num_hidden_layers=1,
                         num_key_value_heads=2)  # not a Baichuan setting: ignored
    b = build_tiny_model("baichuan2-7b", tmp_path / "b", seed=3, num_hidden_layers=1)
    c = build_tiny_model("baichuan2-7b", tmp_path / "c", seed=4, num_hidden_layers=1)
    config = json.loads((a / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and "num_key_value_heads" not in config

    def weight(path):
        with safe_open(path / "model.safetensors", "pt") as f:
            return f.get_tensor("model.layers.0.self_attn.W_pack.weight")

    assert torch.equal(weight(a), weight(b))
    assert not torch.equal(weight(a), weight(c))


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="baichuan2-13b"):
        build_tiny_model("gpt-j", tmp_path / "m")
    assert "baichuan2-7b" in FIXTURE_FAMILIES


# --------------------------------------------------------------------------- demo model

ASSET = Path(quantkit.__file__).parent / "assets" / "tiny-baichuan2"
HELDOUT_ZH = Path(__file__).resolve().parents[1] / "calib_data" / "heldout" / "zh.txt"


def test_tiny_trained_model_ships_small_in_bf16():
    assert folder_size(ASSET) <= 10_000_000
    config = json.loads((ASSET / "config.json").read_text())
    assert is_baichuan2(ASSET, config) and not is_alibi_baichuan(config)
    with safe_open(ASSET / "model.safetensors", "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
        # Stored as Baichuan2 ships it: NormHead rows not yet normalized.
        head_norms = f.get_tensor("lm_head.weight").float().norm(dim=-1)
    assert (head_norms - 1).abs().max() > 0.1
    model = AutoModelForCausalLM.from_pretrained(ASSET, trust_remote_code=True, dtype="auto")
    assert model.dtype == torch.bfloat16
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]
    shapes.append(tuple(model.lm_head.weight.shape))
    assert len(shapes) == 5 * model.config.num_hidden_layers + 1
    for out_features, in_features in shapes:
        assert in_features % 128 == 0 and out_features % 32 == 0, (out_features, in_features)


def test_tiny_trained_model_learned_chinese():
    tokenizer = AutoTokenizer.from_pretrained(ASSET, trust_remote_code=True)
    text = HELDOUT_ZH.read_text(encoding="utf-8")[:3000]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert tokenizer.decode(ids) == text  # byte-level BPE: lossless
    seqlen = 256
    windows = ids[: len(ids) // seqlen * seqlen].view(-1, seqlen)
    assert len(windows) >= 4
    model = AutoModelForCausalLM.from_pretrained(ASSET, trust_remote_code=True, dtype="auto")
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    vocab = model.config.vocab_size
    # Chance level is `vocab` (3072); the shipped model scores about 101 on the whole zh
    # held-out split (TRAINING.md) and about 95 on this 3,000-character slice.
    assert math.exp(nll.item()) < vocab / 10
