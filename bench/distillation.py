"""Distillation on the tiny model: how much of the perplexity lost to pruning recovery KD wins back, per temperature.

The pruned model (50% magnitude) is the student, the unpruned tiny model the teacher; `steps` recovery KD steps
(masks kept) at T = 1, 2, 4, 8, each with SEEDS seeds, everything else at DistillationConfig's defaults.
Recovered fraction = (ppl_pruned − ppl_after) / (ppl_pruned − ppl_base) on held-out text never trained on:
1 = all of the loss recovered, 0 = none, negative = distillation made the model worse.
"""
from __future__ import annotations

import statistics
import time

from bench.common import timed

MODEL = "tiny"
TEMPERATURES = (1, 2, 4, 8)
SEEDS = (0, 1, 2)
# what run() returns, key for key (bench/__main__.py checks it)
KEYS = ("headline", "base_perplexity", "pruned_perplexity", "steps", "seeds", "rows", "eval_tokens", "seconds")


def _config(temperature: float | None, steps: int, seed: int = 0):
    from lmcompress_core.compress import CompressionConfig
    from lmcompress_core.distill import DistillationConfig
    from lmcompress_core.prune import PruningConfig

    distillation = None if temperature is None else DistillationConfig(
        temperature=float(temperature), steps=steps, mode="recovery", seed=seed)
    return CompressionConfig(pruning=PruningConfig(sparsity=0.5, method="magnitude"), distillation=distillation)


def recovered_fraction(pruned: float, after: float, base: float) -> float | None:
    """(pruned − after) / (pruned − base); None when pruning lost nothing (nothing to recover)."""
    gap = pruned - base
    return (pruned - after) / gap if gap > 0 else None


def summary(rows: list[dict]) -> dict:
    """T -> {mean, std} of the recovered fraction over seeds (std over ≥ 2 seeds, else None)."""
    out = {}
    for temperature in TEMPERATURES:
        values = [r["recovered_fraction"] for r in rows
                  if r["temperature"] == temperature and r["recovered_fraction"] is not None]
        out[str(temperature)] = {"mean": statistics.mean(values) if values else None,
                                 "std": statistics.stdev(values) if len(values) > 1 else None}
    return out


def run(ctx) -> dict:
    from lmcompress_core.compress import compress

    start = time.perf_counter()
    base = ctx.loaded(MODEL)
    calibration = ctx.calibration(MODEL)
    steps = ctx.scale.kd_steps
    base_ppl = ctx.base_perplexity(MODEL)
    pruned = compress(base.model, _config(None, steps), calibration=calibration)
    pruned_ppl = ctx.perplexity(pruned.model, MODEL)
    rows = []
    for temperature in TEMPERATURES:
        for seed in SEEDS:
            cm, seconds = timed(lambda: compress(base.model, _config(temperature, steps, seed), calibration=calibration))
            ppl = ctx.perplexity(cm.model, MODEL)
            rows.append({"temperature": temperature, "seed": seed, "steps": steps, "perplexity": ppl,
                         "train_s": seconds, "recovered_fraction": recovered_fraction(pruned_ppl, ppl, base_ppl)})
            del cm
    return {
        "headline": {"kd_recovered_fraction_by_temperature": summary(rows)},
        "base_perplexity": base_ppl, "pruned_perplexity": pruned_ppl, "steps": steps, "seeds": list(SEEDS),
        "rows": rows, "eval_tokens": int(ctx.eval_ids(MODEL).numel()), "seconds": time.perf_counter() - start,
    }
