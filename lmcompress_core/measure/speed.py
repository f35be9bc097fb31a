"""Speed and memory measurements: prefill/decode latency, this machine's memory bandwidth, runtime bytes.

Latency follows gpt-fast's discipline: warm up, synchronise the device around every timed region, report the
median. The roofline is the memory-bound ceiling of decoding: every weight byte is read once per new token, so
tokens/s <= bandwidth / bytes per token.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable
from functools import lru_cache

import torch

from lmcompress_core.measure.quality import Steps, max_positions, model_device, synchronize


@dataclass
class LatencyReport:
    prefill_ms: float              # median wall time of one forward pass over the prompt
    decode_tokens_per_s: float     # new_tokens / median wall time of the greedy decode loop (KV cache)
    kernel: str                    # what really ran (from CompressedModel.kernel)
    threads: int                   # torch.get_num_threads() during the runs
    prompt_tokens: int
    new_tokens: int
    runs: int                      # timed runs (after warm-up)
    roofline_tokens_per_s: float | None = None  # bandwidth / bytes_per_token
    bandwidth_gb_s: float | None = None         # measured copy bandwidth of this machine (GB/s = 1e9 B/s)
    bytes_per_token: int | None = None
    bytes_basis: str = ""          # which byte count the roofline divides by
    device: str = "cpu"
    warmup: int = 1
    prefill_ms_runs: list | None = None         # every timed run, in order (the median is taken over these)
    decode_tokens_per_s_runs: list | None = None
    source: str = "timed runs"     # or "greedy generation": read off the generation the page shows (exploring)
    load_average: float | None = None   # the machine's 1-minute load average when the timing ended
    busy: bool = False             # more work was waiting than there are cores: a slow time, not the setting's speed
    loop: str = ""                 # the forward pass timed: our static-cache loop or transformers' (quality.Steps)


@dataclass
class SpeedRatio:
    """Compressed against base, from runs taken alternately in one call (round i of each model back to back).

    ``*_ratio`` is the median over rounds of (base time / compressed time); ``*_range`` the lowest and highest
    round. ``*_text`` is what a chart may print: "≈ 1×" when the rounds disagree on the sign of the change (the
    difference is inside the measured noise) or when nothing runs faster by construction (simulated).
    """
    prefill_ratio: float
    decode_ratio: float
    prefill_range: tuple[float, float]
    decode_range: tuple[float, float]
    prefill_text: str
    decode_text: str
    rounds: int


@lru_cache(maxsize=4)
def memory_bandwidth_gb_s(device: str = "cpu", nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s (read + write bytes / best time) of a large tensor; measured once per process."""
    dev = torch.device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: page in both buffers
    best = float("inf")
    for _ in range(repeats):
        synchronize(dev)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(dev)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def _dynamic_int8_bytes(module) -> int:
    """Bytes of a torch dynamic-quantized Linear: int8 weight, its scales/zero-points, float bias."""
    weight, bias = module._packed_params._weight_bias()
    total = weight.numel() * weight.element_size()
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        total += weight.q_per_channel_scales().numel() * 8 + weight.q_per_channel_zero_points().numel() * 8
    else:
        total += 8 + 8  # one double scale, one int64 zero-point
    if bias is not None:
        total += bias.numel() * bias.element_size()
    return total


def runtime_bytes(model) -> int:
    """Bytes of parameters and buffers the model holds while it runs (shared tensors once; int8 packed weights)."""
    total, seen = 0, set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        # a meta stand-in (a matrix made on first use) has no memory to share: counted by itself
        key = id(tensor) if tensor.is_meta else (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    for module in model.modules():
        if hasattr(module, "_packed_params") and callable(getattr(module, "weight", None)):
            total += _dynamic_int8_bytes(module)
    return total


def decode_bytes(model) -> int:
    """Bytes one decode step reads: every matrix the step multiplies (a kernel module: the buffers it ``reads``,
    not the exact grid it keeps for export), norms and biases; embedding tables not shared with the LM head are
    left out (a step reads one row). Shared tensors once."""
    total, seen = 0, set()
    tables = {id(m) for m in model.modules() if hasattr(m, "num_embeddings")}   # nn.Embedding and ours
    for module in model.modules():
        if id(module) in tables:
            continue
        names = getattr(module, "reads", None)
        tensors = ([getattr(module, n) for n in names] if names is not None
                   else list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)))
        for tensor in tensors:
            if tensor is None or tensor.is_meta:
                continue
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total


