"""C-Eval / CMMLU / MMLU scoring, proven with a tiny model rigged to know the answers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from quantkit.errors import ConfigError
from quantkit.evaluate import mcq
from quantkit.evaluate.mcq import (
    BENCHMARKS,
    LETTERS,
    SAMPLES_DIR,
    Request,
    Row,
    benchmark_summary,
    build_request,
    evaluate_benchmark,
    load_benchmark,
    request_rows,
    resolve_data_dirs,
    score_requests,
    subject_summary,
)
from quantkit.loading import load, load_tokenizer
from tests.test_eval import FullHead


def official_answers(bench: str) -> dict[str, dict[str, str]]:
    """subject -> {question text: answer letter}, read straight from the shipped CSVs."""
    out: dict[str, dict[str, str]] = {}
    folder = {"ceval": "val", "cmmlu": "test", "mmlu": "test"}[bench]
    for path in sorted((SAMPLES_DIR / bench / folder).glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if bench == "ceval":
            pairs = [(r[1], r[6]) for r in rows[1:]]
        elif bench == "cmmlu":
            pairs = [(r[1], r[6]) for r in rows[1:]]
        else:
            pairs = [(r[0], r[5]) for r in rows]
        subject = path.stem.rsplit("_", 1)[0] if bench != "cmmlu" else path.stem
        out[subject] = dict(pairs)
    return out


class KnowsTheAnswer(nn.Module):
    """A real tiny LM whose last real position gets `bias` added to one letter's token:
    the right answer's (shift 0) or a wrong one (shift 1). It finds the question by decoding
    the prompt it is given and looking the final question up in the CSV answers above, so
    the accuracy code cannot be right by accident."""

    def __init__(self, inner: nn.Module, tokenizer, answers: dict[str, str], *, shift: int,
                 bias: float = 100.0):
        super().__init__()
        self.inner, self.tokenizer, self.answers = inner, tokenizer, answers
        self.shift, self.bias = shift, bias
        self.letter_ids = [tokenizer.encode(letter, add_special_tokens=False)[-1]
                           for letter in LETTERS]

    def forward(self, input_ids, attention_mask=None, **kwargs):
        out = self.inner(input_ids, attention_mask=attention_mask)
        logits = out.logits.float().clone()
        lengths = (attention_mask.sum(-1) if attention_mask is not None
                   else torch.full((len(input_ids),), input_ids.shape[1]))
        for b, length in enumerate(lengths.tolist()):
            last_block = self.tokenizer.decode(input_ids[b, :length]).split("\n\n")[-1]
            found = [a for q, a in self.answers.items() if q in last_block]
            assert len(found) == 1, last_block
            letter = (LETTERS.index(found[0]) + self.shift) % 4
            logits[b, length - 1, self.letter_ids[letter]] += self.bias
        out.logits = logits
        return out


@pytest.fixture(scope="module")
def llama(tiny_model):
    path = tiny_model("llama")
    return load(path, dtype="fp32"), load_tokenizer(path)


def test_shipped_samples_follow_the_release_layouts():
    with open(SAMPLES_DIR / "ceval/dev/high_school_physics_dev.csv", encoding="utf-8") as f:
        assert f.readline().strip() == "id,question,A,B,C,D,answer,explanation"
    with open(SAMPLES_DIR / "ceval/val/high_school_physics_val.csv", encoding="utf-8") as f:
        assert f.readline().strip() == "id,question,A,B,C,D,answer"
    with open(SAMPLES_DIR / "cmmlu/test/chinese_history.csv", encoding="utf-8") as f:
        assert f.readline().strip() == ",Question,A,B,C,D,Answer"
    with open(SAMPLES_DIR / "mmlu/test/computer_security_test.csv", encoding="utf-8") as f:
        first = next(csv.reader(f))
    assert len(first) == 6 and first[5] in LETTERS  # headerless
    for name, bench in BENCHMARKS.items():
        sets = load_benchmark(bench, SAMPLES_DIR / name, shots=5, limit=None)
        assert len(sets) == 3
        for s in sets:
            assert len(s.dev) == 5 and len(s.questions) == 4
            assert sorted(q.answer for q in s.questions) == list(LETTERS)
            truth = official_answers(name)[s.subject]
            assert all(q.answer == truth[q.question] for q in s.questions)


@pytest.mark.parametrize("bench", ["ceval", "cmmlu", "mmlu"])
def test_rigged_model_scores_every_question_right_then_every_question_wrong(llama, bench):
    model, tokenizer = llama
    answers = official_answers(bench)
    subjects = load_benchmark(BENCHMARKS[bench], SAMPLES_DIR / bench, shots=2, limit=None)
    flat = {q: a for per in answers.values() for q, a in per.items()}
    for shift, expected in ((0, 100.0), (1, 0.0)):
        rigged = KnowsTheAnswer(model, tokenizer, flat, shift=shift)
        result = evaluate_benchmark(rigged, tokenizer, BENCHMARKS[bench], subjects,
                                    batch_size=4, max_length=2048)
        assert result["average"] == expected and result["micro_average"] == expected
        assert result["questions"] == 12
        for subject, summary in result["subjects"].items():
            truth = [answers[subject][q.question] for s in subjects if s.subject == subject
                     for q in s.questions]
            moved = "".join(LETTERS[(LETTERS.index(a) + shift) % 4] for a in truth)
            assert summary["predictions"] == moved
            assert summary["fewer_shots"] == 0 and summary["truncated"] == 0


def test_prompts_follow_each_benchmark_template(llama):
    _, tokenizer = llama
    subjects = {name: load_benchmark(b, SAMPLES_DIR / name, shots=2, limit=1)
                for name, b in BENCHMARKS.items()}
    physics = next(s for s in subjects["ceval"] if s.subject == "high_school_physics")
    prompt = BENCHMARKS["ceval"].prompt(physics.name, physics.dev, physics.questions[0])
    assert prompt.startswith("以下是中国关于高中物理考试的单项选择题，请选出其中的正确答案。\n\n"
                             "在国际单位制中，力的单位是____\n"
                             "A. 焦耳\nB. 牛顿\nC. 瓦特\nD. 帕斯卡\n答案：B\n\n")
    assert prompt.endswith("动能的表达式是____\nA. mv²/2\nB. mgh\nC. Fs\nD. Pt\n答案：")
    history = next(s for s in subjects["cmmlu"] if s.subject == "chinese_history")
    prompt = BENCHMARKS["cmmlu"].prompt(history.name, history.dev, history.questions[0])
    assert prompt.startswith("以下是关于中国历史的单项选择题，请直接给出正确答案的选项。\n\n"
                             "题目：秦朝")
    assert prompt.endswith("\nD. 秦朝\n答案是：") and "答案是：A\n\n" in prompt
    geo = next(s for s in subjects["mmlu"] if s.subject == "high_school_geography")
    prompt = BENCHMARKS["mmlu"].prompt(geo.name, geo.dev, geo.questions[0])
    assert prompt.startswith("The following are multiple choice questions (with answers) about "
                             "high school geography.\n\n")
    assert "\nAnswer: B\n\n" in prompt and prompt.endswith("\nAnswer:")


def test_letter_continuations_follow_the_tokenizer(llama):
    """Fixture BPE: 'A' after '答案：' is one token; ' A' after 'Answer:' is two."""
    _, tokenizer = llama
    for name, tokens in (("ceval", 1), ("cmmlu", 1), ("mmlu", 2)):
        bench = BENCHMARKS[name]
        subject = load_benchmark(bench, SAMPLES_DIR / name, shots=1, limit=1)[0]
        req = build_request(tokenizer, bench, subject, subject.questions[0], 4096)
        prompt = bench.prompt(subject.name, subject.dev, subject.questions[0])
        for letter, cont in zip(LETTERS, req.conts, strict=True):
            assert len(cont) == tokens
            assert tokenizer.decode(req.ctx + cont) == prompt + bench.answer_sep + letter
        assert len(request_rows(0, req)) == (1 if tokens == 1 else 4)


def test_one_pass_shortcut_equals_scoring_each_letter_on_its_own(llama):
    model, tokenizer = llama
    bench = BENCHMARKS["ceval"]
    subject = load_benchmark(bench, SAMPLES_DIR / "ceval", shots=2, limit=1)[0]
    reqs = [build_request(tokenizer, bench, subject, q, 4096) for q in subject.questions]
    fast = score_requests(model, reqs, batch_size=2, pad_id=0)
    for i, req in enumerate(reqs):
        for letter, cont in enumerate(req.conts):
            ids = torch.tensor([req.ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, -2].float(), -1)
            assert fast[i, letter].item() == pytest.approx(logp[cont[0]].item(), abs=1e-4)


def test_padding_batching_and_head_slicing_do_not_change_scores(llama):
    model, tokenizer = llama
    bench = BENCHMARKS["mmlu"]
    subjects = load_benchmark(bench, SAMPLES_DIR / "mmlu", shots=1, limit=1)
    reqs = [build_request(tokenizer, bench, s, q, 4096) for s in subjects for q in s.questions]
    assert len({len(r.ctx) for r in reqs}) > 1  # mixed lengths: right padding is exercised
    one = score_requests(model, reqs, batch_size=1, pad_id=0)
    many = score_requests(model, reqs, batch_size=5, pad_id=0)
    assert torch.allclose(one, many, atol=1e-4)
    assert torch.allclose(one, score_requests(FullHead(model), reqs, batch_size=3, pad_id=0),
                          atol=1e-4)


def test_multi_token_letters_sum_their_token_log_probs():
    """Row layout for a letter spelled by two tokens: both read, one position apart."""
    req = Request(ctx=[5, 6, 7], conts=([9, 1], [9, 2], [9, 3], [9, 4]), shots=0)
    rows = request_rows(3, req)
    assert rows[1] == Row(3, [5, 6, 7, 9], ((2, 9, 1), (3, 2, 1)))


def test_averages_weight_subjects_equally_and_questions_equally():
    per = {"a": subject_summary([True]), "b": subject_summary([True, False, False]),
           "c": subject_summary([False, True])}
    summary = benchmark_summary(per)
    assert per["b"]["accuracy"] == pytest.approx(100 / 3)
    assert summary["average"] == pytest.approx((100 + 100 / 3 + 50) / 3)
    assert summary["micro_average"] == pytest.approx(100 * 3 / 6)
    assert (summary["correct"], summary["questions"]) == (3, 6)


def test_shots_are_dropped_until_the_prompt_fits(llama):
    _, tokenizer = llama
    bench = BENCHMARKS["cmmlu"]
    subject = load_benchmark(bench, SAMPLES_DIR / "cmmlu", shots=5, limit=1)[0]
    full = build_request(tokenizer, bench, subject, subject.questions[0], 100_000)
    budget = len(full.ctx) - 5
    cut = build_request(tokenizer, bench, subject, subject.questions[0], budget)
    assert full.shots == 5 and cut.shots < 5
    assert len(cut.ctx) + 1 <= budget and not cut.truncated
    tiny = build_request(tokenizer, bench, subject, subject.questions[0], 20)
    assert tiny.shots == 0 and tiny.truncated and len(tiny.ctx) + 1 == 20


def test_data_dir_values(tmp_path):
    for b in ("ceval", "mmlu"):
        (tmp_path / "all" / b).mkdir(parents=True)
    assert resolve_data_dirs([], ["ceval"]) == {"ceval": SAMPLES_DIR / "ceval"}
    assert resolve_data_dirs([str(tmp_path / "all")], ["ceval", "mmlu", "cmmlu"]) == {
        "ceval": tmp_path / "all" / "ceval", "mmlu": tmp_path / "all" / "mmlu",
        "cmmlu": SAMPLES_DIR / "cmmlu"}
    assert resolve_data_dirs([str(tmp_path / "x")], ["mmlu"]) == {"mmlu": tmp_path / "x"}
    assert resolve_data_dirs([f"mmlu={tmp_path}"], ["ceval", "mmlu"])["mmlu"] == tmp_path
    with pytest.raises(ConfigError, match="BENCH=PATH"):
        resolve_data_dirs([str(tmp_path / "x")], ["ceval", "mmlu"])
    with pytest.raises(ConfigError, match="not in --tasks"):
        resolve_data_dirs([f"cmmlu={tmp_path}"], ["ceval"])


def test_ceval_subject_mapping_in_the_release_folder_names_the_subject(tmp_path):
    data = tmp_path / "ceval"
    (data / "val").mkdir(parents=True)
    (data / "val" / "new_subject_val.csv").write_text(
        "id,question,A,B,C,D,answer\n0,问题,甲,乙,丙,丁,C\n", encoding="utf-8")
    (data / "subject_mapping.json").write_text(
        '{"new_subject": ["New Subject", "新科目", "Other"]}', encoding="utf-8")
    [subject] = mcq.load_benchmark(BENCHMARKS["ceval"], Path(data), shots=0, limit=None)
    assert subject.name == "新科目" and subject.questions[0].answer == "C"
