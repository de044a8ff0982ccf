"""Chat-formatted calibration rows: conversations rendered with the model's own chat template.

Chat models spend their life on text wrapped in their template (role markers, special
tokens, a default system prompt), and GPTQ fits each layer to the activations it sees, so
rows built the way users' prompts are built match what the model will meet. Conversations
come from the bilingual pairs quantkit ships (calib_data/{train,heldout}/chat.jsonl) or
from a user's .jsonl file with `messages` ([{"role", "content"}, ...]) or
`instruction`/`output` (alpaca style, optional `input` and `system`) on each line.

A conversation is cut into turns at the points where the template's rendering of its first
k messages ends, so packing can keep turns whole: each row of `seqlen` tokens is filled
with whole conversations first, then with the leading whole turns of the next one, and
only when no whole turn fits the remaining space is a turn cut to fill the row.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from quantkit.errors import CalibrationError

log = logging.getLogger(__name__)

LOOKAHEAD = 64  # conversations searched for one that fits a row's remaining space
_FORMAT_HINT = ('a .jsonl file with one {"messages": [{"role": ..., "content": ...}, ...]} '
                'or {"instruction": ..., "output": ...} object per line')


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]
    lang: str = "?"  # "zh" / "en" for the built-in pairs; detected for a user's file
    source: str = "?"


@dataclass
class Unit:
    """A tokenized conversation: one token list per turn, the template's preamble in the
    first."""

    turns: list[list[int]]
    lang: str
    source: str

    @property
    def size(self) -> int:
        return sum(len(t) for t in self.turns)


@dataclass
class PackedRows:
    ids: torch.Tensor  # [nsamples, seqlen]
    # per row, (lang, source, tokens) of each piece in it, in order
    pieces: list[list[tuple[str, str, int]]] = field(default_factory=list)
    cut_turns: int = 0  # turns cut to fill a row (no whole turn fitted)


# ----------------------------------------------------------------------------- reading


def _conversation(record: object, where: str) -> Conversation:
    if not isinstance(record, dict):
        raise CalibrationError(f"{where}: not a JSON object; give {_FORMAT_HINT}")
    if "messages" in record:
        messages = record["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages)):
            raise CalibrationError(f"{where}: \"messages\" must be a non-empty list of "
                                   "{\"role\": ..., \"content\": ...} objects")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        prompt = record["instruction"]
        if isinstance(record.get("input"), str) and record["input"].strip():
            prompt = f"{prompt}\n\n{record['input']}"
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": record["output"]}]
        if isinstance(record.get("system"), str) and record["system"].strip():
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise CalibrationError(f"{where}: has neither \"messages\" nor \"instruction\" and "
                               f"\"output\"; give {_FORMAT_HINT}")
    return Conversation(tuple(messages), lang=str(record.get("lang") or "?"),
                        source=str(record.get("source") or "?"))


def read_conversations(path: str | Path, *, source: str | None = None) -> list[Conversation]:
    """The conversations of a .jsonl file, in file order."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise CalibrationError(f"{path}: {what}; give {_FORMAT_HINT}")
    if path.suffix.lower() != ".jsonl":
        raise CalibrationError(f"{path}: chat calibration needs {_FORMAT_HINT}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: is not UTF-8 text (byte {exc.start})") from exc
    conversations = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{lineno}: not valid JSON ({exc.msg}); give "
                                   f"{_FORMAT_HINT}") from exc
        conv = _conversation(record, f"{path}:{lineno}")
        if source is not None and conv.source == "?":
            conv = Conversation(conv.messages, conv.lang, source)
        conversations.append(conv)
    if not conversations:
        raise CalibrationError(f"{path}: is empty; give {_FORMAT_HINT}")
    return conversations


