"""Modules that hold a compressed weight on themselves: the simulation modules the stages work on.

Every compressed module answers two questions, whatever runs inside it, so packing, size measurement and the
exporters read the model itself (no dictionaries keyed by layer name):

* ``quantized_weight()`` -> the layer's ``QuantizedWeight`` (uint8 codes [out, in], fp32 scales and zeros,
  bits, group_size, keep-mask) or None when it only was pruned (``codes=False``: the codes by their shape only);
* ``keep_mask()`` -> the bool keep-mask [out, in] of pruning, or None.

``CompressedLinear`` / ``CompressedEmbedding`` are what prune -> quantize -> distill work on: a float weight
(pruned, or de-quantized from the codes: quantization *simulated* in float) plus the codes and the mask
(bit-packed, one bit per weight). ``kernels.py`` holds the modules that run codes on real kernels.
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmcompress_core.runtime.bits import pack_codes, unpack_codes
from lmcompress_core.methods.prune import zero_pruned_
from lmcompress_core.methods.quantize import QuantizedWeight


class _HoldsCodes:
    """Storage shared by the simulation modules: codes, scales, zeros, bits, group size and a bit-packed mask."""

    def is_compressed(self) -> bool:
        return self.codes is not None or self.mask_bits is not None

    def is_quantized(self) -> bool:
        return self.codes is not None

    def is_pruned(self) -> bool:
        return self.mask_bits is not None

    def _init_storage(self, shape: tuple[int, int]) -> None:
        self.matrix_shape = tuple(shape)
        self.bits, self.group_size = None, None
        for name in ("codes", "scales", "zeros", "mask_bits"):
            self.register_buffer(name, None)

    def keep_mask(self) -> torch.Tensor | None:
        return unpack_mask(self.mask_bits, self.matrix_shape)

    def quantized_weight(self, codes: bool = True) -> QuantizedWeight | None:
        """None when only pruned; ``codes=False``: the codes by their shape only (on the meta device), as kernels'."""
        if self.codes is None:
            return None
        held = self.codes if codes else torch.empty(self.matrix_shape, dtype=torch.uint8, device="meta")
        return QuantizedWeight(held, self.scales, self.zeros, self.bits, self.group_size, self.keep_mask())

    @torch.no_grad()
    def set_mask_(self, mask: torch.Tensor | None = None, packed: torch.Tensor | None = None,
                  borrowed: bool = False) -> None:
        """Prune: keep only the weights where mask is True (the float weight's zeros are real zeros); the mask
        comes as a bool matrix or already bit-packed (``packed``, as ``pack_mask`` gives it: kept as a copy).
        ``borrowed``: the float weight shares memory with a model that must not change (see ``borrowing_copy``),
        so the pruned weight goes into a new tensor instead of being zeroed in place."""
        if (mask is None) == (packed is None):
            raise ValueError("set_mask_ takes a bool mask or its packed bits, one of the two")
        self.mask_bits = pack_mask(mask) if packed is None else packed.clone()
        keep = mask if mask is not None else self.keep_mask()
        if borrowed:
            kept = keep.view(torch.uint8) if keep.dtype == torch.bool else keep   # as zero_pruned_ multiplies
            self.weight = nn.Parameter(self.weight.detach() * kept, requires_grad=self.weight.requires_grad)
        else:
            zero_pruned_(self.weight, keep)

    @torch.no_grad()
    def set_quantized_(self, qw: QuantizedWeight, own_mask: bool = False, keep_weight: bool = True) -> None:
        """Quantize: hold qw's codes and grid, and write its de-quantized matrix into the float weight.
        ``own_mask``: qw.mask is this module's own keep_mask(), already held bit-packed (not packed again).
        ``keep_weight=False``: the float weight is released instead of written (left on the meta device, so a
        forward fails loudly), for a layer whose codes go onto a kernel module next, which reads codes only."""
        if qw.mask is not None and not (own_mask and self.mask_bits is not None):
            self.mask_bits = pack_mask(qw.mask)
        self.codes, self.scales, self.zeros = qw.codes.to(torch.uint8), qw.scales.float(), qw.zeros.float()
        self.bits, self.group_size = int(qw.bits), int(qw.group_size)
        if not keep_weight:
            self.release_weight_()
            return
        self.weight.copy_(qw.dequantize().to(self.weight.dtype))
        # what quantized_weight() de-quantizes to (its mask is the held one): unless qw came without the mask
        same = qw.mask is not None or self.mask_bits is None
        self._written = (self.weight.data_ptr(), self.weight._version) if same else None

    def release_weight_(self) -> None:
        """Leave the float weight on the meta device (a forward fails loudly): the codes are what is kept."""
        self.weight = nn.Parameter(torch.empty_like(self.weight, device="meta"), requires_grad=False)
        self._written = None

    def simulated_weight(self) -> torch.Tensor | None:
        """The float weight while it still is exactly what set_quantized_ wrote, quantized_weight().dequantize()
        in the weight's dtype (nothing has written to it since: training, pruning); else None."""
        written = getattr(self, "_written", None)
        if written is None or self.codes is None or written != (self.weight.data_ptr(), self.weight._version):
            return None
        return self.weight.detach()


