"""Honest measurements of a compressed model and the one call that produces them all: ``evaluate`` -> ``Report``.

Size is counted three ways (theoretical, packed on disk, runtime in memory); latency, perplexity, KL to the
base and generations live in speed.py and quality.py. What is measured, on which text and with
how many runs is one ``EvalProtocol`` (protocol.py), which is also the key of the one result cache. Every
figure in a Report comes with a plain-language ``how`` label, written here and nowhere else.
"""
from __future__ import annotations

import copy
import math
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from lmcompress_core.measure.quality import (BaseScores, GenerationReport, PerplexityReport, base_continuations,
                                             base_scores, generate_side_by_side, score_tokens)
from lmcompress_core.measure.speed import (LatencyReport, SpeedRatio, latency_from_generation, measure_latency,
                                           measure_latency_pair, runtime_bytes)
from lmcompress_core.runtime import threads
from lmcompress_core.runtime.kernels import INT4_WIDEN_NOTE, INT8_WIDEN_NOTE, pending_dense, prepare_
from lmcompress_core.runtime.packing import pack_model, packed_file_bytes
from lmcompress_core.measure.protocol import EvalProtocol, calibration_for, evaluation_text, prompt_for

__all__ = ["SizeReport", "Report", "measure_size", "evaluate", "cached_report", "clear_cache", "how_labels"]

SCALE_BITS = 16  # theoretical size: a 16-bit scale per group, and a zero-point: an integer code or a 16-bit float
CACHE_SIZE = 64
BASE_SCORES_CACHE_SIZE = 3


@dataclass
class SizeReport:
    theoretical_bytes: int     # Σ weights × bits + 16-bit scale/zero per group + sparse masks; others at dtype
    packed_bytes: int          # bytes of the files save_compressed writes (from their layout, nothing written)
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
    protocol: dict                                 # EvalProtocol.to_dict(): how everything below was measured
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
    base_latency: LatencyReport | None = None      # the base model timed alternately with the compressed one
    speed: SpeedRatio | None = None                # compressed vs base from those alternating runs
    history: list = field(default_factory=list)   # distillation curve from the CompressedModel
    notes: list = field(default_factory=list)     # the engine's plain-text remarks (e.g. layers GPTQ ran as RTN)
    quality_stats: dict | None = None             # TokenScores.statistics(): KL percentiles, same-top %, RMS Δp
    base_dtype: str = ""                          # the dtype the base model runs in (the reference of KL, ratios)
    model_caveat: str = ""                        # the model card's caveat, shown wherever results are shown
    calibration_tokens: int = 0                   # calibration tokens the compression read (its cost with timings)

    def to_dict(self) -> dict:
        """Plain JSON-safe dict (NaN/inf become None) with a ``how`` label for every figure."""
        plain = ("model", "config", "protocol", "base_perplexity", "base_perplexity_stderr", "kl_to_base",
                 "top1_agreement", "timings", "kernel", "history", "notes", "quality_stats", "base_dtype",
                 "model_caveat", "calibration_tokens")
        data = {f: getattr(self, f) for f in plain}
        for name in ("size", "latency", "base_latency", "speed", "perplexity", "generation"):
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
def measure_size(cm, base_model, check: Callable[[], None] | None = None) -> SizeReport:
    """Size three ways; the packed figure is the byte count of the files ``save_compressed`` writes, taken from
    the format's layout (every tensor's dtype and shape; the codes not bit-packed, nothing written: a third of
    the time on SmolLM2); the tests check it equals the files written, byte for byte.

    ``check()`` (optional) is called before each layer and may raise to cancel."""
    tensors, meta = pack_model(cm, base_model, check=check, planned=True)
    packed = packed_file_bytes(tensors, meta)
    layers = meta["layers"].values()
    runtime, base = runtime_bytes(cm.model), runtime_bytes(base_model)
    simulated = runtime >= base and bool(cm.layers())  # compressed on paper, not in memory
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
        zero_bits = layer["bits"] if layer.get("zeros_dtype") == "codes" else SCALE_BITS
        return kept * layer["bits"] + layer["groups"] * (SCALE_BITS + zero_bits) + mask_bits
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
    """The caption of every figure: the only place the app, the HTML report and the CLI get them from."""
    how = {}
    if report.size is not None:
        how.update(_how_size(report.size))
    if report.latency is not None:
        how.update(_how_latency(report))
    if report.perplexity is not None:
        how.update(_how_perplexity(report.perplexity))
        how["perplexity"] += f"; {_precision(report)}"
    if report.generation is not None:
        g = report.generation
        how["generation"] = (
            f"greedy continuations of both models from the same prompt, {g.prompt_tokens} prompt tokens; the "
            f"highlight starts at the first greedy token that differs; {_precision(report)}"
            + (f"; {g.notice}" if g.notice else ""))
    return how


