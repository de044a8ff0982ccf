"""Calibration and held-out text: the one place that reads it, tokenizes it and cuts it.

GPTQ needs `nsamples` windows of `seqlen` tokens; perplexity needs long token streams the
calibration never saw. By default both come from calib_data/ (mixed Chinese and English,
see calib_data/README.md), because calibrating on English alone is known to hurt the Chinese
output of bilingual models; a user's own .txt or .jsonl file replaces it.

Text is cut into chunks at line boundaries and only as many chunks as the windows need are
tokenized, in an order drawn from the seed: tokenizing megabytes of text takes seconds,
a few hundred thousand tokens take a fraction of one. Chunks are tokenized without special
tokens, so no BOS lands in the middle of the text.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from quantkit.errors import CalibrationError

log = logging.getLogger(__name__)

CALIB_DIR: Path = Path(os.environ.get("QUANTKIT_CALIB_DIR")
                       or Path(__file__).resolve().parents[1] / "calib_data")
SPLITS = ("train", "heldout")
LANGS = ("zh", "en")
CHUNK_CHARS = 8192  # characters a chunk reaches before it is cut at the next line end
TOKENIZE_BATCH = 8  # chunks per tokenizer call: the fast tokenizers encode a batch in parallel

_FORMAT_HINT = 'a UTF-8 .txt file, or a .jsonl file with one {"text": ...} object per line'


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


def load_split(split: str = "train", lang: str = "mix") -> dict[str, str]:
    """The built-in text of `split` ("train" or "heldout"): {"zh": ..., "en": ...} for "mix"."""
    if split not in SPLITS:
        raise CalibrationError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    if lang not in LANGS + ("mix",):
        raise CalibrationError(f"language {lang!r}: choose one of {', '.join(LANGS)}, mix")
    texts = {}
    for name in (LANGS if lang == "mix" else (lang,)):
        path = calib_dir() / split / f"{name}.txt"
        if not path.is_file():
            raise CalibrationError(
                f"{path}: the built-in calibration text is missing; reinstall quantkit from its "
                "repository, set QUANTKIT_CALIB_DIR, or pass your own text file")
        texts[name] = read_text_file(path)
    return texts


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


def interleave_rows(*blocks: torch.Tensor) -> torch.Tensor:
    """Rows taken from each block in turn (a0, b0, a1, b1, ...), so any prefix stays mixed."""
    rows = []
    for i in range(max(b.shape[0] for b in blocks)):
        rows += [b[i] for b in blocks if i < b.shape[0]]
    return torch.stack(rows)


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


def calibration_samples(tokenizer, *, calib_file: str | Path | None = None,
                        nsamples: int = 128, seqlen: int = 2048,
                        seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] calibration token ids, the same for the same seed.

    Without `calib_file`: half the rows from the Chinese train split and half from the
    English one (Chinese first when nsamples is odd), interleaved. Each row is a contiguous
    stretch of the token stream of chunks taken in a seeded order, so rows never overlap.
    """
    _check_sizes(nsamples, seqlen)
    if calib_file is not None:
        text = read_text_file(calib_file)
        samples = _windows(tokenizer, text, str(calib_file), nsamples, seqlen, seed)
        log.info("calibration: %d x %d tokens from %s", nsamples, seqlen, calib_file)
        return samples
    texts = load_split("train", "mix")
    counts = {"zh": nsamples - nsamples // 2, "en": nsamples // 2}
    blocks = []
    for offset, lang in enumerate(LANGS):
        if counts[lang]:
            source = str(calib_dir() / "train" / f"{lang}.txt")
            # A different stream per language, both fixed by `seed`.
            blocks.append(_windows(tokenizer, texts[lang], source, counts[lang], seqlen,
                                   seed * len(LANGS) + offset,
                                   longer="pass --calib with a longer file of your own"))
    log.info("calibration: %d x %d tokens, %d Chinese + %d English rows from %s", nsamples,
             seqlen, counts["zh"], counts["en"], calib_dir() / "train")
    return interleave_rows(*blocks)


def heldout_tokens(tokenizer, *, text_file: str | Path | None = None,
                   min_tokens: int = 2) -> dict[str, torch.Tensor]:
    """1-D token streams for perplexity: {"zh", "en"} of the held-out split, or {"text"}.

    The whole text is tokenized in its own order; callers cut it into windows.
    """
    if text_file is not None:
        sources = {"text": (str(text_file), read_text_file(text_file))}
    else:
        texts = load_split("heldout", "mix")
        sources = {lang: (str(calib_dir() / "heldout" / f"{lang}.txt"), texts[lang])
                   for lang in LANGS}
    streams = {}
    for key, (source, text) in sources.items():
        ids = tokenize_chunks(tokenizer, chunk_text(text))
        if len(ids) < min_tokens:
            raise CalibrationError(f"{source}: has {len(ids)} tokens; evaluation needs at "
                                   f"least {min_tokens}; give a longer file")
        streams[key] = torch.tensor(ids, dtype=torch.long)
    return streams
