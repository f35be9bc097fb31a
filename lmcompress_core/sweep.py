"""Grids of compression configurations, running them through measure.evaluate, and the Pareto frontier.

A sweep is a list of CompressionConfig (bits × sparsity × method) evaluated one by one into a pandas
DataFrame with one row per configuration; ``pareto_mask`` marks the rows no other row beats on both
axes (both minimised: size or latency against perplexity).
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import pandas as pd

from .compress import Cancelled, CompressionConfig, Progress, ProgressCallback
from .plots import as_dict, config_label, pareto_mask
from .prune import PruningConfig
from .quantize import QuantizationConfig

COLUMNS = ["label", "bits", "sparsity", "method", "size_mb", "packed_bytes", "perplexity", "stderr",
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
        "sparsity": p.sparsity if p else 0.0,
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
              **evaluate_kwargs) -> pd.DataFrame:
    """Evaluate each configuration in turn; raises compress.Cancelled when ``should_stop`` says so.

    ``evaluate`` defaults to measure.evaluate; ``evaluate_kwargs`` (eval_tokens, ...) pass through.
    """
    if evaluate is None:
        from .measure import evaluate
    rows = []
    for i, config in enumerate(configs):
        if should_stop is not None and should_stop():
            raise Cancelled(f"sweep stopped after {i} of {len(configs)} configurations")
        if callback is not None:
            callback(Progress("sweep", i, len(configs), f"evaluating {report_row_label(config)}"))
        report = evaluate(loaded, config, should_stop=should_stop, **evaluate_kwargs)
        rows.append(report_row(report, config))
    if callback is not None:
        callback(Progress("sweep", len(configs), len(configs), "done"))
    return with_pareto(pd.DataFrame(rows, columns=COLUMNS))


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
