"""Quality against the peers on SmolLM2: perplexity and quantization wall time, same text, same function.

Rows: our RTN and GPTQ at 8 / 4 / 3 bits with groups of 128 and per output channel (weight-only, simulated:
the de-quantized weights run in fp32, which is what the peers' CPU paths compute too), HQQ, the MSE grid
(calibrated on the same windows as GPTQ), the bit-budget autopilot, our real int8 kernel, then torchao and
optimum-quanto. Our asymmetric rows use the default
integer zero-point grid (0 on the grid, as torchao's MappingType.ASYMMETRIC); one row keeps the seed's
fractional min-max for comparison. torchao cannot group SmolLM2's 576-wide inputs by 128, so the torchao
ratios are taken at groups of 64 for both. optimum-quanto's qint4 picks its own group: 96 on the 576-wide
inputs and 128 on the 1536-wide down_proj inputs; our g128 row splits 576 into 128·4 + 64, so that ratio is
not like for like and its label says so.
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from bench import peers
from bench.common import median_time, timed
from bench.values import failed, is_failed
from bench.interactivity import app_protocol
from lmcompress_core.measure import protocol


# what run() returns, key for key (bench/__main__.py checks it)
KEYS = (
    "headline", "extra", "weight_error_int4_g64", "base_perplexity", "rows", "eval_tokens", "context",
    "calibration", "deepcopy_s", "model", "seconds",
)


GPTQ_ONE_PASS_MINMAX = "ours GPTQ int3 g128 one-pass min-max grid"


def our_configs() -> list[tuple[str, object]]:
    """(row label, CompressionConfig) for our quantizers.

    The like-for-like rows run simulated in fp32 with the LM head float, as the peers' CPU paths do; the last
    rows run on the real kernels exactly as the app does (its runtime, its int8 head, its calibration).
    """
    from lmcompress_core.compress import CompressionConfig
    from lmcompress_core.methods.quantize import QuantizationConfig

    def sim(**q):
        return CompressionConfig(quantization=QuantizationConfig(**q), runtime="simulate")

    rows = []
    for method in ("rtn", "gptq"):
        for bits in (8, 4, 3):
            for granularity in ("group", "channel"):
                where = "g128" if granularity == "group" else "per-channel"
                rows.append((f"ours {method.upper()} int{bits} {where}",
                             sim(bits=bits, granularity=granularity, group_size=128, method=method)))
    # GPTQ as it was before issue 33 (every Hessian from the float model, min-max group grids, columns in order)
    rows.append((GPTQ_ONE_PASS_MINMAX, sim(bits=3, group_size=128, method="gptq", calibration_pass="one-pass",
                                           grid_search=False, act_order=False)))
    rows.append(("ours RTN int8 per-channel sym", sim(bits=8, granularity="channel", symmetric=True)))
    for bits, symmetric in ((4, False), (4, True), (3, False)):   # torchao's group size on SmolLM2
        rows.append((f"ours RTN int{bits} g64 {'sym' if symmetric else 'asym'}",
                     sim(bits=bits, group_size=64, symmetric=symmetric)))
    for bits in (4, 3):
        rows.append((f"ours RTN int{bits} g64 minmax (seed rule)", sim(bits=bits, group_size=64, grid="minmax")))
    for method in ("hqq", "mse"):
        for bits, group_size in ((4, 128), (4, 64), (3, 128), (3, 64)):
            rows.append((f"ours {method.upper()} int{bits} g{group_size}",
                         sim(bits=bits, group_size=group_size, method=method)))
    for label, changes in (("app 4-bit g128 (real int4 kernel)", {"bits": 4}),
                           ("app 8-bit per-channel (real int8 weight-only)", {"bits": 8, "granularity": "channel"}),
                           ("app 8-bit per-channel dynamic int8 (calibrated)",
                            {"bits": 8, "granularity": "channel", "runtime": "dynamic_int8"})):
        rows.append((f"ours {label}", app_config(**changes)))
    return rows


def app_config(**changes):
    """The CompressionConfig Explore builds from its default widgets with ``changes``: what the app runs."""
    from pages.common import WIDGETS, build_config

    return build_config({**WIDGETS, **changes})


def _compress_seconds(ctx, config, runs: int) -> tuple[object, float, list[float]]:
    """Compress once for the model, and time `runs` compressions (GPTQ: the one run, it is slow)."""
    from lmcompress_core.compress import compress

    base = ctx.loaded(ctx.main_model)
    needs_calibration = protocol.needs_calibration(config)
    # GPTQ and MSE calibrate on the bench's calibration half; a setting the app runs calibrates as the app does
    calibration = (ctx.calibration(ctx.main_model) if config.quantization.method in ("gptq", "mse")
                   else protocol.calibration_for(base, config, app_protocol()) if needs_calibration else None)
    call = lambda: compress(base.model, config, calibration=calibration, tokenizer=base.tokenizer)
    if needs_calibration:
        cm, seconds = timed(call)
        return cm, seconds, [seconds]
    cm = call()
    seconds, times = median_time(call, runs=runs, warmup=0)
    return cm, seconds, times


def _our_rows(ctx, runs: int) -> list[dict]:
    rows = []
    for label, config in our_configs():
        q = config.quantization
        row = {"name": label, "library": "ours", "method": q.method, "bits": q.bits,
               "group_size": q.group_size if q.granularity == "group" else -1, "symmetric": q.symmetric}
        try:
            cm, seconds, times = _compress_seconds(ctx, config, runs)
            row.update(kernel=cm.kernel, quantize_s=seconds, quantize_runs=len(times),
                       perplexity=checked_perplexity(ctx.perplexity(cm.model, ctx.main_model)))
            del cm
        except Exception as exc:  # a row failing is a result (an error entry), never a number
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    return rows


def checked_perplexity(value: float) -> float:
    """A perplexity as measured, or ValueError: one that is not finite and positive is a broken measurement."""
    if not (isinstance(value, float) and math.isfinite(value) and value > 0):
        raise ValueError(f"perplexity {value!r} is no measurement (a working model scores a finite value > 0)")
    return value


AUTOPILOT_BASE_GROUP = 128
AUTOPILOT_METHOD = "mse"          # the quantizer every width of every allocation and uniform setting uses
RULE_MIX_BPW = 3.5                # the budget at which the measured allocation meets the rule mix


def _autopilot_label(what: str) -> str:
    return f"ours {what} ({AUTOPILOT_METHOD.upper()} g{AUTOPILOT_BASE_GROUP})"


def _uniform_label(bits: int) -> str:
    return _autopilot_label(f"uniform int{bits}")


def _autopilot_configs(ctx, base, ids, q) -> list[tuple[str, object, dict | None]]:
    """Like for like (issue 32): uniform settings of the autopilot's own quantizer, the autopilot at exactly their
    packed bits per weight, and the autopilot and a rule mix (llama.cpp k-quant style) at one budget. The first
    allocation measures the sensitivity into an empty disk cache (its seconds: the autopilot's cost on a new
    model); the second reads it back from disk in a fresh process cache (the cost on every later call)."""
    from lmcompress_core.methods import autopilot

    configs = [(_uniform_label(b), replace(q, bits=b), None) for b in (3, 4)]
    budgets = [(f"autopilot at uniform int{b}'s bpw", autopilot.uniform_bits_per_weight(base, b, q.group_size))
               for b in (3, 4)] + [(f"autopilot {RULE_MIX_BPW:g} bpw", RULE_MIX_BPW)]
    with tempfile.TemporaryDirectory(prefix="bench-sensitivity-") as folder:
        os.environ["LMCOMPRESS_SENSITIVITY_CACHE"] = folder
        try:
            for i, (what, bpw) in enumerate(budgets):
                if i == 1:
                    autopilot._CACHE.clear()   # a new process: the measurement comes from disk
                start = time.perf_counter()
                allocation = autopilot.allocate(base, ids, autopilot.BudgetConfig(target_bpw=bpw, base=q),
                                                model_name=ctx.main_model)
                configs.append((_autopilot_label(what), allocation.config, _allocation_facts(allocation, start)))
        finally:
            os.environ.pop("LMCOMPRESS_SENSITIVITY_CACHE", None)
    mix = autopilot.rule_mix_for(base, autopilot.BudgetConfig(target_bpw=RULE_MIX_BPW, base=q))
    configs.append((_autopilot_label(f"rule mix {RULE_MIX_BPW:g} bpw"), mix.config, _allocation_facts(mix, None)))
    return configs


def _allocation_facts(allocation, start: float | None) -> dict:
    widths = list(allocation.bits.values())
    return {"allocate_s": None if start is None else time.perf_counter() - start,
            "predicted_kl": allocation.predicted_kl,
            "bits_histogram": {str(b): widths.count(b) for b in sorted(set(widths))}}


def _autopilot_rows(ctx) -> list[dict]:
    """Each configuration of ``_autopilot_configs`` compressed (simulated: only the codes differ) and scored on
    the evaluation text (never the calibration text the allocation was measured on), with its packed bits per
    weight counted from the file's layout."""
    from lmcompress_core.compress import CompressionConfig, compress
    from lmcompress_core.measure.evaluation import measure_size
    from lmcompress_core.methods.quantize import QuantizationConfig

    base = ctx.loaded(ctx.main_model).model
    ids = ctx.calibration(ctx.main_model, n_samples=4)
    q = QuantizationConfig(bits=4, group_size=AUTOPILOT_BASE_GROUP, method=AUTOPILOT_METHOD, int8_kernel=False)
    rows = []
    for label, config, extra in _autopilot_configs(ctx, base, ids, q):
        cm = compress(base, CompressionConfig(quantization=config, runtime="simulate"),
                      calibration=ctx.calibration(ctx.main_model))
        size = measure_size(cm, base)
        kind = "autopilot" if "autopilot" in label else ("rule mix" if extra else "uniform")
        rows.append({"name": label, "library": "ours", "method": kind, "bits": config.bits,
                     "group_size": config.group_size, "symmetric": False,
                     "bits_per_weight": 8 * size.layers_packed_bytes / sum(
                         m.quantized_weight().codes.numel() for m in cm.layers().values()),
                     "layers_packed_bytes": size.layers_packed_bytes, "packed_bytes": size.packed_bytes,
                     "perplexity": checked_perplexity(ctx.perplexity(cm.model, ctx.main_model)), **(extra or {})})
        del cm
    return rows


