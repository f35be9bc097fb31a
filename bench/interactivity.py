"""Interactivity: seconds from a configuration change to each result, as the Explore page computes them.

The Report comes from `lmcompress_core.measure.evaluation.evaluate` with the protocol the Explore page uses at its
defaults (`app_protocol`, built by the page's own `protocol_from_settings`): while exploring, the compressed
model is timed alone (no speed ratio) and the stages run size → perplexity → generations (streamed) → latency.
Per model:
  cold       first Report of the process: model load + first evaluate (lazy imports, allocator warm-up, and
             the configuration-independent base results: log-probabilities, continuations)
  change     the model is loaded; the slider moves to a bit-width not seen before (median of distinct moves)
  cached     the slider comes back to a configuration already computed: evaluate's report cache
  first chart / perplexity chart / all charts / generations
             seconds from the change until the size, perplexity, latency and generation stages are done (the
             page draws each as its stage ends; while exploring the latency is read off the greedy generation,
             so its chart comes once the greedy continuation has taken the protocol's decode_tokens steps, and
             "generations" is the whole change)
  abandon    seconds from should_stop turning True (a new slider move) to evaluate giving up, at 10–90% of an
             uncached run of the same setting timed just before; the largest
  abandon while distilling
             the same with the page's Distil toggle on (its default steps): should_stop turns True at 10–90% of
             one distillation step after the first step's report (a step is the longest unit of work: ~4 s on
             SmolLM2 here); the largest
  gptq       a first GPTQ setting (calibration pass + GPTQ) and a second one that reuses the model's
             calibration statistics: seconds of the compress stage and of the whole Report
The headline `interactive_s_<model>` is the median *change*, the case a person meets at every slider move.
"""
from __future__ import annotations

import statistics
import time

from bench.common import timed

# what run() returns, key for key (bench/__main__.py checks it)
KEYS = (
    "headline", "models", "protocol", "seconds", "gptq",
)


MOVES = (2, 3, 4, 5, 6, 8)   # bit-widths visited by the slider; the first is the cold run
MARKS = {"size": "first_chart_s", "perplexity": "perplexity_chart_s", "generate": "generations_s",
         "latency": "all_charts_s"}
ABANDON_AT = (0.1, 0.3, 0.5, 0.7, 0.9)   # fractions of a change's (or a distillation step's) duration


def app_protocol():
    """The EvalProtocol pages/explore.py measures with at its default settings (the page's own function)."""
    from pages.common import WIDGETS, protocol_from_settings

    return protocol_from_settings(WIDGETS)


def _config(bits: int, method: str = "rtn"):
    from lmcompress_core.compress import CompressionConfig
    from lmcompress_core.methods.quantize import QuantizationConfig

    return CompressionConfig(quantization=QuantizationConfig(bits=bits, group_size=128, method=method))


def _one_report(loaded, config, protocol) -> dict:
    """Seconds to a complete Report and to the end of each stage (from the callback), plus the stage timings."""
    from lmcompress_core.measure.evaluation import evaluate

    start = time.perf_counter()
    marks = {}

    def callback(progress):
        mark = MARKS.get(progress.stage)
        if mark and "partial" in progress.metrics and mark not in marks:
            marks[mark] = time.perf_counter() - start

    report = evaluate(loaded, config, protocol, callback=callback)
    total = time.perf_counter() - start
    return {"total_s": total, **marks, "stages_s": dict(report.timings),
            "eval_tokens": report.perplexity.tokens if report.perplexity else None}


def _abandon_s(loaded, bits: int, protocol, after_s: float) -> float | None:
    """Seconds from should_stop turning True, ``after_s`` into a change, to evaluate raising Cancelled."""
    from lmcompress_core.compress import Cancelled
    from lmcompress_core.measure.evaluation import evaluate

    stop_at = time.perf_counter() + after_s
    try:
        evaluate(loaded, _config(bits), protocol, should_stop=lambda: time.perf_counter() >= stop_at,
                 use_cache=False)
    except Cancelled:
        return time.perf_counter() - stop_at
    return None   # finished before the stop


def _distilling():
    """The Explore page's default setting with its Distil toggle on (the page's own build_config)."""
    from pages.common import WIDGETS, build_config

    return build_config({**WIDGETS, "kd": True})


def _distil_step_s(loaded, protocol) -> float:
    """Seconds between the first two distillation steps' reports (the run is stopped at the second)."""
    from lmcompress_core.compress import Cancelled
    from lmcompress_core.measure.evaluation import evaluate

    reports = []

    def callback(progress):
        if progress.stage == "distill" and "loss" in progress.metrics:
            reports.append(time.perf_counter())

    try:
        evaluate(loaded, _distilling(), protocol, callback=callback, should_stop=lambda: len(reports) >= 2,
                 use_cache=False)
    except Cancelled:
        pass
    return reports[1] - reports[0]


