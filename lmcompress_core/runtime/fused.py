"""Projections of one input run as one kernel call: q/k/v, gate/up (fewer, larger matmuls per token).

A ``FusedProjection`` concatenates its parts' kernel storage along the output rows and then points each part's own
buffer at its slice of that storage, so the model holds the codes once: the parts still run alone (the
transformers forward, the perplexity), and the fused call reads the same bytes. Rows concatenate exactly in both
containers: int8pack is row-major, and torch's CPU int4pack layout packs blocks of 64 output rows (checked against
the packer for the concatenated shape before anything is rebound, ``kernels._int4_blocked``).

Parts fuse when they are the same kernel (all int4pack with one kernel group and the same number of 4-bit planes,
or all int8pack) on the CPU; a two-plane call adds each part's two halves before the outputs split;
anything else (float layers, de-quantized fallbacks, mixed kernels) returns None and runs part by part.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lmcompress_core.runtime.kernels import (BF16, INT4_WIDEN_FROM_ROWS, Int4Linear, Int8Linear, _flat, _int4_blocked,
                                             _int4_mm, _int8_mm, add_planes)


class FusedProjection:
    """One matmul for several projections of the same input; ``__call__(x)`` returns their outputs in order."""

    def __init__(self, parts: list[nn.Module]):
        self.parts = parts
        self.sizes = [p.matrix_shape[0] for p in parts]
        self.bias = _cat_optional([p.bias for p in parts], self.sizes)
        self._storage = self._rebind()

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self._mm(_flat(x))
        if self.bias is not None:
            y.add_(self.bias)
        return list(y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype).split(self.sizes, -1))

    def intact(self) -> bool:
        """Whether every part still reads its slice of the fused storage (a device move re-lays a part out)."""
        return all(self._buffer(p).untyped_storage().data_ptr() == self._storage for p in self.parts)

    def _rebind(self) -> int:
        fused = torch.cat([self._buffer(p) for p in self.parts])
        start = 0
        for part, rows in zip(self.parts, self._rows()):
            setattr(part, self._name, fused[start:start + rows])
            start += rows
        self.weight = fused
        return fused.untyped_storage().data_ptr()

    def _rows(self) -> list[int]:
        return [self._buffer(p).shape[0] for p in self.parts]

    def _buffer(self, part: nn.Module) -> torch.Tensor:
        return getattr(part, self._name)


class FusedInt4(FusedProjection):
    _name = "packed"

    def __init__(self, parts: list[Int4Linear]):
        self.group, self.planes = parts[0].kernel_group, parts[0].planes
        self.scales_and_zeros = torch.cat([p.scales_and_zeros for p in parts], 1).contiguous()
        super().__init__(parts)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= INT4_WIDEN_FROM_ROWS:   # as each part alone does (Int4Linear.forward): one bf16 GEMM
            return F.linear(x, torch.cat([p.widened() for p in self.parts]))
        y = _int4_mm(x, self.weight, self.group, self.scales_and_zeros)
        return y if self.planes == 1 else add_planes(y, self.sizes)


class FusedInt8(FusedProjection):
    _name = "weight_int8"

    def __init__(self, parts: list[Int8Linear]):
        self.kernel_scales = torch.cat([p.kernel_scales for p in parts])
        self.correction = _cat_optional([p.correction for p in parts], [p.matrix_shape[0] for p in parts])
        super().__init__(parts)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        y = _int8_mm(x, self.weight, self.kernel_scales)
        if self.correction is not None:
            y.addcmul_(x.sum(-1, keepdim=True), self.correction)
        return y


def fuse(parts: list[nn.Module]) -> FusedProjection | None:
    """The fused call of ``parts`` (their storage rebound to slices of it), or None when they cannot fuse."""
    if not all(isinstance(p, (Int4Linear, Int8Linear)) and p.scales.device.type == "cpu" for p in parts):
        return None   # the CUDA int4 layout is tiled, not row-major: no row slices there
    if all(isinstance(p, Int4Linear) for p in parts) and _int4_fusable(parts):
        return FusedInt4(parts)
    if all(isinstance(p, Int8Linear) for p in parts) and len({p.matrix_shape[1] for p in parts}) == 1:
        return FusedInt8(parts)
    return None


def _int4_fusable(parts: list[Int4Linear]) -> bool:
    in_features = {p.matrix_shape[1] for p in parts}
    if len(in_features) != 1 or len({(p.kernel_group, p.planes) for p in parts}) != 1:
        return False
    total = sum(p.rows for p in parts)
    return all(_int4_blocked(p.rows, *in_features) for p in parts) and _int4_blocked(total, *in_features)


def _cat_optional(tensors: list[torch.Tensor | None], sizes: list[int]) -> torch.Tensor | None:
    """The concatenation of per-part vectors, zeros standing in for a part without one; None when none has one."""
    if all(t is None for t in tensors):
        return None
    return torch.cat([t.to(BF16) if t is not None else torch.zeros(n, dtype=BF16) for t, n in zip(tensors, sizes)])
