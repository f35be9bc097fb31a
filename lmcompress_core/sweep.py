"""Grids of compression configurations, running them through measure.evaluate, and the Pareto frontier.

A sweep is a list of CompressionConfig (bits × sparsity × method) evaluated by an executor (serial in this
process, or Ray: see execute/) into a pandas DataFrame with one row per configuration; ``pareto_mask``
marks the rows no other row beats on both axes (both minimised: size or latency against perplexity).
"""
from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from .compress import CompressionConfig, Progress, ProgressCallback
from .execute import Executor, ResultLog, SerialExecutor
from .execute.tasks import evaluate_config
from .plots import as_dict, config_label, pareto_mask
from .protocol import EvalProtocol
from .prune import PruningConfig
from .quantize import QuantizationConfig

COLUMNS = ["label", "bits", "sparsity_pct", "method", "size_mb", "packed_bytes", "perplexity", "stderr",
           "kl_to_base", "top1_agreement", "prefill_ms", "decode_tokens_per_s", "kernel", "config"]


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
    }


def run_sweep(loaded, configs: Sequence[CompressionConfig], evaluate: Callable | None = None,
              callback: ProgressCallback | None = None, should_stop: Callable[[], bool] | None = None,
              executor: Executor | None = None, out: str | Path | None = None, resume: bool = False,
              protocol: EvalProtocol | None = None) -> pd.DataFrame:
    """Evaluate every configuration on ``executor`` (default: serial, in this process); one row each.

    Rows come back in the grid's order whatever order the tasks finish in. ``callback`` gets a Progress as
    each configuration finishes (or fails and is retried). ``out`` appends every result to a JSON-lines file
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
        progress(outcome, config)
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

    def __call__(self, outcome, config: CompressionConfig) -> None:
        label = report_row_label(config)
        if outcome.ok:
            self.done += 1
            self._say(f"{label} done ({outcome.worker})")
        elif outcome.retrying:
            self._say(f"{label} failed, retrying once: {outcome.error}")
        else:
            self.done += 1
            self._say(f"{label} FAILED twice, left out: {outcome.error}")

    def _say(self, message: str) -> None:
        if self.callback is not None:
            self.callback(Progress("sweep", self.done, self.total, message))


def report_row_label(config: CompressionConfig) -> str:
    return config_label(config.to_dict())


def with_pareto(df: pd.DataFrame) -> pd.DataFrame:
    """Add boolean columns marking the size-vs-perplexity and latency-vs-perplexity frontiers."""
    df = df.copy()
    ok = df["perplexity"].notna()
    # Latency axis: decode time per token (ms), so that lower is better on both axes.
    df["decode_ms_per_token"] = [1000.0 / v if v else float("nan") for v in df["decode_tokens_per_s"]]
    df["pareto_size"] = False
    df["pareto_latency"] = False
    if ok.any():
        sub = df[ok]
        df.loc[ok, "pareto_size"] = pareto_mask(list(sub["size_mb"]), list(sub["perplexity"]))
        ms = [v if v == v else float("inf") for v in sub["decode_ms_per_token"]]
        df.loc[ok, "pareto_latency"] = pareto_mask(ms, list(sub["perplexity"]))
    return df
