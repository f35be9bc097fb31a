"""The one verb: ``compress(model, CompressionConfig)`` applies prune → quantize → distill to a deep copy.

Each stage's config type maps to a handler in ``_HANDLERS`` (adding a method = one dataclass + one handler).
The handlers share a ``_Run`` holding the copy, the pruning masks, the integer codes and the finishing steps
(half cast, int8 kernel) that must wait until distillation has trained the copy. The base model is never
touched: it is shared between app sessions.
"""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from .distill import DistillationConfig, distill_, keep_every_kth_block_
from .int8_kernel import to_int8_kernel_
from .layers import DEFAULT_EXCLUDE, input_statistics, linear_layers, set_weight_matrix_, weight_matrix
from .prune import PruningConfig, global_masks, layer_mask
from .quantize import (QuantizationConfig, QuantizedWeight, cast_half_, fake_quantize, half_round_trip,
                       quantize_weight, requantize)

KERNEL_SIMULATED = "fp32 dense — quantization simulated"
KERNEL_INT8 = "int8 (real, torch dynamic)"
KERNEL_DENSE = "fp32 dense"
SPARSE_SUFFIX = " + dense zeros — no sparse kernel"


@dataclass
class Progress:
    stage: str                    # "calibrate" | "prune" | "quantize" | "distill" | "finish" | "done"
    step: int
    total: int
    message: str = ""
    metrics: dict = field(default_factory=dict)


ProgressCallback = Callable[[Progress], None]


class Cancelled(Exception):
    """should_stop() returned True; the partly compressed copy was discarded."""


