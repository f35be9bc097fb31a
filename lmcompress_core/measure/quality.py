"""Quality measurements: sliding-window perplexity with KL and top-1 agreement to the base, side-by-side generations.

Protocol (stated in every report): the token sequence is cut to ``max_tokens + 1`` tokens and read in windows of
``context`` tokens starting every ``stride`` tokens (Hugging Face's sliding-window recipe); each token is scored
at most once, in the first window that predicts it with at least one token of context — so with stride == context
the first token of every window after the first is not scored (the standard recipe; ``tokens`` counts the scored
ones). Perplexity = exp(mean NLL); its ± is the standard error of the mean NLL (tokens treated as independent)
carried through exp (delta method).
Against a base model the same pass also yields llama.cpp-style statistics (``TokenScores.statistics``): mean,
median, 99th and 99.9th percentile of the per-token KL(p_base ‖ p), the share of tokens whose most likely next
token is the same, and the RMS of Δp = p(correct token) − p_base(correct token).
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lmcompress_core.methods.layers import checking_blocks
from lmcompress_core.runtime import compiled
from lmcompress_core.runtime.decode import LOOP, LOOP_COMPILED, STEP_CAPACITY, decoder_for

TRANSFORMERS_LOOP = "transformers forward (its dynamic KV cache)"

SAMPLE_TEMPERATURE = 0.8  # sampled generations: mild temperature and top-k, the usual chat defaults
SAMPLE_TOP_K = 40
BATCH_TOKENS = 512        # scoring runs windows of one length together, up to this many tokens per forward


@dataclass
class PerplexityReport:
    value: float          # exp(mean token NLL)
    stderr: float         # standard error of the mean NLL propagated to perplexity (delta method)
    tokens: int           # number of tokens scored
    context: int          # window length in tokens
    stride: int           # window start every `stride` tokens
    text: str = ""        # name of the text scored


@dataclass
class GenerationReport:
    prompt: str
    base: str                         # greedy continuation of the base model
    compressed: str                   # greedy continuation of the compressed model
    first_divergence: int | None      # index of the first differing greedy token; None when identical
    compressed_logprobs: list[float]  # compressed model's log-prob of each token it generated (greedy)
    sampled_base: str | None          # seeded sampled continuations; None when the protocol asked for greedy only
    sampled_compressed: str | None
    seed: int
    base_tokens: list[str] | None = None
    compressed_tokens: list[str] | None = None
    prompt_tokens: int = 0
    notice: str = ""                  # e.g. the prompt was truncated to fit the context


@dataclass
class TokenScores:
    """Everything one pass over the token windows yields, for the compressed model and (optionally) the base."""
    nll: torch.Tensor
    base_nll: torch.Tensor | None
    kl_to_base: float | None
    top1_agreement: float | None
    context: int
    stride: int
    kl_tokens: torch.Tensor | None = None     # per-token KL(p_base ‖ p) in nats
    same_top: torch.Tensor | None = None      # per-token bool: both models' most likely next token agree

    def statistics(self) -> dict[str, float] | None:
        """llama.cpp-style quality statistics against the base (None without a base model)."""
        if self.kl_tokens is None or self.base_nll is None:
            return None
        kl = self.kl_tokens.double()
        delta_p = torch.exp(-self.nll.double()) - torch.exp(-self.base_nll.double())
        return {"kl_mean": float(kl.mean()), "kl_median": float(torch.quantile(kl, 0.5)),
                "kl_p99": float(torch.quantile(kl, 0.99)), "kl_p999": float(torch.quantile(kl, 0.999)),
                "same_top_percent": 100 * float(self.same_top.double().mean()),
                "rms_delta_p_percent": 100 * float(delta_p.pow(2).mean().sqrt()),
                "tokens": int(kl.numel())}

    def report(self, nll: torch.Tensor | None = None, text: str = "") -> PerplexityReport:
        nll = self.nll if nll is None else nll
        mean = float(nll.double().mean())
        se = float(nll.double().std() / math.sqrt(nll.numel())) if nll.numel() > 1 else float("nan")
        value = math.exp(mean)
        return PerplexityReport(value, value * se, int(nll.numel()), self.context, self.stride, text)


def continue_with_cache(model, out, token_ids: torch.Tensor):
    """One more forward step reusing the KV cache of ``out`` (transformers 5.24 renamed past_key_values to cache)."""
    cache = out["cache"] if "cache" in out else out.past_key_values
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    return model(input_ids=token_ids, use_cache=True, **{name: cache})


def model_device(model) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n tokens; every position >= 1 scored once."""
    out, scored_to = [], 1
    for begin in range(0, max(n - 1, 0), stride):
        end = min(begin + context, n)
        first = max(scored_to, begin + 1)
        if first < end:
            out.append((begin, end, first))
            scored_to = end
        if end == n:
            break
    return out


