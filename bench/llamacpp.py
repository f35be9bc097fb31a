"""llama.cpp as the runtime peer: our exported SmolLM2 GGUFs (Q4_0, Q8_0) run by llama-cpp-python against our engine.

* Files: SmolLM2 compressed by our engine with 4-bit and 8-bit symmetric groups of 32 and written by
  `lmcompress_core.export.export_gguf` (codes bit for bit in Q4_0 / Q8_0, scales rounded to fp16).
* Perplexity: the same token ids as every bench section (`Context.eval_ids`, 1024 tokens of the web text) in
  the same non-overlapping windows of 256 (`measure_quality.windows`); llama.cpp returns every position's
  logits (`logits_all`), the NLL is computed here. Ours is `Context.perplexity` of the compressed model holding
  the same codes in fp32; also of our real-runtime model (bf16, int8 head), the one that is timed.
* Decode: the same random prompt ids as `measure_latency` (prompt_tokens, new_tokens of the scale), greedy,
  llama.cpp on 2 threads, warm-up then the median of `runs`; ours is `measure_latency` of the model as the app
  runs it on the real runtime once its decode step is compiled (Q4: the same codes on the int4 kernel; Q8: 8-bit
  per-channel on the int8 kernel, which reads fewer bytes than 8-bit groups of 32 as two 4-bit planes). The
  runtimes take turns over ``ROUNDS`` rounds (ours, llama.cpp on each file) and each keeps the median of its
  round medians, so a burst of load on the machine hits both alike.
* Like for like (``*_like``): llama.cpp runs the GGUF exported from the very model we time — the same codes, its
  int8 LM head as Q8_0 — so both sides read about the same bytes per token (``bytes_per_token_*``: our kernels'
  buffers, the file's tensors); each side's fraction of the roofline divides by the measured copy bandwidth.
  The older ratio (``decode_ratio_vs_llamacpp_q4``) ran the file of the simulated model (F32 tied head).
* Standard files: llama.cpp's own quantizer (llama-quantize's ``llama_model_quantize``) makes Q4_0 and Q8_0 from
  an F16 export of the base model: the speed a llama.cpp user gets with its default mix.

llama-cpp-python (a source distribution) is built once, CPU only, into .venv/llamacpp by `make bench`; when it is
missing or does not import, the section records why instead of measuring.
"""
from __future__ import annotations

import importlib.metadata
import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import THREADS
from lmcompress_core.measure import llamacpp
from lmcompress_core.measure.speed import decode_bytes, memory_bandwidth_gb_s

LLAMACPP_DIR = llamacpp.DEFAULT_DIR
SETTINGS = {"q4": dict(bits=4, group_size=32, symmetric=True),
            "q8": dict(bits=8, group_size=32, symmetric=True)}
# what run() returns, key for key (bench/__main__.py checks it)
KEYS = ("headline", "rows", "skipped", "llama_cpp_python", "threads", "model", "eval_tokens", "context",
        "prompt_tokens", "new_tokens", "runs", "how", "standard_files")


def _version() -> str | None:
    try:
        return next(d.version for d in importlib.metadata.distributions(path=[str(LLAMACPP_DIR)])
                    if d.metadata["Name"] == "llama_cpp_python")
    except StopIteration:
        return None


# Our real-runtime counterpart of each file, as the app runs it: Q4_0's codes on the int4 kernel; for Q8_0 our
# 8-bit kernel is per output channel (groups of 32 have no int8 kernel here), so that setting is timed instead.
REAL = {"q4": dict(bits=4, group_size=32, symmetric=True), "q8": dict(bits=8, granularity="channel", symmetric=True)}
ROUNDS = 3


def _compressed(ctx, quantization: dict, runtime: str):
    """Our model with these quantization settings on ``runtime`` ("simulate": the file's weights in fp32)."""
    from lmcompress_core.compress import CompressionConfig, compress
    from lmcompress_core.methods.quantize import QuantizationConfig

    config = CompressionConfig(quantization=QuantizationConfig(**quantization), runtime=runtime)
    return compress(ctx.loaded(ctx.main_model).model, config)


def llamacpp_perplexity(llama_cpp, path: Path, ids: torch.Tensor, context: int) -> float:
    return llamacpp.perplexity(llama_cpp, path, ids, context, THREADS)


def llamacpp_decode_tokens_per_s(llama_cpp, path: Path, prompt: list[int], new_tokens: int, runs: int) -> float:
    return llamacpp.decode_tokens_per_s(llama_cpp, path, prompt, new_tokens, runs, THREADS)


def _ours_decode(ctx, cm):
    """Our LatencyReport of ``cm`` as the app runs it once its decode step is compiled (compiled first, untimed)."""
    from lmcompress_core.measure.speed import measure_latency
    from lmcompress_core.runtime.compiled import compile_now

    compile_now(cm.model)
    return measure_latency(cm.model, ctx.loaded(ctx.main_model).tokenizer, cm.kernel,
                           prompt_tokens=ctx.scale.prompt_tokens, new_tokens=ctx.scale.new_tokens, runs=ctx.scale.runs)


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of the file's tensors: what llama.cpp reads per decoded token (the tied table is its LM head; the one
    embedding row a step reads is left out on both sides)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight" or
               not _has_output(path))


def _has_output(path: Path) -> bool:
    from gguf import GGUFReader

    return any(t.name == "output.weight" for t in GGUFReader(str(path)).tensors)


