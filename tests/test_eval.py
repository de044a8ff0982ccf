"""quantkit eval: sliding-window perplexity, KL divergence, the result JSON, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkit.evaluate.kld import KldTotal
from quantkit.evaluate.perplexity import perplexity, sliding_windows
from quantkit.evaluate.runner import evaluate_text, heldout_ids
from quantkit.fixtures import _TOKENIZER_TEXT
from quantkit.loading import load, load_tokenizer
from tests.helpers import assert_one_line_error, run_cli

TEXT = _TOKENIZER_TEXT * 6


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "heldout.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _ids(model_path: Path) -> torch.Tensor:
    return torch.tensor(load_tokenizer(model_path)(TEXT)["input_ids"])


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("n, seqlen, stride", [(100, 16, 16), (100, 16, 5), (17, 16, 1),
                                               (10, 32, 8), (64, 16, 16), (65, 16, 4)])
def test_windows_score_each_token_once_with_the_promised_context(n, seqlen, stride):
    windows = sliding_windows(n, seqlen, stride)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert all(w.length <= seqlen and w.begin <= w.first_target - 1 for w in windows)
    if stride < seqlen:
        assert scored == list(range(1, n))
        for w in windows[1:]:  # every later token sees at least seqlen - stride tokens before it
            assert w.first_target - w.begin >= min(seqlen - stride, w.first_target)
    else:  # non-overlapping chunks: a chunk's first token has no context
        assert scored == [t for t in range(1, n) if t % seqlen != 0]


class Successor(nn.Module):
    """A rigged LM: at every position it bets `margin` logits on token (id + shift) % V."""

    def __init__(self, vocab: int, shift: int, margin: float = 30.0):
        super().__init__()
        self.vocab, self.shift, self.margin = vocab, shift, margin
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        target = (input_ids + self.shift) % self.vocab
        return SimpleNamespace(logits=self.margin * F.one_hot(target, self.vocab).float())


@pytest.mark.parametrize("seqlen, stride", [(32, 32), (32, 8)])
def test_perplexity_is_one_for_a_model_that_knows_the_next_token(seqlen, stride):
    vocab = 50
    ids = torch.arange(300) % vocab  # token t is always followed by t + 1
    right = perplexity(Successor(vocab, 1), ids, seqlen=seqlen, stride=stride, batch_size=3)
    assert right["ppl"] == pytest.approx(1.0, abs=1e-6)
    assert right["tokens"] == (299 if stride < seqlen else 299 - 299 // seqlen)
    # Off by one position and the same model is as wrong as it can be.
    wrong = perplexity(Successor(vocab, 2), ids, seqlen=seqlen, stride=stride, batch_size=3)
    assert wrong["ppl"] > 1e12


def test_strided_perplexity_matches_the_hf_labels_recipe(tiny_model):
    """Reference: the Hugging Face strided-perplexity loop, using the model's own loss."""
    path = tiny_model("llama")
    model, ids = load(path, dtype="fp32"), _ids(path)
    seqlen, stride = 48, 20
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + seqlen, ids.numel())
        trg_len = end - prev_end
        inputs = ids[begin:end].unsqueeze(0)
        labels = inputs.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(inputs, labels=labels).loss
        valid = int((labels[:, 1:] != -100).sum())
        nll_sum, count, prev_end = nll_sum + float(loss) * valid, count + valid, end
        if end == ids.numel():
            break
    ours = perplexity(model, ids, seqlen=seqlen, stride=stride, batch_size=4)
    assert ours["tokens"] == count == ids.numel() - 1
    assert ours["ppl"] == pytest.approx(float(torch.exp(torch.tensor(nll_sum / count))),
                                        rel=1e-5)


class FullHead(nn.Module):
    """The same model without `logits_to_keep` in its signature: the head runs everywhere."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("family", ["llama", "baichuan2-7b"])
def test_head_on_scored_positions_only_gives_the_full_head_result(tiny_model, family):
    """Baichuan2 (our remote code) slices its NormHead itself; llama is transformers'."""
    path = tiny_model(family)
    model = load(path, dtype="fp32", trust_remote_code=True)
    ids = _ids(path)
    sliced = perplexity(model, ids, seqlen=48, stride=16, batch_size=2)
    full = perplexity(FullHead(model), ids, seqlen=48, stride=16, batch_size=2)
    assert sliced["tokens"] == full["tokens"] == ids.numel() - 1
    assert sliced["ppl"] == pytest.approx(full["ppl"], rel=1e-6)


