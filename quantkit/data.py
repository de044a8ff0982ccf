"""Calibration and held-out text: the one place that reads it, tokenizes it and cuts it.

GPTQ needs `nsamples` windows of `seqlen` tokens; perplexity needs long token streams the
calibration never saw. By default both come from calib_data/ (mixed Chinese and English,
see calib_data/README.md), because calibrating on English alone is known to hurt the Chinese
output of bilingual models; a user's own .txt or .jsonl file replaces it.

Calibration rows come in three formats: `text` (prose: modern Debian documentation and the
classical/Python-docs set, half each), `chat` (instruction/response pairs rendered with the
model's own chat template, see quantkit.chat_calib) and `mixed` (half chat, half prose).
Every calibration carries a report -- rows and tokens per language and per source, the
share of CJK characters, the sha256 of the rows -- that gptq stores in quantkit.json.

Text is cut into chunks at line boundaries and only as many chunks as the windows need are
tokenized, in an order drawn from the seed: tokenizing megabytes of text takes seconds,
a few hundred thousand tokens take a fraction of one. Chunks are tokenized without special
tokens, so no BOS lands in the middle of the text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit import chat_calib
from quantkit.errors import CalibrationError

log = logging.getLogger(__name__)

CALIB_DIR: Path = Path(os.environ.get("QUANTKIT_CALIB_DIR")
                       or Path(__file__).resolve().parents[1] / "calib_data")
SPLITS = ("train", "heldout")
LANGS = ("zh", "en")
CHUNK_CHARS = 8192  # characters a chunk reaches before it is cut at the next line end
TOKENIZE_BATCH = 8  # chunks per tokenizer call: the fast tokenizers encode a batch in parallel

_FORMAT_HINT = 'a UTF-8 .txt file, or a .jsonl file with one {"text": ...} object per line'
CALIB_FORMATS = ("text", "chat", "mixed")
TEXT_FORMATS = ("plain", "chat")  # of held-out text for perplexity and KL divergence
# Share of each language's rows per built-in source. "classic" is zh.txt / en.txt (the
# classical Chinese / Python docs set the tiny demo model is trained on), "modern" the
# Debian handbook and installation guide, "chat" the pairs of chat.jsonl.
COMPOSITION = {"text": {"modern": 1, "classic": 1},
               "chat": {"chat": 1},
               "mixed": {"chat": 2, "modern": 1, "classic": 1},
               # The set quantkit calibrated on before the modern and chat sources came
               # (Python API only, for comparisons such as bench/calibration_compare.py).
               "classic": {"classic": 1}}
# What `--calib-format auto` means for a tokenizer with a chat template (without one: text):
# mixed rows measured best over chat and plain held-out text together (bench/RESULTS.md,
# "Calibration sets": KLD 0.188 chat / 0.126 plain, against 0.207 / 0.123 for prose and
# 0.182 / 0.132 for chat rows only, SmolLM2-135M-Instruct 4-bit g64).
AUTO_CHAT_FORMAT = "mixed"
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def calib_dir() -> Path:
    """calib_data/, or $QUANTKIT_CALIB_DIR when it is set (read at each call)."""
    override = os.environ.get("QUANTKIT_CALIB_DIR")
    return Path(override) if override else CALIB_DIR


# ----------------------------------------------------------------------------- reading


def read_text_file(path: str | Path) -> str:
    """The text of a user's .txt file, or the "text" fields of a .jsonl file, one per line."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise CalibrationError(f"{path}: {what}; give {_FORMAT_HINT}")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: is not UTF-8 text (byte {exc.start}); convert it, "
                               "e.g. `iconv -t UTF-8`") from exc
    text = _jsonl_text(path, raw) if path.suffix.lower() == ".jsonl" else raw
    if not text.strip():
        raise CalibrationError(f"{path}: is empty; give {_FORMAT_HINT}")
    return text


def _jsonl_text(path: Path, raw: str) -> str:
    records = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationError(f"{path}:{lineno}: not a JSON object with a \"text\" "
                                   f"string; give {_FORMAT_HINT}")
        records.append(record["text"].strip())
    return "\n\n".join(r for r in records if r) + "\n"


