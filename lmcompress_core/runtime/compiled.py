"""The decode step compiled by torch.compile (inductor): one graph per layout, built in the background.

``runtime.decode.token_step`` has static shapes (a cache of ``STEP_CAPACITY`` positions, the position a tensor), so
inductor compiles it once (``fullgraph=True, dynamic=False``) into fused C++ kernels around torch's int4pack and
int8pack calls. The weights, codes and scales are read off the Decoder, so they are graph inputs, not constants:
another model of the same layout (kernel per layer, shapes) runs the same graph, and the compiled artefacts sit in
a disk cache (``$TORCHINDUCTOR_CACHE_DIR``, by default ~/.cache/lmcompress/inductor): a cold compile of SmolLM2
takes about a minute on 2 cores, a warm one seconds.

Nothing ever waits for it (``mode="background"``): the first run of a layout starts a thread that waits
``BACKGROUND_DELAY_S`` and then compiles at the lowest CPU priority, while the runs go on eager; later runs take
the compiled step once it is ready. The delay keeps the compilation off a cold start's first charts: dynamo
traces in Python, under the interpreter lock the page's own work needs, which no CPU priority lowers (the
browser cold start measured 26.9 s with the compilation beside it, 15.7 s without). Models small enough to
run on one thread (the tiny model) are not compiled in the background: eager they take a few ms a token.
``"wait"`` compiles before returning (benchmarks, the CLI), ``"off"`` never compiles (the tests).
``$LMCOMPRESS_COMPILE`` sets the default.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lmcompress_core.runtime import threads
from lmcompress_core.runtime.decode import STEP_CAPACITY, Decoder, decoder_for, token_step
from lmcompress_core.runtime.kernels import Int4Linear, Int4PlanesLinear, Int8Embedding, Int8Linear

MODES = ("background", "wait", "off")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "lmcompress" / "inductor"))

# the plain attributes the modules' forward passes read (others, like a layer's bit-width, never enter the graph:
# 3-bit codes run in the int4 container through the same graph as 4-bit ones)
_READ_SETTINGS = ("kernel_group", "variance_epsilon", "padding_idx", "offset")
_KERNELS = (nn.Linear, nn.Embedding, Int4Linear, Int4PlanesLinear, Int8Linear, Int8Embedding)
BACKGROUND_DELAY_S = 30.0
_states: dict[tuple, str] = {}   # layout -> "compiling" | "ready" | "failed: why"
_lock = threading.Lock()
_compiled = None


def mode() -> str:
    chosen = os.environ.get("LMCOMPRESS_COMPILE", "background")
    if chosen not in MODES:
        raise ValueError(f"LMCOMPRESS_COMPILE={chosen!r}: choose one of {', '.join(MODES)}")
    return chosen


def compilable(decoder: Decoder) -> bool:
    """Whether every matrix is a float layer or a real kernel. Simulation modules and de-quantized fallbacks stay
    eager: a simulated model must not look faster, and their settings (bit-width, ...) would each need a graph."""
    matrices = [decoder.body.embed_tokens, decoder.head] + [m for b in decoder.blocks for m in b.modules()[2:]]
    return all(type(m) in _KERNELS for m in matrices)


def layout(decoder: Decoder) -> tuple:
    """What the graph depends on: the shape of the model, each module's type, tensor shapes and plain settings
    (a kernel's group, a norm's epsilon), whether its projections fuse; never the tensors' values."""
    heads = (decoder.heads, decoder.kv_heads, decoder.head_dim, decoder.dtype, len(decoder.blocks))
    fused = tuple((b.qkv is None, b.gate_up is None, b.scaling) for b in decoder.blocks)
    return heads, fused, tuple(_module_layout(m) for m in decoder.modules())


def state(decoder: Decoder) -> str | None:
    """"compiling", "ready", "failed: …", or None (never asked for)."""
    return _states.get(layout(decoder))


def step_for(decoder: Decoder, how: str | None = None) -> Callable | None:
    """The compiled step for this decoder's layout when it is ready (None: run eager), compiling it as ``how``
    (default ``mode()``) says when it is not."""
    how = how or mode()
    if how == "off" or not compilable(decoder):
        return None
    key = layout(decoder)
    with _lock:
        start = key not in _states and not (how == "background" and _small(decoder))
        if start:
            _states[key] = "compiling"
    if start:
        if how == "wait":
            _compile(decoder, key)
        else:
            threading.Thread(target=_compile_aside, args=(decoder, key), daemon=True,
                             name="lmcompress-compile").start()
            return None
    return _function() if _states.get(key) == "ready" else None


def compile_now(model) -> str | None:
    """Compile the decode step for ``model``'s layout and wait (benchmarks, the CLI): its state ("ready",
    "failed: …"), or None when our loop does not run the model or its layers are not all real kernels."""
    decoder = decoder_for(model)
    if decoder is None or not compilable(decoder):
        return None
    step_for(decoder, "wait")
    return state(decoder)


def _function() -> Callable:
    global _compiled
    if _compiled is None:
        torch._dynamo.config.recompile_limit = 64   # one graph per layout: many settings, many layouts
        # cpp_wrapper: the graph's kernels called from C++, not from Python (SmolLM2 int4 g32, 2 threads, measured
        # here: 119 against 100 tokens/s; a cold compile 97 against about 60 s)
        _compiled = torch.compile(token_step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    return _compiled


def _small(decoder: Decoder) -> bool:
    """A model small enough to run one thread (the tiny model: a few ms a token eager) is not worth a compilation
    beside a person's slider moves (tens of seconds of both cores, cold)."""
    held = sum(t.numel() for m in decoder.modules() for _, t in _named_tensors(m))
    return held < threads.SINGLE_THREAD_BELOW


def _compile_aside(decoder: Decoder, key: tuple) -> None:
    """``_compile`` after ``BACKGROUND_DELAY_S``, at the lowest CPU priority (Linux sets it per thread; inductor's
    compiler processes inherit it), so the page's own work keeps the cores while a layout compiles."""
    time.sleep(BACKGROUND_DELAY_S)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):   # no per-thread priority here: compile at the normal one
        pass
    _compile(decoder, key)


def _compile(decoder: Decoder, key: tuple) -> None:
    """Compile by running the step once on a scratch cache; record the outcome (a failure stays eager)."""
    try:
        cache = decoder.new_cache(STEP_CAPACITY)
        cache.length = 1
        decoder.forward(torch.zeros(1, 1, dtype=torch.long), cache, _function())
        outcome = "ready"
    except Exception as error:   # noqa: BLE001 — any compiler failure means: keep running eager, say why
        outcome = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    with _lock:
        _states[key] = outcome


def _named_tensors(module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))


def _module_layout(module) -> tuple:
    tensors = _named_tensors(module)
    settings = sorted((k, v) for k, v in vars(module).items() if k in _READ_SETTINGS)
    return type(module).__name__, tuple((n, tuple(t.shape), t.dtype) for n, t in tensors), tuple(settings)
