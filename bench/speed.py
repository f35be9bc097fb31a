"""Real speedups on SmolLM2: fp32 against bf16 and the real int8 kernel, prefill and decode.

Each variant is timed by `lmcompress_core.measure.measure_latency` (its own warm-up and median of `runs`);
the three variants are interleaved over `ROUNDS` rounds in this one process and the median of the round
medians is kept, so a burst of load on the machine hits all of them alike. The roofline estimate
(weight bytes streamed per decoded token against the measured memory bandwidth) is reported beside each.
"""
from __future__ import annotations

import statistics
import time

# what run() returns, key for key (bench/__main__.py checks it)
KEYS = (
    "headline", "rows", "prompt_tokens", "new_tokens", "runs_per_round", "rounds", "model", "seconds",
)


ROUNDS = 3


def _variants(ctx) -> dict:
    from lmcompress_core.compress import CompressionConfig, compress
    from lmcompress_core.quantize import QuantizationConfig

    base = ctx.loaded(ctx.main_model)
    bf16 = compress(base.model, CompressionConfig(quantization=QuantizationConfig(bits=16, dtype16="bf16")))
    int8 = compress(base.model, CompressionConfig(quantization=QuantizationConfig(
        bits=8, granularity="channel", int8_kernel=True)))
    return {"fp32": (base.model, "fp32 dense"), "bf16": (bf16.model, bf16.kernel), "int8": (int8.model, int8.kernel)}


def _measure(ctx, model, kernel):
    from lmcompress_core.measure import measure_latency

    return measure_latency(model, ctx.loaded(ctx.main_model).tokenizer, kernel,
                           prompt_tokens=ctx.scale.prompt_tokens, new_tokens=ctx.scale.new_tokens,
                           runs=ctx.scale.runs)


def run(ctx) -> dict:
    start = time.perf_counter()
    variants = _variants(ctx)
    samples = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, (model, kernel) in variants.items():
            samples[name].append(_measure(ctx, model, kernel))
    rows = {}
    for name, reports in samples.items():
        last = reports[-1]
        rows[name] = {
            "kernel": last.kernel,
            "prefill_ms": statistics.median(r.prefill_ms for r in reports),
            "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in reports),
            "roofline_tokens_per_s": last.roofline_tokens_per_s,
            "bandwidth_gb_s": last.bandwidth_gb_s,
            "rounds": [{"prefill_ms": r.prefill_ms, "decode_tokens_per_s": r.decode_tokens_per_s} for r in reports],
        }
    fp32 = rows["fp32"]
    for row in rows.values():
        row["prefill_speedup"] = fp32["prefill_ms"] / row["prefill_ms"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / fp32["decode_tokens_per_s"]
        if row["roofline_tokens_per_s"]:
            row["decode_fraction_of_roofline"] = row["decode_tokens_per_s"] / row["roofline_tokens_per_s"]
            row["roofline_speedup"] = row["roofline_tokens_per_s"] / fp32["roofline_tokens_per_s"]
    return {
        "headline": {"int8_speedup_prefill": rows["int8"]["prefill_speedup"],
                     "int8_speedup_decode": rows["int8"]["decode_speedup"],
                     "bf16_speedup_decode": rows["bf16"]["decode_speedup"]},
        "rows": rows, "prompt_tokens": ctx.scale.prompt_tokens, "new_tokens": ctx.scale.new_tokens,
        "runs_per_round": ctx.scale.runs, "rounds": ROUNDS, "model": ctx.main_model,
        "seconds": time.perf_counter() - start,
    }