def _distil_abandon_s(loaded, protocol, after_s: float) -> float | None:
    """Seconds from should_stop turning True, ``after_s`` after the first distillation step's report, to
    evaluate raising Cancelled."""
    from lmcompress_core.compress import Cancelled
    from lmcompress_core.measure.evaluation import evaluate

    stop_at = [float("inf")]

    def callback(progress):
        if progress.stage == "distill" and "loss" in progress.metrics and stop_at[0] == float("inf"):
            stop_at[0] = time.perf_counter() + after_s

    try:
        evaluate(loaded, _distilling(), protocol, callback=callback,
                 should_stop=lambda: time.perf_counter() >= stop_at[0], use_cache=False)
    except Cancelled:
        return time.perf_counter() - stop_at[0]
    return None   # finished before the stop


def _median(changes: list[dict], key: str) -> float | None:
    values = [c[key] for c in changes if c.get(key) is not None]
    return statistics.median(values) if values else None


def _model(ctx, name: str, runs: int, protocol) -> dict:
    from lmcompress_core.compress import CALIBRATION_STATS
    from lmcompress_core.measure.evaluation import clear_cache, evaluate

    clear_cache()
    CALIBRATION_STATS.clear()
    loaded, load_s = timed(lambda: ctx.loaded(name))
    cold = _one_report(loaded, _config(MOVES[0]), protocol)
    changes = [_one_report(loaded, _config(bits), protocol) for bits in MOVES[1: 1 + runs]]
    cached = [_one_report(loaded, _config(bits), protocol)["total_s"] for bits in MOVES[1: 1 + runs]]
    typical = sorted(changes, key=lambda c: c["total_s"])[len(changes) // 2]
    change_s = statistics.median(c["total_s"] for c in changes)
    uncached = timed(lambda: evaluate(loaded, _config(4), protocol, use_cache=False))[1]   # the stops' yardstick
    abandon = [_abandon_s(loaded, 4, protocol, f * uncached) for f in ABANDON_AT]
    step_s = _distil_step_s(loaded, protocol)
    distilling = [_distil_abandon_s(loaded, protocol, f * step_s) for f in ABANDON_AT]
    return {
        "load_s": load_s, "cold_s": load_s + cold["total_s"], "cold_evaluate_s": cold["total_s"],
        "change_s": change_s, "change_all_s": [c["total_s"] for c in changes],
        "cached_s": statistics.median(cached),
        **{mark: _median(changes, mark) for mark in MARKS.values()},
        **{f"{mark}_all": [c.get(mark) for c in changes] for mark in MARKS.values()},   # the runs behind each
        "abandon_s": max((a for a in abandon if a is not None), default=None), "abandon_all_s": abandon,
        "abandon_distil_s": max((a for a in distilling if a is not None), default=None),
        "abandon_distil_all_s": distilling, "distil_step_s": step_s,
        "stages_s": {k: v for k, v in typical["stages_s"].items() if isinstance(v, (int, float))},
        "eval_tokens": typical["eval_tokens"], "runs": len(changes),
    }


def _gptq(loaded, protocol) -> dict:
    """A first and a second GPTQ setting on one model: the second reuses the calibration statistics."""
    first, second = (_one_report(loaded, _config(bits, "gptq"), protocol) for bits in (4, 3))
    compress = (first["stages_s"].get("compress"), second["stages_s"].get("compress"))
    return {"first_compress_s": compress[0], "second_compress_s": compress[1],
            "first_total_s": first["total_s"], "second_total_s": second["total_s"],
            "compress_speedup": compress[0] / compress[1] if all(compress) else None,
            "total_speedup": first["total_s"] / second["total_s"]}


def run(ctx) -> dict:
    start = time.perf_counter()
    names = ["tiny", "default"] if ctx.scale.include_default else ["tiny"]
    runs = max(5, ctx.scale.runs)
    protocol = app_protocol()
    models, gptq = {}, {}
    for name in names:
        models[name] = _model(ctx, name, runs, protocol)
        gptq[name] = _gptq(ctx.loaded(name), protocol)   # after the moves: the base results are cached
    headline = {}
    for name, m in models.items():
        headline.update({f"interactive_s_{name}": m["change_s"], f"first_chart_s_{name}": m["first_chart_s"],
                         f"generations_s_{name}": m["generations_s"], f"abandon_s_{name}": m["abandon_s"],
                         f"abandon_distil_s_{name}": m["abandon_distil_s"],
                         f"gptq_second_speedup_{name}": gptq[name]["compress_speedup"]})
    return {"headline": headline, "models": models, "protocol": protocol.to_dict(),
            "seconds": time.perf_counter() - start, "gptq": gptq}