def _peer_rows(ctx, runs: int) -> list[dict]:
    base = ctx.loaded(ctx.main_model).model
    errors = peers.available()
    rows = []
    for method in peers.peer_methods():
        row = {"name": method.name, "library": method.library, "method": "rtn", "bits": method.bits,
               "group_size": method.group_size, "symmetric": method.symmetric}
        if errors.get(method.library):
            rows.append({**row, "error": errors[method.library]})
            continue
        try:
            peers.quantize_with_peer(base, method)  # warm-up: the first call pays one-time lazy set-up
            times = [peers.quantize_with_peer(base, method)[1] for _ in range(runs - 1)]
            model, seconds = peers.quantize_with_peer(base, method)
            times.append(seconds)
            rows.append({**row, "quantize_s": statistics.median(times), "quantize_runs": len(times),
                         "perplexity": checked_perplexity(ctx.perplexity(model, ctx.main_model))})
            del model
        except Exception as exc:  # a peer failing on this platform is a result, not a crash
            rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


def _dense(weight):
    """A peer's weight tensor subclass as the float matrix its forward uses."""
    return (weight.dequantize() if hasattr(weight, "dequantize") else weight).detach().float()


def weight_error_vs_torchao(ctx) -> dict | None:
    """Per-layer relative weight error ‖Ŵ−W‖²/‖W‖² of ours and torchao at int4 g64 asym: is ours a finer grid?"""
    from lmcompress_core.compress import CompressionConfig, compress
    from lmcompress_core.methods.quantize import QuantizationConfig

    method = next((m for m in peers.peer_methods() if m.name == "torchao int4 g64 asym"), None)
    if method is None or peers.available().get("torchao"):
        return None
    base = ctx.loaded(ctx.main_model).model
    # ours as codes: the default real runtime swaps layers for int4 kernel modules, which hold no float .weight
    # (that was the AttributeError in an earlier run); quantized_weight().dequantize() is the truth on any runtime
    config = CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=64), runtime="simulate")
    ours = compress(base, config).layers()
    theirs = dict(peers.quantize_with_peer(base, method)[0].named_modules())
    ratios, ours_total, theirs_total = [], 0.0, 0.0
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear) or "lm_head" in name:
            continue
        w = module.weight.detach().float()
        norm = float((w ** 2).sum())
        e_ours = float(((ours[name].quantized_weight().dequantize() - w) ** 2).sum()) / norm
        e_theirs = float(((_dense(theirs[name].weight) - w) ** 2).sum()) / norm
        ratios.append(e_ours / e_theirs if e_theirs else 1.0)
        ours_total, theirs_total = ours_total + e_ours, theirs_total + e_theirs
    return {"layers": len(ratios), "ours_lower_in": sum(r < 1 for r in ratios),
            "mean_rel_mse_ours": ours_total / len(ratios), "mean_rel_mse_torchao": theirs_total / len(ratios)}


