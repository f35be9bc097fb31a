"""Interactivity: seconds from a configuration change to a complete Report, as the Explore page computes it.

The Report comes from `lmcompress_core.measure.evaluate` with the protocol the Explore page uses at its
defaults (`app_protocol`, built by the page's own `protocol_from_settings`).
Per model:
  cold       first Report of the process: model load + first evaluate (lazy imports, allocator warm-up)
  change     the model is loaded; the slider moves to a bit-width not seen before (median of distinct moves)
  cached     the slider comes back to a configuration already computed: evaluate's report cache
  first chart  seconds until the size stage is done, the first figure the page can draw (from the callback)
The headline `interactive_s_<model>` is the median *change*, the case a person meets at every slider move.
"""
from __future__ import annotations

import statistics
import time

from bench.common import timed

# what run() returns, key for key (bench/__main__.py checks it)
KEYS = (
    "headline", "models", "protocol", "seconds",
)


MOVES = (2, 3, 4, 5, 6, 8)   # bit-widths visited by the slider; the first is the cold run


def app_protocol():
    """The EvalProtocol pages/explore.py measures with at its default settings (the page's own function)."""
    from pages.common import WIDGETS, protocol_from_settings

    return protocol_from_settings(WIDGETS)


def _config(bits: int):
    from lmcompress_core.compress import CompressionConfig
    from lmcompress_core.quantize import QuantizationConfig

    return CompressionConfig(quantization=QuantizationConfig(bits=bits, group_size=128))


def _one_report(loaded, bits: int, protocol) -> dict:
    """Seconds to a complete Report and to the size result (the first chart), plus the stage timings."""
    from lmcompress_core.measure import evaluate

    start = time.perf_counter()
    marks = {}

    def callback(progress):
        if progress.stage == "size" and progress.step == progress.total and "size" not in marks:
            marks["size"] = time.perf_counter() - start

    report = evaluate(loaded, _config(bits), protocol, callback=callback)
    total = time.perf_counter() - start
    return {"bits": bits, "total_s": total, "first_chart_s": marks.get("size"), "stages_s": dict(report.timings),
            "eval_tokens": report.perplexity.tokens if report.perplexity else None}


def _model(ctx, name: str, runs: int, protocol) -> dict:
    from lmcompress_core.measure import clear_cache

    clear_cache()
    loaded, load_s = timed(lambda: ctx.loaded(name))
    cold = _one_report(loaded, MOVES[0], protocol)
    changes = [_one_report(loaded, bits, protocol) for bits in MOVES[1: 1 + runs]]
    cached = [_one_report(loaded, bits, protocol)["total_s"] for bits in MOVES[1: 1 + runs]]
    typical = sorted(changes, key=lambda c: c["total_s"])[len(changes) // 2]
    return {
        "load_s": load_s, "cold_s": load_s + cold["total_s"], "cold_evaluate_s": cold["total_s"],
        "change_s": statistics.median(c["total_s"] for c in changes),
        "change_all_s": [c["total_s"] for c in changes],
        "cached_s": statistics.median(cached),
        "first_chart_s": statistics.median(c["first_chart_s"] for c in changes if c["first_chart_s"] is not None),
        "stages_s": {k: v for k, v in typical["stages_s"].items() if isinstance(v, (int, float))},
        "eval_tokens": typical["eval_tokens"], "runs": len(changes),
    }


def run(ctx) -> dict:
    start = time.perf_counter()
    names = ["tiny", "default"] if ctx.scale.include_default else ["tiny"]
    runs = max(5, ctx.scale.runs)
    protocol = app_protocol()
    models = {name: _model(ctx, name, runs, protocol) for name in names}
    headline = {f"interactive_s_{name}": m["change_s"] for name, m in models.items()}
    return {"headline": headline, "models": models, "protocol": protocol.to_dict(),
            "seconds": time.perf_counter() - start}
