"""The one verb: ``compress(model, CompressionConfig)`` applies prune → quantize → distill to a deep copy.

Each stage's config type maps to a handler in ``_HANDLERS`` (adding a method = one dataclass + one handler).
The handlers share a ``_Run`` holding the copy and the finishing steps that must wait until distillation has
trained it. A compressed weight lives on its module: pruning and quantization swap each chosen layer for a
``CompressedLinear`` / ``CompressedEmbedding`` (runtime.py) holding its codes and keep-mask, and the finish
stage moves the codes onto the runtime the config names (``runtime_kernels.py``): real int4/int8 weight-only
kernels with the rest of the model in bf16 (default), the fp32 simulation, or torch's dynamic int8. The base
model is never touched: it is shared between app sessions.
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
from .layers import DEFAULT_EXCLUDE, input_statistics, linear_layers, weight_matrix
from .prune import PruningConfig, global_masks, layer_mask
from .quantize import (QuantizationConfig, QuantizedWeight, cast_half_, fake_quantize, half_round_trip,
                       quantize_weight, requantize)
from .runtime import CompressedEmbedding, CompressedLinear, as_compressed_, compressed_layers
from .runtime_kernels import (ActivationInt8Linear, DequantLinear, Int4Linear, Int8Linear, cast_rest_,
                              quantize_head_, to_kernels_)

KERNEL_SIMULATED = "fp32 dense — quantization simulated"
KERNEL_INT8_DYNAMIC = "int8 (real, torch dynamic; activations quantized too)"
KERNEL_INT8 = "int8 weight-only (real, aten int8pack), bf16 activations"
KERNEL_DENSE = "fp32 dense"
SPARSE_SUFFIX = " + dense zeros — no sparse kernel"
RUNTIMES = ("real", "simulate", "dynamic_int8")
HEADS = ("int8", "float")
HEAD_INT8 = "LM head int8 (real, aten int8pack)"
HEAD_FLOAT = "LM head bf16"


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
    # What runs integer codes. "real": 2–4-bit on the int4pack kernel, 5–8-bit per-channel on int8pack, the rest
    # of the model in bf16; "simulate": de-quantized fp32 weights (codes, not kernels, decide quality);
    # "dynamic_int8": 8-bit layers on torch's dynamic int8 (activations quantized too), other bits simulated
    runtime: str = "real"
    head: str = "int8"    # real runtime: the LM head (and a tied embedding) on int8pack; "float" keeps it bf16

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(map(repr, RUNTIMES))}; got {self.runtime!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be 'int8' (LM head on the int8 kernel) or 'float'; got {self.head!r}")
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

    def chosen_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers of ``model`` this config compresses (include/exclude patterns, embeddings when asked)."""
        exclude = tuple(p for p in self.exclude if p not in DEFAULT_EXCLUDE) if self.include_embeddings \
            else self.exclude
        return linear_layers(model, self.include, exclude, embeddings=self.include_embeddings)

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
    model: nn.Module                         # a NEW model (deep copy) whose compressed layers hold their codes
    config: CompressionConfig
    kernel: str                              # what really runs, e.g. "int8 weight-only (real, aten int8pack), ..."
    history: list[dict]                      # distillation curve: {"step", "loss", "ppl"?}
    notes: list[str] = field(default_factory=list)  # plain-text remarks (e.g. layers GPTQ ran as RTN)

    def layers(self) -> dict[str, nn.Module]:
        """Every module holding a compressed weight (``quantized_weight()`` / ``keep_mask()``), by name."""
        return compressed_layers(self.model)


@dataclass
class _Run:
    """Everything the stage handlers share while compressing one copy."""

    base: nn.Module
    model: nn.Module
    config: CompressionConfig
    calibration: torch.Tensor | None
    callback: ProgressCallback | None
    should_stop: Callable[[], bool] | None
    half: str | None = None                   # "bf16" | "fp16" once a 16-bit cast is due
    runtime: str = "simulate"                 # what the finish stage runs codes on (CompressionConfig.runtime)
    kernel: str = ""                          # the label the finish stage writes
    history: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def layers(self) -> dict[str, nn.Module]:
        return self.config.chosen_layers(self.model)

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
    return CompressedModel(run.model, config, run.kernel, run.history, run.notes)


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
    for i, name in enumerate(layers):
        as_compressed_(run.model, name).set_mask_(masks[name])
        run.report("prune", i + 1, len(layers), name)