# ----------------------------------------------------------------------------- KLD


def test_kld_of_a_model_against_itself_is_zero(tiny_model):
    path = tiny_model("llama")
    ids = _ids(path)
    ppl, kld = evaluate_text(load(path), ids, seqlen=40, stride=16, batch_size=2,
                             base=load(path))
    summary = kld.summary()
    assert summary["mean"] < 1e-9 and summary["p99"] < 1e-9 and summary["max"] < 1e-9
    assert summary["same_top1"] == 1.0
    assert summary["tokens"] == ppl["tokens"] == ids.numel() - 1


def test_kld_matches_a_direct_full_sequence_computation(tiny_model):
    base_path, other_path = tiny_model("llama"), tiny_model("llama", seed=1)
    base, other = load(base_path, dtype="fp32"), load(other_path, dtype="fp32")
    ids = _ids(base_path)
    seqlen = 32
    _, kld = evaluate_text(other, ids, seqlen=seqlen, stride=seqlen, batch_size=3, base=base)
    per_token, same = [], []
    for begin in range(0, ids.numel() - 1, seqlen):
        chunk = ids[begin:begin + seqlen].unsqueeze(0)
        with torch.no_grad():
            p_log = F.log_softmax(base(chunk).logits[0, :-1].float(), -1)
            q_log = F.log_softmax(other(chunk).logits[0, :-1].float(), -1)
        per_token.append(F.kl_div(q_log, p_log, log_target=True, reduction="none").sum(-1))
        same.append(p_log.argmax(-1) == q_log.argmax(-1))
    reference = torch.cat(per_token).double()
    summary = kld.summary()
    assert summary["tokens"] == reference.numel()
    assert summary["mean"] == pytest.approx(float(reference.mean()), rel=1e-5)
    assert summary["p99"] == pytest.approx(float(torch.quantile(reference, 0.99)), rel=1e-5)
    assert summary["same_top1"] == pytest.approx(float(torch.cat(same).double().mean()))
    assert summary["mean"] > 1e-3  # two different random models do disagree


def test_kld_totals_merge_over_texts():
    a, b = KldTotal(), KldTotal()
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    a.add(logits[:1], logits[:1].flip(-1))
    b.add(logits[1:], logits[1:] * 0.5)
    merged = a.merged(b).summary()
    both = KldTotal()
    both.add(logits, torch.cat([logits[:1].flip(-1), logits[1:] * 0.5]))
    assert merged == pytest.approx(both.summary())


# ----------------------------------------------------------------------------- eval JSON


def test_eval_writes_a_self_describing_result(tiny_model, text_file, tmp_path, capsys):
    path = tiny_model("llama")
    out = tmp_path / "eval.json"
    result = run_cli(capsys, "eval", path, "--base", path, "--tasks", "ppl,kld,ceval",
                     "--text", text_file, "--seqlen", 40, "--stride", 16, "--limit", 1,
                     "--shots", 1, "--out", out)
    assert result.code == 0, result.err
    data = json.loads(out.read_text())
    assert data["kind"] == "eval" and data["schema_version"] == 1
    model = data["model"]
    assert model["path"] == str(path.absolute()) and model["precision"] == "BF16"
    assert model["quantized"] is False and model["quantization_config"] is None
    assert model["weight_bytes"] == (path / "model.safetensors").stat().st_size
    assert model["bytes_on_disk"] == sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert data["base"]["path"] == str(path.absolute())
    assert set(data["versions"]) >= {"quantkit", "torch", "transformers"}
    assert data["started"] <= data["finished"] and data["seconds"] > 0
    settings = data["settings"]
    assert (settings["seqlen"], settings["stride"], settings["shots"], settings["limit"]) == \
        (40, 16, 1, 1)
    assert settings["tasks"] == ["ppl", "kld", "ceval"]
    # The figures are the library's on the same held-out tokens.
    [(split, ids)] = heldout_ids(load_tokenizer(path), text_file).items()
    ppl = data["results"]["ppl"][split]
    assert settings["text_tokens"][split] == ids.numel() == ppl["tokens"] + 1
    direct = perplexity(load(path), ids, seqlen=40, stride=16)
    assert ppl["ppl"] == pytest.approx(direct["ppl"], rel=1e-6)
    assert data["results"]["kld"][split]["mean"] < 1e-9
    ceval = data["results"]["ceval"]
    assert ceval["questions"] == 3 and ceval["sample_data"] is True
    assert set(ceval["subjects"]) == {"computer_network", "high_school_physics",
                                      "middle_school_mathematics"}
    assert "ppl" in result.out and f"wrote {out}" in result.out