@dataclass(frozen=True)
class CompressionConfig:
    quantization: QuantizationConfig | None = None
    pruning: PruningConfig | None = None
    distillation: DistillationConfig | None = None
    include: tuple[str, ...] = ()                # regexes on module names; empty = all linear layers
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE   # embeddings and lm_head stay float by default
    include_embeddings: bool = False             # True: embeddings and lm_head are compressed too

    def __post_init__(self):
        for name, kind in (("quantization", QuantizationConfig), ("pruning", PruningConfig),
                           ("distillation", DistillationConfig)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"{name} must be a {kind.__name__} or None; got {type(value).__name__}")
        for name in ("include", "exclude"):
            patterns = (getattr(self, name),) if isinstance(getattr(self, name), str) else tuple(getattr(self, name))
            for p in patterns:
                try:
                    re.compile(p)
                except (re.error, TypeError) as e:
                    raise ValueError(f"{name} pattern {p!r} is not a valid regular expression: {e}") from None
            object.__setattr__(self, name, patterns)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown compression setting(s): {', '.join(sorted(unknown))}")
        kinds = {"quantization": QuantizationConfig, "pruning": PruningConfig, "distillation": DistillationConfig}
        args = dict(d)
        for name, kind in kinds.items():
            if isinstance(args.get(name), dict):
                args[name] = _build(kind, args[name])
        return cls(**args)

    def key(self) -> str:
        """A stable string for caching: the canonical JSON of the settings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def _build(kind, values: dict):
    known = {f.name for f in fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {kind.__name__} setting(s): {', '.join(sorted(unknown))}")
    return kind(**values)


@dataclass
class CompressedModel:
    model: nn.Module                         # a NEW model (deep copy); runs the forward evaluation should time
    config: CompressionConfig
    quantized: dict[str, QuantizedWeight]    # layer name -> codes (empty when no integer quantization)
    masks: dict[str, torch.Tensor]           # layer name -> bool keep-mask [out, in] (empty when no pruning)
    kernel: str                              # what really runs, e.g. "int8 (real, torch dynamic)"
    history: list[dict]                      # distillation curve: {"step", "loss", "ppl"?}
    notes: list[str] = field(default_factory=list)  # plain-text remarks (e.g. layers GPTQ ran as RTN)


@dataclass
class _Run:
    """Everything the stage handlers share while compressing one copy."""

    base: nn.Module
    model: nn.Module
    config: CompressionConfig
    calibration: torch.Tensor | None
    callback: ProgressCallback | None
    should_stop: Callable[[], bool] | None
    masks: dict = field(default_factory=dict)
    quantized: dict = field(default_factory=dict)
    half: str | None = None                   # "bf16" | "fp16" once a 16-bit cast is due
    int8: bool = False
    int8_detail: str = ""                     # e.g. "; SmoothQuant α=0.75; 27 of 210 layers kept fp32"
    history: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def layers(self) -> dict[str, nn.Module]:
        c = self.config
        exclude = tuple(p for p in c.exclude if p not in DEFAULT_EXCLUDE) if c.include_embeddings else c.exclude
        return linear_layers(self.model, c.include, exclude, embeddings=c.include_embeddings)

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("compression cancelled")

    def report(self, stage: str, step: int, total: int, message: str = "", metrics: dict | None = None) -> None:
        self.check()
        if self.callback is not None:
            self.callback(Progress(stage, step, total, message, dict(metrics or {})))

    def calibration_ids(self, what: str) -> torch.Tensor:
        if self.calibration is None:
            raise ValueError(f"{what} needs calibration token ids: pass calibration=data.calibration_batches(...)")
        return self.calibration

    def input_statistics(self, layers: dict, hessian: bool):
        self.report("calibrate", 0, 1, "running calibration text through the model")
        return input_statistics(self.model, layers, self.calibration_ids("GPTQ/Wanda"), hessian=hessian,
                                check=self.check)


_HANDLERS: dict[type, Callable[[_Run, object], None]] = {}
_STAGES = ("pruning", "quantization", "distillation")  # the order compression applies


def register(config_type: type):
    """Register the handler that applies a stage config of this type to a _Run."""
    def decorate(handler):
        _HANDLERS[config_type] = handler
        return handler
    return decorate


def compress(model: nn.Module, config: CompressionConfig, calibration: torch.Tensor | None = None, tokenizer=None,
             callback: ProgressCallback | None = None, should_stop: Callable[[], bool] | None = None) -> CompressedModel:
    """Compress a deep copy of ``model`` (never mutated) by ``config``: prune, then quantize, then distill.

    ``calibration`` is token ids [n, seq_len] (GPTQ, Wanda and distillation need it); ``tokenizer`` is unused
    and accepted for symmetry with the other entry points. Raises Cancelled when should_stop() turns True.
    """
    if calibration is not None and calibration.dim() == 1:
        calibration = calibration[None, :]
    run = _Run(model, copy.deepcopy(model).eval(), config, calibration, callback, should_stop)
    for stage in _STAGES:
        stage_config = getattr(config, stage)
        if stage_config is not None:
            _HANDLERS[type(stage_config)](run, stage_config)
    _finish(run)
    run.report("done", 1, 1, "done")
    return CompressedModel(run.model, config, run.quantized, run.masks, _kernel(run), run.history, run.notes)


# ---- stage handlers ---------------------------------------------------------------------------------------

@register(PruningConfig)
def _prune(run: _Run, cfg: PruningConfig) -> None:
    if cfg.effective_sparsity == 0:
        return  # 0% leaves every weight bit-identical
    layers = run.layers()
    stats = run.input_statistics(layers, hessian=False) if cfg.method == "wanda" else None
    if cfg.scope == "global" and cfg.pattern == "unstructured":
        masks = global_masks({name: weight_matrix(m) for name, m in layers.items()}, cfg.sparsity)
    else:
        masks = {}
        for name, m in layers.items():
            masks[name] = layer_mask(weight_matrix(m), cfg, stats.sq_norm.get(name) if stats else None)
    for i, (name, m) in enumerate(layers.items()):
        set_weight_matrix_(m, weight_matrix(m) * masks[name])
        run.masks[name] = masks[name]
        run.report("prune", i + 1, len(layers), name)


@register(QuantizationConfig)
def _quantize(run: _Run, cfg: QuantizationConfig) -> None:
    if not cfg.is_integer:
        run.half = cfg.dtype16  # cast at the end, after any distillation has trained in float32
        return
    layers = run.layers()
    stats = run.input_statistics(layers, hessian=True) if cfg.method == "gptq" else None
    for i, (name, m) in enumerate(layers.items()):
        w, mask = weight_matrix(m), run.masks.get(name)
        hessian = stats.hessian.pop(name, None) if stats is not None else None
        layer_cfg = cfg.for_layer(name)
        if layer_cfg is None:
            continue  # mixed precision: this layer stays float
        if layer_cfg.method == "gptq" and hessian is None:
            layer_cfg = replace(layer_cfg, method="rtn")  # no calibration inputs (embeddings): noted below
        qw = quantize_weight(w, layer_cfg, hessian, mask)
        set_weight_matrix_(m, qw.dequantize())
        run.quantized[name] = qw
        run.report("quantize", i + 1, len(layers), name)
    if stats is not None and len(run.quantized) > len(stats.tokens):
        run.notes.append("layers without calibration inputs (embeddings) were quantized with RTN")
    run.int8 = cfg.bits == 8 and cfg.int8_kernel


@register(DistillationConfig)
def _distill(run: _Run, cfg: DistillationConfig) -> None:
    ids = run.calibration_ids("distillation")
    n_heldout = max(1, ids.shape[0] // 8) if ids.shape[0] >= 2 else 0
    train, heldout = (ids[:-n_heldout], ids[-n_heldout:]) if n_heldout else (ids, None)
    if cfg.mode == "student":
        _shrink(run, cfg.keep_every)
    constrained = _attach_constraints(run)
    trainable = _trainable(run, cfg)
    try:
        run.history = distill_(run.model, run.base, cfg, train, heldout,
                               report=lambda step, total, row: run.report("distill", step, total, _describe(row), row),
                               check=run.check)
    finally:
        for m in constrained:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        for p in run.model.parameters():
            p.requires_grad_(True)
    run.notes.append(f"distillation trained {trainable}")
    run.model.eval()
    for name, m in run.layers().items():  # trained weights back onto their integer grids
        if name in run.quantized:
            run.quantized[name] = requantize(weight_matrix(m), run.quantized[name])
            set_weight_matrix_(m, run.quantized[name].dequantize())


def _trainable(run: _Run, cfg: DistillationConfig) -> str:
    """Recovery trains only the chosen layers' weights (and biases): embeddings, norms and untouched layers stay
    as the teacher's. With a few thousand calibration tokens, Adam's noise on every parameter costs more
    perplexity than it wins back when the compressed model is already close to the original."""
    if cfg.mode == "student":
        return "every parameter of the smaller student"
    for p in run.model.parameters():
        p.requires_grad_(False)
    for m in run.layers().values():
        for p in m.parameters():
            p.requires_grad_(True)
    return "the weights of the compressed layers only"


def _describe(row: dict) -> str:
    text = f"step {row['step']}: loss {row['loss']:.3f}"
    return text + (f", held-out ppl {row['ppl']:.2f}" if "ppl" in row else "")


def _shrink(run: _Run, keep_every: int) -> None:
    """Student mode: keep every k-th block; masks and codes follow their modules to the new names."""
    old_names = {id(m): name for name, m in run.layers().items()}
    kept = keep_every_kth_block_(run.model, keep_every)
    renamed = {old_names[id(m)]: name for name, m in run.layers().items()}
    run.masks = {renamed[n]: v for n, v in run.masks.items() if n in renamed}
    run.quantized = {renamed[n]: v for n, v in run.quantized.items() if n in renamed}
    run.notes.append(f"student keeps blocks {kept} of the original")


class _Constrained(nn.Module):
    """Parametrization: the forward sees quantize(w)·mask, gradients reach w straight through (STE)."""

    def __init__(self, quantized: QuantizedWeight | None, mask: torch.Tensor | None, half: str | None,
                 transpose: bool):
        super().__init__()
        self.half, self.transpose = half, transpose
        self.grid = None if quantized is None else (quantized.bits, quantized.group_size)
        self.register_buffer("scales", None if quantized is None else quantized.scales.clone())
        self.register_buffer("zeros", None if quantized is None else quantized.zeros.clone())
        self.register_buffer("mask", None if mask is None else mask.to(torch.float32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        m = w.t() if self.transpose else w
        if self.grid is not None:
            m = m + (fake_quantize(m, self.scales, self.zeros, *self.grid) - m).detach()
        elif self.half is not None:
            m = m + (half_round_trip(m, self.half) - m).detach()
        if self.mask is not None:
            m = m * self.mask
        return m.t() if self.transpose else m


def _attach_constraints(run: _Run) -> list[nn.Module]:
    constrained = []
    for name, m in run.layers().items():
        qw, mask = run.quantized.get(name), run.masks.get(name)
        if qw is None and mask is None and run.half is None:
            continue
        parametrize.register_parametrization(m, "weight", _Constrained(qw, mask, run.half, isinstance(m, Conv1D)))
        constrained.append(m)
    return constrained


def _finish(run: _Run) -> None:
    if run.int8:
        _finish_int8(run)
    if run.half is not None:
        cast_half_(run.model, run.half)


def _finish_int8(run: _Run) -> None:
    """Convert the 8-bit layers to torch's int8 kernel, smoothed and checked on calibration text when there is some."""
    run.report("finish", 0, 1, "converting 8-bit layers to torch's int8 kernel")
    cfg = run.config.quantization
    names = [n for n, m in run.layers().items() if not isinstance(m, nn.Embedding) and n in run.quantized]
    run.notes.append("int8 kernel: weights are int8 per output channel; activations are quantized to int8 per "
                     "tensor at run time (one scale per batch), so an outlier input channel costs every other "
                     "channel resolution")
    if run.calibration is None:
        to_int8_kernel_(run.model, names)
        run.notes.append("int8 kernel: no calibration text, so SmoothQuant smoothing and the per-layer SQNR check "
                         "were skipped")
        return
    kept = to_int8_kernel_(run.model, names, run.calibration, cfg.smooth_alpha, cfg.int8_sqnr_floor_db, run.check)
    run.int8_detail = (f"; SmoothQuant α={cfg.smooth_alpha:g}" if cfg.smooth_alpha > 0 else "") + \
        f"; {len(kept)} of {len(names)} layers kept fp32"
    if cfg.smooth_alpha > 0:
        run.notes.append(f"int8 kernel: SmoothQuant (α={cfg.smooth_alpha:g}) divides each layer's inputs by "
                         "per-channel factors from calibration text and multiplies the weight columns by them")
    if kept:
        run.notes.append(f"int8 kernel: {len(kept)} layer(s) below {cfg.int8_sqnr_floor_db:g} dB int8 output SQNR on "
                         f"calibration text run in fp32 (their weights stay 8-bit fake-quantized): {', '.join(kept)}")


def _kernel(run: _Run) -> str:
    if run.int8:
        kernel = KERNEL_INT8[:-1] + run.int8_detail + ")"
    elif run.half is not None:
        kernel = run.half
    elif run.quantized:
        kernel = KERNEL_SIMULATED
    else:
        kernel = KERNEL_DENSE
    return kernel + (SPARSE_SUFFIX if run.masks else "")
