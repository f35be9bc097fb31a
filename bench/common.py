"""Shared pieces of the benchmarks: the scale of a run, medians, the machine and library description.

Every timing in bench/ goes through `median_time` (warm-up first, then the median of >= 5 runs) so the
numbers in results.md were all obtained the same way.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

THREADS = min(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class Scale:
    """How big a bench run is: `full` for `make bench`, `smoke` for a quick check of the harness."""

    name: str = "full"
    eval_tokens: int = 1024          # perplexity tokens per SmolLM2 evaluation (quality, pruning)
    tiny_eval_tokens: int = 2048     # perplexity tokens per tiny-model evaluation
    context: int = 256               # perplexity window (non-overlapping: stride == context)
    runs: int = 5                    # timed repetitions behind every median
    calibration_samples: int = 16    # GPTQ / Wanda calibration sequences of `context` tokens
    kd_steps: int = 100              # tiny-model distillation steps per temperature and seed (and per student)
    kd_steps_default: int = 55       # SmolLM2 recovery steps (3-bit RTN g64): 100 took 449 s, 55 fit the 5 min target
    prompt_tokens: int = 64          # latency: prefill length
    new_tokens: int = 16             # latency: decoded tokens
    include_default: bool = True     # False: skip everything that needs SmolLM2

    def to_dict(self) -> dict:
        return asdict(self)


FULL = Scale()
SMOKE = Scale(name="smoke", eval_tokens=256, tiny_eval_tokens=512, runs=5, calibration_samples=4,
              kd_steps=5, kd_steps_default=2, prompt_tokens=16, new_tokens=4, include_default=False)


def median_time(fn, runs: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Seconds per call of `fn`: warm-up calls first, then the median of `runs` timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def timed(fn):
    """(result, seconds) of one call: for steps that are too slow or stateful to repeat."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict:
    """What the numbers were measured on: CPU, cores, torch threads, memory, ISA features that matter."""
    flags = cpu_flags()
    interesting = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8"]
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "isa": [f for f in interesting if f in flags],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],   # of this invocation
    }


def versions() -> dict:
    from bench import peers

    names = ["torch", "transformers", "tokenizers", "safetensors", "numpy", "streamlit"]
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return {**out, **peers.versions()}


def setup_torch() -> None:
    """Same threading for every benchmark: the machine's cores, at most 2 (the project's CI size)."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
