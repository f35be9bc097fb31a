"""Distillation: how much of the perplexity lost to compression recovery KD wins back, and the smaller student.

Three measurements, all on held-out text never trained on (the first half of the evaluation text; KD trains on
calibration windows from the tiny model's training text or the second half, `Context.calibration`):

* tiny model, 70% magnitude pruning: `kd_steps` recovery steps at T = 1, 2, 4, 8, each with SEEDS seeds
  (the recipe is DistillationConfig's defaults: kept weights, norms and biases train, masks stay);
* SmolLM2, 3-bit RTN g64 and 2-bit MSE g64: `kd_steps_default` recovery steps each at the temperature the tiny
  study found best, on the same windows: DistillationConfig's default (the integer codes stay; the per-group
  scales, norms and biases train), and at 2 bits also with the codes moving (trains="codes": each weight's grid
  position trains too; same bits, same bytes), same steps, so the two recipes compare like for like;
* tiny model cut to every KEEP_EVERY-th block, trained `kd_steps` steps from the same initialisation on the same
  windows, once with KD from the full model and once with cross-entropy only (alpha = 0).

Recovered fraction = (ppl_compressed − ppl_after) / (ppl_compressed − ppl_base): 1 = all of the loss recovered,
0 = none, negative = distillation made the model worse.
"""
from __future__ import annotations

import itertools
import statistics
import time

from bench.common import timed

TEMPERATURES = (1, 2, 4, 8)
SEEDS = (0, 1, 2)
KEEP_EVERY = 2
# what run() returns, key for key (bench/__main__.py checks it)
KEYS = ("headline", "tiny", "smollm2", "smollm2_2bit", "student", "best_temperature", "eval_tokens", "tiny_behaviour", "seconds")
TINY_RATIO_TOKENS = 4096   # held-out tokens the tiny model's compression behaviour is measured on (as its test)


def tiny_compression():
    from lmcompress_core.methods.prune import PruningConfig

    return {"pruning": PruningConfig(sparsity=0.7, method="magnitude")}


def smollm2_compression():
    from lmcompress_core.methods.quantize import QuantizationConfig

    return {"quantization": QuantizationConfig(bits=3, group_size=64, method="rtn")}


def smollm2_2bit_compression():
    from lmcompress_core.methods.quantize import QuantizationConfig

    return {"quantization": QuantizationConfig(bits=2, group_size=64, method="mse")}


def _config(compression: dict, **distillation):
    from lmcompress_core.compress import CompressionConfig
    from lmcompress_core.methods.distill import DistillationConfig

    kd = DistillationConfig(**distillation) if distillation else None
    return CompressionConfig(**compression, distillation=kd)


def recovered_fraction(compressed: float, after: float, base: float) -> float | None:
    """(compressed − after) / (compressed − base); None when compression lost nothing (nothing to recover)."""
    gap = compressed - base
    return (compressed - after) / gap if gap > 0 else None


def summary(rows: list[dict]) -> dict:
    """T -> {mean, std} of the recovered fraction over seeds (std over ≥ 2 seeds, else None)."""
    out = {}
    for temperature in TEMPERATURES:
        values = [r["recovered_fraction"] for r in rows
                  if r["temperature"] == temperature and r["recovered_fraction"] is not None]
        out[str(temperature)] = {"mean": statistics.mean(values) if values else None,
                                 "std": statistics.stdev(values) if len(values) > 1 else None}
    return out


def best_temperature(by_temperature: dict) -> float | None:
    """The T whose mean recovered fraction is highest (None when nothing was measured)."""
    measured = {t: v["mean"] for t, v in by_temperature.items() if v.get("mean") is not None}
    return float(max(measured, key=measured.get)) if measured else None


def _recovery_rows(ctx, name: str, setting: str, compression: dict, temperatures, seeds, steps: int,
                   calibration, trains: tuple = ("grid",)) -> dict:
    from lmcompress_core.compress import compress

    base = ctx.loaded(name)
    base_ppl = ctx.base_perplexity(name)
    compressed_ppl = ctx.perplexity(compress(base.model, _config(compression), calibration=calibration).model, name)
    rows = []
    for temperature, seed, recipe in itertools.product(temperatures, seeds, trains):
        config = _config(compression, temperature=float(temperature), steps=steps, seed=seed, trains=recipe)
        cm, seconds = timed(lambda: compress(base.model, config, calibration=calibration))
        ppl = ctx.perplexity(cm.model, name)
        rows.append({"temperature": temperature, "seed": seed, "steps": steps, "trains": recipe, "perplexity": ppl,
                     "train_s": seconds, "recovered_fraction": recovered_fraction(compressed_ppl, ppl, base_ppl)})
        del cm
    return {"model": name, "setting": setting, "compression": _describe(compression), "base_perplexity": base_ppl,
            "compressed_perplexity": compressed_ppl, "steps": steps, "seeds": list(seeds),
            "calibration_windows": int(calibration.shape[0]), "rows": rows}