def prose_path(split: str, lang: str, source: str = "classic") -> Path:
    """calib_data/<split>/<lang>.txt for "classic", <lang>-modern.txt for "modern"."""
    return calib_dir() / split / (f"{lang}.txt" if source == "classic" else f"{lang}-{source}.txt")


def chat_path(split: str) -> Path:
    return calib_dir() / split / "chat.jsonl"


def _builtin_text(path: Path) -> str:
    if not path.is_file():
        raise CalibrationError(
            f"{path}: the built-in calibration text is missing; reinstall quantkit from its "
            "repository, set QUANTKIT_CALIB_DIR, or pass your own text file")
    return read_text_file(path)


def builtin_conversations(split: str, lang: str) -> list[chat_calib.Conversation]:
    """The shipped instruction/response pairs of one split and language, in file order."""
    path = chat_path(split)
    if not path.is_file():
        raise CalibrationError(f"{path}: the built-in chat pairs are missing; reinstall "
                               "quantkit from its repository or pass --calib FILE.jsonl")
    return [c for c in chat_calib.read_conversations(path) if c.lang == lang]


def load_split(split: str = "train", lang: str = "mix") -> dict[str, str]:
    """The built-in text of `split` ("train" or "heldout"): {"zh": ..., "en": ...} for "mix"."""
    if split not in SPLITS:
        raise CalibrationError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    if lang not in LANGS + ("mix",):
        raise CalibrationError(f"language {lang!r}: choose one of {', '.join(LANGS)}, mix")
    return {name: _builtin_text(prose_path(split, name))
            for name in (LANGS if lang == "mix" else (lang,))}


# ----------------------------------------------------------------------------- pure helpers


