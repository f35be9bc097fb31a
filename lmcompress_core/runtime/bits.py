"""Dense bit-packing of integer codes: two 4-bit codes per byte, 3-, 5- and 6-bit codes across byte boundaries.

The leaf of runtime/: the modules that hold packed codes (modules.py), the kernels (kernels.py) and the file
format (packing.py) all import it, and it imports none of them.
"""
from __future__ import annotations

import sys

import numpy as np
import torch


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes taken by ``numel`` codes of ``bits`` bits packed densely."""
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes (< 2**bits) densely into a 1-D uint8 tensor, little-endian bit order.

    Code i occupies bits [i*bits, (i+1)*bits) of the stream, so 4-bit codes go two per byte and 3- or 5-bit
    codes straddle byte boundaries. Works for 1..32 bits (wide widths pack sparse-format column indices).
    Codes of up to 8 bits are packed as bytes (a bool mask or uint8 codes are never widened to int64).
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    _check_range(flat, bits)
    if bits <= 8:
        return _pack_narrow(flat.to(torch.uint8), bits)
    flat = flat.to(torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)
    return (stream.view(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def _check_range(flat: torch.Tensor, bits: int) -> None:
    if flat.numel() == 0 or flat.dtype == torch.bool or (flat.dtype == torch.uint8 and bits >= 8):
        return  # nothing to check: every value fits
    low, high = (0, int(flat.max())) if flat.dtype == torch.uint8 else map(int, torch.aminmax(flat))
    if low < 0 or high >= 1 << bits:
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] to pack at {bits} bits")


def _pack_narrow(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of 1..8 bits -> the packed stream (8 codes of ``bits`` bits make exactly ``bits`` bytes)."""
    if bits == 8:
        return flat.contiguous()
    if bits == 1 and flat.device.type == "cpu":   # keep-masks: numpy's packbits (12x the shifts' speed)
        return torch.from_numpy(np.packbits(flat.contiguous().numpy(), bitorder="little"))
    per_group = 8 // bits if bits in (1, 2, 4) else 8   # whole codes per byte, else 8 codes per `bits` bytes
    groups = torch.nn.functional.pad(flat, (0, (-flat.numel()) % per_group)).view(-1, per_group)
    if bits in (1, 2, 4):
        out = groups[:, 0].clone()
        for i in range(1, per_group):
            out |= groups[:, i] << (bits * i)
        return out
    if sys.byteorder == "little":  # 8 codes -> one int64 word (<= 56 bits); its low `bits` bytes are the stream
        out = _squeeze_words(groups.contiguous().view(torch.int64), bits).view(torch.uint8).view(-1, 8)[:, :bits]
    else:
        words = torch.zeros(groups.shape[0], dtype=torch.int64)
        for i in range(8):   # one int64 word per 8 codes, built column by column
            words |= groups[:, i].to(torch.int64) << (bits * i)
        out = ((words[:, None] >> (8 * torch.arange(bits, dtype=torch.int64))) & 0xFF).to(torch.uint8)
    return out.reshape(-1)[:packed_nbytes(flat.numel(), bits)]


def _as_int64(mask: int) -> int:
    return mask - (1 << 64) if mask >= 1 << 63 else mask


# (low-half mask, high-half mask, lane width) of the three halving steps of _squeeze_words
_SQUEEZE_STEPS = tuple((_as_int64(low), _as_int64(low ^ 0xFFFFFFFFFFFFFFFF), lane) for low, lane in (
    (0x00FF00FF00FF00FF, 8), (0x0000FFFF0000FFFF, 16), (0x00000000FFFFFFFF, 32)))


def _squeeze_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 words holding 8 codes (< 2**bits, bits < 8), one per byte (code i at bit 8i), -> the same codes
    back to back (code i at bit bits·i). Three halving steps: each moves the upper code (pair, quad) of every
    lane down against the lower one: four word-wide operations a step, instead of 8 strided columns widened
    one by one (1.6x, measured here).
    The top bit never carries a code (it stays clear), so the arithmetic shift is safe."""
    width = bits
    for low, high, lane in _SQUEEZE_STEPS:
        words = (words & low) | ((words & high) >> (lane - width))
        width *= 2
    return words


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes, uint8 for bits <= 8, int64 above."""
    _check_bits(bits)
    if packed.numel() < packed_nbytes(numel, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold {numel} codes of {bits} bits")
    flat = packed.reshape(-1)
    if bits == 8:
        return flat[:numel].clone()
    if bits == 1 and flat.device.type == "cpu":   # keep-masks: numpy's unpackbits (3x a table lookup's speed)
        return torch.from_numpy(np.unpackbits(flat.contiguous().numpy(), count=numel, bitorder="little"))
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        codes = torch.stack([(flat >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)], 1)
        return codes.reshape(-1)[:numel].clone()
    if bits < 8:
        groups = torch.nn.functional.pad(flat.to(torch.int64), (0, (-flat.numel()) % bits)).view(-1, bits)
        words = (groups << (8 * torch.arange(bits, dtype=torch.int64))).sum(1)
        codes = (words[:, None] >> (bits * torch.arange(8, dtype=torch.int64))) & ((1 << bits) - 1)
        return codes.reshape(-1)[:numel].to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.int32)
    stream = ((flat.to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1)
    planes = stream[: numel * bits].view(numel, bits).to(torch.int64)
    return (planes << torch.arange(bits, dtype=torch.int64)).sum(1)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 32:
        raise ValueError(f"bits must be an integer in 1..32, got {bits!r}")
