"""quantkit.data: built-in splits, calibration windows, held-out streams and their errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from quantkit import data
from quantkit.errors import CalibrationError
from quantkit.fixtures import build_tokenizer

CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


class CountingTokenizer:
    """The real fixture tokenizer, counting how many characters it was asked to encode."""

    def __init__(self, inner):
        self.inner, self.chars = inner, 0

    def __call__(self, texts, **kwargs):
        self.chars += sum(len(t) for t in texts)
        return self.inner(texts, **kwargs)

    def __getattr__(self, name):  # decoding (the calibration report) is not counted
        return getattr(self.inner, name)


def numbered_text(lines: int) -> str:
    return "".join(f"line {i:05d} says the quick brown fox jumps over the lazy dog\n"
                   for i in range(lines))


def complete_lines(decoded: str) -> list[str]:
    """Lines a window holds whole: the first and last pieces may be cut mid-line."""
    return decoded.split("\n")[1:-1]


def script_of(decoded: str) -> str:
    return data.detect_lang(decoded)


# ----------------------------------------------------------------------------- built-in splits


def test_splits_exist_and_held_out_is_about_a_tenth():
    for lang in data.LANGS:
        train = data.load_split("train", lang)[lang]
        heldout = data.load_split("heldout", lang)[lang]
        assert 0.05 < len(heldout) / (len(train) + len(heldout)) < 0.2, lang
    mix = data.load_split("train")
    assert set(mix) == {"zh", "en"}
    assert len(CJK.findall(mix["zh"][:2000])) > 500
    assert not CJK.search(mix["en"])


def test_train_and_heldout_share_no_paragraph():
    for lang in data.LANGS:
        train = {p for p in data.load_split("train", lang)[lang].splitlines() if p.strip()}
        heldout = {p for p in data.load_split("heldout", lang)[lang].splitlines() if p.strip()}
        assert len(train) > 1000 and len(heldout) > 100, lang
        assert not train & heldout, (lang, sorted(train & heldout)[:3])


def test_split_and_language_names_are_checked():
    with pytest.raises(CalibrationError, match="split 'test'"):
        data.load_split("test")
    with pytest.raises(CalibrationError, match="language 'fr'"):
        data.load_split("train", "fr")


def test_calib_dir_override_and_missing_split(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("QUANTKIT_CALIB_DIR", str(tmp_path))
    with pytest.raises(CalibrationError, match=re.escape(str(tmp_path / "train" / "zh-"))):
        data.calibration_samples(tok, nsamples=2, seqlen=16)
    (tmp_path / "train").mkdir()
    texts = {"zh": "天下大势，分久必合，合久必分。\n" * 50, "en": numbered_text(50),
             "zh-modern": "软件包管理系统会自动安装依赖关系。\n" * 50,
             "en-modern": "The package manager installs dependencies for you.\n" * 50}
    for name, text in texts.items():
        (tmp_path / "train" / f"{name}.txt").write_text(text, "utf-8")
    rows = data.calibration_samples(tok, nsamples=4, seqlen=64)
    # modern zh, modern en, classic zh, classic en: languages alternate
    for row, name in zip(rows, ("zh-modern", "en-modern", "zh", "en"), strict=True):
        assert tok.decode(row).strip("\ufffd") in texts[name]
    have = len(tok(texts["zh-modern"], add_special_tokens=False)["input_ids"])
    with pytest.raises(CalibrationError) as err:
        data.calibration_samples(tok, nsamples=2, seqlen=5000)
    assert str(err.value) == (f"{tmp_path / 'train' / 'zh-modern.txt'}: has {have} tokens; "
                              "--nsamples 1 x --seqlen 5000 needs 5000; lower them or pass "
                              "--calib with a longer file of your own")


def test_modern_splits_exist_and_share_no_paragraph_with_any_train_text():
    for lang in data.LANGS:
        train = data.read_text_file(data.prose_path("train", lang, "modern"))
        heldout = data.read_text_file(data.prose_path("heldout", lang, "modern"))
        assert 0.03 < len(heldout) / (len(train) + len(heldout)) < 0.2, lang
        assert len(train) > 150_000, lang
        share = len(CJK.findall(train)) / sum(c.isalpha() for c in train)
        assert (share > 0.5) if lang == "zh" else (share == 0), (lang, share)
        all_train = set(train.splitlines()) | set(data.load_split("train", lang)[lang]
                                                   .splitlines())
        assert not (set(heldout.splitlines()) - {""}) & all_train, lang


# ----------------------------------------------------------------------------- pure helpers


def test_chunk_text_cuts_at_line_ends_and_keeps_everything():
    text = numbered_text(300)
    chunks = data.chunk_text(text, max_chars=1000)
    assert "".join(chunks) == text
    assert all(c.endswith("\n") for c in chunks)
    line = len(text.splitlines(keepends=True)[0])
    lines_per_chunk = -(-1000 // line)  # a chunk closes at the first line end past 1000
    assert len(chunks) == -(-300 // lines_per_chunk)
    assert all(len(c) < 1000 + line for c in chunks)
    assert data.chunk_text("no newline at the end") == ["no newline at the end\n"]
    assert data.chunk_text("\n \n\t\n") == []


def test_pack_windows_and_interleave():
    rows = data.pack_windows(list(range(100)), 3, 10)
    assert rows.dtype == torch.long and rows.shape == (3, 10)
    assert rows[2].tolist() == list(range(20, 30))
    with pytest.raises(ValueError):
        data.pack_windows(list(range(29)), 3, 10)
    a, b = torch.zeros(3, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long)
    assert data.interleave_rows(a, b)[:, 0].tolist() == [0, 1, 0, 1, 0]


def test_seeded_order_is_a_seed_fixed_permutation():
    assert sorted(data.seeded_order(50, 3)) == list(range(50))
    assert data.seeded_order(50, 3) == data.seeded_order(50, 3)
    assert data.seeded_order(50, 3) != data.seeded_order(50, 4)


# ----------------------------------------------------------------------------- calibration


def test_default_calibration_shape_seed_and_language_mix(tok):
    rows = data.calibration_samples(tok, nsamples=10, seqlen=128, seed=0)
    assert rows.shape == (10, 128) and rows.dtype == torch.long
    assert torch.equal(rows, data.calibration_samples(tok, nsamples=10, seqlen=128, seed=0))
    other = data.calibration_samples(tok, nsamples=10, seqlen=128, seed=1)
    assert not torch.equal(rows, other)
    scripts = [script_of(tok.decode(r)) for r in rows]
    assert scripts == ["zh", "en"] * 5
    odd = data.calibration_samples(tok, nsamples=5, seqlen=64)
    assert [script_of(tok.decode(r)) for r in odd] == ["zh", "en", "zh", "en", "zh"]
    assert tok.bos_token_id not in rows


def test_default_windows_come_from_the_train_text(tok):
    texts = {lang: text + data.read_text_file(data.prose_path("train", lang, "modern"))
             for lang, text in data.load_split("train").items()}
    heldout = {lang: (set(text.splitlines()) | set(data.read_text_file(
        data.prose_path("heldout", lang, "modern")).splitlines())) - {""}
        for lang, text in data.load_split("heldout").items()}
    rows = data.calibration_samples(tok, nsamples=6, seqlen=512, seed=7)
    for i, row in enumerate(rows):
        lang = "zh" if i % 2 == 0 else "en"
        # Pieces between newlines are (parts of) source lines; the ends may be cut mid-character.
        pieces = [p.strip("\ufffd") for p in tok.decode(row).split("\n")]
        assert max(len(p) for p in pieces) > 20
        for piece in pieces:
            assert piece in texts[lang], piece[:80]
        assert not set(complete_lines(tok.decode(row))) & heldout[lang]


def test_windows_never_overlap(tmp_path, tok):
    path = tmp_path / "mine.txt"
    path.write_text(numbered_text(4000), "utf-8")
    rows = data.calibration_samples(tok, calib_file=path, nsamples=16, seqlen=256, seed=3)
    seen = [line for r in rows for line in complete_lines(tok.decode(r))]
    assert len(seen) > 16 * 5
    assert len(seen) == len(set(seen))
    assert all(line in path.read_text("utf-8").splitlines() for line in seen)


def test_only_the_text_needed_is_tokenized(tok):
    counting = CountingTokenizer(tok)
    rows = data.calibration_samples(counting, nsamples=8, seqlen=256)
    total = sum(len(t) for t in data.load_split("train").values())
    assert rows.shape == (8, 256)
    assert 0 < counting.chars < 0.05 * total


def test_user_txt_and_jsonl(tmp_path, tok):
    txt = tmp_path / "mine.txt"
    txt.write_text(numbered_text(400), "utf-8")
    rows = data.calibration_samples(tok, calib_file=txt, nsamples=4, seqlen=128)
    assert rows.shape == (4, 128)
    assert all(not CJK.search(tok.decode(r)) for r in rows)

    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"记录 {i}：滚滚长江东逝水，浪花淘尽英雄。"},
                                        ensure_ascii=False) + "\n" for i in range(300)), "utf-8")
    rows = data.calibration_samples(tok, calib_file=jsonl, nsamples=4, seqlen=128, seed=2)
    for r in rows:
        for line in complete_lines(tok.decode(r)):
            assert line == "" or re.fullmatch(r"记录 \d+：滚滚长江东逝水，浪花淘尽英雄。", line)


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"),
    ("", "is empty"),
    (" \n\n\t\n", "is empty"),
])
def test_missing_or_empty_file(tmp_path, tok, content, fragment):
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_text(content, "utf-8")
    for call in (lambda: data.calibration_samples(tok, calib_file=path),
                 lambda: data.heldout_tokens(tok, text_file=path)):
        with pytest.raises(CalibrationError) as err:
            call()
        message = str(err.value)
        assert str(path) in message and fragment in message and "\n" not in message


def test_short_file_names_token_counts(tmp_path, tok):
    path = tmp_path / "short.txt"
    text = numbered_text(20)
    path.write_text(text, "utf-8")
    have = len(tok(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(CalibrationError) as err:
        data.calibration_samples(tok, calib_file=path, nsamples=128, seqlen=2048)
    assert str(err.value) == (f"{path}: has {have} tokens; --nsamples 128 x --seqlen 2048 "
                              f"needs {128 * 2048}; lower them or give a longer file")
    fits = data.calibration_samples(tok, calib_file=path, nsamples=2, seqlen=have // 2)
    assert fits.shape == (2, have // 2)


def test_bad_jsonl_and_non_utf8(tmp_path, tok):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"body": "no text field"}\n', "utf-8")
    with pytest.raises(CalibrationError, match=re.escape(f"{jsonl}:2: not a JSON object")):
        data.calibration_samples(tok, calib_file=jsonl, nsamples=1, seqlen=4)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(CalibrationError, match="is not UTF-8"):
        data.calibration_samples(tok, calib_file=latin1, nsamples=1, seqlen=4)
    with pytest.raises(CalibrationError, match="--nsamples 0"):
        data.calibration_samples(tok, nsamples=0, seqlen=4)


# ----------------------------------------------------------------------------- held-out


def test_heldout_streams_follow_the_text(tok):
    streams = data.heldout_tokens(tok)
    texts = data.load_split("heldout")
    assert set(streams) == {"zh", "en"}
    for lang, ids in streams.items():
        assert ids.dim() == 1 and ids.dtype == torch.long
        # Byte-level BPE: about one token for every 1-3 bytes, never more tokens than bytes.
        assert len(texts[lang]) // 4 < ids.numel() <= len(texts[lang].encode("utf-8"))
        assert texts[lang].startswith(tok.decode(ids[:200]).rstrip("\ufffd"))
        assert tok.bos_token_id not in ids


def test_heldout_user_file(tmp_path, tok):
    path = tmp_path / "eval.txt"
    text = numbered_text(30)
    path.write_text(text, "utf-8")
    streams = data.heldout_tokens(tok, text_file=path)
    assert list(streams) == ["text"]
    assert tok.decode(streams["text"]) == text
    with pytest.raises(CalibrationError, match=rf"has {streams['text'].numel()} tokens"):
        data.heldout_tokens(tok, text_file=path, min_tokens=10**6)
