"""Per-layer sensitivity: how much error the chosen pruning + quantization puts into each layer, per bit-width.

The data for a heatmap (layer × bits). Each layer is compressed on its own, from the float weights, and
compared with them: rel_mse = ‖W − Ŵ‖² / ‖W‖², sqnr_db = 10·log10(1 / rel_mse). The model is not modified.
"""
from __future__ import annotations

import dataclasses
import math

import pandas as pd
import torch

from lmcompress_core.compress import CompressionConfig
from lmcompress_core.methods.layers import input_statistics, weight_matrix
from lmcompress_core.models.loading import LoadedModel
from lmcompress_core.methods.prune import global_masks, layer_mask
from lmcompress_core.methods.quantize import QuantizationConfig, half_round_trip, quantize_weight


def layer_sensitivity(model, config: CompressionConfig, bits_list=(2, 3, 4, 8),
                      calibration: torch.Tensor | None = None, executor=None) -> pd.DataFrame:
    """Rows (layer, bits, rel_mse, sqnr_db) for every chosen layer and bit-width.

    ``calibration`` token ids are needed for Wanda and GPTQ: without them this raises (it never quietly runs
    magnitude / RTN under their names).
    ``executor`` (execute/; default: this process) with ``remote`` set runs one task per bit-width on its
    workers; ``model`` must then be the LoadedModel, whose name each worker loads.
    """
    if executor is not None and executor.remote:
        return _remote_sensitivity(model, config, bits_list, calibration, executor)
    if isinstance(model, LoadedModel):
        model = model.model
    layers = config.chosen_layers(model)
    q, p = config.quantization, config.pruning
    gptq, wanda = q is not None and q.method == "gptq", p is not None and p.method in ("wanda", "sparsegpt")
    if (gptq or wanda) and calibration is None:
        raise ValueError(f"{'GPTQ' if gptq else 'Wanda'} needs calibration text to measure per-layer sensitivity; "
                         "pass calibration (protocol.calibration_for)")
    mse = q is not None and q.method == "mse" and calibration is not None   # without calibration: weight error
    stats = input_statistics(model, layers, calibration, hessian=gptq or mse) if (gptq or wanda or mse) else None
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


def _remote_sensitivity(loaded, config, bits_list, calibration, executor) -> pd.DataFrame:
    """One task per bit-width on the executor's workers, rows put back in the in-process order (layer, bits)."""
    if not hasattr(loaded, "name"):
        raise ValueError("a remote executor loads the model by name: pass the LoadedModel, not the bare module")
    ids = None if calibration is None else calibration.tolist()
    payloads = [{"config": config.to_dict(), "bits": bits, "calibration": ids} for bits in bits_list]
    rows, failures = [], []
    for outcome in executor.map(loaded, "sensitivity", payloads):
        if outcome.ok:
            rows += outcome.result["rows"]
        elif not outcome.retrying:
            failures.append(f"{payloads[outcome.index]['bits']} bits: {outcome.error}")
    if failures:
        raise ValueError("sensitivity failed on the workers: " + "; ".join(failures))
    frame = pd.DataFrame(rows, columns=["layer", "bits", "rel_mse", "sqnr_db"])
    layer_order = {name: i for i, name in enumerate(dict.fromkeys(frame["layer"]))}
    bits_order = {bits: i for i, bits in enumerate(bits_list)}
    order = sorted(range(len(frame)), key=lambda i: (layer_order[frame["layer"][i]], bits_order[frame["bits"][i]]))
    return frame.iloc[order].reset_index(drop=True)


def _masks(weights: dict, config: CompressionConfig, stats) -> dict | None:
    cfg = config.pruning
    if cfg is None or cfg.effective_sparsity == 0:
        return None
    if cfg.scope == "global" and cfg.pattern == "unstructured":
        return global_masks(weights, cfg.sparsity)
    return {name: layer_mask(w, cfg, stats.sq_norm.get(name) if stats else None) for name, w in weights.items()}


def _quantized(w: torch.Tensor, base: QuantizationConfig | None, bits: int, hessian, mask) -> torch.Tensor:
    """The layer as compress would leave it at ``bits`` (the same quantizer entry point, never a stand-in)."""
    cfg = dataclasses.replace(base or QuantizationConfig(), bits=bits)
    if not cfg.is_integer:
        return half_round_trip(w, cfg.dtype16)
    approx = quantize_weight(w, cfg, hessian, mask).dequantize()
    return approx if mask is None else approx * mask


def _errors(w: torch.Tensor, approx: torch.Tensor) -> dict:
    energy = float(w.pow(2).sum())
    rel_mse = float((w - approx).pow(2).sum()) / energy if energy > 0 else 0.0
    sqnr_db = math.inf if rel_mse == 0 else 10 * math.log10(1 / rel_mse)
    return {"rel_mse": rel_mse, "sqnr_db": sqnr_db}
