"""Chat-formatted calibration: reading pairs, turn boundaries, packing, the report, the CLI."""

from __future__ import annotations

import hashlib
import json
import random
import shutil

import pytest

from quantkit import chat_calib, data
from quantkit.chat_calib import Conversation, Unit, pack_units
from quantkit.errors import CalibrationError
from quantkit.fixtures import build_tokenizer
from quantkit.loading import load_tokenizer
from quantkit.recipe import RecipeError, load_recipe
from tests.helpers import assert_one_line_error, run_cli

# Each turn renders as "<|role|>\ncontent</s>\n" after one <s>: the rendering of the first
# k messages is a prefix of the whole one, as with ChatML, Llama-3 or Qwen templates.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
            "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
            "{% endif %}")

CONV = Conversation((
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "什么是量化？"},
    {"role": "assistant", "content": "把权重存成更少的位数。"},
    {"role": "user", "content": "And in English?"},
), lang="zh", source="test")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture
def chat_model(tmp_path, tiny_model):
    """The tiny llama checkpoint with TEMPLATE as its tokenizer's chat template."""
    dest = tmp_path / "chat-model"
    shutil.copytree(tiny_model("llama"), dest)
    tokenizer = load_tokenizer(dest)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(dest)
    return dest


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


# ----------------------------------------------------------------------------- reading


def test_messages_and_alpaca_records(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"instruction": "Translate", "input": "你好", "output": "Hello", "system": "Be exact."},
        {"instruction": "Say hi", "output": "hi", "input": ""},
    ])
    convs = chat_calib.read_conversations(path, source="mine")
    assert [c.messages for c in convs] == [
        ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}),
        ({"role": "system", "content": "Be exact."},
         {"role": "user", "content": "Translate\n\n你好"},
         {"role": "assistant", "content": "Hello"}),
        ({"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}),
    ]
    assert {c.source for c in convs} == {"mine"}
    assert chat_calib.is_chat_jsonl(path)
    assert not chat_calib.is_chat_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}]))


