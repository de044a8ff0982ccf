"""Our Baichuan2-style remote code behaves like a downloaded Baichuan2 folder: loaded only
with trust_remote_code, Baichuan2 weight names, NormHead, RoPE (7B) or ALiBi (13B), and
decoder layers a layer-streaming quantizer can capture and replay."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from quantkit.families import is_alibi_baichuan, is_baichuan2
from quantkit.remote_code import build_baichuan2
from quantkit.remote_code.baichuan2.modeling_baichuan import NormHead, alibi_slopes

LAYOUTS = ("baichuan2-7b", "baichuan2-13b")


def _load(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)


@pytest.fixture(params=LAYOUTS)
def layout(request) -> str:
    return request.param


def test_needs_trust_remote_code(tiny_model, layout):
    path = tiny_model(layout)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(path)
    model = _load(path)
    # The class comes from the folder's copy of the code, as for a downloaded checkpoint.
    assert type(model).__name__ == "BaichuanForCausalLM"
    assert type(model).__module__.startswith("transformers_modules.")


def test_weight_names_and_shapes_are_baichuan2s(tiny_model, layout):
    path = tiny_model(layout)
    with safe_open(path / "model.safetensors", "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    layer = {
        "self_attn.W_pack.weight": (3 * 128, 128),
        "self_attn.o_proj.weight": (128, 128),
        "mlp.gate_proj.weight": (256, 128),
        "mlp.up_proj.weight": (256, 128),
        "mlp.down_proj.weight": (128, 256),
        "input_layernorm.weight": (128,),
        "post_attention_layernorm.weight": (128,),
    }
    expected = {"model.embed_tokens.weight": (512, 128), "model.norm.weight": (128,),
                "lm_head.weight": (512, 128)}
    expected.update({f"model.layers.{i}.{k}": v for i in range(2) for k, v in layer.items()})
    assert shapes == expected
    assert is_baichuan2(path, json.loads((path / "config.json").read_text()))


def test_rope_and_alibi_configs(tiny_model):
    rope = json.loads((tiny_model("baichuan2-7b") / "config.json").read_text())
    alibi = json.loads((tiny_model("baichuan2-13b") / "config.json").read_text())
    for config in (rope, alibi):
        assert config["model_type"] == "baichuan"
        assert config["architectures"] == ["BaichuanForCausalLM"]
        assert config["auto_map"] == {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}
        assert config["model_max_length"] == 256
    assert rope["max_position_embeddings"] == 256
    assert "max_position_embeddings" not in alibi
    assert not is_alibi_baichuan(rope) and is_alibi_baichuan(alibi)


def test_rope_uses_positions_and_alibi_ignores_them(tiny_model):
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    shifted, spread = torch.arange(12)[None] + 7, torch.arange(12)[None] * 3
    rope, alibi = _load(tiny_model("baichuan2-7b")), _load(tiny_model("baichuan2-13b"))
    with torch.no_grad():
        base = rope(ids).logits
        # Rotary scores depend on relative positions only: a shift changes nothing,
        # stretched distances do.
        torch.testing.assert_close(rope(ids, position_ids=shifted).logits, base)
        assert (rope(ids, position_ids=spread).logits - base).abs().max() > 1e-2
        torch.testing.assert_close(alibi(ids, position_ids=spread).logits, alibi(ids).logits)


def test_alibi_slopes():
    # The ALiBi paper's geometric series, interleaved for a non-power-of-two head count.
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    expected_12 = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i / 2) for i in (1, 3, 5, 7)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected_12))


def test_alibi_bias_penalizes_distance(tiny_model):
    model = _load(tiny_model("baichuan2-13b"))
    captured = {}
    model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(3, 512, (1, 5)), use_cache=False)
    bias = captured["attention_mask"][0]  # [heads, query, key]
    slopes = alibi_slopes(4)
    assert bias[:, 4, 1].tolist() == pytest.approx((-3 * slopes).tolist())
    assert (bias[:, 1, 2:] == torch.finfo(torch.float32).min).all()  # causal


def test_norm_head_eval_normalizes_once_in_place():
    torch.manual_seed(0)
    head = NormHead(16, 8).eval()
    torch.nn.init.normal_(head.weight, std=3.0)
    raw = head.weight.detach().clone()
    x = torch.randn(2, 16)
    out = head(x)
    torch.testing.assert_close(out, x @ F.normalize(raw, dim=-1).T)
    torch.testing.assert_close(head.weight.norm(dim=-1), torch.ones(8))  # stored rows now
    head.weight.data.mul_(2.0)  # a second eval call uses the weight as stored
    torch.testing.assert_close(head(x), 2 * out)


def test_norm_head_training_normalizes_every_call():
    torch.manual_seed(0)
    head = NormHead(16, 8).train()
    torch.nn.init.normal_(head.weight, std=3.0)
    raw = head.weight.detach().clone()
    x = torch.randn(2, 16)
    head(x).sum().backward()
    torch.testing.assert_close(head.weight.detach(), raw)  # stored weight untouched
    assert head.weight.grad is not None
    with torch.no_grad():
        head.weight.mul_(5.0)
    torch.testing.assert_close(head(x), x @ F.normalize(raw, dim=-1).T)  # scale-free
    head.eval()(x)  # back in eval, the first call normalizes again
    torch.testing.assert_close(head.weight.norm(dim=-1), torch.ones(8))


def test_loaded_model_normalizes_head_on_first_call(tiny_model, layout):
    model = _load(tiny_model(layout), dtype=torch.bfloat16)
    assert not model.training and model.dtype == torch.bfloat16
    norms = model.lm_head.weight.float().norm(dim=-1)
    assert (norms - 1).abs().max() > 0.5  # random rows, far from unit norm
    model(torch.tensor([[5, 6, 7]]))
    norms = model.lm_head.weight.float().norm(dim=-1)
    assert (norms - 1).abs().max() < 1e-2  # bf16 rounding


def test_labels_give_shifted_cross_entropy(tiny_model, layout):
    model = _load(tiny_model(layout))
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, :4] = -100
    out = model(input_ids=ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_padding_does_not_change_real_positions(tiny_model, layout):
    model = _load(tiny_model(layout))
    gen = torch.Generator().manual_seed(2)
    long, short = torch.randint(3, 512, (9,), generator=gen), torch.randint(3, 512, (6,),
                                                                           generator=gen)
    with torch.no_grad():
        alone = [model(seq[None]).logits[0] for seq in (long, short)]
        for left in (False, True):
            ids = torch.full((2, 9), 2)
            mask = torch.zeros(2, 9, dtype=torch.long)
            ids[0], mask[0] = long, 1
            real = slice(3, 9) if left else slice(0, 6)
            ids[1, real], mask[1, real] = short, 1
            logits = model(input_ids=ids, attention_mask=mask).logits
            assert torch.isfinite(logits).all()
            torch.testing.assert_close(logits[0], alone[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(logits[1, real], alone[1], atol=1e-4, rtol=1e-4)


def test_generate_with_and_without_cache(tiny_model, layout):
    model = _load(tiny_model(layout))
    prompt = torch.randint(3, 512, (1, 7), generator=torch.Generator().manual_seed(3))
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, uncached)
    # Left-padded in a batch, the prompt continues the same way.
    ids = torch.cat([torch.full((1, 3), 2), prompt], dim=1).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(batched[0, 3:], cached[0])


def test_layers_replay_from_captured_kwargs(tiny_model, layout):
    """The contract a GPTQ engine relies on: capture layer 0's inputs once, then
    `layer(hidden, **kwargs)` layer by layer reproduces the model's forward."""
    model = _load(tiny_model(layout))
    captured = {}

    def grab(module, args, kwargs):
        captured.update(hidden=args[0], kwargs=kwargs)

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        handle.remove()
        assert set(captured["kwargs"]) == {"attention_mask", "position_ids", "past_key_values"}
        hidden = captured["hidden"]
        for layer in model.model.layers:
            hidden = layer(hidden, **captured["kwargs"])
            assert isinstance(hidden, torch.Tensor)
        replayed = model.lm_head(model.model.norm(hidden))
    torch.testing.assert_close(replayed, logits)


def test_build_writes_requested_dtype(tmp_path):
    torch.manual_seed(0)
    path = build_baichuan2(tmp_path / "m", alibi=True, dtype=torch.float16, hidden_size=128,
                           intermediate_size=384, num_hidden_layers=1, num_attention_heads=2,
                           vocab_size=256, max_position_embeddings=64,
                           num_key_value_heads=1)  # not a Baichuan setting: ignored
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "float16" and config["intermediate_size"] == 384
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "configuration_baichuan.py", "generation_config.json",
        "model.safetensors", "modeling_baichuan.py"]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype="auto")
    assert model.dtype == torch.float16
    assert model.model.layers[0].mlp.down_proj.in_features == 384
    assert math.isclose(model.lm_head.weight.float().std().item(), 0.02, rel_tol=0.1)
