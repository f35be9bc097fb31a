"""Real speedups on SmolLM2: fp32, bf16, real int4 and int8 weight-only kernels and torch's dynamic int8.

Variants (batch 1, `prompt_tokens` prompt, `new_tokens` greedy steps with the KV cache, the bench's threads):
fp32 (the base), bf16 (the whole model cast), int4 (4-bit g32 codes on aten int4pack, LM head int8 on int8pack,
the rest bf16), int8 (8-bit symmetric per-channel codes on aten int8pack, LM head int8, the rest bf16; the asymmetric grid's
perplexity beside it), int8_g128,
int6_g128 and int5_g128 (8-, 6- and 5-bit codes in groups of 128 as two 4-bit planes on aten int4pack, LM head
int8: ``runtime.kernels.Int4PlanesLinear``) and int8_dynamic
(torch's dynamic int8 with activations quantized too, calibrated exactly as the app runs it: SmoothQuant and
the SQNR floor on `measure.calibration_for` windows). Each variant is timed by
`lmcompress_core.measure.evaluation.measure_latency` (its own warm-up and median of `runs`); the variants are interleaved
over `ROUNDS` rounds in this one process and the median of the round medians is kept, so a burst of load on
the machine hits all of them alike. Every variant runs our static-cache loop, its decode step compiled
first (``runtime.compiled.compile_now``, outside the timed runs; ``compile_s`` says how long, cold or from the
disk cache); ``int4_transformers`` times the same int4 model through transformers' forward. The roofline
(the bytes one decode step reads, `measure.speed.decode_bytes`, against the measured copy bandwidth) is
reported beside each, and the perplexity of the real int4 model beside the simulated 4-bit model (same codes,
de-quantized fp32, head fp32), and of the 6-bit g128 model on its two planes beside the same model with each
of those layers' codes de-quantized to a dense bf16 matrix (``DequantLinear``, what ran group-wise 5–8-bit codes
before the planes: the same bf16 activations and int8 head, so the two differ by the kernel alone).
"""
from __future__ import annotations

import statistics
import time

# what run() returns, key for key (bench/__main__.py checks it)
KEYS = (
    "headline", "rows", "perplexity", "prompt_tokens", "new_tokens", "runs_per_round", "rounds", "model", "seconds",
    "compile_s",
)


ROUNDS = 3




def _configs():
    from dataclasses import replace

    from lmcompress_core.compress import CompressionConfig
    from lmcompress_core.methods.quantize import QuantizationConfig

    channel8 = QuantizationConfig(bits=8, granularity="channel")
    return {"bf16": CompressionConfig(quantization=QuantizationConfig(bits=16, dtype16="bf16")),
            "int4": CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32)),
            # int8 weight-only as torchao's int8_weight_only and llama.cpp's Q8_0 are: symmetric, no zero-point
            # (int8pack takes none; an asymmetric grid adds a rank-1 bf16 term per call, see _perplexities)
            "int8": CompressionConfig(quantization=replace(channel8, symmetric=True)),
            **{f"int{bits}_g128": CompressionConfig(quantization=QuantizationConfig(bits=bits, group_size=128))
               for bits in (8, 6, 5)},
            "int8_dynamic": CompressionConfig(quantization=channel8, runtime="dynamic_int8")}


def _variants(ctx) -> dict:
    from lmcompress_core.compress import compress
    from bench.interactivity import app_protocol
    from lmcompress_core.measure.protocol import calibration_for

    base = ctx.loaded(ctx.main_model)
    variants = {"fp32": (base.model, "fp32 dense")}
    for name, config in _configs().items():
        calibration = calibration_for(base, config, app_protocol())   # exactly as the app calibrates
        cm = compress(base.model, config, calibration=calibration, tokenizer=base.tokenizer)
        variants[name] = (cm.model, cm.kernel)
    return variants


def _perplexities(ctx, variants) -> dict:
    """Perplexity of the real int4 model and of the simulated 4-bit model with the same codes; of the 6-bit g128
    model on its planes and on dense bf16 matrices of the same codes."""
    from dataclasses import replace

    from lmcompress_core.compress import compress

    base = ctx.loaded(ctx.main_model)
    simulated = compress(base.model, replace(_configs()["int4"], runtime="simulate")).model
    asymmetric8 = replace(_configs()["int8"], quantization=replace(_configs()["int8"].quantization, symmetric=False))
    return {"int4_real_ppl": ctx.perplexity(variants["int4"][0], ctx.main_model),
            "int4_simulated_ppl": ctx.perplexity(simulated, ctx.main_model),
            "int6_g128_real_ppl": ctx.perplexity(variants["int6_g128"][0], ctx.main_model),
            "int6_g128_dense_bf16_ppl": ctx.perplexity(dense_twin(variants["int6_g128"][0]), ctx.main_model),
            "int8_real_ppl": ctx.perplexity(variants["int8"][0], ctx.main_model),
            "int8_asymmetric_real_ppl": ctx.perplexity(compress(base.model, asymmetric8).model, ctx.main_model),
            "bf16_ppl": ctx.perplexity(variants["bf16"][0], ctx.main_model)}


