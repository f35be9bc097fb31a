"""Evaluation and calibration texts (shipped in assets/texts/, licences in LICENSES.md) and their token batches.

Texts by name:
  "tiny-train"   Shakespeare's works minus two plays: the tiny model's training text (public domain)
  "tiny-heldout" Macbeth and Twelfth Night, never trained on: the tiny model's evaluation text
  "web"          World English Bible (Genesis, Ruth, Mark, Acts; public domain): modern English for SmolLM2
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import torch

TEXTS_DIR = Path(__file__).resolve().parent.parent / "assets" / "texts"
TEXT_FILES = {
    "tiny-train": "tiny-train.txt.gz",
    "tiny-heldout": "tiny-heldout.txt",
    "web": "web.txt",
}


def text_names() -> list[str]:
    """The names `load_text` accepts."""
    return list(TEXT_FILES)


@lru_cache(maxsize=None)
def load_text(name: str) -> str:
    """The shipped text called `name` (see the module docstring); ValueError names the valid choices."""
    if name not in TEXT_FILES:
        raise ValueError(f"unknown text {name!r}; choose one of {', '.join(TEXT_FILES)}")
    path = TEXTS_DIR / TEXT_FILES[name]
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes()).decode("utf-8")
    return path.read_text(encoding="utf-8")


def default_text_for(model_name: str) -> str:
    """The text a model is evaluated on: its own held-out plays for the tiny model, modern English otherwise."""
    return "tiny-heldout" if model_name == "tiny" else "web"


def token_ids(tokenizer, text: str) -> torch.LongTensor:
    """The whole text as one 1-D tensor of token ids, without special tokens (no BOS per chunk).

    Tokenized once per (tokenizer, text): every evaluation of a model reads the same text, and tokenizing it
    costs more than scoring a short protocol (a fresh copy each call, so a caller may change it freely)."""
    return _token_ids(tokenizer, text).clone()


@lru_cache(maxsize=8)
def _token_ids(tokenizer, text: str) -> torch.LongTensor:
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(tokenizer, text: str, n_samples: int = 16, seq_len: int = 256,
                        seed: int = 0) -> torch.LongTensor:
    """`n_samples` windows of `seq_len` tokens at seeded random offsets of `text`: [n_samples, seq_len].

    A text shorter than one window is repeated so calibration always gets full-length rows.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError("n_samples and seq_len must be at least 1")
    ids = token_ids(tokenizer, text)
    if ids.numel() == 0:
        raise ValueError("the calibration text is empty after tokenization")
    if ids.numel() <= seq_len:
        ids = ids.repeat(seq_len // ids.numel() + 2)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
