"""Which layers of a causal LM get compressed, their weights as [out, in] matrices, and calibration statistics.

Every algorithm in this package sees a layer's weight as a float32 matrix ``[out_features, in_features]``,
whatever the module stores: GPT-2's transformers ``Conv1D`` keeps ``[in, out]`` and is transposed here, so
quantize.py and prune.py never special-case an architecture.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# Regexes searched in module names. Embeddings and the LM head stay float by default: they are a large share of
# a small model, tied to each other in GPT-2, and the usual recipes (GPTQ, Wanda) leave them alone.
# embed_out is GPT-NeoX/Pythia's LM head; embed_in its token embedding.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"(^|\.)lm_head$",
    r"(^|\.)embed_tokens$",
    r"(^|\.)embed_positions$",
    r"(^|\.)wte$",
    r"(^|\.)wpe$",
    r"(^|\.)embed_in$",
    r"(^|\.)embed_out$",
)

_MATRIX_TYPES = (nn.Linear, Conv1D)


def _selected(name: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    include, exclude = tuple(include), tuple(exclude)
    if include and not any(re.search(p, name) for p in include):
        return False
    return not any(re.search(p, name) for p in exclude)


def linear_layers(model: nn.Module, include=(), exclude=DEFAULT_EXCLUDE, embeddings: bool = False) -> dict[str, nn.Module]:
    """The model's nn.Linear and Conv1D modules (plus nn.Embedding when ``embeddings``) chosen by the patterns.

    ``include`` empty means every layer; a weight tied to an earlier layer (GPT-2's lm_head and wte) is listed once.
    """
    types = _MATRIX_TYPES + ((nn.Embedding,) if embeddings else ())
    chosen, seen = {}, set()
    for name, module in model.named_modules():
        if not isinstance(module, types) or not _selected(name, include, exclude):
            continue
        if id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        chosen[name] = module
    return chosen


def weight_matrix(module: nn.Module, copy: bool = True) -> torch.Tensor:
    """A float32 copy of the module's weight as ``[out_features, in_features]`` (Conv1D transposed).
    ``copy=False``: no copy where the weight already is float32 (the weight itself or its transposed view: to
    read only)."""
    w = module.weight.detach()
    if isinstance(module, Conv1D):
        w = w.t()
    w = w.to(torch.float32)
    return w.clone() if copy else w


@torch.no_grad()
def set_weight_matrix_(module: nn.Module, w: torch.Tensor) -> None:
    """Write an ``[out, in]`` matrix into the module's weight in place, in the module's own layout and dtype."""
    if isinstance(module, Conv1D):
        w = w.t()
    module.weight.copy_(w.to(module.weight.dtype))


def transformer_blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, blocks): the ModuleList of decoder blocks (transformer.h, model.layers, ...)."""
    n_layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise ValueError(f"could not find the {n_layers} decoder blocks of {type(model).__name__}")


@contextmanager
def checking_blocks(model: nn.Module, check: Callable[[], None] | None):
    """``check()`` before each transformer block of the model's passes inside the block and after its output
    head, forward and backward, so that one long pass (a perplexity window: ~0.3 s on SmolLM2 here; a
    distillation step: ~6 s) can be abandoned between two blocks: whatever ``check`` raises leaves the pass
    (``backward()`` re-raises it), and the hooks go with the block. Only passes on this thread ask: the base
    model is shared by every session, and another session's pass must never run this check."""
    if check is None:
        yield
        return
    owner = threading.get_ident()

    def ask(*_) -> None:
        if threading.get_ident() == owner:
            check()

    def ask_backward(module, args, output) -> None:
        # the gradient reaches a module's output just before the module's own backward: ask there (from
        # whichever thread runs the backward: the output belongs to this thread's pass)
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad and threading.get_ident() == owner:
            out.register_hook(lambda grad: check())

    try:
        stack = transformer_blocks(model)[2]
    except (AttributeError, ValueError):   # no stack of blocks found: the pass asks only before it starts
        stack = ()
    hooks = [hook for block in stack
             for hook in (block.register_forward_pre_hook(ask), block.register_forward_hook(ask_backward))]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        hooks += [head.register_forward_hook(ask), head.register_forward_hook(ask_backward)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def conv1d_to_linear_(model: nn.Module, names: Iterable[str]) -> None:
    """Replace the named transformers Conv1D modules by equivalent nn.Linear modules (weight transposed)."""
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, Conv1D):
            continue
        in_features, out_features = module.weight.shape
        linear = nn.Linear(in_features, out_features, bias=module.bias is not None)
        linear.to(device=module.weight.device, dtype=module.weight.dtype)
        linear.weight.copy_(module.weight.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, linear)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class InputStatistics:
    """Per-layer statistics of the inputs a layer sees on calibration text, gathered by forward pre-hooks.

    ``sq_norm[name]`` is Σ x_j² over calibration tokens per input feature (Wanda's ‖X_j‖₂²);
    ``hessian[name]`` is GPTQ's H = 2·XXᵀ / n_tokens (only when asked: it is in_features² floats per layer).
    """

    def __init__(self, hessian: bool):
        self.want_hessian = hessian
        self.sq_norm: dict[str, torch.Tensor] = {}
        self.hessian: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def hook(self, name: str):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            seen = self.tokens.get(name, 0)
            total = seen + x.shape[0]
            self.sq_norm[name] = self.sq_norm.get(name, 0) + (x * x).sum(dim=0)
            if self.want_hessian:
                # Running mean keeps H on the same scale whatever the number of calibration tokens.
                h = self.hessian.get(name)
                h = torch.zeros(x.shape[1], x.shape[1], device=x.device) if h is None else h * (seen / total)
                self.hessian[name] = h.addmm_(x.t(), x, alpha=2.0 / total)
            self.tokens[name] = total

        return record

    def share_identical_(self) -> None:
        """Layers fed the same input (q/k/v, gate/up) get bit-identical Hessians: keep one tensor for all of
        them, so memory holds each once and GPTQ can quantize them together (``same_hessian`` is ``is``)."""
        kept: list[torch.Tensor] = []
        for name, h in self.hessian.items():
            twin = next((k for k in kept[-4:] if k.shape == h.shape and torch.equal(k, h)), None)
            if twin is None:
                kept.append(h)
            else:
                self.hessian[name] = twin


@torch.no_grad()
def input_statistics(model: nn.Module, modules: dict[str, nn.Module], calibration: torch.Tensor,
                     hessian: bool = False, batch_size: int = 4, check=None, progress=None) -> InputStatistics:
    """Run the model on calibration token ids ``[n, seq_len]`` and record what each named layer receives.

    ``check()`` (optional) is called before every batch and may raise to cancel; ``progress(done, total)``
    (optional) after every layer's statistics are updated, so a listener hears (and may cancel) within one layer.
    """
    stats = InputStatistics(hessian)
    hooked = [(name, m) for name, m in modules.items() if isinstance(m, _MATRIX_TYPES)]
    batches = range(0, calibration.shape[0], batch_size)
    total, done = len(batches) * len(hooked), [0]

    def tick(module, args) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    handles = [h for name, m in hooked for h in (m.register_forward_pre_hook(stats.hook(name)),
                                                 m.register_forward_pre_hook(tick))]
    device = model_device(model)
    try:
        for start in batches:
            if check is not None:
                check()  # raises when the caller cancels
            model(input_ids=calibration[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    stats.share_identical_()
    return stats


class BaseModelCache:
    """Results that depend on a base model and a key alone, kept per base model for every setting and session.

    Entries hang off the base model (a weak reference: they go when it goes) and only the last ``per_model``
    keys are kept. Callers read entries, never change them (the base model is never mutated either).
    """

    def __init__(self, per_model: int = 2):
        import threading
        import weakref

        self.per_model, self.lock, self.models = per_model, threading.Lock(), weakref.WeakKeyDictionary()

    def get(self, base: nn.Module, key):
        with self.lock:
            return self.models.get(base, {}).get(key)

    def put(self, base: nn.Module, key, value) -> None:
        with self.lock:
            entries = self.models.setdefault(base, {})
            entries.pop(key, None)
            entries[key] = value
            while len(entries) > self.per_model:
                entries.pop(next(iter(entries)))

    def clear(self) -> None:
        with self.lock:
            self.models.clear()


class StatisticsCache(BaseModelCache):
    """Calibration statistics kept per base model, so a second GPTQ or Wanda setting skips the calibration pass.

    They depend on the model the calibration text runs through (the base model, or its copy pruned by one
    pruning setting), the calibration ids and the layers hooked — the key — and on no quantization setting:
    one-pass GPTQ, the MSE grid and Wanda fit every layer to the float model's inputs, so their statistics are
    the same for every bit-width (sequential GPTQ and SparseGPT take each block's from the compressed blocks
    before it, and collect their own). Only the last ``per_model`` keys are kept (SmolLM2-135M's Hessians are about
    0.5 GB).
    """

    @staticmethod
    def key(calibration: torch.Tensor, layer_names, model_state: str = "") -> tuple:
        import hashlib

        ids = calibration.detach().to(torch.int64).cpu().contiguous()
        digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
        return digest, tuple(ids.shape), tuple(layer_names), model_state

    def get(self, base: nn.Module, key: tuple, hessian: bool = False) -> InputStatistics | None:
        found = super().get(base, key)
        return found if found is not None and (found.want_hessian or not hessian) else None
