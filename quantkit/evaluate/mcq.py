"""C-Eval, CMMLU and MMLU: k-shot multiple choice, scored by the answer letter's log-probability.

Each benchmark is read from its official release layout and prompted with its own
template (the ones the benchmarks' evaluation scripts use, which the published Baichuan2
figures follow): a header naming the subject, k solved examples from the dev split, then
the question, ending where the answer letter would follow ("答案：", "答案是：", "Answer:").

Which tokens are "the letter": the model is asked for the letter exactly as the solved
examples spell it after the cue ("A" after the Chinese cues, " A" after "Answer:"). For
each question the prompt and the prompt followed by each letter are tokenized whole; the
context is their common token prefix and each letter's continuation is what follows it.
With most tokenizers every continuation is one token and one forward pass scores all four
(the log-probability of each letter token at the last position). When a tokenizer splits
the letter (" " + "A") or merges it with the cue, each letter is scored as the summed
log-probability of its continuation tokens after the same context, so the comparison
stays between the four spellings a model would actually produce.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from quantkit.errors import ConfigError, QuantkitError
from quantkit.evaluate.forward import positions_logits

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
SAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "benchmarks"


class BenchmarkDataError(QuantkitError):
    """A benchmark folder or CSV that does not follow the benchmark's release layout."""


# ----------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Layout:
    """Where a release keeps its CSVs and which columns they have (None: headerless)."""

    dev_dir: str
    eval_dir: str
    dev_suffix: str
    eval_suffix: str
    columns: tuple[str, ...] | None  # names of question, A, B, C, D, answer

    def dev_file(self, data_dir: Path, subject: str) -> Path:
        return data_dir / self.dev_dir / f"{subject}{self.dev_suffix}.csv"

    def eval_file(self, data_dir: Path, subject: str) -> Path:
        return data_dir / self.eval_dir / f"{subject}{self.eval_suffix}.csv"

    def describe(self) -> str:
        files = (f"{self.dev_dir}/<subject>{self.dev_suffix}.csv and "
                 f"{self.eval_dir}/<subject>{self.eval_suffix}.csv")
        if self.columns is None:
            return f"{files}, headerless rows question,A,B,C,D,answer"
        return f"{files} with columns {','.join(self.columns)}"


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    layout: Layout
    header: str  # names the subject
    question_prefix: str
    answer_cue: str
    answer_sep: str  # between the cue and the letter in the solved examples

    def format_question(self, q: Question, *, with_answer: bool) -> str:
        text = self.question_prefix + q.question
        for letter, option in zip(LETTERS, q.options, strict=True):
            text += f"\n{letter}. {option}"
        text += self.answer_cue
        return text + (f"{self.answer_sep}{q.answer}\n\n" if with_answer else "")

    def prompt(self, subject_name: str, shots: Sequence[Question], q: Question) -> str:
        return (self.header.format(subject=subject_name)
                + "".join(self.format_question(s, with_answer=True) for s in shots)
                + self.format_question(q, with_answer=False))


BENCHMARKS: dict[str, Benchmark] = {
    "ceval": Benchmark(
        name="ceval", title="C-Eval",
        layout=Layout("dev", "val", "_dev", "_val",
                      ("question", "A", "B", "C", "D", "answer")),
        header="以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
        question_prefix="", answer_cue="\n答案：", answer_sep=""),
    "cmmlu": Benchmark(
        name="cmmlu", title="CMMLU",
        layout=Layout("dev", "test", "", "", ("Question", "A", "B", "C", "D", "Answer")),
        header="以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
        question_prefix="题目：", answer_cue="\n答案是：", answer_sep=""),
    "mmlu": Benchmark(
        name="mmlu", title="MMLU",
        layout=Layout("dev", "test", "_dev", "_test", None),
        header="The following are multiple choice questions (with answers) about {subject}.\n\n",
        question_prefix="", answer_cue="\nAnswer:", answer_sep=" "),
}


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Question:
    question: str
    options: tuple[str, str, str, str]
    answer: str
    where: str  # "file row N", for messages


@dataclass
class SubjectSet:
    subject: str  # file name stem, e.g. "high_school_physics"
    name: str  # as the prompt names it, e.g. "高中物理"
    dev: list[Question]
    questions: list[Question]


