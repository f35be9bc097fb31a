"""The finish stage of compress(): the codes held by the simulation modules onto what really runs them.

``finish_real`` swaps every layer holding codes for its kernel module (kernels.py), puts the LM head (and
a tied embedding) on int8 unless the config keeps it float, casts the rest of the model to bf16 and writes the
kernel label from the modules that are really there. ``finish_dynamic_int8`` is the explicit option that runs
8-bit layers on torch's dynamic int8 (activations quantized too, SmoothQuant and an SQNR floor with calibration).
Both take compress's ``_Run`` (model, config, calibration, notes, report/check).
"""
from __future__ import annotations

import torch
from torch import nn

from lmcompress_core.runtime.int8_dynamic import to_int8_kernel_
from lmcompress_core.methods.layers import BaseModelCache
from lmcompress_core.methods.quantize import QuantizationConfig, quantize_weight
from lmcompress_core.runtime.modules import CompressedLinear, compressed_layers
from lmcompress_core.runtime.kernels import (ActivationInt8Linear, DequantLinear, Int4Linear, Int4PlanesLinear,
                                             Int8Linear, cast_rest_, quantize_head_, to_kernels_)

KERNEL_SIMULATED = "fp32 dense — quantization simulated"
KERNEL_INT8_DYNAMIC = "int8 (real, torch dynamic; activations quantized too)"
KERNEL_INT8 = "int8 weight-only (real, aten int8pack), bf16 activations"
HEAD_INT8 = "LM head int8 (real, aten int8pack)"
HEAD_FLOAT = "LM head bf16"
# on CUDA, Int8Linear widens its int8 codes to bf16 at every call and runs a dense bf16 GEMM (kernels._int8_mm):
# int8 storage, bf16 speed; the label says so instead of naming a kernel that does not run there
INT8_ON_CUDA = "int8 storage widened to bf16 per call (CUDA: dense bf16 GEMM, no int8 kernel)"


def few(names: list[str], shown: int = 3) -> str:
    """Layer names for a note a person reads: all of a short list, else the first few and how many more."""
    if len(names) <= shown + 1:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown} more"


def finish_real(run) -> None:
    """Codes onto the int4/int8 kernels, the LM head onto int8 (unless kept float), the rest of the model to bf16."""
    run.report("finish", 0, 1, "moving the codes onto the int4 / int8 kernels")
    fallbacks = to_kernels_(run.model, check=run.check)
    by_reason: dict[str, list[str]] = {}
    for name, why in fallbacks.items():
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        run.notes.append(f"{len(names)} layer(s) run no integer kernel ({why}): their uint8 codes are de-quantized "
                         f"once to dense bf16 matrices (held beside the codes; bf16 speed, no saving): "
                         f"{few(names)}")
    head = _finish_head(run)
    cast_rest_(run.model, torch.bfloat16)
    run.kernel = real_label(run.model, head)


def _finish_head(run) -> str:
    if run.config.include_embeddings:
        return "embeddings and LM head at the chosen bits, de-quantized in bf16"
    if run.config.head == "float":
        run.notes.append("LM head kept float (bf16), as asked")
        return HEAD_FLOAT
    refused = quantize_head_(run.model, lambda w: _head_codes(run.base, w))
    if refused is not None:
        run.notes.append(refused)
        return HEAD_FLOAT
    run.notes.append("LM head quantized to 8 bits per output channel (RTN) and run on int8pack; a tied input "
                     "embedding gathers its rows from the same int8 table")
    return HEAD_INT8


# the LM head's int8 codes per base model (a weak reference: they go when the model goes)
HEAD_CODES = BaseModelCache(per_model=1)


def _head_codes(base: nn.Module, w: torch.Tensor):
    """The head's per-channel 8-bit RTN codes. They depend on the head's weights alone, which every configuration
    leaves as they are (unless distillation trained them): such a head is the base model's (checked element
    by element), and its codes are computed once per base model (the base is never mutated)."""
    per_channel = QuantizationConfig(bits=8, granularity="channel")
    source = getattr(base.get_output_embeddings(), "weight", None)
    if not isinstance(source, torch.Tensor) or source.shape != w.shape or not _same_values(source, w):
        return quantize_weight(w, per_channel)
    key = (source.data_ptr(), tuple(source.shape), source.dtype)
    codes = HEAD_CODES.get(base, key)
    if codes is None:
        codes = quantize_weight(w, per_channel)
        HEAD_CODES.put(base, key, codes)
    return codes


def _same_values(source: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether w holds the source's values: the same memory (a borrowed weight, compress.py) or equal elements."""
    if source.dtype == w.dtype and source.data_ptr() == w.data_ptr() and source.stride() == w.stride():
        return True
    return torch.equal(source.to(w.dtype), w)


def real_label(model: nn.Module, head: str) -> str:
    """Which bits run on which kernel, from the modules that are really there and the device they are on (call it
    again after moving the model: on CUDA the int8 layers run no int8 kernel)."""
    parts = []
    int4 = [m for m in model.modules() if type(m) is Int4Linear]
    if int4:
        groups = _kernel_groups(int4)
        narrow = sorted({m.bits for m in int4 if m.bits < 4})
        container = f"; {'/'.join(map(str, narrow))}-bit codes in the 4-bit container" if narrow else ""
        parts.append(f"int4 weight-only (real, aten int4pack, groups of {groups}{container})")
    planes = [m for m in model.modules() if isinstance(m, Int4PlanesLinear)]
    if planes:
        widths = "/".join(str(b) for b in sorted({m.bits for m in planes}))
        parts.append(f"{widths}-bit codes in groups as two 4-bit planes (real, aten int4pack, groups of "
                     f"{_kernel_groups(planes)}; 8 bits held per weight)")
    head_module = model.get_output_embeddings()
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear) and m is not head_module]
    if int8:
        narrow = sorted({m.bits for m in int8 if m.bits < 8})
        codes = f"; {'/'.join(map(str, narrow))}-bit codes" if narrow else ""
        on_cuda = int8[0].weight_int8.device.type == "cuda"
        parts.append(f"int8 weight-only ({INT8_ON_CUDA}{codes})" if on_cuda else
                     f"int8 weight-only (real, aten int8pack{codes})")
    if isinstance(head_module, Int8Linear) and head_module.weight_int8.device.type == "cuda" and head == HEAD_INT8:
        head = f"LM head int8 ({INT8_ON_CUDA})"
    dequant = [m for m in model.modules() if isinstance(m, DequantLinear)]
    if dequant:
        parts.append(f"{len(dequant)} layer(s) de-quantized once to dense bf16 (no kernel takes them: bf16 "
                     "speed, codes and dense matrix both held)")
    return " + ".join(parts) + ", bf16 activations; " + head


def _kernel_groups(modules: list[Int4Linear]) -> str:
    return "/".join(str(g) for g in sorted({m.kernel_group for m in modules}))


def finish_dynamic_int8(run) -> None:
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


def _note_smoothing(run, cfg: QuantizationConfig, kept: list[str]) -> None:
    if cfg.smooth_alpha > 0:
        run.notes.append(f"int8 kernel: SmoothQuant (α={cfg.smooth_alpha:g}) divides each layer's inputs by "
                         "per-channel factors from calibration text and multiplies the weight columns by them")
    if kept:
        run.notes.append(f"int8 kernel: {len(kept)} layer(s) below {cfg.int8_sqnr_floor_db:g} dB int8 output SQNR on "
                         f"calibration text run in fp32 (their weights stay 8-bit fake-quantized): {few(kept)}")
