"""The measurement protocol: one ``EvalProtocol`` says what evaluate measures and how, and is its cache key.

Every page, the CLI and the benchmarks describe a measurement with this one object (text, tokens scored,
window length and stride, timed runs, generation settings), so a perplexity on one page is the same number
on another. ``evaluation_text`` resolves the text and ``calibration_for`` draws calibration windows from the
part of that text the protocol never scores.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

import torch

DEFAULT_PROMPTS = {"tiny": "ROMEO:\nWhat light through yonder"}
DEFAULT_PROMPT = "The most important thing to know about the weather is"


@dataclass(frozen=True)
class EvalProtocol:
    text: str | None = None       # a text name from data.py, raw text, or None = the model's own evaluation text
    eval_tokens: int = 2048       # tokens scored for perplexity (at most)
    context: int = 256            # window length of the perplexity pass
    stride: int = 256             # a new window every `stride` tokens (== context: no overlap)
    latency: bool = True
    latency_runs: int = 5         # timed runs per model (base and compressed alternate), after one warm-up each
    # True: the base model is timed too, alternately with the compressed one in the same call, so their ratio
    # compares two models under the same load. False (exploring): only the compressed model is timed, its
    # absolute speed is shown and no ratio is claimed (a base timed at another moment is not comparable)
    latency_base: bool = True
    # True (exploring): the compressed model's latency is read off its greedy generation (the prompt's forward
    # pass after a warm-up, and the median per-token step) instead of extra timed runs; needs generation and
    # latency_base False, else the timed runs are used
    latency_from_generation: bool = False
    prompt_tokens: int = 64       # latency: prefill length (fixed random token ids)
    decode_tokens: int = 16       # latency: greedy steps with the KV cache
    generation: bool = True
    prompt: str | None = None     # None = the model's default prompt
    new_tokens: int = 32          # generated tokens per continuation
    seed: int = 0                 # sampled continuations
    # True: a seeded sampled continuation per model besides the greedy ones (the HTML report shows it). Exploring
    # generates the greedy ones only: Explore shows greedy side by side, and a sampled pair doubles the wait
    sampled: bool = True

    def __post_init__(self):
        for name, low in (("eval_tokens", 1), ("context", 2), ("stride", 1), ("latency_runs", 1),
                          ("prompt_tokens", 1), ("decode_tokens", 1), ("new_tokens", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number of at least {low}; got {value!r}")
        if self.stride > self.context:
            raise ValueError(f"stride ({self.stride}) cannot exceed the context ({self.context}): tokens would be "
                             "skipped")

    @classmethod
    def explore(cls, **changes) -> "EvalProtocol":
        """The lighter protocol used while moving sliders: fewer tokens scored, fewer timed runs of the compressed
        model alone (no speed ratio: that needs the base timed alternately, which `precise` does), its latency read
        off the first 8 steps of its greedy generation, so the latency chart comes 8 steps sooner than with 16:
        on SmolLM2 here the median of the first 8 steps was within 1% of that of 16 and of 32 (4/5/6/8-bit
        settings, 5 generations each), inside the ±5% that generations of one setting differ by."""
        return replace(cls(eval_tokens=512, latency_runs=3, decode_tokens=8, new_tokens=32, latency_base=False,
                           latency_from_generation=True, sampled=False), **changes)

    @classmethod
    def precise(cls, **changes) -> "EvalProtocol":
        """The full protocol (the Report page, `measure precisely`, the CLI's default)."""
        return replace(cls(eval_tokens=2048, latency_runs=5), **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self, text_hash: str = "") -> str:
        """Canonical JSON of the protocol; the text enters by its hash (pasted text can be long)."""
        data = self.to_dict()
        data["text"] = text_hash or data["text"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def times_generation(self) -> bool:
        """Whether the latency is read off the greedy generation rather than timed in runs of its own."""
        return self.latency and self.latency_from_generation and self.generation and not self.latency_base

    def describe(self) -> str:
        """One line for a page: what every number on it was measured with."""
        if self.latency_base:
            timing = f"latency median of {self.latency_runs} runs, base and compressed timed alternately"
        elif self.times_generation():
            timing = ("latency read off the compressed model's greedy generation (prompt pass; median of the first "
                      f"{self.decode_tokens} per-token steps), no speed ratio while exploring")
        else:
            timing = (f"latency median of {self.latency_runs} runs of the compressed model alone (no speed ratio "
                      "while exploring)")
        return (f"perplexity on {self.eval_tokens} tokens (windows of {self.context}, stride {self.stride}); "
                f"{timing}; {self.new_tokens} generated tokens" +
                ("" if self.sampled or not self.generation else " (greedy only; a sampled continuation too when "
                                                                "measuring precisely)"))


def prompt_for(model_name: str, protocol: EvalProtocol) -> str:
    return protocol.prompt or DEFAULT_PROMPTS.get(model_name, DEFAULT_PROMPT)


def evaluation_text(model_name: str, text: str | None = None) -> tuple[str, str, str]:
    """(label, body, hash) of the text a model is scored on: a data.py text name, raw text, or the default."""
    from lmcompress_core import data

    name = text or data.default_text_for(model_name)
    known = name in data.text_names()
    body = data.load_text(name) if known else text
    return (name if known else "pasted text"), body, hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]


def needs_calibration(config) -> bool:
    """GPTQ, the MSE grid, Wanda, SparseGPT, distillation and the calibrated dynamic-int8 path read calibration
    text."""
    q, p = config.quantization, config.pruning
    return (config.distillation is not None
            or (q is not None and q.method in ("gptq", "mse"))
            or (q is not None and q.bits == 8 and config.runtime == "dynamic_int8")  # SmoothQuant + SQNR check
            or (p is not None and p.method in ("wanda", "sparsegpt")))


def calibration_for(loaded, config, protocol: EvalProtocol | None = None, n_samples: int = 16,
                    seq_len: int = 256, force: bool = False) -> torch.Tensor | None:
    """Calibration token ids [n_samples, seq_len], or None when the config needs none (``force``: always).

    Distillation raises n_samples to what its steps consume (``DistillationConfig.calibration_windows``).

    The tiny model calibrates on its training text; other models on the part of their evaluation text after
    the tokens the protocol scores, so calibration never sees a scored token: a text too short to leave
    ``seq_len`` unscored tokens is refused (ValueError saying how long it must be).
    """
    from lmcompress_core import data

    protocol = protocol or EvalProtocol()
    if not (force or needs_calibration(config)):
        return None
    if config.distillation is not None:  # training wants fresh tokens at every step, not 16 windows seen again
        n_samples = max(n_samples, config.distillation.calibration_windows(seq_len))
    if loaded.name == "tiny" and protocol.text is None:
        return data.calibration_batches(loaded.tokenizer, data.load_text("tiny-train"), n_samples, seq_len)
    ids = data.token_ids(loaded.tokenizer, evaluation_text(loaded.name, protocol.text)[1])
    if ids.numel() == 0:
        raise ValueError("the evaluation text gives no tokens, so there is nothing to calibrate on: paste some text")
    ids = _unscored(ids, protocol.eval_tokens, seq_len)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=torch.Generator().manual_seed(0))
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def _unscored(ids: torch.Tensor, eval_tokens: int, seq_len: int) -> torch.Tensor:
    """The tokens after the scored ones (perplexity scores the first eval_tokens + 1 positions), or a ValueError
    when fewer than one calibration window is left: calibrating on scored tokens would fit the test set."""
    scored = min(eval_tokens + 1, ids.numel())
    unscored = ids[scored:]
    if unscored.numel() < seq_len:
        raise ValueError(f"calibration needs {seq_len} tokens that are never scored, but the text gives "
                         f"{ids.numel()} tokens and perplexity scores the first {scored}: paste a longer text (at "
                         f"least {eval_tokens + 1 + seq_len} tokens) or score fewer tokens")
    return unscored