def read_questions(path: Path, layout: Layout) -> list[Question]:
    """Questions of one CSV, checking columns and answers; errors name the file and row."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BenchmarkDataError(f"{path}: cannot read this CSV ({exc})") from exc
    if layout.columns is None:
        index, first = list(range(6)), 0
    else:
        if not rows:
            raise BenchmarkDataError(f"{path}: empty file; expected a header "
                                     f"{','.join(layout.columns)}")
        header = [h.strip() for h in rows[0]]
        missing = [c for c in layout.columns if c not in header]
        if missing:
            raise BenchmarkDataError(
                f"{path}: missing column {', '.join(missing)} (header: {','.join(header)}); "
                f"expected {','.join(layout.columns)}")
        index, first = [header.index(c) for c in layout.columns], 1
    questions = []
    for number, row in enumerate(rows[first:], start=1):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path} row {number}"
        if len(row) <= max(index):
            raise BenchmarkDataError(f"{where}: {len(row)} columns, expected {max(index) + 1} "
                                     "(question,A,B,C,D,answer)")
        question, *options, answer = (row[i] for i in index)
        answer = answer.strip()
        if answer not in LETTERS:
            raise BenchmarkDataError(f"{where}: answer {answer!r} is not one of A, B, C, D")
        questions.append(Question(question, tuple(options), answer, where))
    if not questions:
        raise BenchmarkDataError(f"{path}: no questions")
    return questions


def subject_names(bench: Benchmark, data_dir: Path) -> dict[str, str]:
    """Names the prompt uses: Chinese for C-Eval/CMMLU (the release's own mapping if any)."""
    if bench.name == "mmlu":
        return {}
    names = json.loads((SAMPLES_DIR / "subject_names.json").read_text(encoding="utf-8"))
    names = dict(names[bench.name])
    mapping = data_dir / "subject_mapping.json"  # C-Eval's: subject -> [en, zh, category]
    if mapping.is_file():
        try:
            names.update({k: v[1] for k, v in json.loads(mapping.read_text("utf-8")).items()})
        except (ValueError, IndexError, TypeError, AttributeError) as exc:
            raise BenchmarkDataError(f"{mapping}: not C-Eval's subject -> [English, Chinese, "
                                     f"category] mapping ({exc})") from exc
    return names


def load_benchmark(bench: Benchmark, data_dir: Path, *, shots: int, limit: int | None
                   ) -> list[SubjectSet]:
    """Every subject with an evaluation file, with its dev examples when shots are wanted."""
    layout = bench.layout
    expected = f"expected the {bench.title} release layout: {layout.describe()}"
    if not data_dir.is_dir():
        raise BenchmarkDataError(f"{bench.title} data {data_dir}: no such folder; {expected}")
    suffix = f"{layout.eval_suffix}.csv"
    files = sorted((data_dir / layout.eval_dir).glob(f"*{suffix}"))
    if not files:
        raise BenchmarkDataError(f"{bench.title} data {data_dir}: no "
                                 f"{layout.eval_dir}/*{suffix} files; {expected}")
    names = subject_names(bench, data_dir)
    sets = []
    for path in files:
        subject = path.name[: -len(suffix)]
        dev: list[Question] = []
        if shots > 0:
            dev_path = layout.dev_file(data_dir, subject)
            if not dev_path.is_file():
                raise BenchmarkDataError(f"{dev_path}: missing ({shots}-shot prompts take their "
                                         f"examples from it; {expected}, or pass --shots 0)")
            dev = read_questions(dev_path, layout)
            if len(dev) < shots:
                log.warning("%s: %d dev examples, fewer than --shots %d; using them all",
                            dev_path, len(dev), shots)
        questions = read_questions(path, layout)[:limit]
        name = names.get(subject, subject.replace("_", " "))
        sets.append(SubjectSet(subject, name, dev[:shots], questions))
    return sets


def resolve_data_dirs(values: Sequence[str], benches: Sequence[str]) -> dict[str, Path]:
    """`--data-dir` values -> folder per benchmark; default: the samples quantkit ships.

    A value is `BENCH=PATH`, or a PATH holding `ceval/`, `cmmlu/`, `mmlu/` folders, or (with
    one benchmark requested) that benchmark's own folder.
    """
    dirs = {b: SAMPLES_DIR / b for b in benches}
    plain = []
    for value in values:
        name, sep, path = value.partition("=")
        if sep and name not in BENCHMARKS and not Path(value).exists():
            raise ConfigError(f"--data-dir {value}: {name!r} is not a benchmark; use BENCH=PATH "
                              f"with BENCH one of {', '.join(BENCHMARKS)}")
        if sep and name in BENCHMARKS:
            if name not in benches:
                raise ConfigError(f"--data-dir {value}: {name} is not in --tasks")
            dirs[name] = Path(path)
        else:
            plain.append(Path(value))
    for path in plain:
        nested = [b for b in benches if (path / b).is_dir()]
        if nested:
            dirs.update({b: path / b for b in nested})
        elif len(benches) == 1:
            dirs[benches[0]] = path
        else:
            raise ConfigError(f"--data-dir {path}: holds no {'/, '.join(benches)}/ folders; "
                              "with several benchmarks pass --data-dir BENCH=PATH for each")
    return dirs


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Request:
    """A question's context tokens and each letter's continuation tokens."""

    ctx: list[int]
    conts: tuple[list[int], ...]
    shots: int
    truncated: bool = False


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def build_request(tokenizer, bench: Benchmark, subject: SubjectSet, q: Question,
                  max_length: int) -> Request:
    """Tokenize the prompt with as many shots as fit in `max_length` tokens."""
    for k in range(len(subject.dev), -1, -1):
        prompt = bench.prompt(subject.name, subject.dev[:k], q)
        ids = _encode(tokenizer, prompt)
        fulls = [_encode(tokenizer, prompt + bench.answer_sep + letter) for letter in LETTERS]
        if max(map(len, fulls)) <= max_length or k == 0:
            break
    n = min(_common_prefix(ids, full) for full in fulls)
    conts = tuple(full[n:] for full in fulls)
    if not all(conts):
        raise RuntimeError(f"{q.where}: a letter added no token after the prompt")
    ctx, room = ids[:n], max_length - max(map(len, conts))
    truncated = len(ctx) > room
    if truncated:  # even 0-shot is too long: keep the end, where the question is
        ctx = ctx[len(ctx) - room:]
    return Request(ctx, conts, k, truncated)


@dataclass(frozen=True)
class Row:
    """One sequence to run, and which (position, token, letter) log-probs to add up."""

    request: int
    ids: list[int]
    reads: tuple[tuple[int, int, int], ...]


def request_rows(index: int, req: Request) -> list[Row]:
    last = len(req.ctx) - 1
    if all(len(c) == 1 for c in req.conts):
        return [Row(index, req.ctx, tuple((last, c[0], i) for i, c in enumerate(req.conts)))]
    return [Row(index, req.ctx + c[:-1], tuple((last + j, tok, i) for j, tok in enumerate(c)))
            for i, c in enumerate(req.conts)]


def score_requests(model: nn.Module, requests: Sequence[Request], *, batch_size: int,
                   pad_id: int, desc: str = "questions") -> torch.Tensor:
    """[n_requests, 4] summed letter log-probs. Rows are right-padded: the positions read
    are real tokens, which a causal model computes without looking at the padding after."""
    rows = [row for i, req in enumerate(requests) for row in request_rows(i, req)]
    scores = torch.zeros(len(requests), len(LETTERS), dtype=torch.float64)
    order = sorted(range(len(rows)), key=lambda r: (-len(rows[r].ids), r))
    with tqdm(total=len(rows), desc=desc, unit="prompt", leave=False) as bar:
        for start in range(0, len(order), batch_size):
            batch = [rows[r] for r in order[start:start + batch_size]]
            width = max(len(row.ids) for row in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, row in enumerate(batch):
                ids[b, :len(row.ids)] = torch.tensor(row.ids)
                mask[b, :len(row.ids)] = 1
            positions = sorted({pos for row in batch for pos, _, _ in row.reads})
            logp = F.log_softmax(positions_logits(model, ids, torch.tensor(positions), mask), -1)
            column = {pos: j for j, pos in enumerate(positions)}
            for b, row in enumerate(batch):
                for pos, token, letter in row.reads:
                    scores[row.request, letter] += float(logp[b, column[pos], token])
            bar.update(len(batch))
    return scores


def subject_summary(correct: Sequence[bool]) -> dict:
    return {"accuracy": 100.0 * sum(correct) / len(correct), "correct": int(sum(correct)),
            "total": len(correct)}


def benchmark_summary(per_subject: dict[str, dict]) -> dict:
    """Average = mean of subject accuracies (each subject counts once, as CMMLU and C-Eval
    report); micro_average = share of all questions (MMLU's original script)."""
    correct = sum(s["correct"] for s in per_subject.values())
    total = sum(s["total"] for s in per_subject.values())
    return {
        "average": sum(s["accuracy"] for s in per_subject.values()) / len(per_subject),
        "micro_average": 100.0 * correct / total,
        "correct": correct,
        "questions": total,
        "subjects": per_subject,
    }


def evaluate_benchmark(model: nn.Module, tokenizer, bench: Benchmark,
                       subjects: Sequence[SubjectSet], *, batch_size: int, max_length: int
                       ) -> dict:
    """Accuracy per subject and averaged, with each question's predicted letter."""
    spans, requests = [], []
    for subject in subjects:
        start = len(requests)
        requests += [build_request(tokenizer, bench, subject, q, max_length)
                     for q in subject.questions]
        spans.append((subject, start, len(requests)))
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id or 0
    scores = score_requests(model, requests, batch_size=batch_size, pad_id=pad_id,
                            desc=bench.title)
    predicted = [LETTERS[i] for i in scores.argmax(-1).tolist()]
    per_subject = {}
    for subject, start, end in spans:
        preds = predicted[start:end]
        right = [p == q.answer for p, q in zip(preds, subject.questions, strict=True)]
        summary = subject_summary(right)
        reduced = sum(r.shots < len(subject.dev) for r in requests[start:end])
        truncated = sum(r.truncated for r in requests[start:end])
        per_subject[subject.subject] = dict(summary, predictions="".join(preds),
                                            fewer_shots=reduced, truncated=truncated)
        if reduced or truncated:
            log.warning("%s %s: %d prompt(s) dropped shots and %d were cut to fit %d tokens",
                        bench.title, subject.subject, reduced, truncated, max_length)
    return benchmark_summary(per_subject)