def is_chat_jsonl(path: str | Path) -> bool:
    """Whether the first record of a .jsonl file is a conversation (not a {"text"} record)."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and ("messages" in record
                                                     or "instruction" in record)
    return False


# ----------------------------------------------------------------------------- templating


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer, what: str) -> None:
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise CalibrationError(
            f"{what}: {name}'s tokenizer has no chat_template (tokenizer_config.json or "
            "chat_template.jinja), so chat rows cannot be built the way its users' prompts "
            "are; use the plain text format (--calib-format text / --text-format plain)")


def _render(tokenizer, messages: Sequence[dict]) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False)


def turn_texts(tokenizer, conv: Conversation) -> list[str]:
    """The rendered conversation cut at turn ends, joined back it is the whole rendering.

    A template whose rendering of the first k messages is not a prefix of the whole one
    (some rewrite earlier turns) gives the conversation as one piece.
    """
    try:
        full = _render(tokenizer, conv.messages)
    except Exception as exc:  # jinja raises its own errors for roles a template refuses
        raise CalibrationError(f"{conv.source}: the chat template rejects a conversation "
                               f"({type(exc).__name__}: {exc})") from exc
    pieces, start = [], 0
    for k in range(1, len(conv.messages)):
        try:
            prefix = _render(tokenizer, conv.messages[:k])
        except Exception:  # e.g. a template that insists on ending with an assistant turn
            return [full]
        if not full.startswith(prefix) or len(prefix) <= start:
            return [full]
        pieces.append(full[start:len(prefix)])
        start = len(prefix)
    pieces.append(full[start:])
    return [p for p in pieces if p]


def tokenize_conversations(tokenizer, conversations: Sequence[Conversation]) -> list[Unit]:
    """Each conversation as token lists per turn (special tokens come from the template)."""
    units = []
    for conv in conversations:
        texts = turn_texts(tokenizer, conv)
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        units.append(Unit([list(t) for t in ids if t], conv.lang, conv.source))
    return units


def conversation_stream(tokenizer, conversations: Sequence[Conversation]) -> list[int]:
    """All conversations rendered and tokenized back to back (held-out perplexity)."""
    return [t for unit in tokenize_conversations(tokenizer, conversations)
            for turn in unit.turns for t in turn]


# ----------------------------------------------------------------------------- packing


def pack_units(units: Sequence[Unit], nsamples: int, seqlen: int) -> PackedRows:
    """[nsamples, seqlen] rows of whole conversations and turns, in the order given.

    Raises ValueError when the units run out (the caller names the source and the fix).
    """
    pending: deque[Unit] = deque(Unit(list(u.turns), u.lang, u.source) for u in units if u.size)
    rows: list[list[int]] = []
    pieces: list[list[tuple[str, str, int]]] = []
    row: list[int] = []
    row_pieces: list[tuple[str, str, int]] = []
    cut = 0

    def put(unit: Unit, tokens: list[int]) -> None:
        row.extend(tokens)
        row_pieces.append((unit.lang, unit.source, len(tokens)))

    while len(rows) < nsamples:
        if not pending:
            raise ValueError(f"{len(rows) * seqlen + len(row)} tokens cannot fill "
                             f"{nsamples} x {seqlen}")
        space = seqlen - len(row)
        fits = next((i for i, u in enumerate(islice(pending, LOOKAHEAD)) if u.size <= space),
                    None)
        if fits is not None:
            unit = pending[fits]
            del pending[fits]
            put(unit, [t for turn in unit.turns for t in turn])
        else:
            unit = pending.popleft()
            whole, size = 0, 0
            while whole < len(unit.turns) and size + len(unit.turns[whole]) <= space:
                size += len(unit.turns[whole])
                whole += 1
            if whole:
                put(unit, [t for turn in unit.turns[:whole] for t in turn])
                pending.appendleft(Unit(unit.turns[whole:], unit.lang, unit.source))
            else:  # no whole turn fits anywhere nearby: cut this one to fill the row
                put(unit, unit.turns[0][:space])
                cut += 1
        if len(row) == seqlen:
            rows.append(row)
            pieces.append(row_pieces)
            row, row_pieces = [], []
    return PackedRows(torch.tensor(rows, dtype=torch.long).reshape(nsamples, seqlen), pieces,
                      cut_turns=cut)
