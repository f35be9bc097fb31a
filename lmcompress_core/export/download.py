"""One export as bytes for a download button: load the model, compress it by the settings, write, read back.

Called only when the person clicks (a GGUF of SmolLM2 is ~100–200 MB), from a run's model name and config dict.
"""
from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

from lmcompress_core.export.gguf import export_gguf, gguf_note, gguf_refusal
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


def download_bytes(loaded, config_dict: dict, fmt: str, callback=None) -> bytes:
    """The export of ``loaded`` (a LoadedModel, never mutated) compressed by ``config_dict`` as the bytes of one
    file (GGUF, or a zip of the Hugging Face folder); ``callback(bytes_done, bytes_total, tensor)`` while a GGUF
    file is written. A setting no GGUF type holds raises ValueError before anything is compressed."""
    from lmcompress_core.compress import CompressionConfig, compress
    from lmcompress_core.measure.protocol import calibration_for

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    config = CompressionConfig.from_dict(config_dict)
    refusal = gguf_refusal(config) if fmt == "gguf" else None
    if refusal is not None:
        raise ValueError(refusal)
    cm = compress(loaded.model, config, calibration=calibration_for(loaded, config))
    with tempfile.TemporaryDirectory(prefix="lmcompress-export-") as tmp:
        if fmt == "gguf":
            return export_gguf(cm, loaded.tokenizer, Path(tmp) / "model.gguf", name=loaded.card.name,
                               callback=callback).path.read_bytes()
        folder = export_hf(cm, loaded.tokenizer, Path(tmp) / "model").folder
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.iterdir()):
                archive.write(path, f"model/{path.name}")
        return buffer.getvalue()
