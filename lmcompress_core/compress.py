"""The one verb: ``compress(model, CompressionConfig)`` applies prune → quantize → distill to a deep copy.

Each stage's config type maps to a handler in ``_HANDLERS`` (adding a method = one dataclass + one handler).
The handlers share a ``_Run`` holding the copy and the finishing steps that must wait until distillation has
trained it. A compressed weight lives on its module: pruning and quantization swap each chosen layer for a
``CompressedLinear`` / ``CompressedEmbedding`` (runtime.py) holding its codes and keep-mask, and the finish
stage moves the codes onto the runtime the config names (``runtime/kernels.py``): real int4/int8 weight-only
kernels with the rest of the model in bf16 (default), the fp32 simulation, or torch's dynamic int8. The base
model is never touched: it is shared between app sessions.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmcompress_core.methods import recovery, sequential
from lmcompress_core.methods.distill import (TRAINS, DistillationConfig, distill_, format_duration,
                                             keep_every_kth_block_, seconds_left)
from lmcompress_core.methods.layers import DEFAULT_EXCLUDE, BaseModelCache, InputStatistics, StatisticsCache, input_statistics, linear_layers, weight_matrix
from lmcompress_core.methods.prune import PruningConfig, global_masks, layer_mask
from lmcompress_core.methods.quantize import QuantizationConfig, QuantizedWeight, cast_half_, gptq_quantize_rows, quantize_weight
from lmcompress_core.methods.sparsegpt import batch_masks, sparsegpt_prune
from lmcompress_core.runtime.modules import (CompressedEmbedding, CompressedLinear, as_compressed_, borrowing_copy,
                                             compressed_layers, own_borrowed_, shared_parameters)
from lmcompress_core.runtime.finish import KERNEL_INT8, KERNEL_INT8_DYNAMIC, KERNEL_SIMULATED  # noqa: F401 (re-exported labels)
from lmcompress_core.runtime.finish import few, finish_dynamic_int8, finish_real

KERNEL_DENSE = "fp32 dense"
SPARSE_SUFFIX = " + dense zeros — no sparse kernel"
HELDOUT_WINDOWS = 4
RUNTIMES = ("real", "simulate", "dynamic_int8")
# GPTQ Hessians and Wanda input norms per base model and calibration set, shared by every setting and session
CALIBRATION_STATS = StatisticsCache()
# magnitude keep-masks per base model and pruning setting (bit-packed, 1 bit per weight: 17 MB for SmolLM2-135M):
# they depend on the base weights alone, so moving the bit-width slider at a fixed sparsity prunes once
MAGNITUDE_MASKS = BaseModelCache(per_model=4)
HEADS = ("int8", "float")


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
    # What runs integer codes. "real": 2–4-bit on the int4pack kernel, 5–8-bit per-channel on int8pack, 5–8-bit
    # in groups as two 4-bit planes on int4pack, the rest of the model in bf16; "simulate": de-quantized fp32 weights (codes, not kernels, decide quality);
    # "dynamic_int8": 8-bit layers on torch's dynamic int8 (activations quantized too), other bits simulated
    runtime: str = "real"
    head: str = "int8"    # real runtime: the LM head (and a tied embedding) on int8pack; "float" keeps it bf16

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(map(repr, RUNTIMES))}; got {self.runtime!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be 'int8' (LM head on the int8 kernel) or 'float'; got {self.head!r}")
        _check_dynamic_int8(self.runtime, self.quantization)
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


def _check_dynamic_int8(runtime: str, q: QuantizationConfig | None) -> None:
    """runtime='dynamic_int8' converts 8-bit layers only: any other setting would convert nothing and still carry
    the int8 label, so it is refused."""
    if runtime != "dynamic_int8":
        return
    if q is None or q.bits != 8:
        got = "no quantization" if q is None else f"bits={q.bits}"
        raise ValueError(f"runtime='dynamic_int8' runs 8-bit layers on torch's dynamic int8 kernel and needs bits=8 "
                         f"(got {got}): set bits=8, or runtime 'real' or 'simulate'")
    if not q.int8_kernel:
        raise ValueError("runtime='dynamic_int8' runs 8-bit layers on torch's int8 kernel, but int8_kernel=False asks "
                         "for them simulated in fp32: drop one of the two")


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
    calibration_tokens: int = 0              # calibration tokens the stages read (GPTQ, SparseGPT, Wanda, MSE, KD)

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
    model_state: str = ""                     # what was done to the copy before calibration: "" or the pruning
    runtime: str = "simulate"                 # what the finish stage runs codes on (CompressionConfig.runtime)
    kernel: str = ""                          # the label the finish stage writes
    history: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    shared: set = field(default_factory=set)   # ids of the copy's tied Parameters (copied, never handed over)
    select: Callable | None = None              # SparseGPT's mask selection, applied by GPTQ's column loop
    borrowed: set = field(default_factory=set)  # storage addresses of the base weights the copy borrows (read only)
    calibration_read: bool = False              # whether a stage read the calibration ids (its cost, reported)

    def layers(self) -> dict[str, nn.Module]:
        return self.config.chosen_layers(self.model)

    def compressed(self, name: str) -> nn.Module:
        """The named layer of the copy as its compressed module (swapped in on first use; the copy's own weight
        moves into it unless tied)."""
        return as_compressed_(self.model, name, self.shared)

    def own(self, module: nn.Module) -> None:
        """Give a module about to be written in place its own copy of any weight it borrows from the base."""
        own_borrowed_(module, self.borrowed)

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
        self.calibration_read = True
        return self.calibration

    def input_statistics(self, layers: dict, hessian: bool) -> InputStatistics:
        """The layers' calibration statistics: reused when this base model has seen the same calibration ids
        through the same (pruned or not) model and layers; otherwise one calibration pass, then cached."""
        calibration = self.calibration_ids("GPTQ/Wanda")
        key = CALIBRATION_STATS.key(calibration, layers, self.model_state)
        found = CALIBRATION_STATS.get(self.base, key, hessian)
        if found is not None:
            self.report("calibrate", 1, 1, "calibration statistics of this model reused from an earlier setting")
            return found
        eta = _Eta()
        self.report("calibrate", 0, 1, "running calibration text through the model")
        stats = input_statistics(self.model, layers, calibration, hessian=hessian, check=self.check,
                                 progress=lambda done, total: self.report(
                                     "calibrate", done, total, "calibration text through the model" +
                                     eta.text(done, total), eta.metrics(done, total)))
        CALIBRATION_STATS.put(self.base, key, stats)
        return stats


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
    When the codes go straight onto kernel modules the copy borrows the float weights it only reads
    (``_borrowable``); the model that comes out shares no memory with ``model``.

    ``calibration`` is token ids [n, seq_len] (GPTQ, Wanda and distillation need it); ``tokenizer`` is unused
    and accepted for symmetry with the other entry points. Raises Cancelled when should_stop() turns True.
    """
    if calibration is not None and calibration.dim() == 1:
        calibration = calibration[None, :]
    config, note = _runnable(config)
    working, borrowed = borrowing_copy(model, _borrowable(model, config))
    run = _Run(model, working.eval(), config, calibration, callback, should_stop, borrowed=borrowed)
    run.notes += [note] if note else []
    run.shared = shared_parameters(run.model)
    for stage in _STAGES:
        stage_config = getattr(config, stage)
        if stage_config is not None:
            _HANDLERS[type(stage_config)](run, stage_config)
    _finish(run)
    own_borrowed_(run.model, borrowed)
    run.report("done", 1, 1, "done")
    return CompressedModel(run.model, config, run.kernel, run.history, run.notes,
                           calibration.numel() if run.calibration_read else 0)


