"""Computations behind the Learn page: three compression ideas on one real layer of the chosen model.

Quantization levels and error against bit-width on either asymmetric grid (the textbook min-max with a
fractional zero-point, or the engine's default integer zero-point; formula numbers and levels both from
``quantize.grid_parameters`` / ``quantize_tensor``), magnitude pruning masks (unstructured vs 2:4)
on a small weight block, and the two classic mistakes run for real: quantized values computed but never
written back, and a pruning line that changes nothing. The teaching snippets are strings shown with
``st.code``; the functions next to them do exactly what the snippets say, on a copy of the layer.
"""
from __future__ import annotations

import statistics
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


GRID_LABELS = {  # what the page calls each grid, and one sentence on what sets it apart
    "integer-zero": ("integer zero-point (engine default)",
                     "The range is widened to include 0 and z is rounded, so 0 is exactly one of the levels."),
    "minmax": ("min-max (textbook)",
               "The levels run evenly from the smallest weight to the largest, so z stays fractional and 0 is "
               "usually not a level."),
}

# LaTeX of each grid, exactly what quantize.grid_parameters computes for it; one equation per line so the
# formula fits a 600 px column (the page's width at 1024 px with the sidebar open).
FORMULAS = {
    "minmax": (r"\begin{aligned}"
               r"s &= \frac{\max W - \min W}{2^b - 1} \\"
               r"z &= -\frac{\min W}{s}\quad\text{(fractional)} \\"
               r"q &= \operatorname{round}\!\left(\frac{W - \min W}{\max W - \min W}\,(2^b - 1)\right) \\"
               r"\hat W &= s\,(q - z)"
               r"\end{aligned}"),
    "integer-zero": (r"\begin{aligned}"
                     r"s &= \frac{\max(\max W, 0) - \min(\min W, 0)}{2^b - 1} \\"
                     r"z &= \operatorname{round}\!\left(-\frac{\min(\min W, 0)}{s}\right) \\"
                     r"q &= \operatorname{clamp}\!\left(\operatorname{round}\!\left(\frac{W}{s}\right) + z,"
                     r"\ 0,\ 2^b - 1\right) \\"
                     r"\hat W &= s\,(q - z)"
                     r"\end{aligned}"),
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


def error_factor_per_bit(bits_list, errors) -> list[tuple[int, int, float]]:
    """(from, to, factor) between consecutive integer widths: how many times the error fell per added bit (over a
    gap of several bits, e.g. 6 -> 8, the geometric mean per bit). The 16-bit float cast is left out."""
    steps = [(a, b, ea, eb) for a, b, ea, eb in zip(bits_list, bits_list[1:], errors, errors[1:]) if b < 16]
    return [(a, b, (ea / max(eb, 1e-30)) ** (1 / (b - a))) for a, b, ea, eb in steps]


def error_fall_summary(bits_list, errors) -> dict:
    """What the error chart shows in numbers: the median factor per bit (the textbook says 4: each bit halves the
    step and the error goes with its square), every step's factor, and the widths whose error is above 1 (worse
    than setting every weight to zero)."""
    factors = error_factor_per_bit(list(bits_list), list(errors))
    return {"median": statistics.median(f for _, _, f in factors) if factors else None, "factors": factors,
            "worse_than_zero": [b for b, e in zip(bits_list, errors) if e > 1]}


def weight_block(w: torch.Tensor, rows: int = 16, cols: int = 16) -> torch.Tensor:
    return w[:rows, :cols].clone()


def pruning_masks(w: torch.Tensor, size: int = 16) -> dict[str, list[list[bool]]]:
    """Keep-masks the engine (prune.layer_mask) gives one ``size``×``size`` block: unstructured 50% vs 2:4."""
    block = weight_block(w, size, size)
    return {"unstructured 50%": layer_mask(block, PruningConfig(sparsity=0.5)).tolist(),
            "2:4 semi-structured": layer_mask(block, PruningConfig(sparsity=0.5, pattern="2:4")).tolist()}


# ---------------------------------------------------------------- the two classic mistakes

# Lines of at most 48 characters: they fit the page at 1024 px (about 60 characters wide) without wrapping.
MISTAKE_QUANTIZE = '''\
for module in model.modules():
    if isinstance(module, nn.Linear):
        w = module.weight.data
        lo, hi = w.min(), w.max()
        scale = (hi - lo) / (2**bits - 1)
        zero = torch.round(-lo / scale)
        q = torch.round(w / scale) + zero
        q = q.clamp(0, 2**bits - 1)
        # computed ... and thrown away:
        w_hat = (q - zero) * scale
# the model still runs on its float weights
'''

CORRECT_QUANTIZE = '''\
for module in model.modules():
    if isinstance(module, nn.Linear):
        w = module.weight.data
        lo, hi = w.min(), w.max()
        scale = (hi - lo) / (2**bits - 1)
        zero = torch.round(-lo / scale)
        q = torch.round(w / scale) + zero
        q = q.clamp(0, 2**bits - 1)
        # written back into the layer:
        w.copy_((q - zero) * scale)
'''

MISTAKE_PRUNE = '''\
w = module.weight.data
k = int(sparsity * w.numel())
threshold = w.abs().flatten().kthvalue(k).values
# == compares and drops the answer: no change
w[w.abs() < threshold] == 0
'''

CORRECT_PRUNE = '''\
w = module.weight.data
k = int(sparsity * w.numel())
threshold = w.abs().flatten().kthvalue(k).values
# = assigns, in place on the layer's weight
w[w.abs() <= threshold] = 0
'''


def _minmax_fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = w.min(), w.max()
    scale = (hi - lo) / (2 ** bits - 1)
    zero = torch.round(-lo / scale)
    q = torch.round(w / scale) + zero
    q = q.clamp(0, 2 ** bits - 1)
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
    k = max(1, int(sparsity * w.numel()))
    threshold = w.abs().flatten().kthvalue(k).values
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


__all__ = ["GRIDS", "GRID_LABELS", "FORMULAS", "LayerView", "pick_layer", "layer_names", "minmax_parameters", "histogram_data", "error_vs_bits",
           "error_fall_summary",
           "pruning_masks", "mistakes_demo", "kd_temperature_table", "next_token_logits",
           "MISTAKE_QUANTIZE", "CORRECT_QUANTIZE",
           "MISTAKE_PRUNE", "CORRECT_PRUNE"]
