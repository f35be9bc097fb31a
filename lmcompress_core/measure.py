"""Honest measurements of a compressed model and the one call that produces them all: ``evaluate`` -> ``Report``.

Size is counted three ways (theoretical, packed on disk, runtime in memory); latency, perplexity, KL to the
base and generations live in measure_speed.py and measure_quality.py and are re-exported here. Every figure
in a Report comes with a plain-language ``how`` label saying how it was obtained.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import math
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from lmcompress_core.measure_quality import (GenerationReport, PerplexityReport, generate_side_by_side,
                                             perplexity, score_tokens)
from lmcompress_core.measure_speed import LatencyReport, measure_latency, memory_bandwidth_gb_s, runtime_bytes
from lmcompress_core.packing import pack_model, write_packed

__all__ = ["SizeReport", "LatencyReport", "PerplexityReport", "GenerationReport", "Report", "measure_size",
           "measure_latency", "perplexity", "generate_side_by_side", "evaluate", "runtime_bytes",
           "memory_bandwidth_gb_s", "clear_caches", "calibration_for", "evaluation_text", "cached_report"]

SCALE_BITS = 16  # theoretical size: a scale and a zero-point per group at 16 bits each (the usual fp16 storage)
DEFAULT_PROMPTS = {"tiny": "ROMEO:\nWhat light through yonder"}
DEFAULT_PROMPT = "The most important thing to know about the weather is"
CACHE_SIZE = 64


@dataclass
class SizeReport:
    theoretical_bytes: int     # Σ weights × bits + 16-bit scale/zero per group + sparse masks; others at dtype
    packed_bytes: int          # real bytes of the files save_compressed writes
    runtime_bytes: int         # parameters + buffers the running model holds (int8 packed weights included)
    base_bytes: int            # runtime bytes of the uncompressed base model
    simulated: bool            # True when the running model saves no memory over the base
    note: str = ""
    layers_packed_bytes: int = 0   # packed bytes of the compressed layers alone
    layers_fp32_bytes: int = 0     # the same layers' weights at fp32
    dense_bytes: int = 0           # bytes of every tensor stored as it is (embeddings, norms, biases, ...)
    sparse_formats: dict = field(default_factory=dict)  # {"bitmask": n_layers, "index": n_layers}
    scale_dtypes: list = field(default_factory=list)    # dtypes used to store scales/zeros in the file


@dataclass
class Report:
    model: str
    config: dict
    size: SizeReport | None
    latency: LatencyReport | None
    perplexity: PerplexityReport | None
    base_perplexity: float | None
    kl_to_base: float | None
    top1_agreement: float | None
    generation: GenerationReport | None
    timings: dict = field(default_factory=dict)   # seconds per stage
    base_perplexity_stderr: float | None = None
    kernel: str = ""
    base_latency: LatencyReport | None = None      # the base model under the same protocol, for side-by-side ratios
    history: list = field(default_factory=list)   # distillation curve from the CompressedModel
    notes: list = field(default_factory=list)     # the engine's plain-text remarks (e.g. layers GPTQ ran as RTN)
    quality_stats: dict | None = None             # TokenScores.statistics(): KL percentiles, same-top %, RMS Δp

    def to_dict(self) -> dict:
        """Plain JSON-safe dict (NaN/inf become None) with a ``how`` label for every figure."""
        plain = ("model", "config", "base_perplexity", "base_perplexity_stderr", "kl_to_base", "top1_agreement",
                 "timings", "kernel", "history", "notes", "quality_stats")
        data = {f: getattr(self, f) for f in plain}
        for name in ("size", "latency", "base_latency", "perplexity", "generation"):
            value = getattr(self, name)
            data[name] = asdict(value) if value is not None else None
        data["how"] = how_labels(self)
        return _jsonable(data)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


# ---------------------------------------------------------------- size
def measure_size(cm, base_model) -> SizeReport:
    """Size three ways; the packed figure is the byte count of the format really written to a temporary folder."""
    tensors, meta = pack_model(cm, base_model)
    with tempfile.TemporaryDirectory(prefix="lmcompress-size-") as folder:
        packed = write_packed(tensors, meta, folder)
    layers = meta["layers"].values()
    runtime, base = runtime_bytes(cm.model), runtime_bytes(base_model)
    simulated = runtime >= base and bool(cm.quantized or cm.masks)  # compressed on paper, not in memory
    formats: dict[str, int] = {}
    for layer in layers:
        if layer.get("sparse"):
            formats[layer["sparse"]] = formats.get(layer["sparse"], 0) + 1
    return SizeReport(
        theoretical_bytes=math.ceil(sum(_theoretical_bits(layer) for layer in layers) / 8) + meta["dense_bytes"],
        packed_bytes=packed, runtime_bytes=runtime, base_bytes=base, simulated=simulated,
        note=_size_note(runtime, base, cm.kernel, simulated),
        layers_packed_bytes=sum(layer["bytes"] for layer in layers),
        layers_fp32_bytes=sum(4 * math.prod(layer["shape"]) for layer in layers),
        dense_bytes=meta["dense_bytes"], sparse_formats=formats,
        scale_dtypes=sorted({layer[k] for layer in layers for k in ("scales_dtype", "zeros_dtype") if k in layer}))


def _theoretical_bits(layer: dict) -> int:
    numel = math.prod(layer["shape"])
    kept = layer.get("nnz", numel)
    mask_bits = 8 * min(layer["sparse_sizes"].values()) if layer.get("sparse") else 0
    if layer["kind"] == "quantized":
        return kept * layer["bits"] + 2 * layer["groups"] * SCALE_BITS + mask_bits
    return kept * torch.finfo(getattr(torch, layer["dtype"])).bits + mask_bits


def _size_note(runtime: int, base: int, kernel: str, simulated: bool) -> str:
    if runtime >= base and not simulated:
        return "no compression applied: the running model is as large as the base model"
    if simulated:
        return ("nothing saved in memory: simulated — the running model holds dense float weights "
                f"({kernel}); the packed size is what a real format stores")
    return f"the running model holds {runtime / base:.0%} of the base model's bytes ({kernel})"


# ---------------------------------------------------------------- how each number was obtained
def how_labels(report: Report) -> dict[str, str]:
    how = {}
    if report.size is not None:
        s = report.size
        how["theoretical_bytes"] = (
            "Σ weights × bits + a 16-bit scale and zero-point per group; pruned layers count their kept weights plus "
            "the smaller sparse mask; every other tensor at its dtype")
        how["packed_bytes"] = (
            "bytes of the safetensors + JSON files save_compressed writes: codes bit-packed, scales/zeros as "
            f"{'/'.join(s.scale_dtypes) or 'n/a'} (fp16 only when lossless), pruned layers as a bitmask or "
            "bit-packed column indices (the smaller per layer) with only kept weights, other tensors as they are")
        how["runtime_bytes"] = ("bytes of parameters and buffers the running model holds (torch int8 weights at "
                                "1 byte each)" + (f"; {s.note}" if s.note else ""))
        how["size"] = "; ".join(f"{k.replace('_bytes', '')}: {how[k]}" for k in
                                ("theoretical_bytes", "packed_bytes", "runtime_bytes"))
    if report.latency is not None:
        lat = report.latency
        how["latency"] = (
            f"median of {lat.runs} timed runs after {lat.warmup} warm-up on {lat.device} with {lat.threads} "
            f"thread(s): prefill = one forward pass over {lat.prompt_tokens} fixed prompt tokens; decode = "
            f"{lat.new_tokens} greedy steps with the KV cache; kernel: {lat.kernel}")
        if lat.roofline_tokens_per_s:
            how["roofline"] = (
                f"upper bound on decode speed = measured copy bandwidth {lat.bandwidth_gb_s:.1f} GB/s ÷ "
                f"{lat.bytes_per_token:,} bytes read per token ({lat.bytes_basis})")
    if report.perplexity is not None:
        p = report.perplexity
        how["perplexity"] = (
            f"exp(mean next-token NLL) over {p.tokens} tokens of '{p.text}', windows of {p.context} tokens every "
            f"{p.stride} (each token scored once); ± = standard error of the mean NLL carried through exp, "
            "tokens treated as independent")
        how["base_perplexity"] = "the uncompressed base model on the same tokens, in the same pass"
        how["kl_to_base"] = "mean over the same tokens of KL(p_base ‖ p_compressed), in nats"
        how["top1_agreement"] = "share of the same tokens where both models' most likely next token is the same"
    if report.generation is not None:
        g = report.generation
        how["generation"] = (
            f"greedy continuation and a sampled one (temperature 0.8, top-k 40, seed {g.seed}, same for both "
            "models); first divergence = index of the first greedy token that differs; log-probs are the "
            "compressed model's for each token it chose" + (f"; {g.notice}" if g.notice else ""))
    return how


# ---------------------------------------------------------------- evaluate
_PPL_CACHE: OrderedDict = OrderedDict()
_REPORT_CACHE: OrderedDict = OrderedDict()
_BASE_LATENCY_CACHE: OrderedDict = OrderedDict()   # the base model is timed once per process and protocol
_CACHE_LOCK = threading.Lock()


def clear_caches() -> None:
    _PPL_CACHE.clear()
    _REPORT_CACHE.clear()
    _BASE_LATENCY_CACHE.clear()


def base_latency(loaded, prompt_tokens: int, decode_tokens: int, runs: int) -> LatencyReport:
    """The uncompressed model timed with the same protocol (cached per process: it never changes)."""
    key = (loaded.name, prompt_tokens, decode_tokens, runs, torch.get_num_threads())
    cached = _cache_get(_BASE_LATENCY_CACHE, key)
    if cached is None:
        dtype = next(loaded.model.parameters()).dtype
        cached = measure_latency(loaded.model, loaded.tokenizer, f"{str(dtype).removeprefix('torch.')} dense (base)",
                                 prompt_tokens, decode_tokens, runs, bytes_per_token=runtime_bytes(loaded.model),
                                 bytes_basis="base runtime bytes: every weight read once per token")
        _cache_put(_BASE_LATENCY_CACHE, key, cached)
    return cached


def _cache_get(cache: OrderedDict, key):
    with _CACHE_LOCK:  # app sessions run in threads of one process
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    return None


def _cache_put(cache: OrderedDict, key, value) -> None:
    with _CACHE_LOCK:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)


def evaluation_text(loaded, text: str | None = None) -> tuple[str, str, str]:
    """(label, body, hash) of the text a model is scored on: a data.py text name, raw text, or the default."""
    from lmcompress_core import data

    name = text or data.default_text_for(loaded.name)
    body = data.load_text(name) if name in data.text_names() else text
    label = name if name in data.text_names() else "pasted text"
    return label, body, hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]


def calibration_for(loaded, config, eval_tokens: int = 2048, text: str | None = None,
                    n_samples: int = 16, seq_len: int = 256) -> torch.Tensor | None:
    """Calibration token ids [n_samples, seq_len] for GPTQ, Wanda, distillation and the int8 kernel (None: not needed).

    The tiny model calibrates on its training text; other models on the part of their evaluation text after
    the ``eval_tokens`` that perplexity scores, so calibration never sees the scored tokens.
    """
    from lmcompress_core import data

    q = config.quantization
    needs = (config.distillation is not None
             or (q is not None and q.method == "gptq")
             or (q is not None and q.bits == 8 and q.int8_kernel)  # SmoothQuant + SQNR check of the int8 kernel
             or (config.pruning is not None and config.pruning.method == "wanda"))
    if not needs:
        return None
    if loaded.name == "tiny" and text is None:
        return data.calibration_batches(loaded.tokenizer, data.load_text("tiny-train"), n_samples, seq_len)
    ids = data.token_ids(loaded.tokenizer, evaluation_text(loaded, text)[1])
    if ids.numel() == 0:
        raise ValueError("the evaluation text gives no tokens, so there is nothing to calibrate on: paste some text")
    unscored = ids[eval_tokens + 1:]
    ids = unscored if unscored.numel() > seq_len else ids  # a short pasted text: calibrate on all of it
    if ids.numel() <= seq_len:
        ids = ids.repeat(seq_len // max(ids.numel(), 1) + 2)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=torch.Generator().manual_seed(0))
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


class _Stages:
    """Progress reporting and cancellation across the stages of evaluate."""

    def __init__(self, callback, should_stop):
        self.callback, self.should_stop = callback, should_stop
        self.timings: dict[str, float] = {}

    def check(self, stage: str, step: int = 0, total: int = 1, message: str = "",
              metrics: dict | None = None) -> None:
        from lmcompress_core.compress import Cancelled, Progress

        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"stopped during {stage}")
        if self.callback is not None:
            self.callback(Progress(stage, step, total, message, metrics or {}))

    def run(self, stage: str, message: str, fn):
        """Run one stage; its finished result travels in the closing Progress's metrics[stage] (partial results)."""
        self.check(stage, 0, 1, message)
        start = time.perf_counter()
        result = fn()
        self.timings[stage] = round(time.perf_counter() - start, 3)
        self.check(stage, 1, 1, "done", {stage: result})
        return result