def _runnable(config: CompressionConfig) -> tuple[CompressionConfig, str | None]:
    """The config as it runs, and a note where it differs from the one asked for: GPTQ joined with N:M SparseGPT
    runs its columns in order (act-order would visit an N:M group's consecutive inputs out of order)."""
    q, p = config.quantization, config.pruning
    if not (q is not None and q.method == "gptq" and q.act_order and p is not None and p.method == "sparsegpt"
            and p.pattern != "unstructured" and p.effective_sparsity > 0):
        return config, None
    return replace(config, quantization=replace(q, act_order=False)), (
        f"GPTQ ran its columns in order, without act-order: SparseGPT's {p.pattern} groups are consecutive inputs")


# ---- stage handlers ---------------------------------------------------------------------------------------

@register(PruningConfig)
def _prune(run: _Run, cfg: PruningConfig) -> None:
    if cfg.effective_sparsity == 0:
        return  # 0% leaves every weight bit-identical
    if cfg.method == "sparsegpt":
        _prune_sparsegpt(run, cfg)
        return
    layers = run.layers()
    setting = json.dumps(asdict(cfg), sort_keys=True)
    key = (setting, tuple(layers))
    packed = MAGNITUDE_MASKS.get(run.base, key) if cfg.method == "magnitude" else None
    masks = _masks(run, cfg, layers) if packed is None else {}
    for i, name in enumerate(layers):
        module = run.compressed(name)
        borrowed = module.weight.untyped_storage().data_ptr() in run.borrowed
        if packed is None:   # popped: the bool masks go as their packed bits come
            module.set_mask_(masks.pop(name), borrowed=borrowed)
        else:
            module.set_mask_(packed=packed[name], borrowed=borrowed)
        run.report("prune", i + 1, len(layers), name)
    if cfg.method == "magnitude" and packed is None:   # a copy: the cache never shares this model's buffers
        MAGNITUDE_MASKS.put(run.base, key, {name: run.model.get_submodule(name).mask_bits.clone()
                                            for name in layers})
    run.model_state = "pruned " + setting  # later calibration sees this copy