@pytest.mark.parametrize("line, fragment", [
    ('{"prompt": "x", "output": "y"}', 'neither "messages" nor "instruction"'),
    ('{"messages": [{"role": "user"}]}', '"messages" must be a non-empty list'),
    ('{"messages": []}', '"messages" must be a non-empty list'),
    ("[1, 2]", "not a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_records_name_file_and_line(tmp_path, line, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n' + line + "\n", "utf-8")
    with pytest.raises(CalibrationError) as err:
        chat_calib.read_conversations(path)
    assert str(err.value).startswith(f"{path}:2:") and fragment in str(err.value)


def test_wrong_kind_of_file(tmp_path):
    txt = tmp_path / "plain.txt"
    txt.write_text("some prose\n", "utf-8")
    with pytest.raises(CalibrationError, match="chat calibration needs a .jsonl file"):
        chat_calib.read_conversations(txt)
    with pytest.raises(CalibrationError, match="is empty"):
        chat_calib.read_conversations(write_jsonl(tmp_path / "e.jsonl", []))
    with pytest.raises(CalibrationError, match="does not exist"):
        chat_calib.read_conversations(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- templating


def test_turns_join_to_the_template_rendering(chat_tok):
    pieces = chat_calib.turn_texts(chat_tok, CONV)
    assert "".join(pieces) == chat_tok.apply_chat_template(list(CONV.messages), tokenize=False)
    assert len(pieces) == 4
    assert pieces[0] == "<s><|system|>\nYou are brief.</s>\n"
    assert [p.split("|>")[0] for p in pieces[1:]] == ["<|user", "<|assistant", "<|user"]
    (unit,) = chat_calib.tokenize_conversations(chat_tok, [CONV])
    assert len(unit.turns) == 4 and unit.turns[0][0] == chat_tok.bos_token_id
    assert chat_tok.decode([t for turn in unit.turns for t in turn]) == "".join(pieces)


def test_a_template_that_rewrites_earlier_turns_gives_one_piece(chat_tok):
    tokenizer = build_tokenizer()
    # Numbers each message with the conversation's length: prefixes render differently.
    tokenizer.chat_template = ("{% for m in messages %}[{{ messages|length }}]{{ m['content'] }}"
                               "\n{% endfor %}")
    pieces = chat_calib.turn_texts(tokenizer, CONV)
    assert pieces == [tokenizer.apply_chat_template(list(CONV.messages), tokenize=False)]


def test_no_chat_template_is_a_clear_error(tok):
    assert not chat_calib.has_chat_template(tok)
    for call in (lambda: data.build_calibration(tok, fmt="chat", nsamples=2, seqlen=16),
                 lambda: data.build_calibration(tok, fmt="mixed", nsamples=2, seqlen=16),
                 lambda: data.heldout_tokens(tok, text_format="chat")):
        with pytest.raises(CalibrationError) as err:
            call()
        assert "has no chat_template" in str(err.value) and "text" in str(err.value)


# ----------------------------------------------------------------------------- packing


def numbered_units(sizes: list[list[int]]) -> list[Unit]:
    """Units whose tokens are all different: conversation c, turn t, position i."""
    return [Unit([[c * 10_000 + t * 100 + i for i in range(n)] for t, n in enumerate(turns)],
                 "en", f"c{c}") for c, turns in enumerate(sizes)]


def test_whole_conversations_fill_rows_exactly():
    units = numbered_units([[4, 4, 4]] * 6)
    packed = pack_units(units, 3, 24)
    assert packed.cut_turns == 0
    flat = [t for u in units for turn in u.turns for t in turn]
    assert packed.ids.flatten().tolist() == flat
    assert packed.pieces == [[("en", "c0", 12), ("en", "c1", 12)],
                             [("en", "c2", 12), ("en", "c3", 12)],
                             [("en", "c4", 12), ("en", "c5", 12)]]


def test_a_later_conversation_that_fits_comes_before_cutting():
    units = numbered_units([[5, 5], [5, 5], [6], [10], [16]])
    packed = pack_units(units, 3, 16)
    flat = [[t for turn in u.turns for t in turn] for u in units]
    rows = packed.ids.tolist()
    # row 0: conversation 0 (10 tokens); 1 does not fit the 6 left, 2 (6 tokens) does
    assert rows[0] == flat[0] + flat[2]
    # row 1: conversation 1; nothing whole fits the 6 left, so 3's only turn is cut
    assert rows[1] == flat[1] + flat[3][:6]
    assert rows[2] == flat[4]
    assert packed.cut_turns == 1


def test_turns_are_cut_only_to_fill_a_row():
    units = numbered_units([[3, 7], [7, 7], [7, 7], [7, 7]])
    packed = pack_units(units, 2, 12)
    # row 0: conversation 0 (10), 2 tokens left, no turn is that short: one cut.
    assert packed.ids[0].tolist()[:10] == [t for turn in units[0].turns for t in turn]
    assert packed.ids[0].tolist()[10:] == units[1].turns[0][:2]
    assert packed.cut_turns == 2  # one per row at most
    assert packed.pieces[0] == [("en", "c0", 10), ("en", "c1", 2)]


def test_a_turn_longer_than_a_row_is_cut_and_running_out_is_an_error():
    units = numbered_units([[40]])
    packed = pack_units(units, 1, 16)
    assert packed.ids[0].tolist() == units[0].turns[0][:16] and packed.cut_turns == 1
    with pytest.raises(ValueError, match="cannot fill 4 x 16"):
        pack_units(numbered_units([[10], [10]]), 4, 16)


def test_packing_invariants_on_random_sizes():
    rng = random.Random(0)
    sizes = [[rng.randint(1, 60) for _ in range(rng.randint(1, 5))] for _ in range(300)]
    units = numbered_units(sizes)
    packed = pack_units(units, 20, 128)
    tokens = packed.ids.flatten().tolist()
    assert len(tokens) == len(set(tokens)) == 20 * 128  # nothing repeated
    assert packed.cut_turns <= 20
    for row, pieces in zip(packed.ids.tolist(), packed.pieces, strict=True):
        assert sum(n for _, _, n in pieces) == 128
        # within a row, each conversation's tokens keep their order
        by_conv: dict[int, list[int]] = {}
        for t in row:
            by_conv.setdefault(t // 10_000, []).append(t)
        assert all(v == sorted(v) for v in by_conv.values())


# ----------------------------------------------------------------------------- built-in rows


def test_builtin_chat_rows_report_and_seed(chat_tok):
    calib = data.build_calibration(chat_tok, fmt="chat", nsamples=8, seqlen=256, seed=0)
    assert calib.ids.shape == (8, 256)
    decoded = [chat_tok.decode(r) for r in calib.ids]
    assert all("<|user|>" in d or "<|assistant|>" in d for d in decoded)
    assert [data.detect_lang(d) for d in decoded] == ["zh", "en"] * 4
    report = calib.report
    assert report["format"] == "chat" and report["rows"] == 8 and report["tokens"] == 2048
    assert report["by_language"] == {"en": {"rows": 4, "tokens": 1024},
                                     "zh": {"rows": 4, "tokens": 1024}}
    assert sum(s["tokens"] for s in report["by_source"].values()) == 2048
    assert sum(s["rows"] for s in report["by_source"].values()) == 8
    assert all(k.startswith("chat.jsonl:") for k in report["by_source"])
    assert report["sha256"] == hashlib.sha256(calib.ids.numpy().astype("<i8").tobytes()
                                              ).hexdigest()
    assert 0 <= report["cut_turns"] <= 8
    text = "".join(chat_tok.batch_decode(calib.ids, skip_special_tokens=True))
    cjk = len(data.CJK.findall(text)) / sum(not c.isspace() for c in text)
    assert report["cjk_share"] == round(cjk, 4) and 0.1 < cjk < 0.9
    again = data.build_calibration(chat_tok, fmt="chat", nsamples=8, seqlen=256, seed=0)
    other = data.build_calibration(chat_tok, fmt="chat", nsamples=8, seqlen=256, seed=1)
    assert again.report["sha256"] == report["sha256"] != other.report["sha256"]


def test_mixed_is_half_chat_half_prose(chat_tok):
    calib = data.build_calibration(chat_tok, fmt="mixed", nsamples=8, seqlen=128)
    sources = calib.report["by_source"]
    chat_tokens = sum(v["tokens"] for k, v in sources.items() if k.startswith("chat.jsonl:"))
    assert chat_tokens == 4 * 128
    assert {k: v for k, v in sources.items() if not k.startswith("chat.jsonl:")} == {
        name: {"rows": 1, "tokens": 128}
        for name in ("zh-modern.txt", "en-modern.txt", "zh.txt", "en.txt")}
    assert calib.report["by_language"]["zh"] == {"rows": 4, "tokens": 512}


def test_auto_format(tmp_path, tok, chat_tok):
    assert data.resolve_format("auto", tok) == "text"
    assert data.resolve_format("auto", chat_tok) == data.AUTO_CHAT_FORMAT
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "a", "output": "b"}])
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    assert data.resolve_format("auto", chat_tok, pairs) == "chat"
    assert data.resolve_format("auto", chat_tok, texts) == "text"
    with pytest.raises(CalibrationError, match="with --calib FILE choose text or chat"):
        data.resolve_format("mixed", chat_tok, pairs)
    with pytest.raises(CalibrationError, match="holds conversations"):
        data.build_calibration(chat_tok, fmt="text", calib_file=pairs, nsamples=1, seqlen=4)


def test_user_pairs_file(tmp_path, chat_tok):
    records = [{"instruction": f"第{i}个问题：今天天气怎么样？", "output": "晴天，适合出门散步。"}
               for i in range(40)]
    records += [{"messages": [{"role": "user", "content": f"Question {i}: how are you?"},
                              {"role": "assistant", "content": "Fine, thank you."}]}
                for i in range(40)]
    path = write_jsonl(tmp_path / "mine.jsonl", records)
    calib = data.build_calibration(chat_tok, fmt="auto", calib_file=path, nsamples=4,
                                   seqlen=64)
    assert calib.report["format"] == "chat" and calib.report["source"] == str(path)
    assert set(calib.report["by_source"]) == {"mine.jsonl"}
    assert set(calib.report["by_language"]) == {"zh", "en"}
    with pytest.raises(CalibrationError, match="its conversations have .* tokens"):
        data.build_calibration(chat_tok, fmt="chat", calib_file=path, nsamples=64, seqlen=256)


def test_heldout_chat_streams_share_no_message_with_train(chat_tok):
    streams = data.heldout_tokens(chat_tok, text_format="chat")
    assert set(streams) == {"zh-chat", "en-chat"}
    for key, ids in streams.items():
        text = chat_tok.decode(ids)
        assert text.startswith("<s><|system|>") or text.startswith("<s><|user|>"), key
        assert data.detect_lang(text) == key[:2]
    train = {m["content"] for lang in data.LANGS
             for c in data.builtin_conversations("train", lang) for m in c.messages}
    heldout = [m["content"] for lang in data.LANGS
               for c in data.builtin_conversations("heldout", lang) for m in c.messages]
    assert len(heldout) > 100 and not set(heldout) & train
    train_paragraphs = {p for t in train for p in t.split("\n\n")}
    assert not {p for t in heldout for p in t.split("\n\n")} & train_paragraphs


# ----------------------------------------------------------------------------- CLI, recipes


def test_gptq_chat_calibration_is_recorded(tmp_path, capsys, chat_model):
    out = tmp_path / "gptq"
    result = run_cli(capsys, "gptq", chat_model, "--out", out, "--device", "cpu",
                     "--calib-format", "chat", "--nsamples", 4, "--seqlen", 64)
    assert result.code == 0, result.err
    report = json.loads((out / "quantkit.json").read_text())["gptq"]["calibration"]["report"]
    expected = data.build_calibration(load_tokenizer(chat_model), fmt="chat", nsamples=4,
                                      seqlen=64).report
    assert report == expected
    assert any(line.startswith("INFO quantkit.data: calibration (chat") and
               report["sha256"] in line for line in result.err.splitlines())


def test_gptq_user_pairs_and_missing_template(tmp_path, capsys, chat_model, tiny_model):
    pairs = write_jsonl(tmp_path / "pairs.jsonl",
                        [{"instruction": f"Question {i}?", "output": "An answer."}
                         for i in range(60)])
    result = run_cli(capsys, "gptq", chat_model, "--out", tmp_path / "a", "--device", "cpu",
                     "--calib", pairs, "--nsamples", 2, "--seqlen", 64)
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "a" / "quantkit.json").read_text())["gptq"]["calibration"]
    assert report["file"] == str(pairs) and report["report"]["format"] == "chat"
    result = run_cli(capsys, "gptq", tiny_model("llama"), "--out", tmp_path / "b", "--device",
                     "cpu", "--calib-format", "chat", "--nsamples", 2, "--seqlen", 64)
    assert_one_line_error(result, "has no chat_template", "--calib-format text")
    assert not (tmp_path / "b").exists()


def test_eval_text_format_chat(tmp_path, capsys, chat_model):
    out = tmp_path / "eval.json"
    result = run_cli(capsys, "eval", chat_model, "--out", out, "--tasks", "ppl",
                     "--text-format", "chat", "--seqlen", 64, "--max-tokens", 256,
                     "--device", "cpu")
    assert result.code == 0, result.err
    saved = json.loads(out.read_text())
    assert set(saved["results"]["ppl"]) == {"zh-chat", "en-chat"}
    assert saved["settings"]["text_format"] == "chat"
    # 256 tokens of each stream: 4 windows of 64, each scoring its last 63 tokens
    assert all(r["windows"] == 4 and r["tokens"] == 4 * 63 and r["ppl"] > 1
               for r in saved["results"]["ppl"].values())


def test_recipes_take_calib_format(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: m\nsteps:\n  - step: gptq\n    calib_format: chat\n")
    assert load_recipe(path).steps[0].settings == {"calib_format": "chat"}
    path.write_text("model: m\nsteps:\n  - step: gptq\n    calib_format: chatty\n")
    with pytest.raises(RecipeError, match="calib_format: 'chatty' is not one of"):
        load_recipe(path)
