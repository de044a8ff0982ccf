"""Per-layer inputs: layer-by-layer replay must reproduce the model's own forward.

Gemma-3 mixes sliding-window and full attention (`config.layer_types`); each type gets its
own mask and rotary table, so replaying layer 0's arguments everywhere gives the
full-attention layers the wrong rotary embeddings at any length and the wrong mask beyond
the window. The test length is above the window so both would show.
"""

from __future__ import annotations

import pytest
import torch

from quantkit.gptq.calibrate import LayerRunner, capture_inputs, find_decoder_layers

WINDOW = 8
SEQLEN = 40


def _gemma3(seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
        max_position_embeddings=256,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention", "full_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        attn_implementation="eager",
    )
    return Gemma3ForCausalLM(config).eval()


def _replay(model, ids, *, own_arguments: bool) -> list[torch.Tensor]:
    """Each layer's output when run alone on the previous layer's replayed output."""
    _, layers = find_decoder_layers(model, None, "gemma3")
    inputs = capture_inputs(model, layers, ids, batch_size=2, device="cpu", act_device="cpu",
                            dtype=torch.float32)
    outputs = []
    with torch.no_grad():
        for index, layer in enumerate(layers):
            runner = LayerRunner(layer, inputs, "cpu", index if own_arguments else 0)
            inputs.hidden = runner.outputs("cpu")
            outputs.append(torch.cat(inputs.hidden))
    return outputs


@pytest.fixture(scope="module")
def gemma3_and_truth():
    model = _gemma3()
    ids = torch.randint(0, 256, (4, SEQLEN), generator=torch.Generator().manual_seed(1))
    # Capture each decoder layer's output from the model's own forward.
    truth: list[torch.Tensor] = []
    _, layers = find_decoder_layers(model, None, "gemma3")
    handles = [layer.register_forward_hook(
        lambda m, a, out: truth.append(out[0] if isinstance(out, tuple) else out))
        for layer in layers]
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return model, ids, truth


def test_layer_by_layer_replay_reproduces_the_full_forward(gemma3_and_truth):
    model, ids, truth = gemma3_and_truth
    replayed = _replay(model, ids, own_arguments=True)
    assert len(replayed) == len(truth) == 6
    for index, (mine, real) in enumerate(zip(replayed, truth, strict=True)):
        rel = float((mine - real).norm() / real.norm())
        assert rel < 1e-5, f"layer {index} ({model.config.layer_types[index]}): {rel:.2e} off"


def test_layer_zero_arguments_everywhere_would_be_wrong(gemma3_and_truth):
    """The check above has teeth: replaying layer 0's sliding-window arguments in every
    layer goes wrong at the first full-attention layer (index 2), not before."""
    model, ids, truth = gemma3_and_truth
    replayed = _replay(model, ids, own_arguments=False)
    errors = [float((m - t).norm() / t.norm()) for m, t in zip(replayed, truth, strict=True)]
    assert max(errors[:2]) < 1e-5
    assert errors[2] > 1e-2


def test_layers_of_one_type_share_their_arguments(gemma3_and_truth):
    """One mask and one rotary table per attention type, not one copy per layer."""
    model, ids, _ = gemma3_and_truth
    _, layers = find_decoder_layers(model, None, "gemma3")
    inputs = capture_inputs(model, layers, ids, batch_size=4, device="cpu", act_device="cpu",
                            dtype=torch.float32)
    cos = [inputs.kwargs[i][0]["position_embeddings"][0] for i in range(len(layers))]
    assert cos[0] is cos[1] is cos[3]
    assert cos[2] is cos[4] is cos[5]
    assert not torch.equal(cos[0], cos[2])