def _how_size(s: SizeReport) -> dict[str, str]:
    how = {
        "theoretical_bytes": "Σ weights × bits + per group a 16-bit scale and a zero-point (an integer code at the "
                             "layer's bits, else 16-bit); pruned layers count their kept weights plus the smaller "
                             "sparse mask; every other tensor at its dtype",
        "packed_bytes": "bytes of the safetensors + JSON files save_compressed writes (counted from the format's "
                        "layout, which the tests check against the files written): codes bit-packed, scales/zeros "
                        f"as {'/'.join(s.scale_dtypes) or 'n/a'} (fp16 only when lossless; 'codes': integer "
                        "zero-points bit-packed like the codes), pruned layers as a bitmask "
                        "or bit-packed column indices (the smaller per layer) with only kept weights, other tensors "
                        "as they are",
        "runtime_bytes": "bytes of parameters and buffers the running model holds" + (f"; {s.note}" if s.note else ""),
    }
    how["size"] = "; ".join(f"{k.replace('_bytes', '')}: {how[k]}" for k in tuple(how))
    return how


def _how_latency(report: Report) -> dict[str, str]:
    lat = report.latency
    runs = (f"median of {lat.runs} timed runs after {lat.warmup} warm-up on {lat.device} with {lat.threads} "
            f"thread(s)")
    steps = (f"prefill = one forward pass over {lat.prompt_tokens} fixed prompt tokens; decode = {lat.new_tokens} "
             f"greedy steps with the KV cache; kernel: {lat.kernel}")
    if lat.source == "greedy generation":
        how = {"latency": (
            f"the compressed model alone while exploring, read off its greedy generation below on {lat.device} with "
            f"{lat.threads} thread(s): prefill = the forward pass over the {lat.prompt_tokens}-token prompt (after one "
            f"warm-up pass), decode = 1 ÷ the median of its first {lat.new_tokens} per-token steps with the KV cache; "
            f"kernel: {lat.kernel}. No speed ratio: comparing with the base needs both timed alternately in one "
            "call under the same load — 'Measure precisely' does that")}
    elif report.base_latency is None:
        how = {"latency": (
            f"the compressed model alone while exploring, {runs}: {steps}. No speed ratio: comparing with the base "
            "needs both timed alternately in one call under the same load — 'Measure precisely' does that")}
    else:
        how = {"latency": (
            f"{runs}, the base and the compressed model timed alternately in the same call: {steps}. ×N = median "
            "over rounds of base time ÷ compressed time; ≈ 1× when the rounds disagree (inside the noise) or when "
            "the model only simulates its compression")}
    if lat.loop:
        how["latency"] += f"; forward pass: {lat.loop}"
    if "int4pack" in (lat.kernel or ""):
        how["latency"] += f". {INT4_WIDEN_NOTE}"
    if "int8pack" in (lat.kernel or ""):
        how["latency"] += f". {INT8_WIDEN_NOTE}"
    if lat.roofline_tokens_per_s:
        how["roofline"] = (
            f"upper bound on decode speed = measured copy bandwidth {lat.bandwidth_gb_s:.1f} GB/s ÷ "
            f"{lat.bytes_per_token:,} bytes read per token ({lat.bytes_basis})")
    return how


