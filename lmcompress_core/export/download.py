"""One export as bytes for a download button: load the model, compress it by the settings, write, read back.

Called only when the person clicks (a GGUF of SmolLM2 is ~100–200 MB), from a run's model name and config dict.
"""
from __future__ import annotations

import io
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmcompress_core.export.gguf import export_gguf, gguf_note, gguf_refusal, plan_gguf
from lmcompress_core.export.hf import export_hf

FORMATS = {"gguf": ("GGUF (llama.cpp, Llama models)", "model.gguf", "application/octet-stream"),
           "hf": ("Hugging Face folder (zip)", "model-hf.zip", "application/zip")}


def download_note(config_dict: dict, fmt: str) -> str:
    """What the download will hold, exact vs converted, shown before the button."""
    from lmcompress_core.compress import CompressionConfig

    config = CompressionConfig.from_dict(config_dict)
    if fmt == "gguf":
        return "Llama-architecture models only. " + gguf_note(config)
    return ("De-quantized weights in safetensors with the settings in config.json (key 'lmcompress'): plain "
            "transformers loads it and gives the compressed model's logits; the file is not smaller.")


@dataclass
class Download:
    """One export ready for a download button: the file's bytes and one line saying what it holds."""

    data: bytes
    summary: str


def prepare_download(loaded, config_dict: dict, fmt: str,
                     callback: Callable[[int, int, str], None] | None = None) -> Download:
    """The export of ``loaded`` (a LoadedModel, never mutated) compressed by ``config_dict`` as one file (GGUF, or a
    zip of the Hugging Face folder), with its size and what is quantized; ``callback(done, total, what)`` while
    the copy is compressed and the file written. A setting no GGUF type holds raises ValueError at once."""
    from lmcompress_core.compress import CompressionConfig, compress
    from lmcompress_core.measure.protocol import calibration_for

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    config = CompressionConfig.from_dict(config_dict)
    refusal = gguf_refusal(config) if fmt == "gguf" else None
    if refusal is not None:
        raise ValueError(refusal)
    compressing = None if callback is None else (lambda p: callback(p.step, max(p.total, 1), f"{p.stage}: {p.message}"))
    cm = compress(loaded.model, config, calibration=calibration_for(loaded, config), callback=compressing)
    with tempfile.TemporaryDirectory(prefix="lmcompress-export-") as tmp:
        if fmt == "gguf":
            plan = plan_gguf(cm, loaded.tokenizer, loaded.card.name)
            written = export_gguf(cm, loaded.tokenizer, Path(tmp) / "model.gguf", name=loaded.card.name,
                                  callback=callback, plan=plan)
            return Download(written.path.read_bytes(), plan.summary())
        folder = export_hf(cm, loaded.tokenizer, Path(tmp) / "model").folder
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.iterdir()):
                archive.write(path, f"model/{path.name}")
        data = buffer.getvalue()
        return Download(data, f"{len(data) / 1e6:.1f} MB zip: de-quantized float weights, not smaller than the original")


def download_bytes(loaded, config_dict: dict, fmt: str, callback=None) -> bytes:
    """``prepare_download``'s bytes alone."""
    return prepare_download(loaded, config_dict, fmt, callback).data
