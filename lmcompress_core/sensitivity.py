"""Per-layer sensitivity: how much error the chosen pruning + quantization puts into each layer, per bit-width.

The data for a heatmap (layer × bits). Each layer is compressed on its own, from the float weights, and
compared with them: rel_mse = ‖W − Ŵ‖² / ‖W‖², sqnr_db = 10·log10(1 / rel_mse). The model is not modified.
"""
from __future__ import annotations

import dataclasses
import math

import pandas as pd
import torch

from .compress import CompressionConfig, _Run
from .layers import weight_matrix
from .prune import global_masks, layer_mask
from .quantize import QuantizationConfig, gptq_quantize, half_round_trip, quantize_tensor


def layer_sensitivity(model, config: CompressionConfig, bits_list=(2, 3, 4, 8),
                      calibration: torch.Tensor | None = None) -> pd.DataFrame:
    """Rows (layer, bits, rel_mse, sqnr_db) for every chosen layer and bit-width.

    ``calibration`` token ids are needed for Wanda and GPTQ; without them those fall back to magnitude / RTN.
    """
    run = _Run(model, model, config, calibration, None, None)
    layers = run.layers()
    needs_inputs = calibration is not None and (
        (config.pruning is not None and config.pruning.method == "wanda")
        or (config.quantization is not None and config.quantization.method == "gptq"))
    stats = run.input_statistics(layers, hessian=config.quantization is not None
                                 and config.quantization.method == "gptq") if needs_inputs else None
    weights = {name: weight_matrix(m) for name, m in layers.items()}
    masks = _masks(weights, config, stats)
    rows = []
    for name, w in weights.items():
        pruned = w if masks is None else w * masks[name]
        for bits in bits_list:
            approx = _quantized(pruned, config.quantization, bits, stats.hessian.get(name) if stats else None,
                                None if masks is None else masks[name])
            rows.append({"layer": name, "bits": bits, **_errors(w, approx)})
    return pd.DataFrame(rows, columns=["layer", "bits", "rel_mse", "sqnr_db"])


def _masks(weights: dict, config: CompressionConfig, stats) -> dict | None:
    cfg = config.pruning
    if cfg is None or cfg.effective_sparsity == 0:
        return None
    if cfg.scope == "global" and cfg.pattern == "unstructured":
        return global_masks(weights, cfg.sparsity)
    return {name: layer_mask(w, cfg, stats.sq_norm.get(name) if stats else None) for name, w in weights.items()}


def _quantized(w: torch.Tensor, base: QuantizationConfig | None, bits: int, hessian, mask) -> torch.Tensor:
    cfg = dataclasses.replace(base or QuantizationConfig(), bits=bits)
    if not cfg.is_integer:
        return half_round_trip(w, cfg.dtype16)
    if cfg.method == "gptq" and hessian is not None:
        return gptq_quantize(w, hessian, cfg, mask).dequantize()
    approx = quantize_tensor(w, cfg).dequantize()
    return approx if mask is None else approx * mask


def _errors(w: torch.Tensor, approx: torch.Tensor) -> dict:
    energy = float(w.pow(2).sum())
    rel_mse = float((w - approx).pow(2).sum()) / energy if energy > 0 else 0.0
    sqnr_db = math.inf if rel_mse == 0 else 10 * math.log10(1 / rel_mse)
    return {"rel_mse": rel_mse, "sqnr_db": sqnr_db}