def _ppl(rows, name):
    return _field(rows, name, "perplexity")


def _ratio(a, b):
    """a / b, or the error entry of whichever side failed (never a number made from a failed row)."""
    return next((x for x in (a, b) if is_failed(x)), None) or a / b


def _field(rows, name, key):
    """The row's measured ``key``, or an error entry saying why there is none."""
    row = next((r for r in rows if r["name"] == name), None)
    if row is None:
        return failed(f"no row {name!r} in this run")
    if row.get("error"):
        return failed(f"{name}: {row['error']}")
    if row.get(key) is None:
        return failed(f"{name}: no {key} recorded")
    return row[key]


def run(ctx) -> dict:
    start = time.perf_counter()
    base_ppl = ctx.base_perplexity(ctx.main_model)
    copy_s, _ = median_time(lambda: copy.deepcopy(ctx.loaded(ctx.main_model).model), runs=ctx.scale.runs, warmup=0)
    rows = _our_rows(ctx, ctx.scale.runs) + _peer_rows(ctx, ctx.scale.runs)
    try:
        rows += _autopilot_rows(ctx)
    except Exception as exc:  # the autopilot failing is a result, not a reason to lose the table
        rows.append({"name": "ours autopilot", "library": "ours", "error": f"{type(exc).__name__}: {exc}"[:300]})
    for row in rows:
        if row.get("perplexity") is not None:
            row["ppl_over_fp32"] = row["perplexity"] / base_ppl
    rtn4 = _ppl(rows, "ours RTN int4 g128")
    auto3, auto4, auto35, mix35 = (_autopilot_label(w) for w in (
        "autopilot at uniform int3's bpw", "autopilot at uniform int4's bpw", f"autopilot {RULE_MIX_BPW:g} bpw",
        f"rule mix {RULE_MIX_BPW:g} bpw"))
    headline = {
        # torchao refuses groups of 128 on SmolLM2's 576-wide inputs: ours and theirs both at groups of 64.
        "ppl_ratio_rtn4_g64_vs_torchao": _ratio(_ppl(rows, "ours RTN int4 g64 asym"), _ppl(rows, "torchao int4 g64 asym")),
        # not like for like: our g128 (576 = 128·4 + 64) against quanto's own choice (g96 on 576, g128 on 1536)
        "ppl_ratio_rtn4_vs_quanto": _ratio(_ppl(rows, "ours RTN int4 g128"),
                                           _ppl(rows, "quanto qint4 g128 (g96 on 576-wide inputs)")),
        "ppl_ratio_rtn3_g64_vs_torchao": _ratio(_ppl(rows, "ours RTN int3 g64 asym"), _ppl(rows, "torchao int3 g64 asym")),
        # the new quantizer: the MSE grid (HQQ's rows stay in `extra`)
        "ppl_new3_over_rtn3": _ratio(_ppl(rows, "ours MSE int3 g64"), _ppl(rows, "ours RTN int3 g64 asym")),
        "ppl_new4_g128_over_rtn4": _ratio(_ppl(rows, "ours MSE int4 g128"), rtn4),
        "ppl_gptq3_over_rtn3": _ratio(_ppl(rows, "ours GPTQ int3 g128"), _ppl(rows, "ours RTN int3 g128")),
        # like for like: the same quantizer (MSE grid, groups of 128) at the same packed bits per weight
        "autopilot_over_uniform_same_quantizer_3bit": _ratio(_ppl(rows, auto3), _ppl(rows, _uniform_label(3))),
        "autopilot_over_uniform_same_quantizer_4bit": _ratio(_ppl(rows, auto4), _ppl(rows, _uniform_label(4))),
        "autopilot_over_rule_mix_3p5": _ratio(_ppl(rows, auto35), _ppl(rows, mix35)),
        "autopilot_s_default": _field(rows, auto3, "allocate_s"),          # sensitivity measured: a new model
        "autopilot_cached_s_default": _field(rows, auto4, "allocate_s"),   # read back from disk
        # issue 33: GPTQ (sequential, starting from the searched grid) against the searched grid alone
        "ppl_gptq_mse3_over_mse3": _ratio(_ppl(rows, "ours GPTQ int3 g128"), _ppl(rows, "ours MSE int3 g128")),
        "ppl_gptq_mse4_over_mse4": _ratio(_ppl(rows, "ours GPTQ int4 g128"), _ppl(rows, "ours MSE int4 g128")),
        # seconds of one sequential GPTQ compression of all the model's linear layers (calibration pass included)
        "gptq_sequential_s_smollm2": _field(rows, "ours GPTQ int4 g128", "quantize_s"),
    }
    extra = {
        "ppl_ratio_hqq4_g128_over_rtn4_g128": _ratio(_ppl(rows, "ours HQQ int4 g128"), rtn4),
        "ppl_ratio_hqq3_g64_over_rtn3_g64": _ratio(_ppl(rows, "ours HQQ int3 g64"), _ppl(rows, "ours RTN int3 g64 asym")),
        "ppl_ratio_rtn4_g64_minmax_over_integer_zero": _ratio(_ppl(rows, "ours RTN int4 g64 minmax (seed rule)"),
                                                             _ppl(rows, "ours RTN int4 g64 asym")),
        "ppl_ratio_rtn4_g64_sym_vs_torchao_g64_sym": _ratio(_ppl(rows, "ours RTN int4 g64 sym"),
                                                            _ppl(rows, "torchao int4 g64 sym")),
        "ppl_ratio_rtn8_channel_vs_torchao_int8": _ratio(_ppl(rows, "ours RTN int8 per-channel sym"),
                                                         _ppl(rows, "torchao int8 weight-only (per-channel)")),
        "ppl_ratio_rtn8_channel_vs_quanto_qint8": _ratio(_ppl(rows, "ours RTN int8 per-channel sym"),
                                                         _ppl(rows, "quanto qint8 (per-channel)")),
        "ppl_gptq4_over_rtn4": _ratio(_ppl(rows, "ours GPTQ int4 g128"), rtn4),
        "ppl_gptq3_over_gptq3_one_pass_minmax": _ratio(_ppl(rows, "ours GPTQ int3 g128"),
                                                       _ppl(rows, GPTQ_ONE_PASS_MINMAX)),
        "ppl_gptq3_channel_over_rtn3_channel": _ratio(_ppl(rows, "ours GPTQ int3 per-channel"),
                                                      _ppl(rows, "ours RTN int3 per-channel")),
    }
    try:
        weight_error = weight_error_vs_torchao(ctx)
    except Exception as exc:  # a diagnostic, never a reason to lose the table
        weight_error = {"error": f"{type(exc).__name__}: {exc}"}
    return {"headline": headline, "extra": extra, "weight_error_int4_g64": weight_error,
            "base_perplexity": base_ppl, "rows": rows,
            "eval_tokens": int(ctx.eval_ids(ctx.main_model).numel()), "context": ctx.scale.context,
            "calibration": f"{ctx.scale.calibration_samples} x {ctx.scale.context} tokens",
            "deepcopy_s": copy_s, "model": ctx.main_model, "seconds": time.perf_counter() - start}
