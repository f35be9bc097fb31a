"""The peers we compare against: torchao and optimum-quanto weight-only quantization.

Each peer gets a deep copy of the same float model and is called through its own documented API
(`torchao.quantization.quantize_`, `optimum.quanto.quantize` + `freeze`), exactly as a user would.
Embeddings and the LM head stay float for the peers, as in our default `CompressionConfig.exclude`.

The peers live in their own folder, PEERS_DIR (`pip install --no-deps --target .venv/bench-peers`), put on
sys.path only by `enable()` when the quality section starts: the app's environment never sees them, and
transformers does not import torchao while the interactivity numbers are taken.
"""
from __future__ import annotations

import copy
import functools
import importlib.metadata
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


PEERS_DIR = Path(__file__).resolve().parent.parent / ".venv" / "bench-peers"
LIBRARIES = {"torchao": "torchao", "optimum-quanto": "optimum.quanto"}


def enable() -> None:
    """Make the peers importable (appended: the venv's own torch and numpy always win)."""
    if PEERS_DIR.is_dir() and str(PEERS_DIR) not in sys.path:
        sys.path.append(str(PEERS_DIR))


def versions() -> dict[str, str | None]:
    """Installed peer versions, read from package metadata without importing them."""
    found = {}
    for dist in importlib.metadata.distributions(path=[str(PEERS_DIR)] + sys.path):
        name = (dist.metadata["Name"] or "").lower()
        if name in LIBRARIES and name not in found:
            found[name] = dist.version
    return {name: found.get(name) for name in LIBRARIES}


@dataclass(frozen=True)
class PeerMethod:
    name: str        # row label in results, e.g. "torchao int4 g128 sym"
    library: str     # "torchao" | "optimum-quanto"
    bits: int
    group_size: int  # -1 = per output channel
    symmetric: bool
    build: Callable[[torch.nn.Module], None]   # quantizes the model in place


def _not_lm_head(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and "lm_head" not in fqn


def _torchao(config_factory):
    def build(model):
        from torchao.quantization import quantize_

        quantize_(model, config_factory(), filter_fn=_not_lm_head)
    return build


def _torchao_intx(bits: int, group_size: int, symmetric: bool):
    def factory():
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis, PerGroup
        from torchao.quantization.quant_primitives import MappingType

        granularity = PerGroup(group_size) if group_size > 0 else PerAxis(0)
        mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=granularity,
                                    mapping_type=mapping)
    return _torchao(factory)


def _torchao_int8():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _quanto(weights: str):
    def build(model):
        from optimum import quanto

        quanto.quantize(model, weights=getattr(quanto, weights), exclude=["lm_head"])
        quanto.freeze(model)
        model.forward = _outside_inference_mode(model.forward)
    return build


def peer_methods() -> list[PeerMethod]:
    """The peer rows of the quality table.

    torchao needs the group size to divide every layer's input width: SmolLM2's 576 is not a multiple of 128,
    so torchao runs at groups of 64 (the g128 row records its refusal). optimum-quanto picks its qint4 group
    itself: 128, or the next multiple of 32 below that divides the width (96 for 576); its qint8 is symmetric
    per output channel, like torchao's Int8WeightOnlyConfig.
    """
    return [
        PeerMethod("torchao int8 weight-only (per-channel)", "torchao", 8, -1, True, _torchao(_torchao_int8)),
        PeerMethod("torchao int4 g128 asym", "torchao", 4, 128, False, _torchao_intx(4, 128, False)),
        PeerMethod("torchao int4 g64 asym", "torchao", 4, 64, False, _torchao_intx(4, 64, False)),
        PeerMethod("torchao int4 g64 sym", "torchao", 4, 64, True, _torchao_intx(4, 64, True)),
        PeerMethod("torchao int4 per-channel sym", "torchao", 4, -1, True, _torchao_intx(4, -1, True)),
        PeerMethod("torchao int3 g64 asym", "torchao", 3, 64, False, _torchao_intx(3, 64, False)),
        PeerMethod("quanto qint8 (per-channel)", "optimum-quanto", 8, -1, True, _quanto("qint8")),
        PeerMethod("quanto qint4 g128 (g96 on 576-wide inputs)", "optimum-quanto", 4, 128, False, _quanto("qint4")),
    ]


def _outside_inference_mode(forward):
    """optimum-quanto's qint4 matmul fails under torch.inference_mode ("Cannot set version_counter for
    inference tensor"), which measure.perplexity uses; the same forward under no_grad computes the same values."""
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return forward(*args, **kwargs)
    return wrapped


def quantize_with_peer(model: torch.nn.Module, method: PeerMethod) -> tuple[torch.nn.Module, float]:
    """A quantized deep copy of `model` and the seconds the peer's own quantization call took."""
    copied = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        method.build(copied)
        seconds = time.perf_counter() - start
    return copied.eval(), seconds


def available() -> dict[str, str | None]:
    """Peer library versions, or the import error that keeps one out of this run."""
    enable()
    out = {}
    logging.getLogger("torchao").setLevel(logging.ERROR)
    for library, module in LIBRARIES.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                __import__(module)
            out[library] = None
        except Exception as exc:  # a broken peer must not stop the rest of the bench
            out[library] = f"{type(exc).__name__}: {exc}"
    return out