def _llamacpp_quantized(llama_cpp, source: Path, ftype: int, target: Path) -> Path:
    """llama.cpp's own quantization (llama-quantize's) of an F16 file: its standard mix for ``ftype``."""
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, THREADS
    failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if failed:
        raise RuntimeError(f"llama_model_quantize returned {failed} for {source.name}")
    return target


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
    # like for like: the file of the very model we time (its int8 head as Q8_0, the same codes)
    like = export_gguf(real, ctx.loaded(ctx.main_model).tokenizer, folder / f"{setting}-like.gguf")
    prompt = _prompt_ids(ctx)
    files = {"simulated_file": exported.path, "like": like.path}
    rounds = []
    for _ in range(ROUNDS):   # interleaved: ours, then llama.cpp on each file
        report = _ours_decode(ctx, real)
        rounds.append({"ours": report.decode_tokens_per_s, **{
            name: llamacpp_decode_tokens_per_s(llama_cpp, path, prompt, ctx.scale.new_tokens, ctx.scale.runs)
            for name, path in files.items()}})
    ours = statistics.median(r["ours"] for r in rounds)
    theirs = {name: statistics.median(r[name] for r in rounds) for name in files}
    ours_bytes, like_bytes = decode_bytes(real.model), gguf_tensor_bytes(like.path)
    bandwidth = memory_bandwidth_gb_s("cpu") * 1e9   # the value measure_latency's roofline divides by
    return {**row, "our_kernel": real.kernel, "our_loop": report.loop,
            "decode_tokens_per_s_ours": ours,
            "decode_tokens_per_s_llamacpp": theirs["simulated_file"],
            "decode_ratio_ours_over_llamacpp": ours / theirs["simulated_file"],
            "like_tensor_types": like.type_counts(), "decode_tokens_per_s_llamacpp_like": theirs["like"],
            "decode_ratio_ours_over_llamacpp_like": ours / theirs["like"],
            "bytes_per_token_ours": ours_bytes, "bytes_per_token_llamacpp_like": like_bytes,
            "fraction_of_roofline_ours": ours * ours_bytes / bandwidth,
            "fraction_of_roofline_llamacpp_like": theirs["like"] * like_bytes / bandwidth, "rounds": rounds}


def _standard_files(ctx, llama_cpp, folder: Path) -> dict:
    """llama.cpp on its own Q4_0 and Q8_0 files, made by its quantizer from an F16 export of the base model."""
    from lmcompress_core.export import export_gguf

    f16 = export_gguf(_compressed(ctx, dict(bits=16, dtype16="fp16"), "simulate"), ctx.loaded(ctx.main_model).tokenizer,
                      folder / "f16.gguf")
    rows = {}
    for name in ("Q4_0", "Q8_0"):
        path = _llamacpp_quantized(llama_cpp, f16.path, getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}"),
                                   folder / f"{name}.gguf")
        rows[name] = {"file_bytes": path.stat().st_size, "tensor_bytes": gguf_tensor_bytes(path),
                      "decode_tokens_per_s": llamacpp_decode_tokens_per_s(
                          llama_cpp, path, _prompt_ids(ctx), ctx.scale.new_tokens, ctx.scale.runs)}
    return rows


def run(ctx) -> dict:
    headline = {"llamacpp_ppl_ratio_q4": None, "decode_ratio_vs_llamacpp_q4": None, "decode_ratio_vs_llamacpp_q8": None,
                "decode_ratio_vs_llamacpp_q4_like": None, "decode_ratio_vs_llamacpp_q8_like": None,
                "llamacpp_q4_bytes_per_token": None, "ours_int4_bytes_per_token": None,
                "decode_ratio_vs_llamacpp_standard_q4": None}
    out = {"headline": headline, "rows": None, "skipped": None, "standard_files": None,
           "llama_cpp_python": _version(), "threads": THREADS,
           "model": ctx.main_model, "eval_tokens": int(ctx.eval_ids(ctx.main_model).numel()),
           "context": ctx.scale.context, "prompt_tokens": ctx.scale.prompt_tokens,
           "new_tokens": ctx.scale.new_tokens, "runs": ctx.scale.runs,
           "how": "ratios: llama.cpp ppl / ours on the same codes in fp32; decode ratio = our tokens/s (real runtime, "
                  "decode step compiled first, "
                  "as the app runs it) / llama.cpp tokens/s (>1: we are faster)"}
    llama_cpp, why = llamacpp.import_llama_cpp()
    if llama_cpp is None:
        return {**out, "skipped": why}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="lmcompress-llamacpp-") as tmp:
        for setting in SETTINGS:
            rows[setting] = _measure(ctx, llama_cpp, setting, Path(tmp))
        try:
            standard = _standard_files(ctx, llama_cpp, Path(tmp))
        except Exception as exc:   # the second reference only: its failure is recorded, the rest stands
            standard = {"error": f"{type(exc).__name__}: {exc}"}
    q4, q8 = rows["q4"], rows["q8"]
    headline.update(llamacpp_ppl_ratio_q4=q4["ppl_ratio_llamacpp_over_ours"],
                    decode_ratio_vs_llamacpp_q4=q4["decode_ratio_ours_over_llamacpp"],
                    decode_ratio_vs_llamacpp_q8=q8["decode_ratio_ours_over_llamacpp"],
                    decode_ratio_vs_llamacpp_q4_like=q4["decode_ratio_ours_over_llamacpp_like"],
                    decode_ratio_vs_llamacpp_q8_like=q8["decode_ratio_ours_over_llamacpp_like"],
                    llamacpp_q4_bytes_per_token=q4["bytes_per_token_llamacpp_like"],
                    ours_int4_bytes_per_token=q4["bytes_per_token_ours"])
    if "Q4_0" in standard:
        headline["decode_ratio_vs_llamacpp_standard_q4"] = (q4["decode_tokens_per_s_ours"]
                                                           / standard["Q4_0"]["decode_tokens_per_s"])
    return {**out, "rows": rows, "standard_files": standard}
