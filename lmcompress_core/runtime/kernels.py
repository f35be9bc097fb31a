"""Modules that run integer codes on real kernels, and the conversion of a compressed model onto them.

* ``Int4Linear``: 2-, 3- and 4-bit codes in torch's 4-bit container (``aten._weight_int4pack_mm_for_cpu``,
  ``aten._weight_int4pack_mm`` on CUDA), bf16 activations. The kernel computes w = (q − 8)·scale + zero per
  group of 32/64/128 input columns (checked on small matrices against a float reference: equal within bf16), so
  our w = (c − z)·s becomes scale = s, zero = (8 − z)·s. Our grid maps onto the largest kernel group dividing
  both the input width and our group (g128 on 576-wide inputs runs as kernel groups of 64, scales repeated).
* ``Int4PlanesLinear``: 5–8-bit codes in groups of 32/64/128 as two 4-bit planes on the same int4pack kernel:
  c = 16·h + l, the high plane h (its codes centred in the container) with scale 16·s and the low plane l with
  scale s and the zero-point, stacked as 2·out rows of one call whose two halves are added. Exact up to the
  kernel's bf16 grid; it holds 8 bits per weight whatever the width (a 5-bit code's high plane is one bit in a
  4-bit slot), stated on the model.
* ``Int8Linear``: 5–8-bit per-channel (or per-tensor) codes on ``aten._weight_int8pack_mm`` (int8 weights, one
  bf16 scale per output channel, bf16 activations). The int8 weight is c − 2^(bits−1); an asymmetric zero-point
  is exact through a rank-1 correction: y = int8mm(x, c − o, s) + Σx · (o − z)·s.
* ``Int8Embedding``: a tied input embedding that gathers rows from its LM head's int8 table (ties stay tied).
* ``DequantLinear``: what runs when no kernel takes a layer (shapes the kernels refuse, masks the container cannot
  express): uint8 codes de-quantized once to a dense bf16 matrix, a plain
  bf16 matmul at every call (no speed or memory gained over bf16). It is stated.
* ``ActivationInt8Linear``: torch's dynamic int8 Linear (activations quantized too), the explicit option.

None of them keeps a second copy of the codes next to the kernel's weight: ``quantized_weight()`` recovers them
from the kernel's own storage (int4 on the CPU: the packed bytes read through the packer's nibble order, learnt
once per shape from the packer itself; on CUDA: the kernel run on an identity matrix with scale 1 and zero 8
returns the raw codes; int8: the int8 weight + 2^(bits−1)). Kernel modules follow device moves but keep their
dtypes, so a model cast to bf16 never rounds the fp32 scales that packing stores.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from lmcompress_core.methods.quantize import QuantizedWeight, _expand
from lmcompress_core.runtime.modules import pack_mask, unpack_mask

INT4_KERNEL_GROUPS = (128, 64, 32)   # group sizes the int4pack kernels accept, largest first
BF16 = torch.bfloat16


class _KernelModule(nn.Module):
    """Base of the kernel modules: always compressed, dtypes fixed, device moves allowed."""

    def is_compressed(self) -> bool:
        return True

    def is_quantized(self) -> bool:
        return True

    def is_pruned(self) -> bool:
        return self.mask_bits is not None

    def keep_mask(self) -> torch.Tensor | None:
        return unpack_mask(self.mask_bits, self.matrix_shape)

    def quantized_weight(self, codes: bool = True) -> QuantizedWeight:
        """The layer's codes, grid and keep-mask. ``codes=False``: the codes only by their shape (an empty uint8
        tensor on the meta device), nothing read out of the kernel's storage, for what needs the grid alone."""
        held = self._codes() if codes else torch.empty(self.matrix_shape, dtype=torch.uint8, device="meta")
        return QuantizedWeight(held, self.scales, self.zeros, self.bits, self.group_size, self.keep_mask())

    def _codes(self) -> torch.Tensor:
        """The uint8 codes [out, in], read out of the kernel's storage."""
        return self.codes

    def _hold_mask(self, qw: QuantizedWeight, mask_bits: torch.Tensor | None) -> None:
        """qw's keep-mask, bit-packed: ``mask_bits`` when the caller holds it packed already (read only)."""
        self.register_buffer("mask_bits", pack_mask(qw.mask) if mask_bits is None or qw.mask is None else mask_bits)

    def _apply(self, fn, recurse=True):
        # Follow .to(device) but not .to(dtype): a bf16 cast of the model must not round fp32 scales or codes.
        device = next(iter(self._buffers.values())).device
        target = fn(torch.empty(0, device=device)).device
        if target == device:
            return self
        before = self.quantized_weight()
        for name, t in self._buffers.items():
            if t is not None and not t.is_meta:   # a meta stand-in is made later, where the codes are
                self._buffers[name] = t.to(target)
        self._moved(before, target)
        return self

    def _moved(self, qw: QuantizedWeight, device: torch.device) -> None:
        """Re-layout kernel storage for a new device (int4 packing differs between CPU and CUDA)."""


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(BF16)