def _precision(report: Report) -> str:
    """How both models ran while being measured: the compressed one as it is deployed, the base as loaded."""
    base = f"the base model in {report.base_dtype}" if report.base_dtype else "the base model as loaded"
    return f"the compressed model runs as deployed ({report.kernel or 'unknown kernel'}), {base}"


def _how_perplexity(p: PerplexityReport) -> dict[str, str]:
    return {
        "perplexity": (
            f"exp(mean next-token NLL) over {p.tokens} tokens of '{p.text}', windows of {p.context} tokens every "
            f"{p.stride}: each token is scored once, except that a window's first token is not scored when it "
            "would have no context (the standard sliding-window recipe); ± = standard error of the mean NLL "
            "carried through exp, tokens treated as independent"),
        "base_perplexity": "the uncompressed base model on the same tokens, in the same pass",
        "kl_to_base": "mean over the same tokens of KL(p_base ‖ p_compressed), in nats",
        "top1_agreement": "share of the same tokens where both models' most likely next token is the same",
        "quality_stats": "from the same pass, as llama.cpp's perplexity tool reports them: mean, median, 99th and "
                         "99.9th percentile of the per-token KL(p_base ‖ p_compressed) in nats, the share of tokens "
                         "whose most likely next token is the same, and the RMS of Δp = p(correct token) − "
                         "p_base(correct token), in percentage points",
    }


# ---------------------------------------------------------------- the result cache
class _Cache:
    """One in-process LRU of finished results, keyed by (what, model, config key, protocol key).

    App sessions run in threads of one process: identical requests give identical results, so they share it.
    """

    def __init__(self, size: int):
        self.size, self.lock, self.items = size, threading.Lock(), OrderedDict()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


_CACHE = _Cache(CACHE_SIZE)
# the base model's log-probabilities over the scored windows: [tokens, vocab] float32 each (~100 MB for 512 tokens
# of a 49k vocabulary), so only the last few (model, text, windows) are kept
_BASE_SCORES = _Cache(BASE_SCORES_CACHE_SIZE)


def clear_cache() -> None:
    _CACHE.clear()
    _BASE_SCORES.clear()


def _keys(loaded, config, protocol: EvalProtocol, text_hash: str) -> tuple[tuple, tuple]:
    """(report key, perplexity key): perplexity depends on the text and windows only, not on prompts or timing."""
    ppl_protocol = EvalProtocol(eval_tokens=protocol.eval_tokens, context=protocol.context, stride=protocol.stride)
    return (("report", loaded.name, config.key(), protocol.key(text_hash)),
            ("perplexity", loaded.name, config.key(), ppl_protocol.key(text_hash)))


class _Stages:
    """Progress reporting and cancellation across the stages of evaluate; ``report`` fills in as stages finish."""

    def __init__(self, callback, should_stop):
        self.callback, self.should_stop = callback, should_stop
        self.timings: dict[str, float] = {}
        self.report: Report | None = None

    def check(self, stage: str, step: int = 0, total: int = 1, message: str = "",
              metrics: dict | None = None) -> None:
        from lmcompress_core.compress import Cancelled, Progress

        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"stopped during {stage}")
        if self.callback is not None:
            self.callback(Progress(stage, step, total, message, metrics or {}))

    def ticker(self, stage: str, what: str):
        """A ``check(done, total)`` for the engine's loops (windows, tokens, timed runs): progress + cancellation."""
        return lambda done, total: self.check(stage, done, total, f"{what} {min(done + 1, total)} of {total}")

    def run(self, stage: str, message: str, fn, timing=None):
        """Run one stage. Its closing Progress carries the result (metrics[stage]) and the report so far
        (metrics["partial"], a Report dict with every finished stage: what a page may draw before the end)."""
        self.check(stage, 0, 1, message)
        start = time.perf_counter()
        result = fn()
        self.timings[stage] = round(time.perf_counter() - start, 3) if timing is None else timing
        return result

    def finished(self, stage: str, result) -> None:
        partial = {} if self.report is None or self.callback is None else {"partial": self.report.to_dict()}
        self.check(stage, 1, 1, "done", {stage: result, **partial})


