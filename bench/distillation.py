"""Distillation on the tiny model: recovery KD after 50% magnitude pruning, perplexity per temperature.

The pruned model is the student, the unpruned tiny model the teacher; `steps` KD steps (masks kept) at
T = 1, 2, 4, 8 with everything else at DistillationConfig's defaults. The pruned model without KD and the
unpruned model are the two ends of the scale the recovery is read against.
"""
from __future__ import annotations

import time

from bench.common import timed

MODEL = "tiny"
TEMPERATURES = (1, 2, 4, 8)


def _config(temperature: float | None, steps: int):
    from lmcompress_core.compress import CompressionConfig
    from lmcompress_core.distill import DistillationConfig
    from lmcompress_core.prune import PruningConfig

    distillation = None if temperature is None else DistillationConfig(temperature=float(temperature), steps=steps,
                                                                       mode="recovery")
    return CompressionConfig(pruning=PruningConfig(sparsity=0.5, method="magnitude"), distillation=distillation)


def run(ctx) -> dict:
    from lmcompress_core.compress import compress

    start = time.perf_counter()
    base = ctx.loaded(MODEL)
    calibration = ctx.calibration(MODEL)
    steps = ctx.scale.kd_steps
    pruned = compress(base.model, _config(None, steps), calibration=calibration, tokenizer=base.tokenizer)
    pruned_ppl = ctx.perplexity(pruned.model, MODEL)
    rows = []
    for temperature in TEMPERATURES:
        cm, seconds = timed(lambda: compress(base.model, _config(temperature, steps), calibration=calibration,
                                             tokenizer=base.tokenizer))
        ppl = ctx.perplexity(cm.model, MODEL)
        rows.append({"temperature": temperature, "steps": steps, "perplexity": ppl, "train_s": seconds,
                     "history_points": len(cm.history)})
        del cm
    base_ppl = ctx.base_perplexity(MODEL)
    for row in rows:
        # 1.0 = all of the perplexity lost to pruning is recovered; 0.0 = none.
        gap = pruned_ppl - base_ppl
        row["recovered_fraction"] = (pruned_ppl - row["perplexity"]) / gap if gap > 0 else None
    return {
        "headline": {"kd_recovery_by_temperature": {str(r["temperature"]): r["perplexity"] for r in rows}},
        "base_perplexity": base_ppl, "pruned_perplexity": pruned_ppl, "steps": steps, "rows": rows,
        "eval_tokens": int(ctx.eval_ids(MODEL).numel()), "seconds": time.perf_counter() - start,
    }