def evaluate(loaded, config, eval_tokens: int = 2048, context: int = 256, stride: int = 256,
             prompt: str | None = None, new_tokens: int = 32, seed: int = 0, text: str | None = None,
             latency: bool = True, generation: bool = True, latency_runs: int = 5, prompt_tokens: int = 64,
             decode_tokens: int = 16, compressed=None, calibration: torch.Tensor | None = None,
             callback: Callable | None = None, should_stop: Callable[[], bool] | None = None,
             use_cache: bool = True) -> Report:
    """Compress ``loaded.model`` with ``config`` (unless ``compressed`` is given) and measure everything.

    Stages, cheap first: compress, size, latency, generate, perplexity; ``callback`` gets a compress.Progress
    at the start and end of each (and per window during perplexity; the engine's own stages pass through
    while compressing). ``text`` is a text name from data.py or raw text (default: the model's evaluation text).
    ``compressed`` (a CompressedModel from compress) skips compression; its config is the one reported. Reports are cached per process by (model, config key,
    text hash, evaluation parameters), so returning to an earlier configuration is instant.
    """
    from lmcompress_core.compress import compress

    config = compressed.config if compressed is not None else config
    text_label, text_body, text_hash = evaluation_text(loaded, text)
    report_key = (loaded.name, config.key(), text_hash, eval_tokens, context, stride, prompt, new_tokens, seed,
                  latency, generation, latency_runs, prompt_tokens, decode_tokens)
    cached = _cache_get(_REPORT_CACHE, report_key) if use_cache else None
    if cached is not None:
        report = copy.deepcopy(cached)
        report.timings = {"cached": True}
        return report
    stages = _Stages(callback, should_stop)
    if compressed is None:
        calib = calibration if calibration is not None else calibration_for(loaded, config, eval_tokens, text)
        # the engine's own stages (calibrate, prune, quantize, distill, finish) pass through; its final
        # "done" is dropped so a listener never sees "done" before size, latency and perplexity
        inner = None if callback is None else (lambda p: None if p.stage == "done" else callback(p))
        compressed = stages.run("compress", "compressing", lambda: compress(
            loaded.model, config, calibration=calib, tokenizer=loaded.tokenizer,
            callback=inner, should_stop=should_stop))
    cm, base = compressed, loaded.model
    size = stages.run("size", "counting bytes (writing the packed file)", lambda: measure_size(cm, base))
    lat = base_lat = None
    if latency:
        base_lat = stages.run("base latency", "timing the base model (once per process)",
                              lambda: base_latency(loaded, prompt_tokens, decode_tokens, latency_runs))
        lat = stages.run("latency", "timing prefill and decode", lambda: measure_latency(
            cm.model, loaded.tokenizer, cm.kernel, prompt_tokens, decode_tokens, latency_runs,
            bytes_per_token=size.packed_bytes,
            bytes_basis="packed size: every byte of the packed file read once per token, as a kernel "
                        "reading packed weights would"))
    gen = None
    if generation:
        gen = stages.run("generate", "generating side by side", lambda: generate_side_by_side(
            base, cm.model, loaded.tokenizer, prompt or DEFAULT_PROMPTS.get(loaded.name, DEFAULT_PROMPT),
            new_tokens, seed))
    ppl_key = (loaded.name, config.key(), text_hash, eval_tokens, context, stride)
    ppl = _cache_get(_PPL_CACHE, ppl_key) if use_cache else None
    if ppl is None:
        ppl = stages.run("perplexity", f"scoring up to {eval_tokens} tokens", lambda: _perplexities(
            cm.model, base, loaded.tokenizer, text_body, text_label, eval_tokens, context, stride, stages))
        _cache_put(_PPL_CACHE, ppl_key, ppl)
    else:
        stages.timings["perplexity"] = "cached"
    report = Report(model=loaded.name, config=config.to_dict(), size=size, latency=lat, perplexity=ppl[0],
                    base_perplexity=ppl[1].value, kl_to_base=ppl[2], top1_agreement=ppl[3], generation=gen,
                    timings=stages.timings, base_perplexity_stderr=ppl[1].stderr, kernel=cm.kernel,
                    base_latency=base_lat,
                    history=list(getattr(cm, "history", []) or []), notes=list(getattr(cm, "notes", []) or []),
                    quality_stats=ppl[4])
    if use_cache:
        _cache_put(_REPORT_CACHE, report_key, copy.deepcopy(report))
    return report


