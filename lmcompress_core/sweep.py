"""Grids of compression configurations, running them through measure.evaluate, and the Pareto frontier.

A sweep is a list of CompressionConfig (bits × sparsity × method) evaluated by an executor (serial in this
process, or Ray: see execute/) into a pandas DataFrame with one row per configuration; ``pareto_mask``
marks the rows no other row beats on both axes (both minimised: size or latency against perplexity).
``with_original`` adds the uncompressed model as a row (from the base figures every Report carries, measured
by the same protocol), ``latency_frontier_note`` says when a latency frontier would only be drawn from noise,
and ``readable_table`` is the table a person reads on the page and in the CSV (units in the headers).
"""
from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from lmcompress_core.compress import KERNEL_DENSE, KERNEL_SIMULATED, SPARSE_SUFFIX, CompressionConfig, Progress, ProgressCallback
from lmcompress_core.execute import Executor, ResultLog, SerialExecutor
from lmcompress_core.execute.tasks import evaluate_config
from lmcompress_core.report.plots import as_dict, config_label, pareto_mask
from lmcompress_core.measure.protocol import EvalProtocol
from lmcompress_core.methods.prune import PruningConfig
from lmcompress_core.methods.quantize import QuantizationConfig

COLUMNS = ["label", "bits", "sparsity_pct", "method", "size_mb", "packed_bytes", "perplexity", "stderr",
           "kl_to_base", "top1_agreement", "prefill_ms", "decode_tokens_per_s", "kernel", "config",
           "decode_vs_base", "decode_ratio_low", "decode_ratio_high", "base_size_mb", "base_perplexity",
           "base_stderr", "base_decode_tokens_per_s", "is_original", "compress_s", "calibration_tokens"]
ORIGINAL_LABEL = "original (uncompressed)"


def grid(bits: Iterable[int] = (2, 3, 4, 8), sparsities: Iterable[float] = (0.0, 0.5),
         methods: Iterable[str] = ("rtn",), quantization: QuantizationConfig | None = None,
         pruning: PruningConfig | None = None) -> list[CompressionConfig]:
    """Every combination of bit-width × sparsity × quantization method, other settings from the templates.

    ``bits`` 16 keeps the half-precision cast; 32 means "no quantization" (the float baseline);
    sparsity 0 means no pruning. GPTQ is skipped for bits >= 16 (nothing to solve) so the grid has no
    duplicates.
    """
    quantization = quantization or QuantizationConfig()
    pruning = pruning or PruningConfig()
    configs, seen = [], set()
    for b, s, m in itertools.product(bits, sparsities, methods):
        q = None if b >= 32 else replace(quantization, bits=b, method=m if b < 16 else "rtn")
        p = replace(pruning, sparsity=s) if s > 0 else None
        config = CompressionConfig(quantization=q, pruning=p)
        if config.key() not in seen:
            seen.add(config.key())
            configs.append(config)
    return configs


def report_row(report, config: CompressionConfig) -> dict:
    """One sweep row (flat, JSON-friendly) from an evaluated Report."""
    data = as_dict(report)
    size, lat, ppl = data.get("size") or {}, data.get("latency") or {}, data.get("perplexity") or {}
    base_ppl, base_lat = _base_perplexity(data), data.get("base_latency") or {}
    q, p = config.quantization, config.pruning
    return {
        "label": config_label(config.to_dict()),
        "bits": q.bits if q else 32,
        "sparsity_pct": round(100 * p.sparsity, 6) if p else 0.0,   # percent, as the page shows it
        "method": q.method if q else "none",
        "size_mb": (size.get("packed_bytes") or size.get("theoretical_bytes") or 0) / 1e6,
        "packed_bytes": size.get("packed_bytes"),
        "perplexity": ppl.get("value"),
        "stderr": ppl.get("stderr"),
        "kl_to_base": data.get("kl_to_base"),
        "top1_agreement": data.get("top1_agreement"),
        "prefill_ms": lat.get("prefill_ms"),
        "decode_tokens_per_s": lat.get("decode_tokens_per_s"),
        "kernel": lat.get("kernel"),
        "config": json.dumps(config.to_dict(), sort_keys=True),
        **_speed_columns(data.get("speed") or {}),
        "base_size_mb": (size.get("base_bytes") or 0) / 1e6 or None,
        "base_perplexity": base_ppl.get("value"),
        "base_stderr": base_ppl.get("stderr"),
        "base_decode_tokens_per_s": base_lat.get("decode_tokens_per_s"),
        "is_original": False,
        # the method's cost beside its quality: seconds to compress (calibration included), tokens it read
        "compress_s": (data.get("timings") or {}).get("compress"),
        "calibration_tokens": data.get("calibration_tokens") or 0,
    }