def latency_prompt(model, tokenizer, prompt_tokens: int, new_tokens: int) -> torch.Tensor:
    vocab = model.config.vocab_size
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))
    limit = max_positions(model)
    if limit is not None:
        prompt_tokens = max(1, min(prompt_tokens, limit - new_tokens))
    generator = torch.Generator().manual_seed(1234)  # fixed token ids: latency must not depend on content
    return torch.randint(0, vocab, (1, prompt_tokens), generator=generator)


@torch.inference_mode()
def _one_run(model, ids: torch.Tensor, new_tokens: int, device: torch.device, own_loop: bool = True,
             use_compiled: bool = True) -> tuple[float, float, str]:
    """(prefill s, decode s, the loop that ran): the prompt's pass, then ``new_tokens`` greedy steps."""
    steps = Steps(model, ids.shape[-1] + new_tokens, own_loop, use_compiled)
    synchronize(device)
    start = time.perf_counter()
    logits = steps.prompt(ids)
    synchronize(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = steps.next(logits.argmax().view(1, 1))
    synchronize(device)
    return prefill, time.perf_counter() - start, steps.loop


def _compiled_now(models, capacity: int, own_loop: bool) -> bool:
    """Whether every one of ``models`` has its compiled decode step ready now (asking starts a background
    compilation where none has started). A measurement decides this once: its runs never mix eager and compiled
    steps, and a pair never sets one model's compiled step against the other's eager loop."""
    return all(Steps(model, capacity, own_loop).step is not None for model in models)


def measure_latency(model, tokenizer, kernel: str, prompt_tokens: int = 64, new_tokens: int = 16, runs: int = 5,
                    warmup: int = 1, bytes_per_token: int | None = None, bytes_basis: str = "",
                    check: Callable[[int, int], None] | None = None, own_loop: bool = True) -> LatencyReport:
    """Median prefill ms and decode tokens/s over ``runs`` timed runs after ``warmup``; plus the roofline.

    ``bytes_per_token`` (default: ``decode_bytes``) is what one decode step must read from memory.
    ``check(done, total)`` is called before each run, outside the timed region (progress; may raise to cancel).
    ``own_loop=False`` times transformers' forward even where our static-cache loop runs the model (quality.Steps).
    """
    _check_runs(runs, new_tokens, prompt_tokens)
    device = model_device(model)
    ids = latency_prompt(model, tokenizer, prompt_tokens, new_tokens).to(device)
    use_compiled, timings = _compiled_now([model], ids.shape[-1] + new_tokens, own_loop), []
    for i in range(warmup + runs):
        _tick(check, i, warmup + runs)
        timings.append(_one_run(model, ids, new_tokens, device, own_loop, use_compiled))
    _tick(check, warmup + runs, warmup + runs)
    timings = timings[warmup:]
    return _latency_report(model, int(ids.shape[1]), kernel, new_tokens, timings, warmup, bytes_per_token,
                           bytes_basis)


def measure_latency_pair(base, model, tokenizer, kernels: tuple[str, str], prompt_tokens: int = 64,
                         new_tokens: int = 16, runs: int = 5, warmup: int = 1, bytes_per_token=(None, None),
                         bytes_basis=("", ""), simulated: bool = False,
                         check: Callable[[int, int], None] | None = None, own_loop: bool = True,
                         ) -> tuple[LatencyReport, LatencyReport, SpeedRatio]:
    """Time the base and the compressed model alternately (base, compressed, base, ...) on the same prompt.

    Interleaving puts both under the same load, so their ratio is not a comparison of two moments. Returns the
    two reports and their SpeedRatio; ``simulated`` (nothing really runs faster) pins the printed ratio to ≈ 1×.
    ``check(done, total)`` is called before every run of either model, outside the timed regions.
    """
    _check_runs(runs, new_tokens, prompt_tokens)
    ids = latency_prompt(model, tokenizer, prompt_tokens, new_tokens)
    pairs, total = [], 2 * (warmup + runs)
    use_compiled = _compiled_now([base, model], ids.shape[-1] + new_tokens, own_loop)
    for i in range(warmup + runs):
        _tick(check, 2 * i, total)
        base_run = _one_run(base, ids.to(model_device(base)), new_tokens, model_device(base), own_loop,
                            use_compiled)
        _tick(check, 2 * i + 1, total)
        pairs.append((base_run, _one_run(model, ids.to(model_device(model)), new_tokens, model_device(model),
                                         own_loop, use_compiled)))
    _tick(check, total, total)
    pairs = pairs[warmup:]
    models = zip((base, model), kernels, bytes_per_token, bytes_basis)
    reports = [_latency_report(m, int(ids.shape[1]), kernel, new_tokens, [p[i] for p in pairs], warmup, nbytes,
                               basis)
               for i, (m, kernel, nbytes, basis) in enumerate(models)]
    return reports[0], reports[1], speed_ratio(pairs, simulated)


def _tick(check, done: int, total: int) -> None:
    if check is not None:
        check(done, total)


def speed_ratio(pairs: list, simulated: bool) -> SpeedRatio:
    """SpeedRatio from [((base prefill s, base decode s), (comp prefill s, comp decode s)), ...]."""
    prefill = [b[0] / c[0] for b, c in pairs]
    decode = [b[1] / c[1] for b, c in pairs]
    return SpeedRatio(statistics.median(prefill), statistics.median(decode), (min(prefill), max(prefill)),
                      (min(decode), max(decode)), ratio_text(prefill, simulated), ratio_text(decode, simulated),
                      len(pairs))


def ratio_text(ratios: list[float], simulated: bool) -> str:
    """"×2.31" when every round agrees on faster (or slower); "≈ 1×" inside the noise or when simulated."""
    if simulated:
        return "≈ 1× (simulated: nothing runs faster)"
    if min(ratios) <= 1.0 <= max(ratios):
        return "≈ 1× (within the noise of the runs)"
    return f"×{statistics.median(ratios):.2f}"


def _check_runs(runs: int, new_tokens: int, prompt_tokens: int) -> None:
    if runs < 1 or new_tokens < 1 or prompt_tokens < 1:
        raise ValueError("runs, new_tokens and prompt_tokens must all be at least 1")


def latency_from_generation(model, kernel: str, forward_s: list[float], prompt_tokens: int,
                            bytes_per_token: int | None = None, bytes_basis: str = "", loop: str = "") -> LatencyReport:
    """Latency read off one greedy generation (``quality.decode``'s ``forward_s``: the prompt's forward pass, then
    one per new token), so exploring times the model on the tokens it shows instead of on extra runs: prefill =
    the prompt's pass (the caller warms the model up first), decode = 1 / the median per-token step."""
    steps = forward_s[1:]
    if not steps:
        raise ValueError("latency from a generation needs at least one generated token")
    step = statistics.median(steps)
    report = _latency_report(model, prompt_tokens, kernel, len(steps), [(forward_s[0], step * len(steps))], 1,
                             bytes_per_token, bytes_basis)
    report.source = "greedy generation"
    report.loop = loop   # what quality.decode ran (its ``ran["loop"]``)
    report.decode_tokens_per_s_runs = [1 / s for s in steps if s > 0]   # each step's rate: the spread
    return report


def machine_load() -> tuple[float | None, bool]:
    """(1-minute load average, busy). Busy: the load is past twice the cores ($LMCOMPRESS_BUSY_LOAD sets another
    bound), so other work competed for the cores this process's own timing threads need; a time taken then says
    more about the others than the model."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):   # no load average on this platform
        return None, False
    bound = float(os.environ.get("LMCOMPRESS_BUSY_LOAD") or 2 * (os.cpu_count() or 1))
    return load, load > bound


def _latency_report(model, prompt_tokens: int, kernel, new_tokens, timings, warmup, bytes_per_token,
                    bytes_basis) -> LatencyReport:
    prefill = statistics.median(t[0] for t in timings)
    decode = statistics.median(t[1] for t in timings)
    if bytes_per_token is None:
        bytes_per_token, bytes_basis = decode_bytes(model), "bytes one decode step reads (measure.speed.decode_bytes)"
    device = model_device(model)
    bandwidth = memory_bandwidth_gb_s(str(device) if device.type == "cuda" else "cpu")
    load, busy = machine_load()
    return LatencyReport(
        prefill_ms=prefill * 1000, decode_tokens_per_s=new_tokens / decode, kernel=kernel,
        threads=torch.get_num_threads(), prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=len(timings),
        roofline_tokens_per_s=bandwidth * 1e9 / bytes_per_token if bytes_per_token else None,
        bandwidth_gb_s=bandwidth, bytes_per_token=bytes_per_token, bytes_basis=bytes_basis,
        device=str(device), warmup=warmup, prefill_ms_runs=[t[0] * 1000 for t in timings],
        decode_tokens_per_s_runs=[new_tokens / t[1] for t in timings], load_average=load, busy=busy,
        loop=timings[0][2] if len(timings[0]) > 2 else "")
