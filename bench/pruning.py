"""Pruning on SmolLM2: magnitude, Wanda and SparseGPT at 50% unstructured and at 2:4, by perplexity.

Wanda scores each weight by |w| times the norm of its input activation, so it needs calibration batches;
SparseGPT chooses its masks with the calibration Hessian and updates the kept weights (block by block);
magnitude needs none. All prune every linear layer except the embeddings and the LM head.
"""
from __future__ import annotations

import time

from bench.common import timed


# what run() returns, key for key (bench/__main__.py checks it)
KEYS = (
    "headline", "extra", "base_perplexity", "rows", "eval_tokens", "model", "seconds",
)


def _config(method: str, pattern: str):
    from lmcompress_core.compress import CompressionConfig
    from lmcompress_core.methods.prune import PruningConfig

    return CompressionConfig(pruning=PruningConfig(sparsity=0.5, method=method, pattern=pattern))


def run(ctx) -> dict:
    from lmcompress_core.compress import compress

    start = time.perf_counter()
    name = ctx.main_model
    base = ctx.loaded(name)
    calibration = ctx.calibration(name)
    rows = []
    for pattern in ("unstructured", "2:4"):
        for method in ("magnitude", "wanda", "sparsegpt"):
            cm, seconds = timed(lambda: compress(base.model, _config(method, pattern),
                                                 calibration=calibration, tokenizer=base.tokenizer))
            rows.append({"method": method, "pattern": pattern, "sparsity": 0.5, "prune_s": seconds,
                         "kernel": cm.kernel, "perplexity": ctx.perplexity(cm.model, name)})
            del cm

    def ppl(method, pattern):
        return next(r["perplexity"] for r in rows if r["method"] == method and r["pattern"] == pattern)

    return {
        "headline": {"ppl_wanda50_over_magnitude50": ppl("wanda", "unstructured") / ppl("magnitude", "unstructured"),
                     "ppl_sparsegpt50_over_wanda50": ppl("sparsegpt", "unstructured") / ppl("wanda", "unstructured"),
                     "ppl_sparsegpt24_over_wanda24": ppl("sparsegpt", "2:4") / ppl("wanda", "2:4")},
        "extra": {"ppl_wanda24_over_magnitude24": ppl("wanda", "2:4") / ppl("magnitude", "2:4")},
        "base_perplexity": ctx.base_perplexity(name), "rows": rows,
        "eval_tokens": int(ctx.eval_ids(name).numel()), "model": name, "seconds": time.perf_counter() - start,
    }