def _per_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.to(torch.float32).expand(rows, 1).reshape(rows)


def _zeros_at_pruned_are_codes(qw: QuantizedWeight, top: int) -> bool:
    """Pruned weights must de-quantize to 0, so their code must equal an integral zero-point in range."""
    if qw.mask is None or _integral_in_range(qw.zeros, top):   # every zero-point is a code: so are the pruned ones
        return True
    z = _expand(qw.zeros, qw.group_size, qw.shape)[~qw.mask]
    return _integral_in_range(z, top)


def _integral_in_range(z: torch.Tensor, top: int) -> bool:
    return bool(((z == z.round()) & (z >= 0) & (z <= top)).all())


# ---------------------------------------------------------------- int4
def int4_kernel_group(qw: QuantizedWeight) -> int | None:
    out_features, in_features = qw.shape
    ours = in_features if qw.group_size == -1 else qw.group_size
    if out_features % 16:
        return None
    return next((g for g in INT4_KERNEL_GROUPS if in_features % g == 0 and ours % g == 0), None)


def int4_refusal(qw: QuantizedWeight, planes: int = 1) -> str | None:
    """Why the int4 kernel cannot run this layer as ``planes`` 4-bit planes (None: it can)."""
    if qw.bits > 4 * planes:
        return f"{qw.bits}-bit codes do not fit {'the 4-bit container' if planes == 1 else f'{planes} 4-bit planes'}"
    if int4_kernel_group(qw) is None:
        return (f"shape {qw.shape[0]}×{qw.shape[1]}: the int4 kernel needs outputs in multiples of 16 and inputs "
                "in whole groups of 32")
    if not _zeros_at_pruned_are_codes(qw, 2 ** qw.bits - 1):
        return "pruned weights need an integral zero-point to stay 0 in the 4-bit container"
    return None


def _int4_pack(codes: torch.Tensor) -> torch.Tensor:
    if codes.device.type == "cuda":
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        tiles = next(t for t in (8, 4, 2, 1) if codes.shape[1] % (t * 16) == 0)
        return torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


@functools.lru_cache(maxsize=16)
def _int4_nibble_order(out_features: int, in_features: int) -> torch.Tensor:
    """Where each nibble of the CPU int4pack layout comes from: index k·(in) + j of the [out, in] codes matrix for
    nibble 2·byte (low) and 2·byte + 1 (high). The layout is read off the packer itself: matrices whose codes are
    the 4-bit digits of each weight's own index are packed, one per digit, and the digits read back. Raises when
    the packer is not a plain permutation of nibbles (then the layout cannot be inverted this way)."""
    index = torch.arange(out_features * in_features, dtype=torch.int64).view(out_features, in_features)
    order = torch.zeros(out_features * in_features, dtype=torch.int64)
    for digit in range(((index.numel() - 1).bit_length() + 3) // 4):
        order |= _nibbles(_int4_pack(((index >> (4 * digit)) & 15).to(torch.int32))).to(torch.int64) << (4 * digit)
    if not torch.equal(order.sort().values, index.view(-1)):
        raise RuntimeError("the int4pack layout is not a permutation of nibbles")
    return order.to(torch.int32)


@functools.lru_cache(maxsize=16)
def _int4_blocked(out_features: int, in_features: int) -> bool:
    """Whether the packer's nibble order (learnt above) is this one: blocks of 64 output rows; per block and input
    column 32 bytes, byte b holding rows b (low nibble) and 32 + b (high). Then the codes come back by a reshape
    instead of a scatter through the learnt order (5x faster on a 1536x576 layer, measured here)."""
    if out_features % 64:
        return False
    index = torch.arange(out_features * in_features).view(out_features // 64, 2, 32, in_features)
    return torch.equal(_int4_nibble_order(out_features, in_features).long(), index.permute(0, 3, 2, 1).reshape(-1))


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat & 15, flat >> 4], -1).reshape(-1)