def _prune_sparsegpt(run: _Run, cfg: PruningConfig) -> None:
    """SparseGPT. Followed by GPTQ, it waits: GPTQ's column loop then prunes and rounds in one pass
    (``run.select``); otherwise it prunes here, block by block (or one-pass where blocks cannot run alone)."""
    run.model_state = "pruned " + json.dumps(asdict(cfg), sort_keys=True)
    q = run.config.quantization
    if q is not None and q.is_integer and q.method == "gptq":
        if q.act_order and cfg.pattern != "unstructured":
            raise ValueError(f"SparseGPT {cfg.pattern} with GPTQ needs act_order=False: N:M groups are consecutive "
                             "inputs, act-order visits them out of order")
        run.select = batch_masks(cfg)
        return
    layers = run.layers()
    modules = {name: run.compressed(name) for name in layers}
    costs = dict(zip(layers, _quantize_costs(layers, True)))   # the same column loop as GPTQ's
    eta, done = _Eta(), {}

    def process(names: list[str], hessian: torch.Tensor) -> None:
        for name in names:
            module = modules[name]
            pruned, mask = sparsegpt_prune(weight_matrix(module, copy=False), hessian, cfg, run.check)
            module.weight = nn.Parameter(pruned.to(module.weight.dtype), requires_grad=module.weight.requires_grad)
            module.set_mask_(mask)
            done[name] = costs[name]
            work = (sum(done.values()), sum(costs.values()))
            run.report("prune", len(done), len(layers), f"SparseGPT layer {len(done)} of {len(layers)}: {name}" +
                       eta.text(*work), eta.metrics(*work))

    _calibrated_pass(run, modules, process, "SparseGPT")


def _calibrated_pass(run: _Run, modules: dict[str, nn.Module], process, what: str) -> None:
    """``process(names, hessian)`` for every layer: block by block (sequential.py) where the model's blocks can
    run alone, else on the one-pass Hessians of the float copy (cached statistics). Layers outside the blocks
    take the one-pass Hessians."""
    calibration = run.calibration_ids(what)
    try:
        outside = None if not sequential.uniform_blocks(run.model) else \
            sequential.compress_sequentially_(run.model, modules, calibration, process, check=run.check)
    except ValueError:   # no stack of decoder blocks
        outside = None
    rest = {n: modules[n] for n in (modules if outside is None else outside)}
    if outside is None:
        run.notes.append(f"{what} ran one-pass (Hessians from the float model): this model's blocks could not be "
                         "run one by one")
    if rest:
        stats = run.input_statistics(rest, hessian=True)
        for name in rest:
            if name in stats.hessian:
                process([name], stats.hessian[name])