@register(QuantizationConfig)
def _quantize(run: _Run, cfg: QuantizationConfig) -> None:
    if not cfg.is_integer:
        run.half = cfg.dtype16  # cast at the end, after any distillation has trained in float32
        return
    layers = run.layers()
    stats = run.input_statistics(layers, hessian=True) if cfg.method == "gptq" else None
    quantized = 0
    for i, (name, m) in enumerate(layers.items()):
        hessian = stats.hessian.pop(name, None) if stats is not None else None
        layer_cfg = cfg.for_layer(name)
        if layer_cfg is None:
            continue  # a per-layer override keeps this layer float
        if layer_cfg.method == "gptq" and hessian is None:
            layer_cfg = replace(layer_cfg, method="rtn")  # no calibration inputs (embeddings): noted below
        mask = m.keep_mask() if isinstance(m, (CompressedLinear, CompressedEmbedding)) else None
        as_compressed_(run.model, name).set_quantized_(quantize_weight(weight_matrix(m), layer_cfg, hessian, mask))
        quantized += 1
        run.report("quantize", i + 1, len(layers), name)
    if stats is not None and quantized > len(stats.tokens):
        run.notes.append("layers without calibration inputs (embeddings) were quantized with RTN")
    run.runtime = "simulate" if cfg.bits == 8 and not cfg.int8_kernel else run.config.runtime


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
    for m in compressed_layers(run.model).values():  # trained weights back onto their integer grids
        qw = m.quantized_weight()
        if qw is not None:
            m.set_quantized_(requantize(weight_matrix(m), qw))


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
    """Student mode: keep every k-th block; masks and codes live on their modules and move with them."""
    kept = keep_every_kth_block_(run.model, keep_every)
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
    for m in run.layers().values():
        held = isinstance(m, (CompressedLinear, CompressedEmbedding))
        qw, mask = (m.quantized_weight(), m.keep_mask()) if held else (None, None)
        if qw is None and mask is None and run.half is None:
            continue
        parametrize.register_parametrization(m, "weight", _Constrained(qw, mask, run.half, isinstance(m, Conv1D)))
        constrained.append(m)
    return constrained


def _finish(run: _Run) -> None:
    held = compressed_layers(run.model)
    if any(m.quantized_weight() is not None for m in held.values()):
        {"real": _finish_real, "simulate": _finish_simulated, "dynamic_int8": _finish_int8}[run.runtime](run)
    elif run.half is not None:
        cast_half_(run.model, run.half)
        run.kernel = run.half
    else:
        run.kernel = KERNEL_DENSE
    if any(m.keep_mask() is not None for m in held.values()):
        run.kernel += SPARSE_SUFFIX


def _finish_simulated(run: _Run) -> None:
    run.kernel = KERNEL_SIMULATED


def _finish_real(run: _Run) -> None:
    """Codes onto the int4/int8 kernels, the LM head onto int8 (unless kept float), the rest of the model to bf16."""
    run.report("finish", 0, 1, "moving the codes onto the int4 / int8 kernels")
    fallbacks = to_kernels_(run.model)
    by_reason: dict[str, list[str]] = {}
    for name, why in fallbacks.items():
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        run.notes.append(f"{len(names)} layer(s) run no integer kernel ({why}): their uint8 codes are de-quantized "
                         f"to bf16 at every call: {', '.join(names)}")
    head = _finish_head(run)
    cast_rest_(run.model, torch.bfloat16)
    run.kernel = _real_label(run.model, head)


def _finish_head(run: _Run) -> str:
    if run.config.include_embeddings:
        return "embeddings and LM head at the chosen bits, de-quantized in bf16"
    if run.config.head == "float":
        run.notes.append("LM head kept float (bf16), as asked")
        return HEAD_FLOAT
    per_channel = QuantizationConfig(bits=8, granularity="channel")
    refused = quantize_head_(run.model, lambda w: quantize_weight(w, per_channel))
    if refused is not None:
        run.notes.append(refused)
        return HEAD_FLOAT
    run.notes.append("LM head quantized to 8 bits per output channel (RTN) and run on int8pack; a tied input "
                     "embedding gathers its rows from the same int8 table")
    return HEAD_INT8


