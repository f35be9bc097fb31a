"""Computations behind the Learn page: the seed's three ideas on one real layer of the chosen model.

Quantization levels and error against bit-width on either asymmetric grid (the seed's min-max with a fractional
zero-point, or the engine's default integer zero-point; formula numbers and levels both from
``quantize.grid_parameters`` / ``quantize_tensor``), magnitude pruning masks (unstructured vs 2:4)
on a small weight block, and the two classic mistakes run for real: quantized values computed but never
written back, and a pruning line that changes nothing. The teaching snippets are strings shown with
``st.code``; the functions next to them do exactly what the snippets say, on a copy of the layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcompress_core.methods.layers import linear_layers, weight_matrix
from lmcompress_core.methods.prune import PruningConfig, layer_mask
from lmcompress_core.methods.quantize import GRIDS, INTEGER_BITS, QuantizationConfig, grid_parameters, half_round_trip, quantize_tensor

MAX_HISTOGRAM_SAMPLES = 20_000  # enough for a smooth histogram, small enough to ship to the browser


@dataclass
class LayerView:
    name: str
    weight: torch.Tensor          # float32 [out, in] copy


def pick_layer(model, name: str | None = None) -> LayerView:
    """One linear layer of the model (the first compressible one unless ``name`` is given)."""
    layers = linear_layers(model)
    if not layers:
        raise ValueError("this model has no linear layers to show")
    name = name if name in layers else next(iter(layers))
    return LayerView(name, weight_matrix(layers[name]).float())


def layer_names(model) -> list[str]:
    return list(linear_layers(model))


FORMULAS = {  # LaTeX of each grid, exactly what quantize.grid_parameters computes for it
    "minmax": (r"s = \frac{\max W - \min W}{2^b - 1},\quad z = -\frac{\min W}{s}\ \text{(fractional)},"
               r"\quad q = \operatorname{round}\!\left(\frac{W - \min W}{\max W - \min W}\,(2^b - 1)\right),"
               r"\quad \hat W = s\,(q - z)"),
    "integer-zero": (r"s = \frac{\max(\max W, 0) - \min(\min W, 0)}{2^b - 1},"
                     r"\quad z = \operatorname{round}\!\left(-\frac{\min(\min W, 0)}{s}\right),"
                     r"\quad q = \operatorname{clamp}\!\left(\operatorname{round}\!\left(\frac{W}{s}\right) + z,"
                     r"\ 0,\ 2^b - 1\right),\quad \hat W = s\,(q - z)"),
}


def minmax_config(bits: int, grid: str = "minmax") -> QuantizationConfig:
    """Per-tensor asymmetric quantization on ``grid``: one scale and zero-point for the whole matrix."""
    return QuantizationConfig(bits=bits, granularity="tensor", symmetric=False, grid=grid, method="rtn")


def quantized_view(w: torch.Tensor, bits: int, grid: str = "minmax") -> torch.Tensor:
    """``w`` after a round trip through ``bits``-bit per-tensor quantization on ``grid`` (16 = fp16 cast)."""
    if bits >= 16:
        return half_round_trip(w, "fp16")
    return quantize_tensor(w, minmax_config(bits, grid)).dequantize()


def minmax_parameters(w: torch.Tensor, bits: int, grid: str = "minmax") -> dict[str, float]:
    """The numbers that go into the formula on the page: min, max, scale and zero-point, from the engine's
    ``grid_parameters`` (the function quantize_tensor uses)."""
    scale, zero = grid_parameters(w.reshape(1, -1).float(), bits, grid)
    return {"min": float(w.min()), "max": float(w.max()), "scale": float(scale), "zero_point": float(zero),
            "levels": 2 ** bits, "grid": grid}


def histogram_data(w: torch.Tensor, bits: int, seed: int = 0, grid: str = "minmax") -> tuple[list[float], list[float]]:
    """A sample of the weights (for the histogram) and the distinct de-quantized levels at ``bits``."""
    flat = w.reshape(-1)
    if flat.numel() > MAX_HISTOGRAM_SAMPLES:
        gen = torch.Generator().manual_seed(seed)
        flat = flat[torch.randperm(flat.numel(), generator=gen)[:MAX_HISTOGRAM_SAMPLES]]
    levels = torch.unique(quantized_view(w, bits, grid)) if bits < 16 else torch.empty(0)
    return flat.tolist(), levels.tolist()


def relative_error(w: torch.Tensor, bits: int, grid: str = "minmax") -> float:
    """‖W − Ŵ‖² / ‖W‖² after a per-tensor round trip on ``grid``."""
    return float((w - quantized_view(w, bits, grid)).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))


def error_vs_bits(w: torch.Tensor, bits_list=INTEGER_BITS + (16,), grid: str = "minmax") -> tuple[list[int], list[float]]:
    bits_list = list(bits_list)
    return bits_list, [relative_error(w, b, grid) for b in bits_list]


def weight_block(w: torch.Tensor, rows: int = 16, cols: int = 16) -> torch.Tensor:
    return w[:rows, :cols].clone()


def pruning_masks(w: torch.Tensor, size: int = 16) -> dict[str, list[list[bool]]]:
    """Keep-masks the engine (prune.layer_mask) gives one ``size``×``size`` block: unstructured 50% vs 2:4."""
    block = weight_block(w, size, size)
    return {"unstructured 50%": layer_mask(block, PruningConfig(sparsity=0.5)).tolist(),
            "2:4 semi-structured": layer_mask(block, PruningConfig(sparsity=0.5, pattern="2:4")).tolist()}


# ---------------------------------------------------------------- the two classic mistakes

MISTAKE_QUANTIZE = '''\
for name, module in model.named_modules():
    if isinstance(module, nn.Linear):
        w = module.weight.data
        scale = (w.max() - w.min()) / (2**bits - 1)
        zero = torch.round(-w.min() / scale)
        q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
        w_hat = (q - zero) * scale      # computed ... and thrown away
# the model still runs with the original float weights
'''

CORRECT_QUANTIZE = '''\
for name, module in model.named_modules():
    if isinstance(module, nn.Linear):
        w = module.weight.data
        scale = (w.max() - w.min()) / (2**bits - 1)
        zero = torch.round(-w.min() / scale)
        q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
        module.weight.data.copy_((q - zero) * scale)   # written back
'''

MISTAKE_PRUNE = '''\
w = module.weight.data
threshold = w.abs().flatten().kthvalue(int(sparsity * w.numel())).values
w[w.abs() < threshold] == 0        # a comparison, not an assignment: nothing changes
'''

CORRECT_PRUNE = '''\
w = module.weight.data
threshold = w.abs().flatten().kthvalue(int(sparsity * w.numel())).values
w[w.abs() <= threshold] = 0        # assignment, in place on the module's weight
'''


def _minmax_fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    scale = (w.max() - w.min()) / (2 ** bits - 1)
    zero = torch.round(-w.min() / scale)
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)
    return (q - zero) * scale


def changed_fraction_quantize(module, bits: int, write_back: bool) -> float:
    """Run the quantize snippet on a copy of ``module``'s weight; the share of weights that changed."""
    before = weight_matrix(module).float()
    w = before.clone()
    w_hat = _minmax_fake_quant(w, bits)
    if write_back:
        w.copy_(w_hat)
    return float((w != before).float().mean())