def _masks(run: _Run, cfg: PruningConfig, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    stats = run.input_statistics(layers, hessian=False) if cfg.method == "wanda" else None
    # the masks read the weights (their scores are new tensors): no copies
    if cfg.scope == "global" and cfg.pattern == "unstructured":
        return global_masks({name: weight_matrix(m, copy=False) for name, m in layers.items()}, cfg.sparsity)
    if stats is not None:
        _note_magnitude_fallback(run, [name for name in layers if stats.sq_norm.get(name) is None])
    masks = {}
    for name, m in layers.items():   # should_stop asked between layers: all of them take ~0.3 s on SmolLM2 here
        run.check()
        masks[name] = layer_mask(weight_matrix(m, copy=False), cfg, stats.sq_norm.get(name) if stats else None)
    return masks


def _note_magnitude_fallback(run: _Run, names: list[str]) -> None:
    """Wanda scores need each layer's calibration input norms; layers without them (embeddings) are pruned by
    magnitude, and the notes say which."""
    if names:
        run.notes.append(f"{len(names)} layer(s) without calibration input norms were pruned by magnitude instead "
                         f"of Wanda: {', '.join(names)}")


@register(QuantizationConfig)
def _quantize(run: _Run, cfg: QuantizationConfig) -> None:
    if not cfg.is_integer:
        run.half = cfg.dtype16  # cast at the end, after any distillation has trained in float32
        return
    layers = run.layers()
    if _sequential(run, cfg):
        _quantize_sequentially(run, cfg, layers)
    else:
        _quantize_one_pass(run, cfg, layers)
    run.runtime = "simulate" if cfg.bits == 8 and not cfg.int8_kernel else run.config.runtime


def _quantize_one_pass(run: _Run, cfg: QuantizationConfig, layers: dict[str, nn.Module]) -> None:
    """Every layer fitted to the statistics of one calibration pass through the (possibly pruned) float copy."""
    stats = _quantization_statistics(run, cfg, layers)
    writer = _LayerWriter(run, layers, cfg.method == "gptq")
    for group in _quantize_groups(layers, cfg, {} if stats is None else stats.hessian):
        for (name, _, _, _), qw in zip(group, _quantize_group(group, run.check, run.select)):
            writer.write(name, qw)
    _note_without_inputs(run, cfg, layers, stats)


def _note_without_inputs(run: _Run, cfg: QuantizationConfig, layers: dict, stats) -> None:
    """Name the layers the calibrated method could not run as asked (no calibration inputs: embeddings), and what
    ran instead, so no report calls them GPTQ or output-error MSE."""
    if stats is None or cfg.method not in ("gptq", "mse"):
        return
    quantized = [name for name in layers if cfg.for_layer(name) is not None]
    if cfg.method == "mse" and cfg.granularity == "tensor":
        run.notes.append("MSE grid per tensor: one grid spans each whole matrix, so it was fitted on the plain "
                         "weight error (the calibration Hessian scores groups of inputs)")
        return
    missing = [name for name in quantized if stats.hessian.get(name) is None]
    if missing:
        instead = "quantized with RTN instead of GPTQ" if cfg.method == "gptq" else \
            "fitted by the MSE grid on the plain weight error, not the output error"
        run.notes.append(f"{len(missing)} layer(s) without calibration inputs were {instead}: {few(missing)}")


def _sequential(run: _Run, cfg: QuantizationConfig) -> bool:
    """Whether GPTQ runs block by block (its default); a model whose blocks take different attention masks
    (sliding-window and full layers mixed) runs one-pass, and says so."""
    if cfg.method != "gptq" or cfg.calibration_pass != "sequential":
        return False
    try:
        if sequential.uniform_blocks(run.model):
            return True
    except ValueError:   # no stack of decoder blocks found
        pass
    run.notes.append("GPTQ ran one-pass (Hessians from the float model): this model's blocks could not be run "
                     "one by one with the same inputs")
    return False


def _quantize_sequentially(run: _Run, cfg: QuantizationConfig, layers: dict[str, nn.Module]) -> None:
    """GPTQ block by block (``sequential.py``): each layer's Hessian from the inputs the already quantized layers
    before it give. Layers outside the blocks (embeddings, LM head) have no such inputs and are rounded (RTN)
    first, so the blocks see the embeddings as they will be."""
    calibration = run.calibration_ids("GPTQ")
    modules = {name: run.compressed(name) for name in layers}   # the hooks go on the modules that stay
    writer = _LayerWriter(run, modules, True)
    _, outside = sequential.layers_by_block(run.model, modules)
    rounded = _round_unreached(writer, cfg, modules, outside)
    if rounded:
        run.notes.append(f"{len(rounded)} layer(s) outside the transformer blocks (embeddings, LM head) were quantized "
                         f"with RTN instead of GPTQ: {few(rounded)}")

    def process(names: list[str], hessian: torch.Tensor) -> None:
        chosen = {name: modules[name] for name in names}
        for group in _quantize_groups(chosen, cfg, dict.fromkeys(names, hessian)):
            for (name, _, _, _), qw in zip(group, _quantize_group(group, run.check, run.select)):
                writer.write(name, qw, runs_next=True)

    sequential.compress_sequentially_(run.model, {n: modules[n] for n in layers if n not in outside},
                                      calibration, process, after_block=writer.release, check=run.check)
    rounded = _round_unreached(writer, cfg, modules, [n for n in layers if n not in writer.written])
    if rounded:
        run.notes.append(f"{len(rounded)} layer(s) the calibration pass never ran were quantized with RTN instead of "
                         f"GPTQ: {few(rounded)}")


def _round_unreached(writer: "_LayerWriter", cfg: QuantizationConfig, modules: dict, names: list[str]) -> list[str]:
    """RTN for the named layers that get integer codes (no calibration inputs reach them); the layers it rounded."""
    rounded = []
    for name in names:
        layer_cfg = cfg.for_layer(name)
        if layer_cfg is not None:
            writer.write(name, quantize_weight(weight_matrix(modules[name]), replace(layer_cfg, method="rtn"),
                                               mask=_mask(modules[name])))
            rounded.append(name)
    return rounded


class _LayerWriter:
    """Writes each layer's QuantizedWeight into its module and reports progress with the time left."""

    def __init__(self, run: _Run, layers: dict[str, nn.Module], gptq: bool):
        self.run, self.total = run, len(layers)
        self.costs = dict(zip(layers, _quantize_costs(layers, gptq)))
        self.kernels_next = _kernels_next(run, run.config.quantization)
        self.eta, self.done, self.quantized, self.written = _Eta(), 0, 0, set()

    def write(self, name: str, qw: QuantizedWeight, runs_next: bool = False) -> None:
        """Hold qw's codes on the layer's module. ``runs_next``: the module still runs (the rest of its block in
        a sequential pass) with the de-quantized weight, as a new tensor when its codes go onto a kernel next
        (``release`` then drops it)."""
        run = self.run
        module = run.compressed(name)
        onto_kernel = self.kernels_next and isinstance(module, CompressedLinear)
        if not onto_kernel:
            run.own(module)   # its de-quantized matrix is written into the weight
        module.set_quantized_(qw, own_mask=True, keep_weight=not onto_kernel)   # qw.mask: its keep_mask()
        if onto_kernel and runs_next:
            module.weight = nn.Parameter(qw.dequantize(module.weight.dtype), requires_grad=False)
        self.quantized, self.done = self.quantized + 1, self.done + self.costs[name]
        self.written.add(name)
        total = sum(self.costs.values())
        run.report("quantize", self.quantized, self.total, f"layer {self.quantized} of {self.total}: {name}" +
                   self.eta.text(self.done, total), self.eta.metrics(self.done, total))

    def release(self, names: list[str]) -> None:
        """After a block's sequential pass: the weights of layers whose codes go onto kernels are dropped."""
        for name in names:
            module = self.run.model.get_submodule(name)
            if self.kernels_next and isinstance(module, CompressedLinear) and module.is_quantized():
                module.release_weight_()


def _kernels_next(run: _Run, cfg: QuantizationConfig) -> bool:
    """Whether the codes go straight onto kernel modules (the real runtime, nothing trained after): then the float
    weights of the linear layers are never read again and need not be written (finish_real reads the codes)."""
    return _onto_kernels(run.config, cfg)


def _onto_kernels(config: CompressionConfig, cfg: QuantizationConfig) -> bool:
    simulated_int8 = cfg.bits == 8 and not cfg.int8_kernel
    return config.runtime == "real" and not simulated_int8 and config.distillation is None


def _borrowable(model: nn.Module, config: CompressionConfig) -> list[torch.Tensor]:
    """The base weights the working copy may borrow instead of copying (``borrowing_copy``): when the codes go
    straight onto kernel modules, each quantized linear layer's float weight is only read (to prune, calibrate
    and quantize; a pruned one is written into a new tensor) and then released, and the LM head's (with a tied
    embedding) only read by quantize_head_, replaced or cast. Nothing else: what could be written in place
    (compressed embeddings, trained or simulated weights) is copied."""
    q = config.quantization
    if q is None or not q.is_integer or not _onto_kernels(config, q):
        return []
    tied = shared_parameters(model)
    borrow = [m.weight for name, m in config.chosen_layers(model).items()
              if not isinstance(m, nn.Embedding) and id(m.weight) not in tied and q.for_layer(name) is not None]
    head = None if config.include_embeddings else model.get_output_embeddings()
    if head is not None and isinstance(getattr(head, "weight", None), nn.Parameter):
        borrow.append(head.weight)
    return borrow


def _quantize_groups(layers: dict[str, nn.Module], cfg: QuantizationConfig, hessians: dict) -> list[list[tuple]]:
    """The layers to quantize as (name, module, setting, Hessian) in groups quantized together: consecutive
    GPTQ layers with the same setting and the same Hessian tensor (fed the same inputs, e.g. q/k/v), else one."""
    groups: list[list[tuple]] = []
    for name, m in layers.items():
        hessian = hessians.get(name)  # read only: the statistics are cached
        layer_cfg = cfg.for_layer(name)
        if layer_cfg is None:
            continue  # mixed precision: this layer stays float
        if layer_cfg.method == "gptq" and hessian is None:
            layer_cfg = replace(layer_cfg, method="rtn")  # no calibration inputs (embeddings): noted by the caller
        job = (name, m, layer_cfg, hessian)
        last = groups[-1][-1] if groups else None
        together = (last is not None and hessian is not None and last[3] is hessian and last[2] == layer_cfg
                    and layer_cfg.method == "gptq"
                    and layer_cfg.granularity != "tensor" and _mask(last[1]) is None and _mask(m) is None)
        if together:
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


def _mask(m: nn.Module) -> torch.Tensor | None:
    return m.keep_mask() if isinstance(m, (CompressedLinear, CompressedEmbedding)) else None


def _quantize_group(group: list[tuple], check=None, select=None) -> list[QuantizedWeight]:
    """The group's QuantizedWeights; ``select`` (SparseGPT with GPTQ): GPTQ prunes as it rounds."""
    name, m, layer_cfg, hessian = group[0]
    select = select if layer_cfg.method == "gptq" else None
    if len(group) == 1:   # RTN only reads its matrix (no copy); the other methods work on a copy
        return [quantize_weight(weight_matrix(m, copy=layer_cfg.method != "rtn"), layer_cfg, hessian, _mask(m),
                                check=check, select=select)]
    return gptq_quantize_rows([weight_matrix(job[1]) for job in group], hessian, layer_cfg, check=check,
                              select=select)


def _quantize_costs(layers: dict[str, nn.Module], gptq: bool) -> list[int]:
    """Relative work per layer for the time-left estimate: out·in to round; GPTQ adds in² (inverse Hessian)."""
    costs = []
    for m in layers.values():
        out_features, in_features = (m.weight.shape[::-1] if isinstance(m, Conv1D) else m.weight.shape)[:2]
        costs.append(out_features * in_features + (in_features * in_features if gptq else 0))
    return costs


class _Eta:
    """Seconds so far and a linear estimate of the seconds left, from the share of the work done."""

    def __init__(self):
        self.start = time.perf_counter()

    def metrics(self, done: float, total: float) -> dict:
        elapsed = time.perf_counter() - self.start
        left = elapsed * (total - done) / done if done > 0 else None
        return {"elapsed_s": round(elapsed, 1), "remaining_s": None if left is None else round(left, 1)}

    def text(self, done: float, total: float) -> str:
        m = self.metrics(done, total)
        left = "" if m["remaining_s"] is None else f", about {m['remaining_s']:.0f} s left"
        return f" · {m['elapsed_s']:.0f} s so far{left}"


def _quantization_statistics(run: _Run, cfg: QuantizationConfig, layers: dict):
    """The calibration Hessians GPTQ needs and the MSE grid scores its candidates on (None: not needed/none)."""
    if cfg.method == "gptq":
        return run.input_statistics(layers, hessian=True)
    if cfg.method != "mse":
        return None
    if run.calibration is None:
        run.notes.append("MSE grid without calibration text: the plain weight error was minimised, not the output's")
        return None
    return run.input_statistics(layers, hessian=True)


@register(DistillationConfig)
def _distill(run: _Run, cfg: DistillationConfig) -> None:
    ids = run.calibration_ids("distillation")
    # an eighth of the windows (at most HELDOUT_WINDOWS: it is evaluated every tenth of training) for the curve
    n_heldout = min(HELDOUT_WINDOWS, max(1, ids.shape[0] // 8)) if ids.shape[0] >= 2 else 0
    train, heldout = (ids[:-n_heldout], ids[-n_heldout:]) if n_heldout else (ids, None)
    run.own(run.model)   # training writes in place (nothing is borrowed when distillation follows: a safeguard)
    if cfg.mode == "student":
        _shrink(run, cfg.keep_every)
    attached = recovery.attach_(run.model, run.layers(), run.half, cfg.trains, cfg.vectors, check=run.check,
                                float_weights=None if cfg.mode == "student" else _float_weights(run.base))
    if cfg.mode == "student":
        for p in run.model.parameters():
            p.requires_grad_(True)
    trained = _describe_trained(run.model, cfg)
    run.history = distill_(run.model, run.base, cfg, train, heldout,
                           report=lambda step, total, row: run.report("distill", step, total, _describe(row, total), row),
                           check=run.check)
    # only once trained: a stopped or failed run's copy is thrown away with its parametrizations (detaching
    # computes every trained weight, ~0.2 s on SmolLM2, that nobody would read)
    recovery.detach_(run.model, attached)
    run.notes.append(f"distillation trained {trained}")
    run.model.eval()


def _float_weights(base: nn.Module):
    """name -> the original model's weight of that layer as [out, in] float (None where there is none)."""
    def weight(name: str) -> torch.Tensor | None:
        try:
            module = base.get_submodule(name)
        except AttributeError:
            return None
        return weight_matrix(module, copy=False) if isinstance(getattr(module, "weight", None), torch.Tensor) else None
    return weight


def _describe_trained(model: nn.Module, cfg: DistillationConfig) -> str:
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.mode == "student":
        return f"every parameter of the smaller student ({count:,})"
    what = TRAINS[cfg.trains]
    return f"{what}, the kept weights of pruned layers" + (", norms and biases" if cfg.vectors else "") + \
        f" ({count:,} values)"


def _describe(row: dict, total: int) -> str:
    text = f"step {row['step']} of {total}: loss {row['loss']:.3f}"
    text += f", held-out ppl {row['ppl']:.2f}" if "ppl" in row else ""
    return text + (f", about {format_duration(seconds_left(row, total))} left" if row["step"] < total else "")


def _shrink(run: _Run, keep_every: int) -> None:
    """Student mode: keep every k-th block; masks and codes live on their modules and move with them."""
    kept = keep_every_kth_block_(run.model, keep_every)
    run.notes.append(f"student keeps blocks {kept} of the original")


def _finish(run: _Run) -> None:
    held = compressed_layers(run.model)
    if any(m.is_quantized() for m in held.values()):
        {"real": finish_real, "simulate": _finish_simulated, "dynamic_int8": finish_dynamic_int8}[run.runtime](run)
    elif run.half is not None:
        cast_half_(run.model, run.half)
        run.kernel = run.half
    else:
        run.kernel = KERNEL_DENSE
    if any(m.is_pruned() for m in held.values()):
        run.kernel += SPARSE_SUFFIX


def _finish_simulated(run: _Run) -> None:
    run.kernel = KERNEL_SIMULATED