def _base_perplexity(data: dict) -> dict:
    base = data.get("base_perplexity")
    if isinstance(base, dict):
        return base
    return {"value": base, "stderr": data.get("base_perplexity_stderr")}


def _speed_columns(speed: dict) -> dict:
    """Decode speed against the original from the alternating runs (measure_speed.SpeedRatio): the text a chart may
    print and the lowest and highest round's ratio; a simulated model's range is widened to include 1× (nothing in
    it runs faster, whatever one round says)."""
    low, high = speed.get("decode_range") or (None, None)
    text = speed.get("decode_text")
    if text and "simulated" in text and low is not None:
        low, high = min(low, 1.0), max(high, 1.0)
    return {"decode_vs_base": text, "decode_ratio_low": low, "decode_ratio_high": high}


def run_sweep(loaded, configs: Sequence[CompressionConfig], evaluate: Callable | None = None,
              callback: ProgressCallback | None = None, should_stop: Callable[[], bool] | None = None,
              executor: Executor | None = None, out: str | Path | None = None, resume: bool = False,
              protocol: EvalProtocol | None = None) -> pd.DataFrame:
    """Evaluate every configuration on ``executor`` (default: serial, in this process); one row each.

    Rows come back in the grid's order whatever order the tasks finish in. ``callback`` gets a Progress as
    each configuration finishes (its table row in ``metrics["row"]``, for a caller that keeps partial results)
    or fails and is retried. ``out`` appends every result to a JSON-lines file
    as it arrives; with ``resume`` the configurations already in it (same model and protocol) are not
    recomputed. A configuration that fails twice is left out of the table and listed in
    ``table.attrs["failures"]``; ``table.attrs["backend"]`` says where the sweep ran. Raises
    compress.Cancelled when ``should_stop`` says so (results already written stay in ``out``).
    ``evaluate`` (in-process only) replaces measure.evaluate; every configuration is measured by ``protocol``.
    """
    executor = _executor(executor, evaluate)
    keys = [c.key() for c in configs]
    protocol = protocol or EvalProtocol()
    options = {"protocol": protocol.to_dict()}   # plain data: it may travel to another process
    log = ResultLog(out, {"model": loaded.name, **options["protocol"]}, resume) if out is not None else None
    reports = {k: r for k, r in (log.finished() if log and resume else {}).items() if k in keys}
    todo = [c for c in configs if c.key() not in reports]
    progress = _Reporter(callback, len(configs), len(reports), executor)
    failures = []
    for outcome in executor.map(loaded, "evaluate", [{"config": c.to_dict()} for c in todo], options,
                                should_stop):
        config = todo[outcome.index]
        if log is not None:
            log.append(config.key(), outcome.result, outcome.error)
        if outcome.ok:
            reports[config.key()] = outcome.result
        elif not outcome.retrying:
            failures.append({"label": report_row_label(config), "error": outcome.error})
        progress(outcome, config, report_row(outcome.result, config) if outcome.ok else None)
    rows = [report_row(reports[k], c) for k, c in zip(keys, configs) if k in reports]
    table = with_pareto(pd.DataFrame(rows, columns=COLUMNS))
    table.attrs.update(backend=executor.describe(), failures=failures)
    return table