def _fraction(recovery: dict | None, trains: str) -> float | None:
    """The recovered fraction of ``recovery``'s first row trained with ``trains`` (None: not measured)."""
    rows = [r for r in (recovery or {}).get("rows", []) if r["trains"] == trains]
    return rows[0]["recovered_fraction"] if rows else None


def _describe(compression: dict) -> dict:
    from dataclasses import asdict

    return {stage: asdict(config) for stage, config in compression.items()}


def _calibration(ctx, name: str, steps: int):
    from lmcompress_core.methods.distill import DistillationConfig

    return ctx.calibration(name, n_samples=DistillationConfig(steps=steps).calibration_windows(ctx.scale.context))


def _student(ctx, temperature: float, steps: int, calibration) -> dict:
    """The smaller student trained with KD (alpha 0.5) and with cross-entropy only (alpha 0): same steps, seed, data."""
    from lmcompress_core.compress import compress

    base = ctx.loaded("tiny")
    out = {"keep_every": KEEP_EVERY, "steps": steps, "temperature": temperature}
    for label, alpha in (("kd", 0.5), ("ce_only", 0.0)):
        config = _config({}, mode="student", keep_every=KEEP_EVERY, temperature=temperature, alpha=alpha,
                         steps=steps, lr=1e-3)
        cm, seconds = timed(lambda: compress(base.model, config, calibration=calibration))
        out[label] = {"alpha": alpha, "perplexity": ctx.perplexity(cm.model, "tiny"), "train_s": seconds}
    out["kd_over_ce_only"] = out["kd"]["perplexity"] / out["ce_only"]["perplexity"]
    return out


def tiny_behaviour(ctx) -> dict:
    """How the tiny model reacts to compression (issue 14 asks it to react as a real LLM does): held-out
    perplexity after each of train_tiny's checks over the uncompressed model's — the function its model card and
    tests/test_train_tiny.py use, on the first TINY_RATIO_TOKENS tokens of the held-out plays."""
    from lmcompress_core.data import load_text, token_ids
    from lmcompress_core.models.train_tiny import compression_ratios

    loaded = ctx.loaded("tiny")
    ids = token_ids(loaded.tokenizer, load_text("tiny-heldout"))[:TINY_RATIO_TOKENS]
    return {"ratios": compression_ratios(loaded.model, loaded.tokenizer, ids), "tokens": int(ids.numel())}


def run(ctx) -> dict:
    start = time.perf_counter()
    behaviour = tiny_behaviour(ctx)
    steps = ctx.scale.kd_steps
    calibration = _calibration(ctx, "tiny", steps)
    tiny = _recovery_rows(ctx, "tiny", "70% magnitude pruning", tiny_compression(), TEMPERATURES, SEEDS, steps,
                          calibration)
    by_temperature = summary(tiny["rows"])
    best = best_temperature(by_temperature) or 2.0
    student = _student(ctx, best, steps, calibration)
    smollm2 = smollm2_2bit = None
    if ctx.scale.include_default:
        big_steps = ctx.scale.kd_steps_default
        windows = _calibration(ctx, "default", big_steps)
        smollm2 = _recovery_rows(ctx, "default", "3-bit RTN g64", smollm2_compression(), (best,), (0,), big_steps,
                                 windows)
        smollm2_2bit = _recovery_rows(ctx, "default", "2-bit MSE g64", smollm2_2bit_compression(), (best,), (0,),
                                      big_steps, windows, trains=("grid", "codes"))
    return {
        "headline": {"kd_recovered_fraction_by_temperature": by_temperature,
                     "kd_recovered_fraction_smollm2": _fraction(smollm2, "grid"),
                     "kd_recovered_fraction_2bit_smollm2": _fraction(smollm2_2bit, "grid"),
                     "kd_recovered_fraction_2bit_codes_smollm2": _fraction(smollm2_2bit, "codes"),
                     "kd_student_over_ce_only": student["kd_over_ce_only"],
                     "tiny_ppl_ratio_2bit": behaviour["ratios"].get("rtn_2bit_g128"),
                     "tiny_ppl_ratio_4bit": behaviour["ratios"].get("rtn_4bit_g128")},
        "tiny_behaviour": behaviour,
        "tiny": tiny, "smollm2": smollm2, "smollm2_2bit": smollm2_2bit, "student": student, "best_temperature": best,
        "eval_tokens": {"tiny": int(ctx.eval_ids("tiny").numel()),
                        "default": int(ctx.eval_ids("default").numel()) if smollm2 else None},
        "seconds": time.perf_counter() - start,
    }
