"""Checks on a model folder before anything in it is loaded: names, config, weight files.

Kept apart from models.py because these are the safety rules (issue 7): a name must not escape its
folder, a pickle checkpoint is refused without being opened, a model needing remote code is refused,
and a safetensors file must be intact. Everything raises ModelError with a one-line message.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelError(Exception):
    """A model cannot be loaded; str(e) is a one-line message for a person."""


def weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle checkpoint files) directly in `folder`."""
    files = [p for p in folder.iterdir() if p.is_file()]
    return ([p for p in files if p.suffix == ".safetensors"],
            [p for p in files if p.suffix in PICKLE_SUFFIXES])


def check_safetensors(path: Path) -> None:
    """Header parses and the data section is exactly as long as the header says (catches truncation)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length beyond end of file")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path.name} is not a valid safetensors file ({exc})") from None
    if 8 + header_len + end != size:
        raise ModelError(f"{path.name} is truncated or corrupted: header promises {8 + header_len + end} "
                         f"bytes, file has {size}")


def read_config(folder: Path):
    """The folder's config, refusing models whose architecture exists only as remote code."""
    from transformers import CONFIG_MAPPING, AutoConfig

    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder} has no config.json, so it is not a Hugging Face model folder")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{folder}/config.json is not valid JSON ({exc})") from None
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        if "auto_map" in raw:
            raise ModelError(f"model type {model_type!r} needs custom Python code from the model repository "
                             "(auto_map); this app never runs remote code (trust_remote_code=False)")
        raise ModelError(f"model type {model_type!r} is not supported by this transformers version")
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for bad configs
        raise ModelError(f"cannot read the config in {folder}: {one_line(exc)}") from None


def one_line(exc: Exception) -> str:
    """The first line of an exception message (library errors can span pages)."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def check_weights(folder: Path) -> None:
    """Safetensors present and intact; a pickle-only checkpoint is refused without being opened."""
    safetensors, pickles = weight_files(folder)
    if not safetensors and pickles:
        names = ", ".join(p.name for p in pickles)
        raise ModelError(f"{folder.name} only has pickle checkpoints ({names}); they can run arbitrary code "
                         "when loaded, so they are refused. Convert the model to safetensors first")
    if not safetensors:
        raise ModelError(f"{folder} has no model weights (*.safetensors)")
    for path in safetensors:
        check_safetensors(path)



def check_name(name: str) -> str:
    """Reject names that try to escape folders; return the kind: default, tiny, local or hub."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError("no model name given")
    name = name.strip()
    if name in ("default", "tiny"):
        return name
    if ".." in Path(name).parts or ".." in name.split("/"):
        raise ModelError(f"refused model id {name!r}: '..' path components are not allowed")
    if Path(name).expanduser().is_dir():
        return "local"
    if Path(name).expanduser().is_file():
        raise ModelError(f"{name!r} is a file; choose the folder that holds its config.json and *.safetensors")
    if name.startswith(("/", "~", ".", "\\")) or ":" in name or "\\" in name:
        raise ModelError(f"no such model folder {name!r}: check the path (typo?)")
    if not _HUB_ID.match(name):
        raise ModelError(f"{name!r} is neither a model folder nor a valid hub id like 'owner/model'")
    return "hub"



def safetensors_params(folder: Path) -> int | None:
    """Parameter count from safetensors headers only (no weights read)."""
    total = 0
    try:
        for path in folder.glob("*.safetensors"):
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            for key, value in header.items():
                if key != "__metadata__":
                    n = 1
                    for dim in value["shape"]:
                        n *= dim
                    total += n
    except (OSError, ValueError, KeyError):
        return None
    return total or None
