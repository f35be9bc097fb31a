"""Knowledge distillation: the config, the KD loss, a bounded training loop, and the smaller-student initialisation.

The loss is Hinton et al.'s, with the T² factor that keeps the soft term's gradients on the CE scale:

    L = α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α)·CE(y, z_s)

Recovery mode trains the compressed copy against the original model; compress.py attaches a parametrization
to every compressed weight so the forward always sees the quantized, masked weight while gradients reach the
float "latent" weight straight through (STE) — masks and quantization survive training; only the compressed
layers are trained (``distill_`` itself trains whatever requires grad). Student mode first
keeps every k-th decoder block of the copy (DistilBERT-style). Training runs on CUDA when present; the model is
left in eval mode throughout (no dropout) so a few steps are deterministic for a seed.

For the Distillation page: the teacher's next-token distribution at two temperatures, the committed temperature
study and DEFAULT_TEMPERATURE chosen from it, and the training time (estimated from make bench's timings before a
run, the time left from the steps done during one).
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress_core.methods.layers import checking_blocks, transformer_blocks

MAX_STEPS = 10_000
ROOT = Path(__file__).resolve().parents[2]
BENCH_RESULTS = ROOT / "bench" / "results.json"
TINY_FACTS = ROOT / "assets" / "models" / "tiny" / "training_facts.json"
# The one default temperature (Explore, the Distillation page, the CLI): the best mean recovered fraction of
# T = 1, 2, 4, 8 in make bench's study (tiny model, 70% pruning, 100 steps, 3 seeds; bench/results.json), and the T
# its SmolLM2 recovery run used. tests/test_distill.py checks it against the committed study.
DEFAULT_TEMPERATURE = 4.0
# Calibration windows distillation asks for at most: 512 × 256 = 131k tokens. With the 16 windows GPTQ uses
# (4k tokens), 50 steps of 4 × 128 tokens see each token 6 times and the student fits those windows instead of
# the teacher (held-out perplexity rose at 10× the learning rate).
MAX_WINDOWS = 512
HEAD_CHUNK = 128   # positions per output-head pass of the held-out check, with a check() between passes


# what recovery trains in a quantized layer (recovery.py), and how the app says it
TRAINS = {"grid": "the quantization scales (codes frozen)",
          "codes": "the quantization scales and codes (each weight's grid position, STE)",
          "weights": "the latent weights (STE)"}


@dataclass(frozen=True)
class DistillationConfig:
    temperature: float = DEFAULT_TEMPERATURE   # [0.5, 10]; higher = softer teacher distribution
    alpha: float = 0.5            # [0, 1], weight of the KD term (1 − alpha weighs the hard-label CE)
    steps: int = 50               # optimiser steps, [0, 10000]
    mode: str = "recovery"        # "recovery" (student = compressed copy) | "student" (fewer layers, then recovery)
    keep_every: int = 2           # student mode: keep blocks 0, k, 2k, ...
    lr: float = 1e-4              # peak learning rate of float weights (linear warm-up, cosine decay to 0)
    grid_lr: float = 1e-3         # peak learning rate of the scales' log gains, norms and biases
    code_lr: float = 1e-3         # trains="codes": peak learning rate of the weights' positions, in grid steps
    trains: str = "grid"          # quantized layers: "grid" (scales, codes frozen) | "codes" (scales and codes)
    #                               | "weights" (latent weights, STE)
    vectors: bool = True          # recovery also trains the 1-D parameters (norm gains, biases)
    batch_size: int = 4
    seq_len: int = 128
    seed: int = 0

    def __post_init__(self):
        t = self.temperature
        if not _is_number(t) or t <= 0:
            raise ValueError(f"temperature must be positive, between 0.5 and 10; got {t!r}")
        if not 0.5 <= t <= 10:
            raise ValueError(f"temperature must be between 0.5 and 10; got {t!r}")
        if not _is_number(self.alpha) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha (weight of the KD term) must be between 0 and 1; got {self.alpha!r}")
        _integer("steps", self.steps, 0, MAX_STEPS)
        if self.mode not in ("recovery", "student"):
            raise ValueError(f"mode must be 'recovery' or 'student'; got {self.mode!r}")
        _integer("keep_every", self.keep_every, 1, 64)
        if not _is_number(self.lr) or not 0 < self.lr <= 1:
            raise ValueError(f"lr (learning rate) must be in (0, 1], typically 1e-4; got {self.lr!r}")
        if not _is_number(self.grid_lr) or not 0 < self.grid_lr <= 1:
            raise ValueError(f"grid_lr (learning rate of scales, norms, biases) must be in (0, 1], typically 1e-3; "
                             f"got {self.grid_lr!r}")
        if not _is_number(self.code_lr) or not 0 < self.code_lr <= 1:
            raise ValueError(f"code_lr (learning rate of the weights' grid positions) must be in (0, 1], typically "
                             f"1e-3; got {self.code_lr!r}")
        if self.trains not in TRAINS:
            raise ValueError(f"trains must be one of {', '.join(TRAINS)} ({'; '.join(TRAINS.values())}); "
                             f"got {self.trains!r}")
        _integer("batch_size", self.batch_size, 1, 256)
        _integer("seq_len", self.seq_len, 8, 8192)
        _integer("seed", self.seed, 0, 2 ** 63 - 1)

    def calibration_windows(self, window: int) -> int:
        """Calibration windows of ``window`` tokens so training sees each token about once (capped at MAX_WINDOWS),
        plus the held-out windows of the curve."""
        return min(MAX_WINDOWS, math.ceil(self.steps * self.batch_size * self.seq_len / window) + 4)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(field: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{field} must be a whole number between {low} and {high}; got {value!r}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """α·T²·KL(p_t ‖ p_s) + (1 − α)·CE(y, z_s), averaged over positions; labels of -100 are ignored.

    Logits are ``[..., vocab]`` and labels ``[...]``, already aligned (position i predicts labels[i]).
    """
    vocab = student_logits.shape[-1]
    s, t, y = student_logits.reshape(-1, vocab).float(), teacher_logits.reshape(-1, vocab), labels.reshape(-1)
    valid = y != -100
    if not bool(valid.all()):   # (each of these is a copy of the logits: 100 MB for a batch of 4 × 128 tokens)
        s, t, y = s[valid], t[valid], y[valid]
    with torch.no_grad():   # the teacher's side is a constant
        log_p_t = F.log_softmax(t.float() / temperature, dim=-1)
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), log_p_t, reduction="sum", log_target=True) / y.numel()
    ce = F.cross_entropy(s, y)
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


def _next_token_logits(model, tokenizer, prompt: str, temperature: float) -> torch.Tensor:
    """The float logits of the token after ``prompt`` (1-D), after checking the prompt and the temperature."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty; type a few words to see the next-token distribution")
    if not _is_number(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be positive; got {temperature!r}")
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    return model(input_ids=ids, use_cache=False).logits[0, -1].float()


@torch.no_grad()
def next_token_distribution(model, tokenizer, prompt: str, temperature: float, top_k: int = 10) -> list[tuple[str, float]]:
    """The top_k next tokens after ``prompt`` and their probabilities under softmax(logits / temperature)."""
    probs = torch.softmax(_next_token_logits(model, tokenizer, prompt, temperature) / temperature, dim=-1)
    top = torch.topk(probs, min(top_k, probs.numel()))
    return [(tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


@dataclass(frozen=True)
class TemperatureView:
    """The teacher's next-token distribution at T = 1 and at ``temperature`` on the same tokens (the top k at T = 1),
    with the probability all other tokens hold together and the entropy at each T."""

    temperature: float
    tokens: list[str]
    at_one: list[float]
    at_t: list[float]
    rest: tuple[float, float]        # all other tokens together, at T = 1 and at T
    entropy: tuple[float, float]     # nats, at T = 1 and at T
    vocab: int                       # a uniform distribution over it has ln(vocab) nats, the most there can be

    @property
    def max_entropy(self) -> float:
        return math.log(self.vocab)


@torch.no_grad()
def temperature_view(model, tokenizer, prompt: str, temperature: float, top_k: int = 10) -> TemperatureView:
    logits = _next_token_logits(model, tokenizer, prompt, temperature)
    p1, pt = torch.softmax(logits, dim=-1), torch.softmax(logits / temperature, dim=-1)
    top = torch.topk(p1, min(top_k, p1.numel())).indices

    def entropy(p: torch.Tensor) -> float:
        return float(-(p * p.clamp_min(1e-30).log()).sum())
    return TemperatureView(float(temperature), [tokenizer.decode([int(i)]) for i in top], p1[top].tolist(),
                           pt[top].tolist(), (float(1 - p1[top].sum()), float(1 - pt[top].sum())),
                           (entropy(p1), entropy(pt)), p1.numel())


@dataclass(frozen=True)
class TemperatureStudy:
    """What ``make bench`` measured: the recovered fraction of lost perplexity per temperature (mean, std)."""

    by_temperature: dict          # {"T": {"mean": float | None, "std": float | None}}
    best: float | None            # the T with the highest mean; None when nothing was measured
    best_mean: float | None
    setting: str                  # the model, compression and steps it was measured on, in words


def temperature_study(path: Path = BENCH_RESULTS) -> TemperatureStudy | None:
    """The temperature study of the committed bench run (bench/results.json), or None when it has none."""
    try:
        section = json.loads(Path(path).read_text(encoding="utf-8"))["sections"]["distillation"]
        by_temperature = section["headline"]["kd_recovered_fraction_by_temperature"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    means = {t: v["mean"] for t, v in by_temperature.items() if isinstance(v, dict) and _is_number(v.get("mean"))}
    best = max(means, key=means.get) if means else None
    return TemperatureStudy(by_temperature, None if best is None else float(best),
                            None if best is None else means[best], _study_setting(section))


def _study_setting(section: dict) -> str:
    tiny = section.get("tiny") or {}
    steps = tiny.get("steps", section.get("steps"))
    seeds = tiny.get("seeds", section.get("seeds")) or []
    return ", ".join(["tiny model", *([tiny["setting"]] if tiny.get("setting") else []),
                      f"{steps} recovery steps", f"{len(seeds)} seeds"])


def seconds_left(row: dict, total: int) -> float:
    """Training time still to go after history ``row``, at the average pace of the steps done so far (step 0, which
    only measures the starting loss, counts as one)."""
    return row["elapsed_s"] / (row["step"] + 1) * (total - row["step"])


def format_duration(seconds: float) -> str:
    """A duration as people say it: '45 s', '3 min 20 s', '1 h 5 min' (rounded to the second or the minute)."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s" if seconds % 60 else f"{seconds // 60} min"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes % 60 else f"{minutes // 60} h"


@dataclass(frozen=True)
class StepTime:
    """Estimated seconds per training step for one model, and where the number comes from, in words."""

    seconds: float
    source: str

    def training_seconds(self, steps: int) -> float:
        """The whole training of ``steps`` steps (distill_ runs one more: step 0 measures the starting loss)."""
        return self.seconds * (steps + 1)


def step_time_estimate(model_name: str, params: int | None, config: DistillationConfig,
                       path: Path = BENCH_RESULTS) -> StepTime | None:
    """Seconds per step of ``config`` for a model: make bench's measured seconds per step of the same model (the
    default or tiny, compression included) or, for any other model, the tiny model's per parameter times ``params``;
    scaled by tokens per step (batch × sequence length). None when nothing was measured."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
        section, machine = results["sections"]["distillation"], results.get("machine") or {}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    measured = {run["model"]: statistics.median(r["train_s"] / r["steps"] for r in run["rows"])
                for run in (section.get("tiny"), section.get("smollm2")) if run and run.get("rows")}
    # the bench trains with DistillationConfig's batch and sequence length
    tokens = config.batch_size * config.seq_len / (DistillationConfig().batch_size * DistillationConfig().seq_len)
    where = f"make bench on {machine.get('cores', '?')} CPU cores ({machine.get('cpu', 'unknown CPU')})"
    if model_name in measured:
        return StepTime(measured[model_name] * tokens, f"measured on this model by {where}")
    tiny_params = _tiny_params()
    if "tiny" not in measured or not params or not tiny_params:
        return None
    return StepTime(measured["tiny"] / tiny_params * params * tokens,
                    f"the tiny model's time per parameter, measured by {where}, times this model's parameters")


def _tiny_params() -> float | None:
    try:
        return json.loads(TINY_FACTS.read_text(encoding="utf-8"))["params_m"] * 1e6
    except (OSError, ValueError, KeyError, TypeError):
        return None


def keep_every_kth_block_(model: nn.Module, keep_every: int) -> list[int]:
    """Shrink the model in place to decoder blocks 0, k, 2k, ... (DistilBERT-style init); returns their old indices.

    Per-layer config lists (e.g. Qwen2's layer_types) are sliced the same way and each kept block's
    ``layer_idx`` (used by the KV cache) is renumbered.
    """
    parent, attr, blocks = transformer_blocks(model)
    n_layers = len(blocks)
    kept = list(range(0, n_layers, keep_every))
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in kept]))
    for new_index, block in enumerate(getattr(parent, attr)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    for key, value in list(vars(model.config).items()):
        if isinstance(value, list) and len(value) == n_layers:
            setattr(model.config, key, [value[i] for i in kept])
    model.config.num_hidden_layers = len(kept)
    return kept


def _sample_batch(ids: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows of seq_len tokens from the rows of ids [n, L] (seeded)."""
    rows = torch.randint(ids.shape[0], (batch_size,), generator=gen)
    length = min(seq_len, ids.shape[1])
    starts = torch.randint(ids.shape[1] - length + 1, (batch_size,), generator=gen)
    return torch.stack([ids[r, s:s + length] for r, s in zip(rows.tolist(), starts.tolist())])


@torch.no_grad()
def heldout_perplexity(model: nn.Module, ids: torch.Tensor, check=None) -> float:
    """exp(mean next-token cross-entropy) over the rows of ids [n, L] — a quick held-out check while training.
    A row at a time (the float32 logits of 4 rows of 512 tokens on a 49k vocabulary are 400 MB), and the output
    head with its cross-entropy ``HEAD_CHUNK`` positions at a time, ``check()`` before each: on SmolLM2 a whole
    512-token row's head and cross-entropy took 0.26–0.36 s here (fp32) with no place to stop (the blocks ask
    in ``checking_blocks``)."""
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    for row in ids:
        row = row[None].to(device)
        hidden, labels = _hidden(model, row)[0, :-1], row[0, 1:]
        for start in range(0, labels.numel(), HEAD_CHUNK):
            if check is not None:
                check()
            logits = head(hidden[start:start + HEAD_CHUNK]).float()
            total += F.cross_entropy(logits, labels[start:start + HEAD_CHUNK], reduction="sum").item()
        count += labels.numel()
    return math.exp(total / count)


def _train_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def distill_(student: nn.Module, teacher: nn.Module, config: DistillationConfig, train_ids: torch.Tensor,
             heldout_ids: torch.Tensor | None, report=None, check=None) -> list[dict]:
    """Train ``student`` in place against ``teacher`` (never modified) for config.steps steps; returns the curve.

    ``report(step, total, metrics)`` is called every step (metrics: loss, held-out ppl every few steps, and the
    seconds since training started);
    ``check()`` is called every step and before every block of each pass, forward and backward, of either model
    (see ``layers.checking_blocks``); it may raise to cancel. History rows: {"step", "loss", "ppl"?, "elapsed_s"}.
    """
    device = _train_device()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    teacher_run = teacher if device.type == "cpu" else copy.deepcopy(teacher).to(device)
    student.to(device)
    optimizer = torch.optim.AdamW(_param_groups(student, config), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(config.steps))
    eval_every = max(1, config.steps // 10)
    history = []
    started = time.perf_counter()
    try:
        with checking_blocks(student, check), checking_blocks(teacher_run, check):
            for step in range(config.steps + 1):
                if check is not None:
                    check()
                batch = _sample_batch(train_ids, config.batch_size, config.seq_len, gen).to(device)
                loss = _step(student, teacher_run, batch, config, optimizer, update=step > 0, check=check)
                if step > 0:
                    schedule.step()
                row = {"step": step, "loss": loss}
                if heldout_ids is not None and (step % eval_every == 0 or step == config.steps):
                    row["ppl"] = heldout_perplexity(student, heldout_ids, check)
                row["elapsed_s"] = time.perf_counter() - started
                history.append(row)
                if report is not None:
                    report(step, config.steps, row)
    finally:
        student.to("cpu")
    return history


def _param_groups(student: nn.Module, config: DistillationConfig) -> list[dict]:
    """Matrices at ``lr``; log gains, norms and biases (1-D or per-group, relative in size) at ``grid_lr``; grid
    positions (in steps) at ``code_lr``."""
    matrices, small, positions = [], [], []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("position"):
            positions.append(p)
        else:
            (small if p.dim() == 1 or name.endswith("log_gain") else matrices).append(p)
    return [g for g in ({"params": matrices, "lr": config.lr}, {"params": small, "lr": config.grid_lr},
                        {"params": positions, "lr": config.code_lr}) if g["params"]]


def _warmup_cosine(steps: int):
    """Learning-rate factor per step: linear warm-up over the first 10% (at least 1 step), cosine decay to 0."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return factor


def _step(student, teacher, batch, config: DistillationConfig, optimizer, update: bool, check=None) -> float:
    """One KD step (step 0 only measures the starting loss). The transformers run on the whole batch; the output
    heads, the loss and its gradient run a sequence at a time, asking ``check()`` between (``_loss_by_sequence``).
    The heads' pass on the batch was the longest stretch of a step without an ask (~0.2 s each on SmolLM2)."""
    with torch.no_grad():
        teacher_hidden = _hidden(teacher, batch)
    with torch.set_grad_enabled(update):
        student_hidden = _hidden(student, batch)
    if update:
        optimizer.zero_grad(set_to_none=True)   # the student's head gets its gradients a sequence at a time
    heads = (student.get_output_embeddings(), teacher.get_output_embeddings())
    loss, grad = _loss_by_sequence(student_hidden.detach(), teacher_hidden, batch[:, 1:], config, update, check, heads)
    if update:
        student_hidden.backward(grad)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
    return loss


def _hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The last hidden states ``[batch, seq, hidden]``: the causal LM's forward up to its output head (a test
    checks that the head on them gives the model's logits, for every supported architecture)."""
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state


def _loss_by_sequence(student_out: torch.Tensor, teacher_out: torch.Tensor, labels: torch.Tensor,
                      config: DistillationConfig, grad: bool, check=None,
                      heads: tuple[nn.Module, nn.Module] | None = None) -> tuple[float, torch.Tensor | None]:
    """(kd_loss of the batch, its gradient with respect to ``student_out`` or None), the same as one call gives,
    a sequence at a time (each sequence's mean weighted by its share of the positions), ``check()`` before each.
    The outputs are the models' logits ``[batch, seq, vocab]`` aligned with ``labels``, or with ``heads`` (the
    student's, the teacher's) their last hidden states, one position longer: each head then runs on its sequence
    too, and the student's gets its gradients. On a 49k vocabulary the whole batch's loss and its backward took
    ~0.7 s on SmolLM2 here; a sequence at a time also holds a quarter of the memory."""
    counts = (labels != -100).sum(-1).tolist()
    loss, grads = 0.0, []
    for s, t, y, n in zip(student_out, teacher_out, labels, counts):
        if check is not None:
            check()
        s = s.detach().requires_grad_(grad)
        if n:
            with torch.no_grad():
                t = t if heads is None else heads[1](t)[:-1]
            with torch.set_grad_enabled(grad):
                z = s if heads is None else heads[0](s)[:-1]
                part = kd_loss(z, t, y, config.temperature, config.alpha) * (n / sum(counts))
            if grad:
                part.backward()
            loss += float(part.detach())
        grads.append(s.grad if s.grad is not None else torch.zeros_like(s))
    return loss, torch.stack(grads) if grad else None
