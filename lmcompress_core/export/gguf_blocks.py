"""Which GGUF type holds a compressed layer, its bytes in that type, and what a setting's export will hold.

A layer's weights are w = (code − zero)·scale per group. GGUF's block types hold 32 weights along the input with
an fp16 scale d per block (a group of 64, 128, a channel or a tensor repeats its scale in each block):

* Q4_0, w = d·(q − 8), q in 0..15: codes whose code − zero lies in [−8, 7] — 4-bit symmetric codes, and 2- and
  3-bit codes with integer zero-points (the integer-zero grid, HQQ, MSE), written **bit for bit** (a 2- or
  3-bit code then takes 4.5 bits per weight in the file, not 2 or 3).
* Q4_1, w = d·q + m: 4-bit asymmetric codes, m = −zero·d rounded to fp16 (an error of at most 2⁻¹¹·|m|).
* Q8_0, w = d·q, q in −128..127: codes whose code − zero fits int8 — 5-, 6- and 8-bit symmetric codes, 5- and
  6-bit integer zero-points, pruned 4-bit layers Q4_1 cannot keep at 0 — **bit for bit**. 8-bit asymmetric codes
  (the int8 LM head our real runtime runs) reach ±255 from their zero-point: they are **re-rounded** to Q8_0
  (absmax per block of 32 of the de-quantized weights), 8-bit still, not our codes, and the export says so.
* fractional zero-points (the seed's min-max grid) at other than 4 bits, and groups that do not split into
  blocks of 32: no GGUF type holds them, and the export is refused with that reason (never an F16 file that
  would look compressed).

Scales are bfloat16 values, which fp16 holds (every grid but min-max rounds them so: hqq.exact_scale), so d holds
them exactly.
"""
from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from lmcompress_core.methods.quantize import QuantizedWeight, _expand

BLOCK = 32                                   # weights per Q4_0 / Q4_1 / Q8_0 block
REROUNDED = ("8-bit codes whose code − zero leaves int8 (an asymmetric grid, e.g. the int8 LM head) re-rounded to "
             "Q8_0 blocks (absmax per 32 weights): 8-bit, not bit for bit")


# ---------------------------------------------------------------- which type holds a layer
def block_type(qw: QuantizedWeight) -> tuple[T | None, str]:
    """(type, "") when a GGUF type holds the codes bit for bit; (Q8_0, why) when 8-bit codes are re-rounded onto
    it; (None, why not) when no GGUF type holds them."""
    in_features = qw.shape[1]
    if in_features % BLOCK or (qw.group_size != -1 and qw.group_size % BLOCK):
        return None, f"groups of {qw.group_size} over {in_features} inputs do not split into blocks of 32"
    integer = bool((qw.zeros == qw.zeros.round()).all())
    if qw.bits == 4 and not bool((qw.zeros == 8).all()):   # asymmetric 4-bit: Q4_1, as llama.cpp stores it
        if qw.mask is None or _q4_1_keeps_zeros(qw):
            return T.Q4_1, ""
        if integer:
            return T.Q8_0, ""   # code − zero within ±15
        return None, "pruned 4-bit codes with fractional zero-points would not stay 0 in Q4_1"
    if not integer:
        return None, f"{qw.bits}-bit codes with fractional zero-points (grid='minmax') have no GGUF type"
    low, high = _difference_range(qw)
    if qw.bits <= 4 and -8 <= low and high <= 7:
        return T.Q4_0, ""
    if -128 <= low and high <= 127:
        return T.Q8_0, ""
    return T.Q8_0, REROUNDED


def _q4_1_keeps_zeros(qw: QuantizedWeight) -> bool:
    """Whether d·zero + m is exactly 0 in every group once d and m are fp16, as llama.cpp de-quantizes Q4_1."""
    if not bool((qw.zeros == qw.zeros.round()).all()):
        return False
    d = qw.scales.to(torch.float16).to(torch.float32)
    m = (-qw.zeros * d).to(torch.float16).to(torch.float32)
    return bool((d * qw.zeros + m == 0).all())


def _differences(qw: QuantizedWeight) -> torch.Tensor:
    """code − zero per weight (int16), pruned weights 0 so they de-quantize to exactly 0."""
    zeros = _expand(qw.zeros, qw.group_size, qw.shape).round().to(torch.int16)
    diff = qw.codes.to(torch.int16) - zeros
    return diff if qw.mask is None else diff * qw.mask


def _difference_range(qw: QuantizedWeight) -> tuple[int, int]:
    diff = _differences(qw)
    return int(diff.min()), int(diff.max())