# ---------------------------------------------------------------- evaluate
def evaluate(loaded, config, protocol: EvalProtocol | None = None, *, compressed=None,
             calibration: torch.Tensor | None = None, callback: Callable | None = None,
             should_stop: Callable[[], bool] | None = None, use_cache: bool = True) -> Report:
    """Compress ``loaded.model`` with ``config`` (unless ``compressed`` is given) and measure it by ``protocol``.

    Stages, in the order a person wants them: compress, size, perplexity, generate (streamed token by token),
    latency. ``callback`` gets a compress.Progress at the start and end of each, per window, per generated token
    and per timed run (the engine's own stages pass through while compressing); every one of them first asks
    ``should_stop``, so an abandoned run stops within one window, token or run. A stage's closing Progress
    carries the report so far (metrics["partial"]). Reports are cached per (model, config, protocol) only once
    complete; what does not depend on the configuration (the base model's scores, continuations) is cached per
    (model, text, protocol) and shared by every configuration.
    ``compressed`` (a CompressedModel) skips compression; its config is the one reported.
    """
    protocol = protocol or EvalProtocol()
    config = compressed.config if compressed is not None else config
    text_label, text_body, text_hash = evaluation_text(loaded.name, protocol.text)
    report_key, ppl_key = _keys(loaded, config, protocol, text_hash)
    cached = _CACHE.get(report_key) if use_cache else None
    if cached is not None:
        return _from_cache(cached)
    with threads.running(loaded.model):
        report = _evaluate(loaded, config, protocol, compressed, calibration, _Stages(callback, should_stop),
                           (text_label, text_body, text_hash), ppl_key if use_cache else None)
    # a speed timed while the machine was busy is shown (marked) but never handed out again as this setting's speed
    if use_cache and not (report.latency is not None and report.latency.busy):
        _CACHE.put(report_key, copy.deepcopy(report))
    return report


def _evaluate(loaded, config, protocol: EvalProtocol, compressed, calibration, stages: _Stages,
              text: tuple[str, str, str], ppl_key) -> Report:
    cm = compressed if compressed is not None else _compress(loaded, config, protocol, calibration, stages)
    report = stages.report = Report(
        model=loaded.name, config=config.to_dict(), protocol=protocol.to_dict(), size=None, latency=None,
        perplexity=None, base_perplexity=None, kl_to_base=None, top1_agreement=None, generation=None,
        timings=stages.timings, kernel=cm.kernel, history=list(cm.history or []), notes=list(cm.notes or []),
        base_dtype=_dtype(loaded.model), model_caveat=getattr(loaded.card, "caveat", "") or "",
        calibration_tokens=getattr(cm, "calibration_tokens", 0))
    report.size = stages.run("size", "counting bytes (the packed file's layout)",
                             lambda: measure_size(cm, loaded.model, check=lambda: stages.check("size", 0, 1, "laying out")))
    stages.finished("size", report.size)
    if pending_dense(cm.model):   # before anything is timed: the first forward would make them
        stages.run("prepare", "de-quantizing the codes no integer kernel takes to bf16 matrices",
                   lambda: prepare_(cm.model, check=lambda: stages.check("prepare", 0, 1, "de-quantizing")))
    _perplexity_stage(report, cm, loaded, text, protocol, stages, ppl_key)
    if protocol.generation:
        report.generation = stages.run("generate", "generating (the compressed model, token by token)",
                                       lambda: _generate(loaded, cm, protocol, stages, report))
        stages.finished("generate", report.generation)
    if protocol.latency and report.latency is None:
        report.base_latency, report.latency, report.speed = stages.run(
            "latency", _latency_message(protocol), lambda: _latency(loaded, cm, report.size, protocol, stages))
        stages.finished("latency", report.latency)
    return report


