"""llama.cpp as the runtime peer: our exported SmolLM2 GGUFs (Q4_0, Q8_0) run by llama-cpp-python against our engine.

* Files: SmolLM2 compressed by our engine with 4-bit and 8-bit symmetric groups of 32 and written by
  `lmcompress_core.export.export_gguf` (codes bit for bit in Q4_0 / Q8_0, scales rounded to fp16).
* Perplexity: the same token ids as every bench section (`Context.eval_ids`, 1024 tokens of the web text) in
  the same non-overlapping windows of 256 (`measure_quality.windows`); llama.cpp returns every position's
  logits (`logits_all`), the NLL is computed here. Ours is `Context.perplexity` of the compressed model holding
  the same codes in fp32; also of our real-runtime model (bf16, int8 head), the one that is timed.
* Decode: the same random prompt ids as `measure_latency` (prompt_tokens, new_tokens of the scale), greedy,
  llama.cpp on 2 threads, warm-up then the median of `runs`; ours is `measure_latency` of the model as the app
  runs it on the real runtime (Q4: the same codes on the int4 kernel; Q8: 8-bit per-channel on the int8 kernel,
  since groups of 32 have no int8 kernel here).

llama-cpp-python (a source distribution) is built once, CPU only, into .venv/llamacpp by `make bench`; when it is
missing or does not import, the section records why instead of measuring.
"""
from __future__ import annotations

import importlib.metadata
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import THREADS

LLAMACPP_DIR = Path(__file__).resolve().parent.parent / ".venv" / "llamacpp"
SETTINGS = {"q4": dict(bits=4, group_size=32, symmetric=True),
            "q8": dict(bits=8, group_size=32, symmetric=True)}
# what run() returns, key for key (bench/__main__.py checks it)
KEYS = ("headline", "rows", "skipped", "llama_cpp_python", "threads", "model", "eval_tokens", "context",
        "prompt_tokens", "new_tokens", "runs", "how")


def _import_llama_cpp():
    """(module, "") or (None, why not): llama_cpp from .venv/llamacpp only."""
    if not (LLAMACPP_DIR / "llama_cpp").is_dir():
        return None, f"llama-cpp-python is not built in {LLAMACPP_DIR} (make bench builds it)"
    if str(LLAMACPP_DIR) not in sys.path:
        sys.path.append(str(LLAMACPP_DIR))
    try:
        import llama_cpp
    except Exception as exc:  # a failed build leaves a package whose shared library does not load
        return None, f"llama_cpp does not import from {LLAMACPP_DIR}: {type(exc).__name__}: {exc}"
    return llama_cpp, ""


def _version() -> str | None:
    try:
        return next(d.version for d in importlib.metadata.distributions(path=[str(LLAMACPP_DIR)])
                    if d.metadata["Name"] == "llama_cpp_python")
    except StopIteration:
        return None


# Our real-runtime counterpart of each file, as the app runs it: Q4_0's codes on the int4 kernel; for Q8_0 our
# 8-bit kernel is per output channel (groups of 32 have no int8 kernel here), so that setting is timed instead.
REAL = {"q4": dict(bits=4, group_size=32, symmetric=True), "q8": dict(bits=8, granularity="channel", symmetric=True)}


def _compressed(ctx, quantization: dict, runtime: str):
    """Our model with these quantization settings on ``runtime`` ("simulate": the file's weights in fp32)."""
    from lmcompress_core.compress import CompressionConfig, compress
    from lmcompress_core.methods.quantize import QuantizationConfig

    config = CompressionConfig(quantization=QuantizationConfig(**quantization), runtime=runtime)
    return compress(ctx.loaded(ctx.main_model).model, config)


def _llama(llama_cpp, path: Path, n_ctx: int, logits_all: bool):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=THREADS,
                           n_threads_batch=THREADS, logits_all=logits_all, verbose=False)


def llamacpp_perplexity(llama_cpp, path: Path, ids: torch.Tensor, context: int) -> float:
    """exp(mean NLL) of llama.cpp over the same windows `measure_quality.perplexity` scores."""
    from lmcompress_core.measure.quality import windows

    llm = _llama(llama_cpp, path, context, logits_all=True)
    tokens = ids.reshape(-1).tolist()
    nll = []
    for begin, end, first in windows(len(tokens), context, context):
        llm.reset()
        llm.eval(tokens[begin:end])
        logits = torch.from_numpy(np.array(llm.scores[first - begin - 1: end - begin - 1], dtype=np.float32))
        logp = torch.log_softmax(logits, dim=-1)
        nll.append(-logp.gather(1, torch.tensor(tokens[first:end])[:, None])[:, 0])
    return math.exp(float(torch.cat(nll).double().mean()))