def tensor_bytes(kind: T, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this type and shape takes in the file (before alignment padding)."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return int(np.prod(shape)) // block * size


# ---------------------------------------------------------------- the bytes
def _per_block(t: torch.Tensor, group_size: int, shape: tuple[int, int]) -> torch.Tensor:
    """Per-group values [out, n_groups] (per-tensor [1, 1]) -> one value per block of 32 [out, in / 32]."""
    return _expand(t, group_size, shape)[:, ::BLOCK].contiguous()


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[out, nb] values -> [out, nb, 2] little-endian float16 bytes (round to nearest)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _zero_point_codes(qw: QuantizedWeight) -> torch.Tensor:
    """The codes as uint8 [out, in], pruned positions set to the zero-point so they de-quantize to exactly 0."""
    codes = qw.codes.clone()
    if qw.mask is not None:
        zeros = _expand(qw.zeros, qw.group_size, qw.shape).round().to(torch.uint8)
        codes[~qw.mask] = zeros[~qw.mask]
    return codes


def pack_blocks(qw: QuantizedWeight, kind: T) -> np.ndarray:
    """Q4_0 / Q4_1 / Q8_0 bytes [out, in / 32 · block bytes] holding exactly the codes of ``qw`` (``block_type``
    says which type does; 8-bit codes it re-rounds go through ``rerounded_q8_0``)."""
    out_features, in_features = qw.shape
    nb = in_features // BLOCK
    d = _per_block(qw.scales, qw.group_size, qw.shape)
    parts = [_fp16_bytes(d)]
    if kind == T.Q4_1:  # w = d·q + m with m = −zero·d, d already rounded to fp16
        zeros = _per_block(qw.zeros, qw.group_size, qw.shape)
        parts.append(_fp16_bytes(-zeros * d.to(torch.float16).to(torch.float32)))
        codes = _zero_point_codes(qw).reshape(out_features, nb, BLOCK)
    elif kind == T.Q4_0:
        codes = (_differences(qw) + 8).to(torch.uint8).reshape(out_features, nb, BLOCK)
    else:
        q = _differences(qw).to(torch.int8).reshape(out_features, nb, BLOCK)
        return torch.cat(parts + [q.view(torch.uint8)], dim=-1).reshape(out_features, -1).numpy()
    parts.append(codes[..., :BLOCK // 2] | (codes[..., BLOCK // 2:] << 4))  # ggml's nibble order
    return torch.cat(parts, dim=-1).reshape(out_features, -1).numpy()


def rerounded_q8_0(qw: QuantizedWeight) -> np.ndarray:
    """Q8_0 bytes of the de-quantized weights (pruned weights stay exactly 0: 0 rounds to 0)."""
    return gguf.quants.quantize(qw.dequantize().numpy(), T.Q8_0)


# ---------------------------------------------------------------- what a setting's export holds
def _code_widths(q) -> set[int]:
    return {q.bits} | {bits for _, bits in q.layer_bits if bits != 16}


def gguf_refusal(config) -> str | None:
    """Why no GGUF file can hold this setting's codes, from the settings alone (None: it can)."""
    q = config.quantization
    if q is None or not q.is_integer or q.symmetric or q.grid != "minmax":
        return None
    other = sorted(_code_widths(q) - {4})
    if other:
        return (f"GGUF export: {'/'.join(map(str, other))}-bit codes with fractional zero-points (grid='minmax') "
                "have no GGUF type; use grid='integer-zero' or the Hugging Face export")
    if config.pruning is not None:
        return ("GGUF export: pruned 4-bit codes with fractional zero-points (grid='minmax') would not stay 0 in "
                "Q4_1; use grid='integer-zero' or the Hugging Face export")
    return None


def _codes_note(q) -> str:
    parts = []
    for bits in sorted(_code_widths(q)):
        if bits == 4:
            kind = "Q4_0" if q.symmetric else "Q4_1"
            parts.append(f"4-bit {'symmetric' if q.symmetric else 'asymmetric'} codes are written as {kind} bit for "
                         "bit" + ("" if q.symmetric else " (pruned layers Q4_1 cannot keep at 0: Q8_0 bit for bit)"))
        elif bits < 4:
            parts.append(f"{bits}-bit codes are written as Q4_0 bit for bit (4.5 bits per weight in the file)")
        elif bits < 8 or q.symmetric:
            parts.append(f"{bits}-bit {'symmetric ' if q.symmetric else ''}codes are written as Q8_0 bit for bit"
                         + ("" if bits == 8 else " (8.5 bits per weight in the file)"))
        else:
            parts.append("8-bit asymmetric codes are written as Q8_0, bit for bit where code − zero fits int8, else "
                         "re-rounded per block of 32 (8-bit, not your codes)")
    return "; ".join(parts) + ". Scales are stored as fp16 (GGUF's d and m)."


def _float_type(config) -> str:
    """The type the tensors left float run in, hence are written in: the real runtime casts them to bf16."""
    q = config.quantization
    if q is None:
        return "F32"
    if not q.is_integer:
        return q.dtype16.upper()
    on_kernels = config.runtime == "real" and not (q.bits == 8 and not q.int8_kernel)
    return "BF16" if on_kernels else "F32"


def _head_note(config) -> str:
    if config.include_embeddings:
        return "Embeddings and LM head were compressed with the layers and are written like them."
    dtype = _float_type(config)
    if dtype == "BF16" and config.runtime == "real" and config.head == "int8":
        return ("The LM head (and a tied embedding) ran as int8 per channel here: written as Q8_0 re-rounded per "
                "block of 32 (8-bit), once for both when tied; an untied embedding is BF16, as it ran.")
    return f"Embeddings and the LM head keep the type they ran in ({dtype})."


def _activation_note(config) -> str:
    q = config.quantization
    if q is None or not q.is_integer:
        return ""
    if config.runtime == "dynamic_int8":
        return (" The app ran 8-bit layers on torch's dynamic int8 kernel (activations rounded to int8 at run "
                "time); the file holds the 8-bit weights, and llama.cpp computes activations its own way.")
    if config.runtime == "real":
        return " The app ran the codes on weight-only kernels with bf16 activations; llama.cpp uses its own."
    return ""


def gguf_note(config) -> str:
    """Plain-text summary, from the settings alone, of what a GGUF export keeps exactly, re-rounds or refuses."""
    refusal = gguf_refusal(config)
    if refusal is not None:
        return f"Refused: {refusal}."
    q, parts = config.quantization, []
    if q is None:
        parts.append("No quantization: weights are written as F32, exactly.")
    elif not q.is_integer:
        parts.append(f"16-bit cast: weights are written as {q.dtype16.upper()}, exactly.")
    else:
        parts.append(_codes_note(q) + _activation_note(config))
    if config.pruning is not None:
        parts.append("Pruned weights are stored as zeros: GGUF has no sparse type, so the file is not smaller.")
    parts.append("Norms are F32. " + _head_note(config))
    return " ".join(parts)