def cached_report(loaded, config, protocol: EvalProtocol | None = None) -> Report | None:
    """The Report ``evaluate`` would return from its cache for these arguments, or None (nothing is computed)."""
    protocol = protocol or EvalProtocol()
    report_key, _ = _keys(loaded, config, protocol, evaluation_text(loaded.name, protocol.text)[2])
    cached = _CACHE.get(report_key)
    return None if cached is None else _from_cache(cached)


def _from_cache(cached: Report) -> Report:
    report = copy.deepcopy(cached)
    report.timings = {"cached": True}
    return report


def _dtype(model) -> str:
    param = next(model.parameters(), None)
    return "" if param is None else str(param.dtype).removeprefix("torch.")


def _compress(loaded, config, protocol, calibration, stages):
    from lmcompress_core.compress import compress

    calib = calibration if calibration is not None else calibration_for(loaded, config, protocol)
    # the engine's own stages (calibrate, prune, quantize, distill, finish) pass through; its final "done" is
    # dropped so a listener never sees "done" before size, latency and perplexity
    inner = None if stages.callback is None else (lambda p: None if p.stage == "done" else stages.callback(p))
    cm = stages.run("compress", "compressing", lambda: compress(
        loaded.model, config, calibration=calib, callback=inner, should_stop=stages.should_stop))
    stages.finished("compress", cm)
    return cm


def _latency_message(protocol: EvalProtocol) -> str:
    if protocol.latency_base:
        return "timing the base and the compressed model, alternately"
    return "timing the compressed model (no speed ratio while exploring)"


_PACKED_BASIS = ("packed size: every byte of the packed file read once per token, as a kernel reading packed "
                 "weights would")


def _latency(loaded, cm, size: SizeReport, protocol: EvalProtocol, stages: _Stages):
    """(base LatencyReport or None, compressed LatencyReport, SpeedRatio or None) as the protocol asks."""
    packed = _PACKED_BASIS
    args = (protocol.prompt_tokens, protocol.decode_tokens, protocol.latency_runs)
    check = stages.ticker("latency", "timed run")
    if not protocol.latency_base:
        return None, measure_latency(cm.model, loaded.tokenizer, cm.kernel, *args, bytes_per_token=size.packed_bytes,
                                     bytes_basis=packed, check=check), None
    return measure_latency_pair(
        loaded.model, cm.model, loaded.tokenizer, (f"{_dtype(loaded.model)} dense (base)", cm.kernel), *args,
        bytes_per_token=(runtime_bytes(loaded.model), size.packed_bytes),
        bytes_basis=("base runtime bytes: every weight read once per token", packed),
        simulated=size.simulated, check=check)


def _generate(loaded, cm, protocol: EvalProtocol, stages: _Stages, report: Report) -> GenerationReport:
    """Side-by-side generations; every token of the compressed model's continuations goes out as it comes
    (Progress metrics["generation_stream"] = {"kind": "greedy" | "sampled", "text": the continuation so far}).
    When the protocol reads latency off the generation, it is set (and its chart may be drawn) as soon as the
    greedy continuation has taken the protocol's ``decode_tokens`` steps (the step count timed runs take)."""
    total = protocol.new_tokens * (2 if protocol.sampled else 1)
    offset = {"greedy": 0, "sampled": protocol.new_tokens}
    counts = {"greedy": 0, "sampled": 0}

    def on_token(kind: str, text: str) -> None:
        counts[kind] += 1
        stages.check("generate", offset[kind] + counts[kind], total, f"{kind} token {counts[kind]}",
                     {"generation_stream": {"kind": kind, "text": text}})

    def after_greedy(forward_s: list[float], prompt_tokens: int, loop: str) -> None:
        if len(forward_s) < 2:   # the model stopped at once: no step to time, the timed runs will do it
            return
        report.latency = latency_from_generation(cm.model, cm.kernel, forward_s, prompt_tokens,
                                                 bytes_per_token=report.size.packed_bytes, bytes_basis=_PACKED_BASIS,
                                                 loop=loop)
        stages.finished("latency", report.latency)

    timed = after_greedy if protocol.times_generation() else None
    return generate_side_by_side(loaded.model, cm.model, loaded.tokenizer, prompt_for(loaded.name, protocol),
                                 protocol.new_tokens, protocol.seed, base=_base_continuations(loaded, protocol, stages),
                                 on_token=on_token, after_greedy=timed, sampled=protocol.sampled,
                                 timed_steps=protocol.decode_tokens)