def dense_twin(model):
    """A copy of ``model`` whose two-plane layers run their codes de-quantized to dense bf16 matrices instead."""
    import copy

    from lmcompress_core.runtime.kernels import DequantLinear, Int4PlanesLinear

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Int4PlanesLinear):
            twin.set_submodule(name, DequantLinear(module.quantized_weight(), module.bias))
    return twin


def _measure(ctx, model, kernel, own_loop=True):
    from lmcompress_core.measure.speed import measure_latency

    return measure_latency(model, ctx.loaded(ctx.main_model).tokenizer, kernel,
                           prompt_tokens=ctx.scale.prompt_tokens, new_tokens=ctx.scale.new_tokens,
                           runs=ctx.scale.runs, own_loop=own_loop)


def run(ctx) -> dict:
    from lmcompress_core.measure.speed import runtime_bytes

    from lmcompress_core.runtime.compiled import compile_now

    start = time.perf_counter()
    variants = _variants(ctx)
    compiled = {name: compile_now(model) for name, (model, _) in variants.items()}   # outside the timed runs
    compile_s = time.perf_counter() - start
    # the same int4 model through transformers' forward: what our own loop (and its compiled step) gains
    variants["int4_transformers"] = variants["int4"]
    samples = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, (model, kernel) in variants.items():
            samples[name].append(_measure(ctx, model, kernel, own_loop=name != "int4_transformers"))
    rows = {}
    for name, reports in samples.items():
        last = reports[-1]
        rows[name] = {
            "kernel": last.kernel, "loop": last.loop, "compiled": compiled.get(name),
            "prefill_ms": statistics.median(r.prefill_ms for r in reports),
            "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in reports),
            "roofline_tokens_per_s": last.roofline_tokens_per_s,
            "bandwidth_gb_s": last.bandwidth_gb_s,
            "rounds": [{"prefill_ms": r.prefill_ms, "decode_tokens_per_s": r.decode_tokens_per_s} for r in reports],
        }
    for name, (model, _) in variants.items():
        rows[name]["runtime_bytes"] = runtime_bytes(model)
    fp32 = rows["fp32"]
    for row in rows.values():
        row["prefill_speedup"] = fp32["prefill_ms"] / row["prefill_ms"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / fp32["decode_tokens_per_s"]
        if row["roofline_tokens_per_s"]:
            row["decode_fraction_of_roofline"] = row["decode_tokens_per_s"] / row["roofline_tokens_per_s"]
            row["roofline_speedup"] = row["roofline_tokens_per_s"] / fp32["roofline_tokens_per_s"]
    quality = _perplexities(ctx, variants)
    int4, int8, bf16 = rows["int4"], rows["int8"], rows["bf16"]
    planes = {f"int{bits}_g128_over_bf16_decode": rows[f"int{bits}_g128"]["decode_tokens_per_s"]
              / bf16["decode_tokens_per_s"] for bits in (8, 6, 5)}
    return {
        "headline": {"real_int4_decode_speedup": int4["decode_speedup"],
                     "real_int8_decode_speedup": int8["decode_speedup"],
                     "int4_over_bf16_decode": int4["decode_tokens_per_s"] / rows["bf16"]["decode_tokens_per_s"],
                     "int4_decode_fraction_of_roofline": int4.get("decode_fraction_of_roofline"),
                     "int4_runtime_bytes_fraction": int4["runtime_bytes"] / fp32["runtime_bytes"],
                     "int4_prefill_over_bf16": rows["bf16"]["prefill_ms"] / int4["prefill_ms"],
                     "int4_ppl_over_simulated": quality["int4_real_ppl"] / quality["int4_simulated_ppl"],
                     "int8_ppl_over_bf16": quality["int8_real_ppl"] / quality["bf16_ppl"],
                     **planes,
                     "int6_g128_runtime_bytes_fraction": rows["int6_g128"]["runtime_bytes"] / fp32["runtime_bytes"],
                     "int6_g128_ppl_over_dense_bf16": (quality["int6_g128_real_ppl"]
                                                       / quality["int6_g128_dense_bf16_ppl"]),
                     # the keys earlier results used: int8 is now the weight-only kernel
                     "int8_speedup_prefill": int8["prefill_speedup"], "int8_speedup_decode": int8["decode_speedup"],
                     "int8_dynamic_speedup_decode": rows["int8_dynamic"]["decode_speedup"],
                     "bf16_speedup_decode": rows["bf16"]["decode_speedup"],
                     "int4_loop_over_transformers_decode": (int4["decode_tokens_per_s"]
                                                            / rows["int4_transformers"]["decode_tokens_per_s"])},
        "compile_s": compile_s,
        "perplexity": quality,
        "rows": rows, "prompt_tokens": ctx.scale.prompt_tokens, "new_tokens": ctx.scale.new_tokens,
        "runs_per_round": ctx.scale.runs, "rounds": ROUNDS, "model": ctx.main_model,
        "seconds": time.perf_counter() - start,
    }
