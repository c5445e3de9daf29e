"""Plain English prose from Debian documentation packages, for the bundled
model's training data (see recipes/smollm2-135m/README.md).

- train/: the Python 3.11 documentation (package python3.11-doc) and the
  Linux kernel documentation (package linux-doc-6.1), their
  reStructuredText sources with markup, code blocks and tables dropped;
- heldout/: the kernel's admin guide and the Debian Reference (package
  debian-reference-en), never used in training: the haystack of the needle
  evaluation and the text of the reconstruction evaluation.

Usage: python3 prose.py OUT_DIR
"""

import gzip
import re
import sys
from pathlib import Path

PYDOC = Path("/usr/share/doc/python3.11/html/_sources")
KDOC = Path("/usr/share/doc/linux-doc-6.1/Documentation")
DEBREF = Path("/usr/share/debian-reference/debian-reference.en.txt.gz")
ROLE = re.compile(r":[\w:+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`name <target>` -> name
MARKUP = [(re.compile(r"``([^`]+)``"), r"\1"), (re.compile(r"`([^`<]+?)(?:\s*<[^>]*>)?`_{0,2}"), r"\1"),
          (re.compile(r"\*\*([^*]+)\*\*"), r"\1"), (re.compile(r"(?<!\w)\*([^*\s][^*]*)\*"), r"\1"),
          (re.compile(r"\[\d+\]_"), ""), (re.compile(r"\s+"), " ")]


def prose_paragraphs(text: str, min_words: int = 6):
    """Paragraphs that read as sentences: no directives, indented blocks,
    tables, titles or lists of symbols; inline markup removed."""
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or lines[0].startswith((" ", "\t", "..", "|", "+", "=", "-", "*", ">>>", "#")):
            continue
        if any(re.fullmatch(r"\s*[=\-~^\"'`#*+.:_]{3,}\s*", ln) for ln in lines):  # titles and tables
            continue
        para = ROLE.sub(r"\1", " ".join(ln.strip() for ln in lines))
        for pattern, repl in MARKUP:
            para = pattern.sub(repl, para)
        para = para.strip()
        letters = sum(c.isalpha() or c == " " for c in para)
        if (len(para.split()) >= min_words and letters >= 0.8 * len(para) and para[-1:] in ".:?!)"
                and not para.endswith("::")):
            yield para


def main(out: Path) -> None:
    if not PYDOC.is_dir() or not KDOC.is_dir() or not DEBREF.is_file():
        sys.exit("prose.py: install the documentation first: "
                 "apt-get install python3.11-doc linux-doc-6.1 debian-reference-en")
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    files = words = 0
    sources = [("python", PYDOC, src) for src in sorted(PYDOC.rglob("*.rst.txt"))]
    sources += [("linux", KDOC, src) for src in sorted(KDOC.rglob("*.rst.gz"))
                if src.relative_to(KDOC).parts[0] != "translations"]  # English only
    held: list[str] = []
    for tag, root, src in sources:
        raw = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
        paras = list(prose_paragraphs(raw.decode("utf-8", errors="replace")))
        if sum(len(p.split()) for p in paras) < 150:
            continue
        if tag == "linux" and src.relative_to(root).parts[0] == "admin-guide":
            held += paras
            continue
        name = "-".join((tag, *src.relative_to(root).with_suffix("").with_suffix("").parts)) + ".txt"
        (out / "train" / name).write_text("\n\n".join(paras) + "\n", encoding="utf-8")
        files += 1
        words += sum(len(p.split()) for p in paras)
    ref = gzip.decompress(DEBREF.read_bytes()).decode("utf-8", errors="replace")
    paras = list(prose_paragraphs(ref, min_words=8))
    (out / "heldout" / "debian-reference.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    (out / "heldout" / "linux-admin-guide.txt").write_text("\n\n".join(held) + "\n", encoding="utf-8")
    held_words = sum(len(p.split()) for p in paras + held)
    print(f"prose.py: {files} training files, {words} words; held out {held_words} words")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/smollm2-135m/prose"))