def _base_continuations(loaded, protocol: EvalProtocol, stages: _Stages | None = None) -> dict:
    """The base model's continuations, computed once per (model, prompt, tokens, seed) and shared by every setting."""
    prompt = prompt_for(loaded.name, protocol)
    key = ("base-continuations", loaded.name, prompt, protocol.new_tokens, protocol.seed, protocol.sampled)
    found = _CACHE.get(key)
    if found is None:
        tick = None if stages is None else (lambda toks: stages.check("generate", 0, 1, "the base model's continuations "
                                                                      "(once per prompt)"))
        found = base_continuations(loaded.model, loaded.tokenizer, prompt, protocol.new_tokens, protocol.seed,
                                   on_token=tick, sampled=protocol.sampled)
        _CACHE.put(key, found)
    return found


def _perplexity_stage(report: Report, cm, loaded, text: tuple[str, str, str], protocol: EvalProtocol,
                      stages: _Stages, ppl_key) -> None:
    """Perplexity, KL and agreement into ``report``: from the cache (same config and windows) or one pass."""
    ppl = _CACHE.get(ppl_key) if ppl_key is not None else None
    if ppl is None:
        ppl = stages.run("perplexity", f"scoring up to {protocol.eval_tokens} tokens",
                         lambda: _perplexities(cm.model, loaded, text, protocol, stages))
        if ppl_key is not None:
            _CACHE.put(ppl_key, ppl)
    else:
        stages.run("perplexity", "from the cache", lambda: None, timing="cached")
    report.perplexity, base = ppl[0], ppl[1]
    report.base_perplexity, report.base_perplexity_stderr = base.value, base.stderr
    report.kl_to_base, report.top1_agreement, report.quality_stats = ppl[2], ppl[3], ppl[4]
    stages.finished("perplexity", report.perplexity)


def _perplexities(model, loaded, text: tuple[str, str, str], protocol: EvalProtocol, stages: _Stages):
    from lmcompress_core import data

    label, body, text_hash = text
    ids = data.token_ids(loaded.tokenizer, body)
    base = _base_scores(loaded, ids, protocol, text_hash, stages)
    scores = score_tokens(model, ids, protocol.context, protocol.stride, protocol.eval_tokens, base=base,
                          check=stages.ticker("perplexity", "window"))
    return (scores.report(text=label), scores.report(scores.base_nll, text=label),
            scores.kl_to_base, scores.top1_agreement, scores.statistics())


def _base_scores(loaded, ids: torch.Tensor, protocol: EvalProtocol, text_hash: str, stages: _Stages) -> BaseScores:
    """The base model's log-probabilities on the scored windows, once per (model, text, windows)."""
    key = ("base-scores", loaded.name, text_hash, protocol.eval_tokens, protocol.context, protocol.stride)
    found = _BASE_SCORES.get(key)
    if found is None:
        found = base_scores(loaded.model, ids, protocol.context, protocol.stride, protocol.eval_tokens,
                            check=stages.ticker("perplexity", "base model (once per text), window"))
        _BASE_SCORES.put(key, found)
    return found