def _int4_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)


def _where_kept(mask: torch.Tensor, codes: torch.Tensor, elsewhere: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, codes, elsewhere)`` for uint8 codes, as arithmetic modulo 256 (exact: e + (c − e)·1 = c,
    e + (c − e)·0 = e), which torch vectorises: 0.08 vs 1.9 ms for torch.where on a 1536×576 layer (measured here)."""
    return elsewhere + (codes - elsewhere) * mask


# From this many input rows at once (a perplexity window, a long prompt) an int4pack layer on the CPU reads its
# codes out of the kernel's storage into a bf16 matrix for the call, under the kernel's own bf16 grid, and runs one
# bf16 GEMM: the int4pack kernel de-quantizes per tile of rows, so it slows with the rows. Nothing is kept.
# Measured here on a 1536x576 layer, kernel vs widened: 4-bit 1.33 vs 1.60 ms at 128 rows, 2.65 vs 2.26 at 256;
# 6-bit on two planes 2.71 vs 3.02 at 128, 5.40 vs 3.43 at 256 (dense bf16 itself: 1.08 at 256).
INT4_WIDEN_FROM_ROWS = 192
INT4_WIDEN_NOTE = (f"Int4 layers take {INT4_WIDEN_FROM_ROWS}+ tokens at once (a long prompt, a perplexity window) "
                   "as one bf16 GEMM on their codes read into a bf16 matrix per call (faster there than int4pack, "
                   "which de-quantizes per tile of rows); fewer tokens, one token at a time included, on int4pack")


class Int4Linear(_KernelModule):
    """2–4-bit codes on torch's int4pack weight-only kernel (bf16 activations)."""

    # what one call reads (``measure.speed.decode_bytes``); the exact float32 grid (scales, zeros) is kept for
    # packing and export only
    reads = ("packed", "scales_and_zeros", "bias")
    planes = 1

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, mask_bits: torch.Tensor | None = None):
        super().__init__()
        self.matrix_shape, self.bits, self.group_size = qw.shape, int(qw.bits), int(qw.group_size)
        self.kernel_group = int4_kernel_group(qw)
        # 2- and 3-bit codes sit in the middle of the container (c + shift), so the kernel's zero term (8 − z)·s
        # stays as small as the weights and its bf16 rounding does not swamp them (measured: 2-bit per-channel
        # logits 5.8× the bf16 error without the shift)
        self.shift = 8 - 2 ** (qw.bits - 1) // 16 ** (self.planes - 1)
        self.register_buffer("packed", _int4_pack(self._container_codes(qw)))
        self.register_buffer("scales_and_zeros", self._kernel_grid(qw))
        self.register_buffer("scales", qw.scales.float().clone())
        self.register_buffer("zeros", qw.zeros.float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(BF16).clone())
        self._hold_mask(qw, mask_bits)

    @property
    def rows(self) -> int:
        """Output rows of the kernel's matrix (the layer's outputs times its planes)."""
        return self.planes * self.matrix_shape[0]

    def _group_grid(self, qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
        """Our scales and zero-points [out, kernel groups], repeated where a kernel group is smaller than ours."""
        out_features, in_features = qw.shape
        ours = in_features if qw.group_size == -1 else qw.group_size
        index = torch.arange(in_features // self.kernel_group) * self.kernel_group // ours
        s = qw.scales.expand(out_features, -1)[:, index.clamp_max(qw.scales.shape[1] - 1)]
        z = qw.zeros.expand(out_features, -1)[:, index.clamp_max(qw.zeros.shape[1] - 1)]
        return s, z

    def _kernel_grid(self, qw: QuantizedWeight) -> torch.Tensor:
        """The kernel's [kernel groups, rows, (scale, zero)] in bf16: our w = (c − z)·s with c + shift stored."""
        s, z = self._group_grid(qw)
        return _as_kernel_grid(s, (8 - z - self.shift) * s)

    def _container_codes(self, qw: QuantizedWeight) -> torch.Tensor:
        return _kept_codes(qw).to(torch.int32) + self.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _flat(x)
        if flat.shape[0] >= INT4_WIDEN_FROM_ROWS and flat.device.type == "cpu":
            return self._finish(F.linear(flat, self.widened()), x)
        return self._finish(self._kernel_mm(flat), x)

    def _kernel_mm(self, flat: torch.Tensor) -> torch.Tensor:
        return _int4_mm(flat, self.packed, self.kernel_group, self.scales_and_zeros)

    def widened(self) -> torch.Tensor:
        """The bf16 matrix [out, in] the kernel computes with: its container codes under its bf16 grid, the planes
        added (made per call, never kept)."""
        codes = self.container().view(self.rows, -1, self.kernel_group).float().sub_(8)
        grid = self.scales_and_zeros.float().permute(1, 0, 2)[..., None]   # [rows, kernel groups, 2, 1]
        weights = codes.mul_(grid[:, :, 0]).add_(grid[:, :, 1]).view(self.planes, self.matrix_shape[0], -1)
        return weights.sum(0).to(BF16)

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def container(self) -> torch.Tensor:
        """The container codes [rows, in] in the kernel's storage: on the CPU read through the packer's nibble
        order; on CUDA the kernel on an identity matrix, scale 1 and zero 8, returns them."""
        rows, in_features = self.rows, self.matrix_shape[1]
        device = self.packed.device
        if device.type == "cpu" and _int4_blocked(rows, in_features):
            blocks = _nibbles(self.packed).view(rows // 64, in_features, 32, 2).permute(0, 3, 2, 1)
            return blocks.reshape(rows, in_features).to(torch.int32)
        if device.type == "cpu":
            container = torch.empty(rows * in_features, dtype=torch.uint8)
            container[_int4_nibble_order(rows, in_features).long()] = _nibbles(self.packed)
            return container.view(rows, in_features).to(torch.int32)
        unit = torch.tensor([1.0, 8.0], dtype=BF16, device=device).expand(in_features // self.kernel_group,
                                                                           rows, 2).contiguous()
        eye = torch.eye(in_features, dtype=BF16, device=device)
        return _int4_mm(eye, self.packed, self.kernel_group, unit).t().round().to(torch.int32)

    def int4_codes(self) -> torch.Tensor:
        """The layer's uint8 codes [out, in], read out of the kernel's storage."""
        return (self.container() - self.shift).to(torch.uint8)

    def _codes(self) -> torch.Tensor:
        return self.int4_codes()

    def _moved(self, qw, device):
        self.packed = _int4_pack(self._container_codes(qw).to(device))


class Int4PlanesLinear(Int4Linear):
    """5–8-bit codes in groups on the int4pack kernel as two 4-bit planes (8 bits held per weight).

    With c = 16·h + l and o = 2^(bits−1): the high plane stores h + shift (shift = 8 − o/16) with scale 16·s and
    zero term 8·s, giving 16·s·h − o·s + 8·s; the low plane stores l with scale s and zero term (o − z)·s, giving
    (l − 8)·s + (o − z)·s. Their sum is s·(c − z). Each plane's values are centred on zero, so its bf16 output
    does not cancel a large one of the other plane (measured on random 5-bit layers: 2× the bf16 error without
    the 8·s). One kernel call reads the two planes stacked as 2·out rows; the two halves of its output are
    added."""

    planes = 2

    def _kernel_mm(self, flat: torch.Tensor) -> torch.Tensor:
        return add_planes(_int4_mm(flat, self.packed, self.kernel_group, self.scales_and_zeros),
                          [self.matrix_shape[0]])

    def _container_codes(self, qw: QuantizedWeight) -> torch.Tensor:
        codes = _kept_codes(qw).to(torch.int32)
        return torch.cat([(codes >> 4) + self.shift, codes & 15])

    def _kernel_grid(self, qw: QuantizedWeight) -> torch.Tensor:
        s, z = self._group_grid(qw)
        offset = 2 ** (self.bits - 1)
        return _as_kernel_grid(torch.cat([16 * s, s]), torch.cat([8 * s, (offset - z) * s]))

    def int4_codes(self) -> torch.Tensor:
        high, low = self.container().split(self.matrix_shape[0])
        return ((high - self.shift) * 16 + low).to(torch.uint8)


def add_planes(y: torch.Tensor, outputs: list[int]) -> torch.Tensor:
    """A planes kernel's output [rows, Σ 2·out] (each layer's high rows, then its low rows) as [rows, Σ out]."""
    parts = [half[:, :n] + half[:, n:] for half, n in zip(y.split([2 * n for n in outputs], -1), outputs)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def _as_kernel_grid(scales: torch.Tensor, zero_terms: torch.Tensor) -> torch.Tensor:
    return torch.stack([scales.t(), zero_terms.t()], -1).to(BF16).contiguous()


def _kept_codes(qw: QuantizedWeight) -> torch.Tensor:
    """uint8 codes where a pruned weight holds its (integral) zero-point's code, so it de-quantizes to 0."""
    codes = qw.codes.to(torch.uint8)
    if qw.mask is None:
        return codes
    zeros = qw.zeros.round().to(torch.uint8)   # read at pruned weights only: checked in range by the refusals
    return _where_kept(qw.mask, codes, _expand(zeros, qw.group_size, qw.shape))


# ---------------------------------------------------------------- int8
def int8_refusal(qw: QuantizedWeight) -> str | None:
    """Why the int8pack kernel cannot run this layer (None: it can)."""
    if qw.group_size not in (-1, qw.shape[1]):
        return f"{qw.bits}-bit codes in groups of {qw.group_size}: the int8 kernel has one scale per output channel"
    if qw.shape[1] % 16:  # measured: int8pack on inputs not a multiple of 16 wide crashes the process (torch 2.13)
        return f"input width {qw.shape[1]} is not a multiple of 16"
    if not _zeros_at_pruned_are_codes(qw, 2 ** qw.bits - 1):
        return "pruned weights need an integral zero-point to stay 0 in int8"
    return None


# From this many input rows at once (a prompt's pass, a perplexity window) the int8 codes are widened to bf16 for
# one bf16 GEMM per call (exact: every int8 value is a bf16 value), since int8pack works row by row. Measured here,
# int8pack vs widened: SmolLM2's 49152x576 LM head 29 vs 31 ms at 32 rows, 60 vs 38 ms at 64, 223 vs 63 ms at 256;
# a 1536x576 layer 0.78 vs 0.47 ms at 64 rows. Decoding (one row per step) stays on int8pack (0.11 vs 0.20 ms).
INT8_WIDEN_FROM_ROWS = 48
INT8_WIDEN_NOTE = (f"Int8 layers take {INT8_WIDEN_FROM_ROWS}+ tokens at once (a prompt, a perplexity window) as "
                   "one bf16 GEMM on their codes widened to bf16 per call (int8pack works row by row and is slower "
                   "there); one token at a time on int8pack. On CUDA every call is widened (no int8 kernel runs)")


def _int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cuda" or x.shape[0] >= INT8_WIDEN_FROM_ROWS:
        return F.linear(x, weight.to(BF16)) * scales
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales)


class Int8Linear(_KernelModule):
    """5–8-bit per-channel codes on torch's int8pack weight-only kernel (bf16 activations)."""

    reads = ("weight_int8", "kernel_scales", "correction", "bias")   # as Int4Linear's

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, mask_bits: torch.Tensor | None = None):
        super().__init__()
        self.matrix_shape, self.bits, self.group_size = qw.shape, int(qw.bits), int(qw.group_size)
        self.offset = 2 ** (qw.bits - 1)
        rows = qw.shape[0]
        codes = qw.codes.to(torch.uint8)
        if qw.mask is not None:
            codes = _where_kept(qw.mask, codes, qw.zeros.expand(rows, 1).round().to(torch.uint8))
        s, z = _per_row(qw.scales, rows), _per_row(qw.zeros, rows)
        # c − o lies in [−o, o): uint8 arithmetic wraps modulo 256, so its bytes read as int8 are exactly c − o
        self.register_buffer("weight_int8", (codes - self.offset).view(torch.int8))
        self.register_buffer("kernel_scales", s.to(BF16))
        # the zero-point's rank-1 term (o − z)·s per output, bf16 like the output; None when every zero-point is o
        # (symmetric grids), so those layers pay no extra op per token
        correction = (self.offset - z) * s
        self.register_buffer("correction", correction.to(BF16) if bool(correction.any()) else None)
        self.register_buffer("scales", qw.scales.float().clone())
        self.register_buffer("zeros", qw.zeros.float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(BF16).clone())
        self._hold_mask(qw, mask_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _flat(x)
        y = _int8_mm(flat, self.weight_int8, self.kernel_scales)
        if self.correction is not None:  # in place: two small ops per call instead of four
            y.addcmul_(flat.sum(-1, keepdim=True), self.correction)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def _codes(self) -> torch.Tensor:
        return (self.weight_int8.to(torch.int16) + self.offset).to(torch.uint8)


class Int8Embedding(_KernelModule):
    """A tied input embedding gathering rows from its LM head's int8 table (one table for both)."""

    def __init__(self, head: Int8Linear, padding_idx: int | None = None):
        super().__init__()
        self.matrix_shape, self.offset, self.padding_idx = head.matrix_shape, head.offset, padding_idx
        self.num_embeddings, self.embedding_dim = head.matrix_shape
        self.register_buffer("weight_int8", head.weight_int8)  # the same tensors as the head's: held once
        self.register_buffer("row_scales", _per_row(head.scales, self.num_embeddings))
        self.register_buffer("row_zeros", _per_row(head.zeros, self.num_embeddings))
        self.register_buffer("mask_bits", None)
        self._head = (head,)  # not a submodule: the head is the model's own module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_int8[ids].to(torch.float32) + (self.offset - self.row_zeros[ids])[..., None]
        return (rows * self.row_scales[ids][..., None]).to(BF16)

    def is_compressed(self) -> bool:
        return False  # its table is the head's; packing and size count it there

    def quantized_weight(self, codes: bool = True) -> QuantizedWeight:
        return self._head[0].quantized_weight(codes)


# ---------------------------------------------------------------- fallbacks and the dynamic option
class DequantLinear(_KernelModule):
    """uint8 codes de-quantized once to a dense bf16 matrix that a plain bf16 matmul runs: what runs when no
    integer kernel takes the layer. It holds both (the codes are what is stored and exported; the dense matrix
    is what computes), so it saves no memory and no time over the bf16 base: its speed is the bf16 model's.

    Unless handed over, the dense matrix is made when first needed (``dense_matrix``: the first forward, or
    ``prepare_`` before anything is timed): what comes before, like the size of the packed file, reads the codes
    only. Until then a meta-device tensor of its shape and dtype holds its place (``runtime_bytes`` counts it)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, mask_bits: torch.Tensor | None = None,
                 dense: torch.Tensor | None = None):
        """``dense`` (optional): qw.dequantize() already computed, in fp32 or bf16 (a simulation module's weight)."""
        super().__init__()
        self.matrix_shape, self.bits, self.group_size = qw.shape, int(qw.bits), int(qw.group_size)
        self.register_buffer("codes", qw.codes.to(torch.uint8).clone())
        self.register_buffer("scales", qw.scales.float().clone())
        self.register_buffer("zeros", qw.zeros.float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(BF16).clone())
        self._hold_mask(qw, mask_bits)
        exact = dense is not None and dense.dtype in (torch.float32, BF16)   # one rounding to bf16, as from fp32
        later = torch.empty(qw.shape, dtype=BF16, device="meta")
        self.register_buffer("dense", dense.to(BF16) if exact else later, persistent=False)

    def dense_matrix(self) -> torch.Tensor:
        """The bf16 matrix that computes, made from the codes on first use."""
        if self.dense.is_meta:
            self.dense = self.quantized_weight().dequantize(BF16).to(self.codes.device)
        return self.dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(BF16), self.dense_matrix(), self.bias).to(x.dtype)


def _pending(model: nn.Module) -> list[DequantLinear]:
    """The model's DequantLinear layers that have not made their dense matrix yet."""
    return [m for m in model.modules() if isinstance(m, DequantLinear) and m.dense.is_meta]


def pending_dense(model: nn.Module) -> bool:
    """Whether a DequantLinear of the model has not made its dense matrix yet."""
    return bool(_pending(model))


def prepare_(model: nn.Module, check=None) -> int:
    """Make now every dense matrix a DequantLinear would make at its first forward, so nothing timed later pays
    for it; how many were made. ``check()`` (optional) is called before each and may raise to cancel."""
    pending = _pending(model)
    for module in pending:
        if check is not None:
            check()
        module.dense_matrix()
    return len(pending)


class ActivationInt8Linear(_KernelModule):
    """torch's dynamic int8 Linear (``kernel``: int8 weights per channel, activations quantized per batch) plus
    the codes it was built from (its own int8 rounding of the smoothed weights differs from them)."""

    def __init__(self, qw: QuantizedWeight, kernel: nn.Module):
        super().__init__()
        self.matrix_shape, self.bits, self.group_size = qw.shape, int(qw.bits), int(qw.group_size)
        self.kernel = kernel
        self.register_buffer("codes", qw.codes.to(torch.uint8).clone())
        self.register_buffer("scales", qw.scales.float().clone())
        self.register_buffer("zeros", qw.zeros.float().clone())
        self.register_buffer("mask_bits", pack_mask(qw.mask))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)


# ---------------------------------------------------------------- the compressed model onto the kernels
def kernel_module(qw: QuantizedWeight, bias: torch.Tensor | None, mask_bits: torch.Tensor | None = None,
                  dense: torch.Tensor | None = None) -> tuple[nn.Module, str | None]:
    """The module that runs ``qw`` on a real kernel, and why it had to fall back (None: it did not).
    Optional, from a simulation module: ``mask_bits`` (qw.mask bit-packed), ``dense`` (qw de-quantized)."""
    if qw.bits <= 4:
        refusal, kind = int4_refusal(qw), Int4Linear
    else:
        refusal, kind = int8_refusal(qw), Int8Linear
        if refusal is not None and int4_refusal(qw, planes=2) is None:
            refusal, kind = None, Int4PlanesLinear
        elif refusal is not None:
            refusal = f"{refusal}; {int4_refusal(qw, planes=2)}"
    if refusal is not None:
        return DequantLinear(qw, bias, mask_bits, dense), refusal
    return kind(qw, bias, mask_bits), None


def to_kernels_(model: nn.Module, check=None) -> dict[str, str]:
    """Swap every layer holding codes for its kernel module; {name: why it fell back} for the fallbacks.

    ``check()`` (optional) is called before each layer and may raise to cancel.
    """
    from lmcompress_core.runtime.modules import CompressedLinear

    fallbacks = {}
    for name, module in list(model.named_modules()):
        qw = module.quantized_weight() if isinstance(module, CompressedLinear) else None
        if qw is None:
            continue
        if check is not None:
            check()
        runtime, refusal = kernel_module(qw, module.bias, module.mask_bits, module.simulated_weight())
        model.set_submodule(name, runtime)
        if refusal is not None:
            fallbacks[name] = refusal
    return fallbacks


def quantize_head_(model: nn.Module, quantize) -> str | None:
    """The LM head on int8pack (per-channel 8-bit codes from ``quantize(w)``), a tied embedding reading the same
    table. Returns a sentence when the head stays bf16 instead."""
    from lmcompress_core.methods.layers import weight_matrix

    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or not isinstance(head, nn.Linear) or type(head) is not nn.Linear:
        return "LM head kept bf16: it is not a plain float linear layer"
    qw = quantize(head.weight.detach() if head.weight.dtype == torch.float32 else weight_matrix(head))  # read only
    if int8_refusal(qw) is not None:
        return f"LM head kept bf16: {int8_refusal(qw)}"
    tied = embedding is not None and embedding.weight is head.weight
    int8 = Int8Linear(qw, head.bias)
    names = {id(m): n for n, m in model.named_modules()}
    model.set_submodule(names[id(head)], int8)
    if tied:
        model.set_submodule(names[id(embedding)], Int8Embedding(int8, embedding.padding_idx))
    return None


@torch.no_grad()
def cast_rest_(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every float parameter and buffer outside the kernel modules (norms, embeddings, attention); a
    simulation module's fp32 scales and zeros stay fp32 (they are its grid, stored exactly by packing)."""
    for module in model.modules():
        if isinstance(module, _KernelModule):
            continue
        stores = (module._parameters,) if hasattr(module, "is_compressed") else (module._parameters, module._buffers)
        for store in stores:
            for name, t in store.items():
                if t is not None and t.is_floating_point() and t.dtype != dtype:
                    t.data = t.data.to(dtype)
