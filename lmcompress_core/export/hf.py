"""Hugging Face folder export: safetensors + config.json + tokenizer files that plain transformers loads.

The folder holds the **de-quantized** weights (each quantized layer's (codes − zeros)·scales·mask), in the
dtype the compressed model computes in: float32, or bf16/fp16 after a 16-bit cast. So
``AutoModelForCausalLM.from_pretrained(folder)`` gives the same logits as the compressed model, with no code of
ours. Two exceptions, written into the config's ``lmcompress`` entry: an 8-bit model that ran on torch's int8
kernel (the file holds the 8-bit weights; the kernel also rounded activations at run time, smoothed by
SmoothQuant), and nothing is smaller on disk (it is a float checkpoint, not the packed format).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmcompress_core.methods.layers import set_weight_matrix_
from lmcompress_core.export._source import config_metadata, quantized_weights

FORMAT_NOTE = ("de-quantized weights: every quantized layer holds (codes − zeros)·scales, pruned weights are 0; "
               "load with AutoModelForCausalLM.from_pretrained(folder)")


@dataclass
class HFExport:
    folder: Path
    dtype: str                # "float32" | "bfloat16" | "float16"
    note: str


def _runtime_dtype(model) -> torch.dtype:
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32


def _plain_copy(cm) -> torch.nn.Module:
    """A fresh transformers model of the same config holding the compressed model's de-quantized weights.

    Built anew (not deep-copied) because compressed layers may be int8-kernel or packed modules that
    ``save_pretrained`` cannot write; float tensors are copied by name, quantized layers from their codes.
    """
    from transformers import AutoModelForCausalLM

    dtype = _runtime_dtype(cm.model)
    fresh = AutoModelForCausalLM.from_config(cm.model.config, dtype=dtype).eval()
    source = cm.model.state_dict()
    state = {k: source[k] for k in fresh.state_dict() if k in source and source[k].shape == fresh.state_dict()[k].shape}
    fresh.load_state_dict(state, strict=False)
    qws = quantized_weights(cm)
    for name, qw in qws.items():
        set_weight_matrix_(fresh.get_submodule(name), qw.dequantize())
    missing = [k for k in fresh.state_dict() if k not in state and k.rsplit(".", 1)[0] not in qws]
    if missing:
        raise ValueError(f"Hugging Face export: no weights found for {', '.join(missing[:3])}")
    fresh.tie_weights()
    return fresh


def export_hf(cm, tokenizer, folder: str | Path) -> HFExport:
    """Write ``cm`` as a Hugging Face model folder (safetensors, config with an ``lmcompress`` entry, tokenizer)."""
    folder = Path(folder)
    model = _plain_copy(cm)
    meta = {**config_metadata(cm), "format": FORMAT_NOTE}
    model.config.lmcompress = meta
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    dtype = str(_runtime_dtype(model)).removeprefix("torch.")
    note = f"Hugging Face folder, {dtype} weights de-quantized from the codes"
    if cm.config.runtime == "real" and cm.layers():
        note += (". The app runs them on its int4/int8 kernels (bf16 scales and activations); this folder runs them "
                 "as dense weights, so logits agree to bf16 resolution, not bit for bit.")
    elif "int8" in cm.kernel:
        note += ". The app ran 8-bit layers on torch's int8 kernel; this folder runs them in float."
    else:
        note += " (exact copies of what the compressed model computes with)."
    return HFExport(folder, dtype, note)
