"""Evaluation throughput: perplexity tokens/s and achieved FLOP/s as a fraction of this machine's matmul peak.

The peak is measured here, not taken from a datasheet: the best of a few large square `torch.mm` shapes in the
same dtype and thread count as the evaluation. FLOPs of an evaluation are counted from the model's shapes:
2 per weight per token for every linear layer (LM head included) plus the attention score and value products
(4 * context * hidden per token per layer, as computed by the dense kernel).
"""
from __future__ import annotations

import time

import torch

from bench.common import median_time

PEAK_SHAPES = (512, 1024, 2048)


# what run() returns, key for key (bench/__main__.py checks it)
KEYS = ("headline", "fp32", "bf16", "context", "peak_shape", "model", "seconds")


def matmul_peak_flops(dtype: torch.dtype, runs: int = 5) -> dict:
    """Best median FLOP/s of `torch.mm` over PEAK_SHAPES in `dtype`."""
    best = {"flops": 0.0, "n": None}
    for n in PEAK_SHAPES:
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        seconds, _ = median_time(lambda: torch.mm(a, b), runs=runs, warmup=2)
        flops = 2 * n**3 / seconds
        if flops > best["flops"]:
            best = {"flops": flops, "n": n, "seconds": seconds}
    return best


def _config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def forward_flops_per_token(model: torch.nn.Module, context: int) -> float:
    """Dense FLOPs per evaluated token: every Linear/Conv1D weight twice, plus attention at this context.

    Modules are counted, not parameters, so a tied LM head (its own nn.Linear sharing the embedding) counts.
    """
    linear_weights = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or isinstance(module, (torch.nn.Embedding, torch.nn.LayerNorm)) or weight.dim() != 2:
            continue
        linear_weights += weight.numel()
    config = model.config
    layers = _config_value(config, "num_hidden_layers", "n_layer", default=0)
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model", default=0)
    return 2.0 * linear_weights + 4.0 * layers * context * hidden


def evaluation_throughput(model, ids: torch.Tensor, context: int, perplexity_fn, runs: int,
                          peak: dict) -> dict:
    """Time `perplexity_fn(model, ids)` (median of `runs`) and express it as a fraction of `peak`."""
    seconds, times = median_time(lambda: perplexity_fn(model, ids), runs=runs, warmup=1)
    tokens = int(ids.numel())
    flops = forward_flops_per_token(model, context) * tokens
    achieved = flops / seconds
    return {
        "tokens": tokens,
        "context": context,
        "seconds_median": seconds,
        "seconds_all": times,
        "tokens_per_s": tokens / seconds,
        "achieved_gflops": achieved / 1e9,
        "peak_gflops": peak["flops"] / 1e9,
        "peak_shape": peak["n"],
        "fraction_of_peak": achieved / peak["flops"],
    }


def run(ctx) -> dict:
    """fp32 evaluation of the main model against the fp32 matmul peak (the headline), bf16 beside it."""
    from lmcompress_core.compress import CompressionConfig, compress
    from lmcompress_core.methods.quantize import QuantizationConfig

    start = time.perf_counter()
    name = ctx.main_model
    ids = ctx.eval_ids(name)
    perplexity_fn = lambda model, ids: ctx.perplexity(model, name)
    peaks = {"fp32": matmul_peak_flops(torch.float32, ctx.scale.runs),
             "bf16": matmul_peak_flops(torch.bfloat16, ctx.scale.runs)}
    fp32 = evaluation_throughput(ctx.loaded(name).model, ids, ctx.scale.context, perplexity_fn,
                                 ctx.scale.runs, peaks["fp32"])
    bf16_model = compress(ctx.loaded(name).model,
                          CompressionConfig(quantization=QuantizationConfig(bits=16, dtype16="bf16"))).model
    bf16 = evaluation_throughput(bf16_model, ids, ctx.scale.context, perplexity_fn, ctx.scale.runs, peaks["bf16"])
    return {"headline": {"eval_fraction_of_matmul_peak": fp32["fraction_of_peak"]},
            "fp32": fp32, "bf16": bf16, "context": ctx.scale.context, "peak_shape": fp32["peak_shape"],
            "model": name, "seconds": time.perf_counter() - start}