def _executor(executor: Executor | None, evaluate: Callable | None) -> Executor:
    if evaluate is None:
        return executor or SerialExecutor()
    if executor is not None and executor.remote:
        raise ValueError("a custom evaluate function runs only in this process: use the serial executor")
    return SerialExecutor({"evaluate": functools.partial(evaluate_config, evaluate=evaluate)})


class _Reporter:
    """Turns Outcomes into sweep Progress: step = configurations finished so far."""

    def __init__(self, callback: ProgressCallback | None, total: int, done: int, executor: Executor):
        self.callback, self.total, self.done = callback, total, done
        resumed = f" ({done} already done)" if done else ""
        self._say(f"{total} configurations{resumed} on {executor.describe()}")

    def __call__(self, outcome, config: CompressionConfig, row: dict | None = None) -> None:
        label = report_row_label(config)
        if outcome.ok:
            self.done += 1
            self._say(f"{label} done ({outcome.worker})", {"row": row})
        elif outcome.retrying:
            self._say(f"{label} failed, retrying once: {outcome.error}")
        else:
            self.done += 1
            self._say(f"{label} FAILED twice, left out: {outcome.error}")

    def _say(self, message: str, metrics: dict | None = None) -> None:
        if self.callback is not None:
            self.callback(Progress("sweep", self.done, self.total, message, metrics or {}))


def report_row_label(config: CompressionConfig) -> str:
    return config_label(config.to_dict())


def with_pareto(df: pd.DataFrame) -> pd.DataFrame:
    """Add the latency axis, a short chart label and boolean columns marking the size-vs-perplexity and
    latency-vs-perplexity frontiers (no latency frontier when ``latency_frontier_note`` says it is noise)."""
    df = df.copy()
    ok = df["perplexity"].notna()
    # Latency axis: decode time per token (ms), so that lower is better on both axes.
    df["decode_ms_per_token"] = [1000.0 / v if v == v and v else float("nan") for v in df["decode_tokens_per_s"]]
    df["short_label"] = [short_label(row) for row in df.to_dict("records")]
    df["pareto_size"] = False
    df["pareto_latency"] = False
    if ok.any():
        sub = df[ok]
        df.loc[ok, "pareto_size"] = pareto_mask(list(sub["size_mb"]), list(sub["perplexity"]))
        if not latency_frontier_note(df):
            ms = [v if v == v else float("inf") for v in sub["decode_ms_per_token"]]
            df.loc[ok, "pareto_latency"] = pareto_mask(ms, list(sub["perplexity"]))
    return df


def short_label(row: dict) -> str:
    """A label short enough to print beside a point: 'original', '4-bit', '2-bit GPTQ, 50% pruned', 'bf16'."""
    if row.get("is_original"):
        return "original"
    bits, method, sparsity = row.get("bits"), str(row.get("method") or "rtn"), row.get("sparsity_pct") or 0
    words = {16: "bf16", 32: "fp32"}.get(bits, f"{bits}-bit")
    if method not in ("rtn", "none") and bits < 16:
        words += f" {method.upper()}"
    return words + (f", {sparsity:g}% pruned" if sparsity else "")


def with_original(table: pd.DataFrame) -> pd.DataFrame:
    """The sweep with the uncompressed model as its first row and the frontiers recomputed with it.

    Its figures are the base figures the configurations' Reports carry (same protocol, same tokens): perplexity
    and size as measured there, decode speed the median of the base runs timed alternately with each
    configuration. Its size is its fp32 bytes (what its files hold); a table without base figures is returned as is.
    """
    rows = table[table["base_perplexity"].notna()] if "base_perplexity" in table else table.iloc[0:0]
    if rows.empty or table.get("is_original", pd.Series(dtype=bool)).any():
        return table
    decode = rows["base_decode_tokens_per_s"].dropna()
    original = {
        "label": ORIGINAL_LABEL, "bits": 32, "sparsity_pct": 0.0, "method": "none",
        "size_mb": rows["base_size_mb"].iloc[0], "packed_bytes": None, "perplexity": rows["base_perplexity"].iloc[0],
        "stderr": rows["base_stderr"].iloc[0], "kl_to_base": 0.0, "top1_agreement": 1.0, "prefill_ms": None,
        "decode_tokens_per_s": float(decode.median()) if len(decode) else None,
        "kernel": f"{KERNEL_DENSE} (the original)", "config": json.dumps(CompressionConfig().to_dict(), sort_keys=True),
        "decode_vs_base": "1× (the reference)", "decode_ratio_low": 1.0, "decode_ratio_high": 1.0,
        "is_original": True, "compress_s": 0.0, "calibration_tokens": 0}
    combined = pd.concat([pd.DataFrame([original], columns=COLUMNS), table[COLUMNS]], ignore_index=True)
    return _keep_attrs(with_pareto(combined), table)