def _real_label(model: nn.Module, head: str) -> str:
    """Which bits run on which kernel, from the modules that are really there."""
    parts = []
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if int4:
        groups = "/".join(str(g) for g in sorted({m.kernel_group for m in int4}))
        narrow = sorted({m.bits for m in int4 if m.bits < 4})
        container = f"; {'/'.join(map(str, narrow))}-bit codes in the 4-bit container" if narrow else ""
        parts.append(f"int4 weight-only (real, aten int4pack, groups of {groups}{container})")
    head_module = model.get_output_embeddings()
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear) and m is not head_module]
    if int8:
        narrow = sorted({m.bits for m in int8 if m.bits < 8})
        codes = f"; {'/'.join(map(str, narrow))}-bit codes" if narrow else ""
        parts.append(f"int8 weight-only (real, aten int8pack{codes})")
    dequant = [m for m in model.modules() if isinstance(m, DequantLinear)]
    if dequant:
        parts.append(f"{len(dequant)} layer(s) de-quantized from uint8 codes to bf16 at every call (no kernel "
                     "takes them)")
    return " + ".join(parts) + ", bf16 activations; " + head


def _finish_int8(run: _Run) -> None:
    """8-bit layers onto torch's dynamic int8 kernel, smoothed and checked on calibration text when there is some."""
    run.report("finish", 0, 1, "converting 8-bit layers to torch's int8 kernel")
    cfg = run.config.quantization
    held = {n: m for n, m in compressed_layers(run.model).items()
            if isinstance(m, CompressedLinear) and m.quantized_weight() is not None and m.bits == 8}
    codes = {n: m.quantized_weight() for n, m in held.items()}
    for name, m in held.items():  # torch's converter wants plain nn.Linear
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        plain.load_state_dict({k: v for k, v in m.state_dict().items() if k in ("weight", "bias")})
        run.model.set_submodule(name, plain)
    run.notes.append("int8 kernel: weights are int8 per output channel; activations are quantized to int8 per "
                     "tensor at run time (one scale per batch), so an outlier input channel costs every other "
                     "channel resolution")
    detail = ""
    if run.calibration is None:
        to_int8_kernel_(run.model, list(held))
        run.notes.append("int8 kernel: no calibration text, so SmoothQuant smoothing and the per-layer SQNR check "
                         "were skipped")
    else:
        kept = to_int8_kernel_(run.model, list(held), run.calibration, cfg.smooth_alpha, cfg.int8_sqnr_floor_db,
                               run.check)
        detail = (f"; SmoothQuant α={cfg.smooth_alpha:g}" if cfg.smooth_alpha > 0 else "") + \
            f"; {len(kept)} of {len(held)} layers kept fp32"
        _note_smoothing(run, cfg, kept)
    for name, qw in codes.items():
        kernel = run.model.get_submodule(name)
        if isinstance(kernel, nn.Linear):  # kept fp32 by the SQNR floor: the simulation module again
            run.model.set_submodule(name, held[name])
        else:
            run.model.set_submodule(name, ActivationInt8Linear(qw, kernel))
    run.kernel = KERNEL_INT8_DYNAMIC[:-1] + detail + ")"


def _note_smoothing(run: _Run, cfg: QuantizationConfig, kept: list[str]) -> None:
    if cfg.smooth_alpha > 0:
        run.notes.append(f"int8 kernel: SmoothQuant (α={cfg.smooth_alpha:g}) divides each layer's inputs by "
                         "per-channel factors from calibration text and multiplies the weight columns by them")
    if kept:
        run.notes.append(f"int8 kernel: {len(kept)} layer(s) below {cfg.int8_sqnr_floor_db:g} dB int8 output SQNR on "
                         f"calibration text run in fp32 (their weights stay 8-bit fake-quantized): {', '.join(kept)}")