def chunk_text(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut `text` at line ends into contiguous chunks of about `max_chars` characters.

    Every chunk ends with a newline, so chunks tokenized in any order never glue two lines
    together; a line longer than `max_chars` stays whole; blank-only chunks are dropped.
    """
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= max_chars:
            chunks.append("".join(current))
            current, size = [], 0
    chunks.append("".join(current))
    return [c if c.endswith("\n") else c + "\n" for c in chunks if c.strip()]


def seeded_order(n: int, seed: int) -> list[int]:
    """A permutation of range(n) that depends only on `seed` (not on torch's global RNG)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def pack_windows(ids: Sequence[int] | torch.Tensor, nsamples: int, seqlen: int) -> torch.Tensor:
    """The first nsamples*seqlen tokens of `ids` as [nsamples, seqlen] non-overlapping rows."""
    need = nsamples * seqlen
    ids = torch.as_tensor(ids[:need], dtype=torch.long)
    if ids.numel() < need:
        raise ValueError(f"{ids.numel()} tokens cannot fill {nsamples} x {seqlen}")
    return ids.reshape(nsamples, seqlen)


def interleave(blocks: Sequence[Sequence]) -> list:
    """Items taken from each block in turn (a0, b0, a1, b1, ...), so any prefix stays mixed."""
    out = []
    for i in range(max(len(b) for b in blocks)):
        out += [b[i] for b in blocks if i < len(b)]
    return out


def interleave_rows(*blocks: torch.Tensor) -> torch.Tensor:
    """The rows of `blocks` interleaved (see `interleave`)."""
    return torch.stack(interleave([list(b) for b in blocks]))


# ----------------------------------------------------------------------------- tokenizing


def tokenize_chunks(tokenizer, chunks: Sequence[str], *, until: int | None = None) -> list[int]:
    """Token ids of `chunks` in order, concatenated; stop once `until` tokens are collected."""
    ids: list[int] = []
    done = 0
    while done < len(chunks) and (until is None or len(ids) < until):
        size = TOKENIZE_BATCH
        if until is not None:
            # One chunk first, then batches sized from the tokens per chunk so far (plus one
            # to spare), so a small request does not tokenize a whole batch of chunks.
            per_chunk = max(len(ids) / done, 1.0) if done else None
            size = 1 if per_chunk is None else min(
                size, math.ceil((until - len(ids)) / per_chunk) + 1)
        batch = list(chunks[done:done + size])
        # verbose=False: a chunk may exceed model_max_length, which is harmless here.
        for row in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(row)
        done += len(batch)
    return ids


def _windows(tokenizer, text: str, source: str, nsamples: int, seqlen: int, seed: int, *,
             longer: str = "give a longer file") -> torch.Tensor:
    chunks = chunk_text(text)
    order = seeded_order(len(chunks), seed)
    need = nsamples * seqlen
    ids = tokenize_chunks(tokenizer, [chunks[i] for i in order], until=need)
    if len(ids) < need:
        raise CalibrationError(
            f"{source}: has {len(ids)} tokens; --nsamples {nsamples} x --seqlen {seqlen} needs "
            f"{need}; lower them or {longer}")
    return pack_windows(ids, nsamples, seqlen)


def _check_sizes(nsamples: int, seqlen: int) -> None:
    if nsamples < 1 or seqlen < 1:
        raise CalibrationError(f"--nsamples {nsamples} x --seqlen {seqlen}: both must be at "
                               "least 1")


# ----------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """Calibration rows and what they are made of (the report quantkit.json records)."""

    ids: torch.Tensor  # [nsamples, seqlen]
    report: dict


def split_count(n: int, weights: dict[str, int]) -> dict[str, int]:
    """`n` rows shared by `weights`; the remainder goes to the first names, in order."""
    total = sum(weights.values())
    counts = {k: n * w // total for k, w in weights.items()}
    for name in list(weights)[:n - sum(counts.values())]:
        counts[name] += 1
    return counts


def resolve_format(fmt: str, tokenizer, calib_file: str | Path | None = None) -> str:
    """`auto`: a chat .jsonl file -> chat; the built-in set -> AUTO_CHAT_FORMAT when the
    tokenizer has a chat template, else text. Other names are checked and kept."""
    if fmt == "auto":
        if calib_file is not None:
            return "chat" if chat_calib.is_chat_jsonl(calib_file) else "text"
        return AUTO_CHAT_FORMAT if chat_calib.has_chat_template(tokenizer) else "text"
    if fmt not in COMPOSITION:
        raise CalibrationError(f"--calib-format {fmt}: choose one of auto, "
                               f"{', '.join(CALIB_FORMATS)}")
    if fmt in ("mixed", "classic") and calib_file is not None:
        raise CalibrationError(f"--calib-format {fmt}: uses quantkit's built-in prose and chat "
                               "pairs; with --calib FILE choose text or chat")
    if fmt in ("chat", "mixed"):
        chat_calib.require_chat_template(tokenizer, f"--calib-format {fmt}")
    return fmt


def _chat_rows(tokenizer, conversations: Sequence[chat_calib.Conversation], nsamples: int,
               seqlen: int, seed: int, source: str) -> chat_calib.PackedRows:
    """Rows packed from `conversations` in a seeded order, tokenizing only what they need."""
    order = [conversations[i] for i in seeded_order(len(conversations), seed)]
    need = nsamples * seqlen
    units: list[chat_calib.Unit] = []
    done = 0
    # A cut turn's remainder is dropped, so collect some slack beyond the bare need.
    while done < len(order) and sum(u.size for u in units) < need + need // 4 + 2 * seqlen:
        units += chat_calib.tokenize_conversations(tokenizer, order[done:done + 32])
        done += 32
    while True:
        try:
            return chat_calib.pack_units(units, nsamples, seqlen)
        except ValueError:
            if done >= len(order):
                have = sum(u.size for u in units)
                raise CalibrationError(
                    f"{source}: its conversations have {have} tokens; --nsamples {nsamples} x "
                    f"--seqlen {seqlen} needs {need} (more where turns are cut); lower them, "
                    "use --calib-format mixed, or give more conversations") from None
            units += chat_calib.tokenize_conversations(tokenizer, order[done:])
            done = len(order)


def _builtin_block(tokenizer, lang: str, source: str, rows: int, seqlen: int, seed: int
                   ) -> tuple[torch.Tensor, list[list[tuple[str, str, int]]], int]:
    if source == "chat":
        packed = _chat_rows(tokenizer, builtin_conversations("train", lang), rows, seqlen, seed,
                            str(chat_path("train")) + f" ({lang})")
        pieces = [[(lng, f"chat.jsonl:{src}", n) for lng, src, n in row]
                  for row in packed.pieces]
        return packed.ids, pieces, packed.cut_turns
    path = prose_path("train", lang, source)
    ids = _windows(tokenizer, _builtin_text(path), str(path), rows, seqlen, seed,
                   longer="pass --calib with a longer file of your own")
    return ids, [[(lang, path.name, seqlen)] for _ in range(rows)], 0


def detect_lang(text: str) -> str:
    """zh when at least 30% of the letters are CJK (Chinese technical prose is full of
    Latin command names), else en."""
    letters = sum(c.isalpha() for c in text)
    return "zh" if letters and len(CJK.findall(text)) / letters >= 0.3 else "en"


def build_calibration(tokenizer, *, fmt: str = "text", calib_file: str | Path | None = None,
                      nsamples: int = 128, seqlen: int = 2048, seed: int = 0) -> Calibration:
    """[nsamples, seqlen] calibration rows in format `fmt`, the same for the same seed.

    Without `calib_file`: half the rows Chinese and half English (Chinese first when
    nsamples is odd); within a language the rows are shared among the built-in sources as
    COMPOSITION says, and all blocks are interleaved row by row, so any prefix stays mixed.
    A prose row is a contiguous stretch of the token stream of chunks taken in a seeded
    order (rows never overlap); a chat row holds whole conversations where they fit.
    """
    _check_sizes(nsamples, seqlen)
    fmt = resolve_format(fmt, tokenizer, calib_file)
    cut = 0
    if calib_file is not None:
        if fmt == "chat":
            conversations = chat_calib.read_conversations(calib_file,
                                                          source=Path(calib_file).name)
            conversations = [c if c.lang != "?" else chat_calib.Conversation(
                c.messages, detect_lang(" ".join(m["content"] for m in c.messages)),
                c.source) for c in conversations]
            packed = _chat_rows(tokenizer, conversations, nsamples, seqlen, seed,
                                str(calib_file))
            ids, pieces, cut = packed.ids, packed.pieces, packed.cut_turns
        else:
            if chat_calib.is_chat_jsonl(calib_file):
                raise CalibrationError(f"{calib_file}: holds conversations, not \"text\" "
                                       "records; pass --calib-format chat (or auto)")
            ids = _windows(tokenizer, read_text_file(calib_file), str(calib_file), nsamples,
                           seqlen, seed)
            pieces = [[(detect_lang(t), Path(calib_file).name, seqlen)]
                      for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    else:
        langs = split_count(nsamples, {"zh": 1, "en": 1})
        counts = {lang: split_count(langs[lang], COMPOSITION[fmt]) for lang in LANGS}
        blocks, block_pieces = [], []
        # Source by source, a block per language, so interleaved rows alternate zh/en.
        for si, source in enumerate(COMPOSITION[fmt]):
            for li, lang in enumerate(LANGS):
                if counts[lang][source]:
                    # A different stream per language and source, all fixed by `seed`.
                    b, p, c = _builtin_block(tokenizer, lang, source, counts[lang][source],
                                             seqlen, seed * 16 + li * 4 + si)
                    blocks.append(b)
                    block_pieces.append(p)
                    cut += c
        ids = interleave_rows(*blocks)
        pieces = interleave(block_pieces)
    report = calibration_report(tokenizer, ids, pieces, fmt=fmt, cut_turns=cut,
                                source=str(calib_file) if calib_file else "calib_data/train")
    log_report(report)
    return Calibration(ids, report)


def calibration_report(tokenizer, ids: torch.Tensor, pieces: list[list[tuple[str, str, int]]],
                       *, fmt: str, cut_turns: int, source: str) -> dict:
    """Rows and tokens per language and per source, CJK share, sha256 of the rows.

    A row counts for the language and the source that hold most of its tokens; tokens are
    counted exactly. The CJK share is of the non-space characters of the decoded rows
    (special tokens left out); the sha256 is of the rows as little-endian int64 token ids,
    row after row, so the same tokenizer and rows give the same digest.
    """
    by_lang: dict[str, dict[str, int]] = {}
    by_source: dict[str, dict[str, int]] = {}
    for row in pieces:
        langs, sources = Counter(), Counter()
        for lang, src, n in row:
            langs[lang] += n
            sources[src] += n
        for table, counter in ((by_lang, langs), (by_source, sources)):
            for key, n in counter.items():
                table.setdefault(key, {"rows": 0, "tokens": 0})["tokens"] += n
            table[counter.most_common(1)[0][0]]["rows"] += 1
    text = "".join(tokenizer.batch_decode(ids, skip_special_tokens=True))
    visible = sum(1 for c in text if not c.isspace())
    digest = hashlib.sha256(ids.to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
    report = {
        "format": fmt, "source": source, "rows": int(ids.shape[0]),
        "seqlen": int(ids.shape[1]), "tokens": int(ids.numel()),
        "by_language": dict(sorted(by_lang.items())),
        "by_source": dict(sorted(by_source.items())),
        "cjk_share": round(len(CJK.findall(text)) / visible, 4) if visible else 0.0,
        "sha256": digest.hexdigest(),
    }
    if fmt in ("chat", "mixed"):
        report["cut_turns"] = cut_turns
    return report


def log_report(report: dict) -> None:
    langs = ", ".join(f"{k} {v['rows']} rows / {v['tokens']} tokens"
                      for k, v in report["by_language"].items())
    sources = ", ".join(f"{k} {v['rows']} / {v['tokens']}"
                        for k, v in report["by_source"].items())
    log.info("calibration (%s, %s): %d x %d tokens; %s; sources (rows / tokens): %s; CJK "
             "share %.1f%%; sha256 %s", report["format"], report["source"], report["rows"],
             report["seqlen"], langs, sources, 100 * report["cjk_share"], report["sha256"])
    if report.get("cut_turns"):
        log.info("calibration: %d turns were cut to fill rows (no whole turn fitted)",
                 report["cut_turns"])


def calibration_samples(tokenizer, *, calib_file: str | Path | None = None,
                        nsamples: int = 128, seqlen: int = 2048,
                        seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] prose calibration token ids (build_calibration's rows, format
    text), the same for the same seed."""
    return build_calibration(tokenizer, fmt="text", calib_file=calib_file, nsamples=nsamples,
                             seqlen=seqlen, seed=seed).ids


# ----------------------------------------------------------------------------- held-out


def heldout_tokens(tokenizer, *, text_file: str | Path | None = None,
                   min_tokens: int = 2, text_format: str = "plain",
                   sources: Sequence[str] = ("classic",)) -> dict[str, torch.Tensor]:
    """1-D token streams for perplexity, each tokenized in its own order; callers cut it
    into windows.

    plain: {"zh", "en"} of the held-out split (`sources` adds e.g. "modern" as
    {"zh-modern", "en-modern"}), or {"text"} for `text_file`. chat: the held-out
    conversations rendered with the model's chat template back to back, {"zh-chat",
    "en-chat"}, or {"chat"} for a .jsonl `text_file`.
    """
    if text_format not in TEXT_FORMATS:
        raise CalibrationError(f"--text-format {text_format}: choose one of "
                               f"{', '.join(TEXT_FORMATS)}")
    if text_format == "chat":
        chat_calib.require_chat_template(tokenizer, "--text-format chat")
        if text_file is not None:
            convs = {"chat": (str(text_file), chat_calib.read_conversations(text_file))}
        else:
            convs = {f"{lang}-chat": (f"{chat_path('heldout')} ({lang})",
                                      builtin_conversations("heldout", lang)) for lang in LANGS}
        streams = {key: (source, chat_calib.conversation_stream(tokenizer, c))
                   for key, (source, c) in convs.items()}
    else:
        if text_file is not None:
            texts = {"text": (str(text_file), read_text_file(text_file))}
        else:
            texts = {}
            for source in sources:
                for lang in LANGS:
                    path = prose_path("heldout", lang, source)
                    key = lang if source == "classic" else f"{lang}-{source}"
                    texts[key] = (str(path), _builtin_text(path))
        streams = {key: (source, tokenize_chunks(tokenizer, chunk_text(text)))
                   for key, (source, text) in texts.items()}
    out = {}
    for key, (source, ids) in streams.items():
        if len(ids) < min_tokens:
            raise CalibrationError(f"{source}: has {len(ids)} tokens; evaluation needs at "
                                   f"least {min_tokens}; give a longer file")
        out[key] = torch.tensor(ids, dtype=torch.long)
    return out