def _keep_attrs(df: pd.DataFrame, source: pd.DataFrame) -> pd.DataFrame:
    df.attrs.update(source.attrs)
    return df


def kernel_family(kernel: str | None) -> str:
    """What really computes: a simulated model and the original both run fp32 dense; dense zeros change nothing."""
    kernel = (kernel or "").replace(SPARSE_SUFFIX, "").replace(" (the original)", "")
    return KERNEL_DENSE if kernel == KERNEL_SIMULATED else kernel


def latency_frontier_note(df: pd.DataFrame) -> str:
    """Why no latency frontier should be drawn, or "" when one may be.

    A frontier on decode time is noise when every point ran the same kernel, or when no two points' decode speeds
    differ beyond the spread of their timed runs: each configuration's range is the lowest to highest round of
    (original time ÷ its time) from the alternating runs, the original's is exactly 1×, and two points differ only
    when their ranges do not overlap (the rule measure_speed.ratio_text applies against the original).
    """
    timed = df[df["decode_tokens_per_s"].notna() & df["perplexity"].notna()]
    if len(timed) < 2:
        return "fewer than two configurations were timed, so there is no latency frontier to draw"
    families = {kernel_family(k) for k in timed["kernel"]}
    if len(families) == 1:
        return (f"every configuration ran on the same kernel ({families.pop()}), so their decode times differ only "
                "by the noise of the timed runs: no latency frontier is drawn")
    ranges = [(lo, hi) for lo, hi in zip(timed.get("decode_ratio_low", []), timed.get("decode_ratio_high", []))
              if lo == lo and hi == hi and lo is not None and hi is not None]
    if not any(a[1] < b[0] for a in ranges for b in ranges):
        return ("no configuration decodes faster or slower than another beyond the spread of its timed runs "
                "(each timed alternately with the original), so no latency frontier is drawn")
    return ""


READABLE = {  # table column -> the header shown on the page and written to the CSV (units in the name)
    "label": "setting", "bits": "bits", "sparsity_pct": "sparsity (%)", "method": "quantizer",
    "size_mb": "size (MB)", "perplexity": "perplexity", "stderr": "perplexity ± (std. error)",
    "kl_to_base": "KL to original (nats)", "top1_agreement": "same top-1 token as original (%)",
    "compress_s": "compress (s)", "calibration_tokens": "calibration tokens",
    "decode_ms_per_token": "decode (ms per token)", "decode_tokens_per_s": "decode (tokens/s)",
    "decode_vs_base": "decode speed vs original", "kernel": "kernel", "pareto_size": "best for its size",
    "pareto_latency": "best for its speed", "config": "config (JSON, sparsity as a fraction 0-1)",
}


def readable_table(df: pd.DataFrame) -> pd.DataFrame:
    """The sweep as a person reads it, on the page and in the CSV alike: percentages as percentages, units in
    the headers, the machine-readable config last."""
    out = df[[c for c in READABLE if c in df]].copy()
    out["top1_agreement"] = out["top1_agreement"] * 100
    out["method"] = [str(m).upper() if m != "none" else "none" for m in out["method"]]
    return out.rename(columns=READABLE)