@dataclass
class BaseScores:
    """The base model's side of a scoring pass: per window, the log-probabilities at the scored positions.

    They depend on (model, tokens, context, stride, max_tokens) only, never on a compression setting, so evaluate
    computes them once and reuses them for every configuration (KL needs the whole distribution, not just the
    correct token's: [scored tokens, vocab] float32, about 100 MB for 512 tokens of a 49k vocabulary).
    """
    logp: list[torch.Tensor]      # one [scored tokens of the window, vocab] tensor per window
    top1: list[torch.Tensor] | None = None   # per window, the base's most likely token at each scored position

    def __post_init__(self):
        if self.top1 is None:
            self.top1 = [logp.argmax(-1) for logp in self.logp]


def _scored_spans(ids: torch.Tensor, context: int, stride: int, max_tokens: int):
    if context < 2 or stride < 1 or stride > context:
        raise ValueError(f"need context >= 2 and 1 <= stride <= context (got context={context}, stride={stride})")
    ids = ids.reshape(-1)[: max_tokens + 1]
    if ids.numel() < 2:
        raise ValueError("the evaluation text has fewer than 2 tokens; nothing to score")
    return ids, windows(ids.numel(), context, stride)


def _windows_logp(model, ids: torch.Tensor, spans: list[tuple[int, int, int]],
                  check: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """float32 log-probabilities at each window's scored positions, the windows (all of one length) run as one
    batch: a layer that widens its codes to run a long input (runtime/kernels.py) widens them once for all, and
    the products are larger (SmolLM2 5-bit g128, the app's 512 tokens: ~0.4 s of 1.7 s was the second widening).
    The logits (bf16 from a bf16 model) go into log_softmax as float32 in one pass (the same values as converting
    them first, without that copy). ``check()`` (optional) runs before every block of the model's pass (see
    ``checking_blocks``)."""
    batch = torch.stack([ids[begin:end] for begin, end, _ in spans]).to(model_device(model))
    with checking_blocks(model, check):
        logits = model(input_ids=batch, use_cache=False).logits
    return [F.log_softmax(logits[j, first - begin - 1: end - begin - 1], dim=-1, dtype=torch.float32).cpu()
            for j, (begin, end, first) in enumerate(spans)]


def _window_batches(spans: list[tuple[int, int, int]], max_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Indices of consecutive windows of equal length, at most ``max_tokens`` tokens per batch (the float32
    log-probabilities of a batch are 200 MB per 1,024 tokens of a 49k vocabulary)."""
    batches: list[list[int]] = []
    for i, (begin, end, _) in enumerate(spans):
        length = end - begin
        last = batches[-1] if batches else None
        if last and spans[last[0]][1] - spans[last[0]][0] == length and (len(last) + 1) * length <= max_tokens:
            last.append(i)
        else:
            batches.append([i])
    return batches


def _kl_rows_(base_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(p_base ‖ p_model) per row, Σ p_base · (log p_base − log p_model), written through ``logp`` (it is
    overwritten: the caller is done with it) so one temporary is made instead of three (50 MB each for a window
    of 256 tokens of a 49k vocabulary); the same operations in the same order, so the same values."""
    diff = torch.sub(base_logp, logp, out=logp)
    return base_logp.exp().mul_(diff).sum(-1)


@torch.inference_mode()
def base_scores(base_model, ids: torch.Tensor, context: int = 256, stride: int = 256, max_tokens: int = 2048,
                check: Callable[[int, int], None] | None = None) -> BaseScores:
    """The base model's log-probabilities on the windows ``score_tokens`` reads (``check`` as there)."""
    ids, spans = _scored_spans(ids, context, stride, max_tokens)
    logp = []
    for batch in _window_batches(spans):
        if check is not None:
            check(batch[0], len(spans))
        logp += _windows_logp(base_model, ids, [spans[i] for i in batch], _asking(check, batch[0], len(spans)))
    return BaseScores(logp)


def _asking(check: Callable[[int, int], None] | None, done: int, total: int) -> Callable[[], None] | None:
    return None if check is None else (lambda: check(done, total))


@torch.inference_mode()
def score_tokens(model, ids: torch.Tensor, context: int = 256, stride: int = 256, max_tokens: int = 2048,
                 base_model=None, check: Callable[[int, int], None] | None = None,
                 base: BaseScores | None = None) -> TokenScores:
    """Per-token NLL of ``model`` (and of the base, with KL and top-1 agreement) on the windows of ``ids``.

    The base enters as ``base_model`` (scored in the same pass) or as its precomputed ``base`` (base_scores on
    the same arguments). ``check(done, total)`` is called before each window (progress; may raise to cancel)
    and, inside it, before each transformer block.
    """
    ids, spans = _scored_spans(ids, context, stride, max_tokens)
    if base is None and base_model is not None:
        base = base_scores(base_model, ids, context, stride, max_tokens)
    if base is not None and len(base.logp) != len(spans):
        raise ValueError("the base scores were computed on other windows than these")
    nll, base_nll, kl, agree = [], [], [], []
    for batch in _window_batches(spans):
        if check is not None:
            check(batch[0], len(spans))
        logps = _windows_logp(model, ids, [spans[i] for i in batch], _asking(check, batch[0], len(spans)))
        for i, logp in zip(batch, logps):
            targets = ids[spans[i][2]:spans[i][1]]
            nll.append(-logp.gather(1, targets[:, None])[:, 0])
            if base is not None:
                base_logp = base.logp[i]
                base_nll.append(-base_logp.gather(1, targets[:, None])[:, 0])
                agree.append(base.top1[i] == logp.argmax(-1))
                kl.append(_kl_rows_(base_logp, logp))   # last: it overwrites logp
        del logps
    if check is not None:
        check(len(spans), len(spans))
    has_base = base is not None
    return TokenScores(
        torch.cat(nll), torch.cat(base_nll) if has_base else None,
        float(torch.cat(kl).double().mean()) if has_base else None,
        float(torch.cat(agree).double().mean()) if has_base else None, context, stride,
        torch.cat(kl) if has_base else None, torch.cat(agree) if has_base else None)


def perplexity(model, ids, context: int = 256, stride: int = 256, max_tokens: int = 2048, base_model=None,
               text: str = "") -> tuple[PerplexityReport, float | None, float | None]:
    """(PerplexityReport, KL(p_base ‖ p_model) mean in nats, top-1 agreement) on the same scored tokens."""
    scores = score_tokens(model, ids, context, stride, max_tokens, base_model)
    return scores.report(text=text), scores.kl_to_base, scores.top1_agreement


# ---------------------------------------------------------------- generation
def max_positions(model) -> int | None:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class Steps:
    """The forward passes of one continuation: the prompt's, then one per new token, each returning the last
    position's logits [vocab]. They run through our static-cache loop (``runtime.decode``) where it runs the model
    — each new token through its compiled graph when that is ready for the model's layout (``runtime.compiled``;
    chosen once per continuation, never waited for unless ``$LMCOMPRESS_COMPILE=wait``) — else through
    transformers' forward and its cache; ``loop`` names which (``own_loop=False`` forces transformers';
    ``use_compiled=False`` keeps our loop eager)."""

    def __init__(self, model, capacity: int, own_loop: bool = True, use_compiled: bool = True):
        self.model, self.capacity = model, capacity
        self.decoder = decoder_for(model) if own_loop else None
        self.step = None
        if self.decoder is not None and use_compiled and capacity <= STEP_CAPACITY:
            self.step = compiled.step_for(self.decoder)
        self.loop = _loop_label(self.decoder, self.step)
        self._state = None

    def prompt(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.view(1, -1)
        if self.decoder is not None:
            self._state = self.decoder.new_cache(self.capacity)
            return self.decoder.forward(ids, self._state)
        self._state = self.model(input_ids=ids, use_cache=True)
        return self._state.logits[0, -1]

    def next(self, token: torch.Tensor) -> torch.Tensor:
        """Logits after appending ``token`` (a [1, 1] id tensor on the model's device)."""
        if self.decoder is not None:
            return self.decoder.forward(token, self._state, self.step)
        self._state = continue_with_cache(self.model, self._state, token)
        return self._state.logits[0, -1]


def _loop_label(decoder, step) -> str:
    if decoder is None:
        return TRANSFORMERS_LOOP
    return LOOP_COMPILED if step else LOOP


@torch.inference_mode()
def decode(model, prompt_ids: torch.Tensor, new_tokens: int, sample: bool = False, seed: int = 0,
           stop_at: int | None = None, on_token: Callable[[list[int]], None] | None = None,
           forward_s: list[float] | None = None, ran: dict | None = None) -> tuple[list[int], list[float]]:
    """Continue ``prompt_ids`` with a KV cache: (token ids, log-prob of each under the untempered distribution).

    ``on_token(tokens so far)`` is called after every new token (streaming; it may raise to cancel).
    ``forward_s`` (a list) gets the wall time of every forward pass — the prompt's, then one per new token —
    with the device synchronised around each and nothing else inside (not sampling, not ``on_token``).
    ``ran`` (a dict) gets ``"loop"``: the forward pass that ran (``Steps.loop``).
    """
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    steps = Steps(model, prompt_ids.numel() + new_tokens)
    if ran is not None:
        ran["loop"] = steps.loop
    logits = _timed(steps.prompt, device, forward_s)(prompt_ids.to(device))
    tokens, logprobs = [], []
    for _ in range(new_tokens):
        logits = logits.float().cpu()
        token = _sample(logits, generator) if sample else int(logits.argmax())
        if stop_at is not None and token == stop_at:
            break
        tokens.append(token)
        logprobs.append(float(F.log_softmax(logits, -1)[token]))
        if on_token is not None:
            on_token(list(tokens))
        logits = _timed(steps.next, device, forward_s)(torch.tensor([[token]], device=device))
    return tokens, logprobs


def _timed(step: Callable, device: torch.device, forward_s: list[float] | None) -> Callable:
    """``step``, timed into ``forward_s`` (device synchronised around it) when that is a list."""
    if forward_s is None:
        return step

    def timed(*args):
        synchronize(device)
        start = time.perf_counter()
        out = step(*args)
        synchronize(device)
        forward_s.append(time.perf_counter() - start)
        return out
    return timed


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously) so that a clock around it times the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample(logits: torch.Tensor, generator: torch.Generator) -> int:
    top = torch.topk(logits / SAMPLE_TEMPERATURE, min(SAMPLE_TOP_K, logits.numel()))
    choice = torch.multinomial(F.softmax(top.values, -1), 1, generator=generator)
    return int(top.indices[choice])


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two token lists differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def prompt_ids_for(model, tokenizer, prompt: str, new_tokens: int) -> tuple[torch.Tensor, str]:
    """Token ids of the prompt, keeping its last tokens when it would not fit the context; (ids, notice)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: type some text for the models to continue")
    ids = torch.tensor(tokenizer(prompt, add_special_tokens=False).input_ids, dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("the prompt gives no tokens with this tokenizer: type some other text")
    limit = max_positions(model)
    notice = ""
    if limit is not None and ids.numel() + new_tokens > limit:
        keep = max(limit - new_tokens, 1)
        notice = (f"prompt truncated: it has {ids.numel()} tokens, the model's context is {limit} tokens and "
                  f"{new_tokens} are kept for the answer, so only its last {keep} tokens were used")
        ids = ids[-keep:]
    return ids, notice


def base_continuations(base_model, tokenizer, prompt: str, new_tokens: int = 32, seed: int = 0,
                       on_token: Callable[[list[int]], None] | None = None, sampled: bool = True) -> dict:
    """The base model's greedy and (``sampled``) sampled token ids for a prompt: they do not depend on any
    compression setting, so evaluate computes them once per (model, prompt, new_tokens, seed) and reuses them.
    ``on_token`` as decode's.
    """
    ids, _ = prompt_ids_for(base_model, tokenizer, prompt, new_tokens)
    eos = getattr(tokenizer, "eos_token_id", None)
    greedy = decode(base_model, ids, new_tokens, stop_at=eos, on_token=on_token)[0]
    if not sampled:
        return {"greedy": greedy, "sampled": None}
    return {"greedy": greedy,
            "sampled": decode(base_model, ids, new_tokens, sample=True, seed=seed, stop_at=eos, on_token=on_token)[0]}


def generate_side_by_side(base_model, model, tokenizer, prompt: str, new_tokens: int = 32,
                          seed: int = 0, base: dict | None = None,
                          on_token: Callable[[str, str], None] | None = None,
                          after_greedy: Callable[[list[float], int, str], None] | None = None,
                          sampled: bool = True, timed_steps: int | None = None) -> GenerationReport:
    """Greedy and (``sampled``) sampled continuations of one prompt by both models, same seed; where greedy outputs
    diverge.

    ``base`` (from base_continuations) skips decoding with the base model again. ``on_token(kind, text so far)``
    streams the compressed model's continuations ("greedy", then "sampled") token by token.
    ``after_greedy(forward_s, prompt tokens, loop)``, when given, gets the timed forward passes of the compressed
    model's greedy continuation (``decode``'s ``forward_s`` and ``Steps.loop``; one untimed warm-up pass over the
    prompt first):
    exploring reads its latency off them. With ``timed_steps`` it gets the prompt's pass and the first
    ``timed_steps`` steps as soon as they are done, while the continuation goes on; else (or when the
    continuation stops sooner) all of them once it ends.
    """
    ids, notice = prompt_ids_for(model, tokenizer, prompt, new_tokens)
    eos = getattr(tokenizer, "eos_token_id", None)
    base = base or base_continuations(base_model, tokenizer, prompt, new_tokens, seed, sampled=sampled)
    text = lambda toks: tokenizer.decode(toks, skip_special_tokens=True)  # noqa: E731
    stream = (lambda kind: None) if on_token is None else (lambda kind: lambda toks: on_token(kind, text(toks)))
    forward_s, ran = (None if after_greedy is None else []), {}
    pending, greedy_stream = after_greedy, stream("greedy")

    def on_greedy(toks: list[int]) -> None:
        nonlocal pending
        # when the n-th token is out, forward_s holds the prompt's pass and n − 1 steps
        if pending is not None and timed_steps is not None and len(forward_s) > timed_steps:
            hand, pending = pending, None
            hand(forward_s[:timed_steps + 1], int(ids.numel()), ran["loop"])
        if greedy_stream is not None:
            greedy_stream(toks)

    if forward_s is not None:
        decode(model, ids, 0)   # warm-up: the timed prompt pass must not pay first-call costs
    comp, comp_logprobs = decode(model, ids, new_tokens, stop_at=eos, forward_s=forward_s, ran=ran,
                                 on_token=None if after_greedy is None and on_token is None else on_greedy)
    if pending is not None:
        pending(forward_s, int(ids.numel()), ran["loop"])
    sampled_comp = None
    if sampled:
        sampled_comp, _ = decode(model, ids, new_tokens, sample=True, seed=seed, stop_at=eos,
                                 on_token=stream("sampled"))
    pieces = lambda toks: [tokenizer.decode([t]) for t in toks]  # noqa: E731
    return GenerationReport(
        prompt=prompt, base=text(base["greedy"]), compressed=text(comp),
        first_divergence=first_divergence(base["greedy"], comp), compressed_logprobs=comp_logprobs,
        sampled_base=None if sampled_comp is None else text(base["sampled"]),
        sampled_compressed=None if sampled_comp is None else text(sampled_comp), seed=seed,
        base_tokens=pieces(base["greedy"]), compressed_tokens=pieces(comp), prompt_tokens=int(ids.numel()),
        notice=notice)
