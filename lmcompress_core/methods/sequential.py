"""Sequential calibration: the transformer blocks run in order on the calibration text, and each chosen layer is
compressed just before it first runs, on the Hessian of the inputs it really receives.

GPTQ and SparseGPT fit each layer to H = 2XXᵀ/n of its inputs X. Taken from the float model (one pass, the
cheap way) X ignores what compressing the earlier layers did to them; the papers' sequential variant, and the
toolkits people use (GPTQModel, llm-compressor), take X from the already compressed blocks before. Here the
calibration windows go through one block at a time as one batch, and a forward pre-hook on each chosen layer
computes its H from the input it is about to multiply, compresses it (``process``) and lets the forward go on
with the compressed weight. So every layer, inside a block too (attention output after q/k/v, down after
gate/up), sees what the compressed layers before it give, at the cost of one forward pass of the model; layers
fed the same input (q/k/v, gate/up) are compressed together, found once by a probe on a few tokens.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmcompress_core.methods.layers import model_device, transformer_blocks

PROBE_TOKENS = 8   # tokens of the probe that finds which layers share an input


class _Stop(Exception):
    """Raised by the hook that catches the first block's inputs: nothing after it needs to run."""


def block_prefix(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name of the ModuleList of decoder blocks, the list)."""
    blocks = transformer_blocks(model)[2]
    return next(name for name, m in model.named_modules() if m is blocks), blocks


def layers_by_block(model: nn.Module, names) -> tuple[dict[int, list[str]], list[str]]:
    """The chosen layer names per block index, in model order, and the names outside every block."""
    prefix, _ = block_prefix(model)
    inside: dict[int, list[str]] = {}
    outside = []
    for name in names:
        if name.startswith(prefix + "."):
            inside.setdefault(int(name[len(prefix) + 1:].split(".")[0]), []).append(name)
        else:
            outside.append(name)
    return inside, outside


def uniform_blocks(model: nn.Module) -> bool:
    """Whether every block takes the same keyword inputs (no mix of sliding-window and full attention layers),
    so the first block's mask and position embeddings serve them all."""
    kinds = {getattr(b, "attention_type", None) for b in transformer_blocks(model)[2]}
    return len(kinds) == 1


@torch.no_grad()
def first_block_inputs(model: nn.Module, calibration: torch.Tensor) -> tuple[tuple, dict]:
    """(positional args, keyword args) the first block receives for the calibration ids run as one batch; the
    model stops there (the embeddings run, nothing else)."""
    blocks = transformer_blocks(model)[2]
    caught: dict = {}

    def catch(module, args, kwargs):
        caught["args"], caught["kwargs"] = args, dict(kwargs)
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model(input_ids=calibration.to(model_device(model)), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return caught["args"], caught["kwargs"]


@torch.no_grad()
def shared_input_groups(model: nn.Module, layers: dict[str, nn.Module], calibration: torch.Tensor) -> list[list[str]]:
    """The chosen layers in the order they run, grouped where consecutive layers are fed the very same tensor
    (q/k/v, gate/up), found by running the model on the first ``PROBE_TOKENS`` calibration tokens."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda module, args, name=name: seen.append((name, args[0])))
             for name, m in layers.items()]
    try:
        model(input_ids=calibration[:1, :PROBE_TOKENS].to(model_device(model)), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, x in seen:
        if any(name in g for g in groups):
            continue   # a layer run twice (a tied module): its first place counts
        if last is not None and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    return groups


def input_hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2XXᵀ/n of a layer input [..., in] (n tokens), in float32: GPTQ's Hessian, as InputStatistics keeps it."""
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    return (x.t() @ x).mul_(2.0 / x.shape[0])


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def compress_sequentially_(model: nn.Module, layers: dict[str, nn.Module], calibration: torch.Tensor,
                           process: Callable[[list[str], torch.Tensor], None],
                           after_block: Callable[[list[str]], None] | None = None,
                           check: Callable[[], None] | None = None) -> list[str]:
    """Run the calibration ids ``[n, seq_len]`` through the blocks of ``model`` in order; just before a chosen
    layer inside a block first runs, ``process(names, hessian)`` compresses it (in place, in ``model``) together
    with the layers fed the same input, on H = 2XXᵀ/n of that input. ``after_block(names)`` after each block's
    pass, ``check()`` before each block (may raise to cancel). Returns the chosen layers outside every block
    (embeddings, the LM head): not processed here.
    """
    by_block, outside = layers_by_block(model, layers)
    groups = {g[0]: g for g in shared_input_groups(model, layers, calibration)}
    args, kwargs = first_block_inputs(model, calibration)
    hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
    blocks = transformer_blocks(model)[2]
    for index, block in enumerate(blocks):
        if check is not None:
            check()
        names = by_block.get(index, [])
        hooks = [layers[name].register_forward_pre_hook(_processing_hook(groups[name], process))
                 for name in names if name in groups]
        try:
            hidden = _block_output(block(hidden, *rest, **kwargs))
        finally:
            for h in hooks:
                h.remove()
        if after_block is not None and names:
            after_block(names)
    return outside


def _processing_hook(group: list[str], process):
    def hook(module, args) -> None:
        process(group, input_hessian(args[0]))
    return hook