def changed_fraction_prune(module, sparsity: float, assign: bool) -> float:
    """Run the prune snippet on a copy of ``module``'s weight; the share of weights that changed."""
    before = weight_matrix(module).float()
    w = before.clone()
    threshold = w.abs().flatten().kthvalue(max(1, int(sparsity * w.numel()))).values
    if assign:
        w[w.abs() <= threshold] = 0
    else:
        _ = w[w.abs() < threshold] == 0   # the mistake, verbatim: a comparison whose result is dropped
    return float((w != before).float().mean())


def mistakes_demo(model, layer: str, bits: int = 4, sparsity: float = 0.5) -> dict[str, float]:
    """Changed-weight fractions for each snippet on the named layer (the model itself is not touched)."""
    module = linear_layers(model)[layer]
    return {
        "quantize_mistake": changed_fraction_quantize(module, bits, write_back=False),
        "quantize_correct": changed_fraction_quantize(module, bits, write_back=True),
        "prune_mistake": changed_fraction_prune(module, sparsity, assign=False),
        "prune_correct": changed_fraction_prune(module, sparsity, assign=True),
    }


@torch.no_grad()
def next_token_logits(model, tokenizer, prompt: str) -> torch.Tensor:
    """The model's logits for the token after ``prompt`` (1-D, vocabulary size)."""
    ids = tokenizer(prompt or " ", return_tensors="pt").input_ids[:, -256:]
    return model(input_ids=ids).logits[0, -1]


def kd_temperature_table(logits: torch.Tensor, temperatures=(1.0, 2.0, 4.0, 8.0)) -> list[dict]:
    """Entropy of softmax(z/T) and the T² factor: softer targets carry more of the teacher's ranking."""
    rows = []
    for t in temperatures:
        p = torch.softmax(logits.float() / t, dim=-1)
        entropy = float(-(p * p.clamp_min(1e-30).log()).sum())
        rows.append({"T": t, "entropy (nats)": entropy, "top-1 probability": float(p.max()),
                     "T² gradient factor": t * t})
    return rows


__all__ = ["GRIDS", "FORMULAS", "LayerView", "pick_layer", "layer_names", "minmax_parameters", "histogram_data", "error_vs_bits",
           "pruning_masks", "mistakes_demo", "kd_temperature_table", "next_token_logits",
           "MISTAKE_QUANTIZE", "CORRECT_QUANTIZE",
           "MISTAKE_PRUNE", "CORRECT_PRUNE"]