def llamacpp_decode_tokens_per_s(llama_cpp, path: Path, prompt: list[int], new_tokens: int, runs: int) -> float:
    """Greedy decode of ``new_tokens`` after ``prompt``: tokens/s, median of ``runs`` after one warm-up."""
    # logits_all: llama-cpp-python 0.3 copies logits into `scores` only then (one row per decoded token)
    llm = _llama(llama_cpp, path, len(prompt) + new_tokens + 8, logits_all=True)
    times = []
    for _ in range(runs + 1):
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times[1:])


def _ours_decode(ctx, cm) -> float:
    from lmcompress_core.measure.speed import measure_latency

    report = measure_latency(cm.model, ctx.loaded(ctx.main_model).tokenizer, cm.kernel,
                             prompt_tokens=ctx.scale.prompt_tokens, new_tokens=ctx.scale.new_tokens, runs=ctx.scale.runs)
    return report.decode_tokens_per_s


def _prompt_ids(ctx) -> list[int]:
    """The prompt `measure_latency` times (fixed random ids), so both runtimes decode after the same tokens."""
    from lmcompress_core.measure.speed import latency_prompt

    loaded = ctx.loaded(ctx.main_model)
    return latency_prompt(loaded.model, loaded.tokenizer, ctx.scale.prompt_tokens, ctx.scale.new_tokens)[0].tolist()


def _measure(ctx, llama_cpp, setting: str, folder: Path) -> dict:
    """Perplexity of the exported weights (ours in fp32 vs llama.cpp) and decode speed of each runtime."""
    from lmcompress_core.export import export_gguf

    cm = _compressed(ctx, SETTINGS[setting], "simulate")  # the weights the file holds, run in fp32
    exported = export_gguf(cm, ctx.loaded(ctx.main_model).tokenizer, folder / f"{setting}.gguf")
    ours_ppl = ctx.perplexity(cm.model, ctx.main_model)
    theirs_ppl = llamacpp_perplexity(llama_cpp, exported.path, ctx.eval_ids(ctx.main_model), ctx.scale.context)
    row = {"tensor_types": exported.type_counts(), "file_bytes": exported.path.stat().st_size,
           "ppl_ours": ours_ppl, "ppl_llamacpp": theirs_ppl, "ppl_ratio_llamacpp_over_ours": theirs_ppl / ours_ppl}
    real = _compressed(ctx, REAL[setting], "real")   # what the app times
    row.update(our_real_setting=REAL[setting], ppl_ours_real=ctx.perplexity(real.model, ctx.main_model))
    ours_decode = _ours_decode(ctx, real)
    theirs_decode = llamacpp_decode_tokens_per_s(llama_cpp, exported.path, _prompt_ids(ctx), ctx.scale.new_tokens,
                                                 ctx.scale.runs)
    return {**row, "our_kernel": real.kernel, "decode_tokens_per_s_ours": ours_decode,
            "decode_tokens_per_s_llamacpp": theirs_decode, "decode_ratio_ours_over_llamacpp": ours_decode / theirs_decode}


def run(ctx) -> dict:
    headline = {"llamacpp_ppl_ratio_q4": None, "decode_ratio_vs_llamacpp_q4": None, "decode_ratio_vs_llamacpp_q8": None}
    out = {"headline": headline, "rows": None, "skipped": None, "llama_cpp_python": _version(), "threads": THREADS,
           "model": ctx.main_model, "eval_tokens": int(ctx.eval_ids(ctx.main_model).numel()),
           "context": ctx.scale.context, "prompt_tokens": ctx.scale.prompt_tokens,
           "new_tokens": ctx.scale.new_tokens, "runs": ctx.scale.runs,
           "how": "ratios: llama.cpp ppl / ours on the same codes in fp32; decode ratio = our tokens/s (real runtime, "
                  "as the app runs it) / llama.cpp tokens/s (>1: we are faster)"}
    llama_cpp, why = _import_llama_cpp()
    if llama_cpp is None:
        return {**out, "skipped": why}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="lmcompress-llamacpp-") as tmp:
        for setting in SETTINGS:
            rows[setting] = _measure(ctx, llama_cpp, setting, Path(tmp))
    headline.update(llamacpp_ppl_ratio_q4=rows["q4"]["ppl_ratio_llamacpp_over_ours"],
                    decode_ratio_vs_llamacpp_q4=rows["q4"]["decode_ratio_ours_over_llamacpp"],
                    decode_ratio_vs_llamacpp_q8=rows["q8"]["decode_ratio_ours_over_llamacpp"])
    return {**out, "rows": rows}
