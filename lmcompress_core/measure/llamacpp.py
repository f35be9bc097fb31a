"""llama.cpp as the deployment readout: the exported GGUF run by llama-cpp-python, beside our own numbers.

llama-cpp-python exists on PyPI only as a source distribution; ``make llamacpp`` builds it once, CPU only, into
``.venv/llamacpp`` (about 5 minutes on 2 cores; ``$LMCOMPRESS_LLAMACPP`` names another folder). Without it the
app and the CLI work as before and say how to enable it (``HOW_TO_ENABLE``).

The readout (``readout``, ``run_bytes``): the compressed model exported to GGUF (``export_gguf``: codes bit for
bit where a GGUF type holds them), then llama.cpp's perplexity on the same token ids in the same windows as ours
(``quality.windows``: every position's logits, the NLL computed here) and its greedy decode speed after the
same prompt ids, warm-up then the median of ``runs``, on the threads torch uses.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmcompress_core.measure.quality import windows

DEFAULT_DIR = Path(__file__).resolve().parents[2] / ".venv" / "llamacpp"
HOW_TO_ENABLE = ("llama.cpp is not built here: `make llamacpp` builds llama-cpp-python once, CPU only, into "
                 ".venv/llamacpp (about 5 minutes on 2 cores)")


def folder() -> Path:
    return Path(os.environ.get("LMCOMPRESS_LLAMACPP") or DEFAULT_DIR)


def import_llama_cpp():
    """(the llama_cpp module, "") or (None, why not): llama_cpp from ``folder()`` only."""
    where = folder()
    if not (where / "llama_cpp").is_dir():
        return None, f"{HOW_TO_ENABLE} (nothing in {where})"
    if str(where) not in sys.path:
        sys.path.append(str(where))
    try:
        import llama_cpp
    except Exception as exc:  # a failed build leaves a package whose shared library does not load
        return None, f"llama_cpp does not import from {where}: {type(exc).__name__}: {exc}"
    return llama_cpp, ""


def _llama(llama_cpp, path: Path, n_ctx: int, threads: int):
    # logits_all: llama-cpp-python 0.3 copies logits into `scores` only then (one row per evaluated token)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                           n_threads_batch=threads, logits_all=True, verbose=False)


def perplexity(llama_cpp, path: Path, ids: torch.Tensor, context: int, threads: int) -> float:
    """exp(mean NLL) of llama.cpp over the windows ``quality.perplexity`` scores (stride = context)."""
    llm = _llama(llama_cpp, path, context, threads)
    tokens = ids.reshape(-1).tolist()
    nll = []
    for begin, end, first in windows(len(tokens), context, context):
        llm.reset()
        llm.eval(tokens[begin:end])
        logits = torch.from_numpy(np.array(llm.scores[first - begin - 1: end - begin - 1], dtype=np.float32))
        logp = torch.log_softmax(logits, dim=-1)
        nll.append(-logp.gather(1, torch.tensor(tokens[first:end])[:, None])[:, 0])
    return math.exp(float(torch.cat(nll).double().mean()))


def decode_tokens_per_s(llama_cpp, path: Path, prompt: list[int], new_tokens: int, runs: int, threads: int) -> float:
    """Greedy decode of ``new_tokens`` after ``prompt``: tokens/s, median of ``runs`` after one warm-up."""
    llm = _llama(llama_cpp, path, len(prompt) + new_tokens + 8, threads)
    times = []
    for _ in range(runs + 1):
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times[1:])


def same_tokens(loaded, protocol) -> tuple[torch.Tensor, list[int]]:
    """(the token ids our perplexity scores, the prompt ids our latency times) for ``protocol`` (EvalProtocol)."""
    from lmcompress_core import data
    from lmcompress_core.measure.protocol import evaluation_text
    from lmcompress_core.measure.speed import latency_prompt

    ids = data.token_ids(loaded.tokenizer, evaluation_text(loaded.name, protocol.text)[1])[:protocol.eval_tokens + 1]
    prompt = latency_prompt(loaded.model, loaded.tokenizer, protocol.prompt_tokens, protocol.decode_tokens)
    return ids, prompt[0].tolist()


def run_file(path: Path, loaded, protocol) -> dict:
    """llama.cpp on a GGUF file: {"perplexity", "decode_tokens_per_s", "threads", "context"} on our tokens, with
    the threads ours runs ``loaded`` on; {"skipped": why} when llama.cpp is not built."""
    from lmcompress_core.runtime.threads import threads_for

    llama_cpp, why = import_llama_cpp()
    if llama_cpp is None:
        return {"skipped": why}
    ids, prompt = same_tokens(loaded, protocol)
    threads = threads_for(loaded.model)
    return {"perplexity": perplexity(llama_cpp, path, ids, protocol.context, threads),
            "decode_tokens_per_s": decode_tokens_per_s(llama_cpp, path, prompt, protocol.decode_tokens,
                                                       protocol.latency_runs, threads),
            "threads": threads, "context": protocol.context, "file_bytes": Path(path).stat().st_size}


def run_bytes(data: bytes, loaded, protocol) -> dict:
    """``run_file`` on a GGUF held in memory (the Report page's prepared download)."""
    with tempfile.TemporaryDirectory(prefix="lmcompress-llamacpp-") as tmp:
        path = Path(tmp) / "model.gguf"
        path.write_bytes(data)
        return run_file(path, loaded, protocol)


def readout(cm, loaded, protocol) -> dict:
    """``run_file`` on the GGUF export of ``cm`` (a CompressedModel of ``loaded``), with the file's tensor types and
    what was re-rounded to fit GGUF; {"skipped": why} when llama.cpp is not built or no GGUF holds the model."""
    from lmcompress_core.export import export_gguf

    llama_cpp, why = import_llama_cpp()
    if llama_cpp is None:
        return {"skipped": why}
    with tempfile.TemporaryDirectory(prefix="lmcompress-llamacpp-") as tmp:
        try:
            exported = export_gguf(cm, loaded.tokenizer, Path(tmp) / "model.gguf")
        except ValueError as exc:   # an architecture or setting no GGUF file holds
            return {"skipped": str(exc)}
        return {**run_file(exported.path, loaded, protocol), "tensor_types": exported.type_counts(),
                "re_rounded": list(exported.converted)}


def sentence(got: dict, ours_ppl: float | None, ours_tokens_per_s: float | None) -> str:
    """One line for a person: llama.cpp's numbers beside ours, or why there are none."""
    if "skipped" in got:
        return f"llama.cpp: not run — {got['skipped']}"
    ppl = f" (ours {ours_ppl:.3f})" if ours_ppl is not None else ""
    speed = f" (ours {ours_tokens_per_s:.1f})" if ours_tokens_per_s is not None else ""
    rounded = f"; re-rounded to fit GGUF: {', '.join(got['re_rounded'])}" if got.get("re_rounded") else ""
    return (f"llama.cpp on the exported GGUF ({got['file_bytes'] / 1e6:.1f} MB): perplexity {got['perplexity']:.3f}"
            f"{ppl} on the same tokens in windows of {got['context']}, decode {got['decode_tokens_per_s']:.1f} "
            f"tokens/s{speed} on {got['threads']} thread(s){rounded}")