# ----------------------------------------------------------------------------- bad input


def _sample_copy(tmp_path: Path, bench: str) -> Path:
    from quantkit.evaluate.mcq import SAMPLES_DIR

    dest = tmp_path / bench
    shutil.copytree(SAMPLES_DIR / bench, dest)
    return dest


def test_kld_without_base_is_refused(tiny_model, tmp_path, capsys):
    result = run_cli(capsys, "eval", tiny_model("llama"), "--tasks", "ppl,kld",
                     "--out", tmp_path / "e.json")
    assert_one_line_error(result, "kld needs --base")
    assert not (tmp_path / "e.json").exists()


def test_remote_code_needs_the_flag_before_any_work(tiny_model, text_file, tmp_path, capsys):
    result = run_cli(capsys, "eval", tiny_model("baichuan2-7b"), "--tasks", "ppl",
                     "--text", text_file, "--out", tmp_path / "e.json")
    assert_one_line_error(result, "--trust-remote-code")


def test_unknown_task_is_refused(tiny_model, tmp_path, capsys):
    result = run_cli(capsys, "eval", tiny_model("llama"), "--tasks", "ppl,hellaswag",
                     "--out", tmp_path / "e.json")
    assert_one_line_error(result, "--tasks", "choose from")


def test_base_with_another_tokenizer_is_refused(tiny_model, text_file, tmp_path, capsys):
    other = tiny_model("llama", vocab_size=384)
    result = run_cli(capsys, "eval", tiny_model("llama"), "--base", other, "--tasks", "kld",
                     "--text", text_file, "--out", tmp_path / "e.json")
    assert_one_line_error(result, f"--base {other}", "tokenizer differs")
    assert not (tmp_path / "e.json").exists()


def test_data_dir_without_the_release_layout_names_it(tiny_model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    result = run_cli(capsys, "eval", tiny_model("llama"), "--tasks", "ceval",
                     "--data-dir", tmp_path / "empty", "--out", tmp_path / "e.json")
    assert_one_line_error(result, "C-Eval", "val/<subject>_val.csv", "dev/<subject>_dev.csv")


def test_csv_missing_a_column_names_file_and_column(tiny_model, tmp_path, capsys):
    data = _sample_copy(tmp_path, "cmmlu")
    bad = data / "test" / "chinese_history.csv"
    lines = bad.read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join(",".join(line.split(",")[:-1]) for line in lines) + "\n",
                   encoding="utf-8")
    result = run_cli(capsys, "eval", tiny_model("llama"), "--tasks", "cmmlu", "--data-dir", data,
                     "--out", tmp_path / "e.json")
    assert_one_line_error(result, str(bad), "missing column Answer")


@pytest.mark.parametrize("bench, rel, row", [("ceval", "val/high_school_physics_val.csv", 3),
                                             ("mmlu", "dev/computer_security_dev.csv", 2)])
def test_answer_outside_a_to_d_names_file_and_row(tiny_model, tmp_path, capsys, bench, rel, row):
    data = _sample_copy(tmp_path, bench)
    bad = data / rel
    lines = bad.read_text(encoding="utf-8").splitlines()
    header = 1 if bench == "ceval" else 0
    lines[header + row - 1] = lines[header + row - 1].rsplit(",", 1)[0] + ",E"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_cli(capsys, "eval", tiny_model("llama"), "--tasks", bench, "--data-dir",
                     f"{bench}={data}", "--out", tmp_path / "e.json")
    assert_one_line_error(result, f"{bad} row {row}", "'E'", "A, B, C, D")


def test_missing_dev_file_is_named(tiny_model, tmp_path, capsys):
    data = _sample_copy(tmp_path, "mmlu")
    (data / "dev" / "elementary_mathematics_dev.csv").unlink()
    result = run_cli(capsys, "eval", tiny_model("llama"), "--tasks", "mmlu", "--data-dir", data,
                     "--out", tmp_path / "e.json")
    assert_one_line_error(result, "elementary_mathematics_dev.csv", "--shots 0")


def test_out_in_a_missing_folder_is_refused_before_work(tiny_model, tmp_path, capsys):
    result = run_cli(capsys, "eval", tiny_model("llama"), "--tasks", "ceval",
                     "--out", tmp_path / "nope" / "e.json")
    assert_one_line_error(result, "--out", "create it first")