def cached_report(loaded, config, **evaluate_kwargs) -> Report | None:
    """The Report ``evaluate`` would return from its cache for these arguments, or None (nothing is computed)."""
    bound = inspect.signature(evaluate).bind(loaded, config, **evaluate_kwargs)
    bound.apply_defaults()
    args = bound.arguments
    if not args["use_cache"]:
        return None
    key = (loaded.name, config.key(), evaluation_text(loaded, args["text"])[2]) + tuple(
        args[name] for name in ("eval_tokens", "context", "stride", "prompt", "new_tokens", "seed", "latency",
                                "generation", "latency_runs", "prompt_tokens", "decode_tokens"))
    cached = _cache_get(_REPORT_CACHE, key)
    if cached is None:
        return None
    report = copy.deepcopy(cached)
    report.timings = {"cached": True}
    return report


def _perplexities(model, base, tokenizer, text_body, text_label, eval_tokens, context, stride, stages):
    from lmcompress_core import data

    ids = data.token_ids(tokenizer, text_body)
    scores = score_tokens(model, ids, context, stride, eval_tokens, base_model=base,
                          check=lambda i, n: stages.check("perplexity", i, n, f"window {i} of {n}"))
    return (scores.report(text=text_label), scores.report(scores.base_nll, text=text_label),
            scores.kl_to_base, scores.top1_agreement, scores.statistics())