class CompressedLinear(_HoldsCodes, nn.Linear):
    """nn.Linear whose float weight is pruned and/or de-quantized from the codes it holds (the simulation)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self._init_storage((out_features, in_features))

    def reset_parameters(self) -> None:
        """nn.Linear's random init, but for a module made on the meta device (from_layer: every value comes from
        the layer), where it would only cost time (0.27 ms a layer through torch's meta dispatch)."""
        if self.weight.device.type != "meta":
            super().reset_parameters()

    @classmethod
    @torch.no_grad()
    def from_layer(cls, layer: nn.Module, take: bool = False) -> "CompressedLinear":
        """A copy of an nn.Linear or GPT-2 Conv1D (transposed to [out, in]) in the layer's dtype and device.
        ``take``: an nn.Linear's own weight and bias Parameters are taken over instead of copied (for a layer that
        leaves its model and shares them with nothing)."""
        if isinstance(layer, CompressedLinear):
            return layer
        if take and isinstance(layer, nn.Linear):
            with torch.device("meta"):
                module = cls(layer.in_features, layer.out_features, bias=layer.bias is not None)
            module.weight, module.bias = layer.weight, layer.bias
            return module
        w = layer.weight.detach()
        w = w.t() if isinstance(layer, Conv1D) else w   # a view: copied once, below
        with torch.device("meta"):  # no random init: every value is overwritten below
            module = cls(w.shape[1], w.shape[0], bias=layer.bias is not None)
        module.to_empty(device=layer.weight.device)
        module.to(dtype=layer.weight.dtype)
        module.weight.copy_(w)
        if layer.bias is not None:
            module.bias.copy_(layer.bias.detach())
        return module


class CompressedEmbedding(_HoldsCodes, nn.Embedding):
    """nn.Embedding (rows = [out, in] matrix) whose table is pruned and/or de-quantized from the codes it holds.

    It keeps the embedding's own Parameter, so an LM head tied to it stays tied.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_storage((self.num_embeddings, self.embedding_dim))

    @classmethod
    def from_layer(cls, layer: nn.Embedding) -> "CompressedEmbedding":
        if isinstance(layer, CompressedEmbedding):
            return layer
        module = cls(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx, device="meta")
        module.weight = layer.weight  # the same Parameter object: an LM head tied to it stays tied
        return module


def pack_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A bool keep-mask as one bit per weight (uint8), so holding it costs 1/32 of an fp32 weight."""
    if mask is None:
        return None
    flat = mask.reshape(-1)
    flat = flat.view(torch.uint8) if flat.dtype == torch.bool else flat.to(torch.uint8)   # a bool is a 0/1 byte
    return pack_codes(flat.cpu(), 1).to(mask.device)


def unpack_mask(bits: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    if bits is None:
        return None
    return unpack_codes(bits.cpu(), 1, shape[0] * shape[1]).view(shape).view(torch.bool).to(bits.device)  # 0/1 bytes


def as_compressed_(model: nn.Module, name: str, shared: set[int] | None = None) -> nn.Module:
    """The named layer as a CompressedLinear / CompressedEmbedding, swapped into ``model`` (Conv1D becomes Linear).
    ``shared``: the ids of the model's tied Parameters (``shared_parameters``); given, a linear layer whose weight
    is not among them hands its weight and bias over to its replacement instead of having them copied (the caller
    owns the model: it is a copy). A tied weight is copied: compressing one holder must not change the other."""
    layer = model.get_submodule(name)
    if isinstance(layer, (CompressedLinear, CompressedEmbedding)):
        return layer
    if isinstance(layer, nn.Embedding):
        module = CompressedEmbedding.from_layer(layer)
    else:
        module = CompressedLinear.from_layer(layer, take=shared is not None and id(layer.weight) not in shared)
    model.set_submodule(name, module)
    return module


def borrowing_copy(model: nn.Module, borrow: list[torch.Tensor]) -> tuple[nn.Module, set[int]]:
    """A deep copy of ``model`` whose Parameters in ``borrow`` are new Parameter objects over the same memory
    (not copied), and the storage addresses borrowed. For a caller that only reads those weights, replaces or
    releases them, or reassigns their ``.data``, and never writes into them in place; ``own_borrowed_`` at the
    end copies whatever is still borrowed, so the result shares no memory with ``model``."""
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in borrow}
    return copy.deepcopy(model, memo), {p.untyped_storage().data_ptr() for p in borrow}


@torch.no_grad()
def own_borrowed_(model: nn.Module, borrowed: set[int]) -> int:
    """Give every Parameter or buffer of ``model`` still over borrowed memory its own copy; returns how many."""
    copied = 0
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and t.device.type != "meta" and t.untyped_storage().data_ptr() in borrowed:
                    t.data = t.data.clone()
                    copied += 1
    return copied


def shared_parameters(model: nn.Module) -> set[int]:
    """The ids of the Parameters held by more than one module of the model (tied weights)."""
    counts = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    return {key for key, n in counts.items() if n > 1}


def compressed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of the model that holds a compressed weight (codes or a keep-mask), by name."""
    found = {}
    for name, module in model.named_modules():
        if callable(getattr(module, "is_compressed", None)) and module.is_compressed():
            found[name] = module
    return found
