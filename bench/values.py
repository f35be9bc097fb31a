"""What a bench value is: a measurement, an error entry, or the spread of the runs behind a timing.

A measurement that failed is never a number: it is ``{"error": why}`` (``failed``), which the targets table shows
as "failed". A timing headline key is a median (or the largest) of runs its section kept; ``spreads`` reads
those runs back from the section and gives min, median and max beside the value.
"""
from __future__ import annotations

import math
import statistics


def failed(why: str) -> dict:
    """An error entry in place of a value that could not be measured."""
    return {"error": why}


def is_failed(value) -> bool:
    return isinstance(value, dict) and "error" in value


def not_a_measurement(value) -> str | None:
    """Why a headline value is no measurement (an error entry, 0 or not finite), or None when it is one."""
    if is_failed(value):
        return str(value["error"])
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (value == 0 or not math.isfinite(value)):
        return f"the section recorded {value!r}, which no working measurement gives"
    return None


def _get(node, *path):
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _numbers(values) -> list[float]:
    return [float(v) for v in values or [] if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _interactivity(results: dict, model: str, field: str) -> list[float]:
    return _numbers(_get(results, "sections", "interactivity", "models", model, field))


def _browser_moves(results: dict, model: str, field: str) -> list[float]:
    moves = _get(results, "sections", "browser", "models", model, "moves") or []
    return _numbers(m.get(field) for m in moves if m.get("counted") and m.get("group") == "rtn")


def _browser_stops(results: dict, model: str, field: str) -> list[float]:
    stops = _get(results, "sections", "browser", "models", model, field) or []
    return _numbers(s.get("stop_s") for s in stops)


def _per_round(results: dict, top: str, bottom: str, field: str) -> list[float]:
    """Ratio top/bottom of ``field`` round by round (the speed section interleaves its variants in rounds)."""
    rows = _get(results, "sections", "speed", "rows") or {}
    a, b = (rows.get(name, {}).get("rounds") or [] for name in (top, bottom))
    return [x[field] / y[field] for x, y in zip(a, b) if x.get(field) and y.get(field)]


def _matmul_fraction(results: dict) -> list[float]:
    """eval_fraction_of_matmul_peak per timed run: the fraction scales as 1 / seconds."""
    fp32 = _get(results, "sections", "throughput", "fp32") or {}
    seconds, value = _numbers(fp32.get("seconds_all")), fp32.get("fraction_of_peak")
    if not seconds or not isinstance(value, (int, float)):
        return []
    middle = statistics.median(seconds)
    return [value * middle / s for s in seconds]


def _runs_of(results: dict, key: str) -> list[float] | None:
    """The runs behind a timing key, from its section (None: not a timing key this module knows)."""
    model = "default" if key.endswith("_default") else "tiny" if key.endswith("_tiny") else None
    by_prefix = {
        "interactive_s_": lambda: _interactivity(results, model, "change_all_s"),
        "first_chart_s_": lambda: _interactivity(results, model, "first_chart_s_all"),
        "generations_s_": lambda: _interactivity(results, model, "generations_s_all"),
        "abandon_s_": lambda: _interactivity(results, model, "abandon_all_s"),
        "abandon_distil_s_": lambda: _interactivity(results, model, "abandon_distil_all_s"),
        "browser_first_chart_s_": lambda: _browser_moves(results, model, "first_s"),
        "browser_all_charts_s_": lambda: _browser_moves(results, model, "all_s"),
        "browser_complete_s_": lambda: _browser_moves(results, model, "complete_s"),
        "browser_abandon_s_": lambda: _browser_stops(results, model, "interrupts"),
        "browser_abandon_distil_s_": lambda: _browser_stops(results, model, "distil_interrupts"),
        "browser_cold_s_": lambda: _numbers([_get(results, "sections", "browser", "models", model, "cold_s")]),
    }
    for prefix, runs in by_prefix.items():
        if key.startswith(prefix) and model is not None:
            return runs()
    return _speed_runs(results).get(key, lambda: None)()


def _speed_runs(results: dict) -> dict:
    decode, prefill = "decode_tokens_per_s", "prefill_ms"
    return {
        "real_int4_decode_speedup": lambda: _per_round(results, "int4", "fp32", decode),
        "real_int8_decode_speedup": lambda: _per_round(results, "int8", "fp32", decode),
        "int8_speedup_decode": lambda: _per_round(results, "int8", "fp32", decode),
        "int8_dynamic_speedup_decode": lambda: _per_round(results, "int8_dynamic", "fp32", decode),
        "bf16_speedup_decode": lambda: _per_round(results, "bf16", "fp32", decode),
        "int4_over_bf16_decode": lambda: _per_round(results, "int4", "bf16", decode),
        **{f"int{b}_g128_over_bf16_decode": (lambda b=b: _per_round(results, f"int{b}_g128", "bf16", decode))
           for b in (8, 6, 5)},
        "int4_prefill_over_bf16": lambda: _per_round(results, "bf16", "int4", prefill),
        "int8_speedup_prefill": lambda: _per_round(results, "fp32", "int8", prefill),
        "eval_fraction_of_matmul_peak": lambda: _matmul_fraction(results),
    }


def spread(results: dict, key: str) -> dict | None:
    """{"min", "median", "max", "runs"} of the runs behind a timing key; None when the section kept none."""
    runs = _runs_of(results, key)
    if not runs:
        return None
    return {"min": min(runs), "median": statistics.median(runs), "max": max(runs), "runs": len(runs)}


def spreads(results: dict) -> dict[str, dict]:
    """The spread of every headline timing key whose section kept its runs."""
    found = {key: spread(results, key) for key in results.get("headline", {})}
    return {key: value for key, value in found.items() if value is not None}
