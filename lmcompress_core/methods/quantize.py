"""Weight quantization: the config, a real integer representation, RTN, GPTQ and the fp16/bf16 cast.

Integer settings (2–8 bits) store uint8 codes with per-tensor, per-channel or per-group scales and zero-points
(``QuantizedWeight``) and write the de-quantized weights back into the model ("fake quantization"), so every
architecture runs unchanged and the codes can be bit-packed. Asymmetric grids (``grid_parameters``):

- ``grid="integer-zero"`` (default, as torchao's asymmetric mapping and llama.cpp's Q4_1/K-quants): the range is
  widened to include 0 and the zero-point is rounded to an integer code, so 0 is exactly on the grid:
  s = (max(x_max, 0) − min(x_min, 0)) / (2^bits − 1), z = round(−min(x_min, 0) / s), x_q = clamp(round(x/s) + z).
  The many near-zero weights of a group then round to 0 instead of all drifting the same way (a coherent error
  that adds up along each dot product: SmolLM2 int3 g64 perplexity 97.7 with the seed's rule, 27 with this).
  Scales are rounded to bfloat16 values, which float16 holds too, so the packed file stores scales and zero-points
  in 16 bits each and the CPU kernels (bf16 scales) compute with exactly them (``hqq.exact_scale``).
- ``grid="minmax"``: the seed's formula, kept for teaching, with a fractional zero-point
  x_q = round((x − x_min) / (x_max − x_min) · (q_max − q_min) + q_min),   q_min = 0, q_max = 2^bits − 1.

The symmetric grid is absmax: x_q = round(x / s), s = max|x| / (2^(bits−1) − 1) rounded to a bfloat16 value. ``method="hqq"`` fits each
group's zero-point by half-quadratic optimisation (``hqq.py``); ``method="mse"`` searches each group's scale and
integer zero-point for the least output error, δᵀHδ with H the second moment of the group's calibration inputs
(``grid_search.py``); ``layer_bits`` gives layers their own bit-width (mixed precision,
``QuantizationConfig.for_layer``).

GPTQ is written here, not imported, because it is the point of the project: the Hessian H = 2XXᵀ of each
layer's calibration inputs, damping, lazy batches of 128 columns updated with the upper Cholesky factor of H⁻¹,
group scales computed as the columns are reached, optional act-order (with act-order the group grids are fixed
from the unquantized weights first, so groups stay contiguous in the original column order: static groups).
Each group starts from the searched grid (``grid_search``: the MSE grid's search on the group's block of H,
when GPTQ reaches the group), so the column updates correct what the best grid leaves, not what min-max
leaves. By default layers are fitted block by block (``calibration_pass="sequential"``, ``sequential.py``):
each layer's H from the inputs the already quantized layers before it give, at the cost of one forward pass;
"one-pass" fits every layer to the float model's inputs, collected once and reused by a second setting.
Running 8-bit layers on torch's real int8 kernel (with smoothing and an SQNR floor) lives in ``runtime/int8_dynamic.py``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from lmcompress_core.methods.grid_search import mse_grid
from lmcompress_core.methods.hqq import exact_scale, hqq_grid
from lmcompress_core.methods.prune import zero_pruned_

INTEGER_BITS = (2, 3, 4, 5, 6, 8)
ALLOWED_BITS = INTEGER_BITS + (16,)
GROUP_SIZES = (32, 64, 128)
GRIDS = ("integer-zero", "minmax")
METHODS = ("rtn", "gptq", "hqq", "mse")
CALIBRATION_PASSES = ("sequential", "one-pass")
FLOAT_LAYER = 16  # in layer_bits: the layer is not quantized and stays in the model's float dtype
_LAZY_BLOCK = 128  # GPTQ columns per lazy batch (a multiple of every group size)


@dataclass(frozen=True)
class QuantizationConfig:
    bits: int = 4                 # 2,3,4,5,6,8 integer codes; 16 = half-precision cast (dtype16)
    granularity: str = "group"    # "tensor" | "channel" | "group"
    group_size: int = 128         # 32 | 64 | 128 (used when granularity == "group")
    symmetric: bool = False       # False = asymmetric (shape from `grid`); True = absmax, zero-point 2^(bits−1)
    grid: str = "integer-zero"    # asymmetric grid: "integer-zero" (0 on the grid) | "minmax" (the seed's rule)
    # "rtn" | "gptq" (needs calibration token ids) | "hqq" (calibration-free) | "mse" (searched grid: least output
    # error on calibration inputs; without calibration, least weight error)
    method: str = "rtn"
    damp: float = 0.01            # GPTQ / MSE Hessian damping, fraction of the mean diagonal
    # GPTQ: quantize columns in order of decreasing Hessian diagonal (groups stay static: contiguous in the original
    # order, their grids searched before the updates). Measured on SmolLM2, g128, 16×256 calibration tokens: int3
    # 11.94 against 13.42 in column order (the MSE grid alone 13.67), int4 7.72 against 8.21
    act_order: bool = True
    # GPTQ: "sequential" = blocks in order, each layer's Hessian from the inputs the already quantized layers
    # before it give (GPTQModel's and llm-compressor's way); "one-pass" = every layer's Hessian from one pass
    # through the float model (cheaper: one pass, and a second setting reuses it)
    calibration_pass: str = "sequential"
    # GPTQ, asymmetric integer-zero groups: each group's scale and zero-point searched for the least
    # Hessian-weighted error (the MSE grid, grid_search.py) before the column updates; False: the min-max grid
    grid_search: bool = True
    int8_kernel: bool = True      # bits == 8: run torch dynamic int8 (a real kernel) for evaluation/latency
    dtype16: str = "bf16"         # "bf16" | "fp16" for bits == 16
    # int8 kernel with calibration: SmoothQuant migration strength α (0 = no smoothing). 0.5 splits each input
    # channel's range evenly between activations (quantized per tensor at run time) and weights (per channel);
    # 0.75 moves more into the weights, as the SmoothQuant paper does for models with strong outliers (Llama).
    # On SmolLM2-135M (1024 web tokens, floor 20 dB) 0.75 gives ppl 7.74 with 2 layers kept fp32, 0.5 gives 9.02
    # with 19 (float: 6.08)
    smooth_alpha: float = 0.75
    # int8 kernel with calibration: a layer whose int8 output SQNR on calibration inputs stays below this floor
    # (dB) runs in fp32 instead (0 = off). 25 dB ≈ 5.6% relative output error per layer; errors of ~200 layers
    # add up, so SmolLM2-135M needs it: ppl 7.13 with 27 of 210 layers fp32 (7.74 at 20 dB, 6.94 at 30 dB with 48)
    int8_sqnr_floor_db: float = 25.0
    # mixed precision: ((regex, bits), ...) searched in each layer's name, first match wins; 16 keeps the layer
    # float; layers no pattern matches get `bits`. E.g. (("down_proj", 8), (r"layers\.0\.", 16))
    layer_bits: tuple = ()

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in ALLOWED_BITS:
            raise ValueError(f"bits must be one of 2, 3, 4, 5, 6, 8 or 16 (16 = half-precision cast); got {self.bits!r}")
        _choice("granularity", self.granularity, ("tensor", "channel", "group"))
        if self.granularity == "group" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be 32, 64 or 128 for per-group quantization; got {self.group_size!r}")
        _choice("method", self.method, METHODS)
        _choice("grid", self.grid, GRIDS)
        _choice("dtype16", self.dtype16, ("bf16", "fp16"))
        _check_fitted_grid(self.method, self.symmetric, self.grid)
        _choice("calibration_pass", self.calibration_pass, CALIBRATION_PASSES)
        if not isinstance(self.grid_search, bool):
            raise ValueError(f"grid_search must be True or False; got {self.grid_search!r}")
        if not isinstance(self.damp, (int, float)) or not 0 < self.damp <= 1:
            raise ValueError(f"damp (GPTQ Hessian damping) must be in (0, 1], typically 0.01; got {self.damp!r}")
        if isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float)) \
                or not 0 <= self.smooth_alpha <= 1:
            raise ValueError(f"smooth_alpha (SmoothQuant strength) must be in [0, 1], 0 = off, typically 0.5; "
                             f"got {self.smooth_alpha!r}")
        if isinstance(self.int8_sqnr_floor_db, bool) or not isinstance(self.int8_sqnr_floor_db, (int, float)) \
                or not 0 <= self.int8_sqnr_floor_db <= 60:
            raise ValueError(f"int8_sqnr_floor_db must be in [0, 60] dB, 0 = off, typically 20; "
                             f"got {self.int8_sqnr_floor_db!r}")
        object.__setattr__(self, "layer_bits", _checked_layer_bits(self.layer_bits))
        if self.layer_bits and not self.is_integer:
            raise ValueError("layer_bits needs integer base bits (2–8); to keep some layers float, give them 16 "
                             "in layer_bits instead of setting bits=16")
        if self.layer_bits and self.bits == 8 and self.int8_kernel:
            raise ValueError("layer_bits with bits=8 and int8_kernel=True would run every quantized layer on the "
                             "int8 kernel whatever its bits; set int8_kernel=False for mixed precision")

    @property
    def is_integer(self) -> bool:
        return self.bits in INTEGER_BITS

    @property
    def gptq_searches_grid(self) -> bool:
        """GPTQ starts each group from the searched grid (grid_search, on asymmetric integer-zero groups)."""
        return self.grid_search and self.granularity == "group" and not self.symmetric \
            and self.grid == "integer-zero"

    @property
    def integer_zero_points(self) -> bool:
        """Zero-points are integer codes, which the packed file stores at the codes' width (0 is on the grid:
        symmetric, or the integer-zero grid, whatever fits the scale); the seed's min-max rule's are fractional."""
        return self.symmetric or self.grid == "integer-zero"

    def for_layer(self, name: str) -> "QuantizationConfig | None":
        """The setting the layer called ``name`` gets: the first ``layer_bits`` pattern found in the name
        decides its bits (16: None, the layer stays float); no match: this config's own bits."""
        for pattern, bits in self.layer_bits:
            if re.search(pattern, name):
                return None if bits == FLOAT_LAYER else replace(self, bits=bits, layer_bits=())
        return replace(self, layer_bits=()) if self.layer_bits else self


def _checked_layer_bits(value) -> tuple[tuple[str, int], ...]:
    """layer_bits as a tuple of (pattern, bits) pairs (JSON gives lists), each pattern compiled once to check it."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise ValueError(f"layer_bits must be a sequence of (pattern, bits) pairs; got {value!r}")
    pairs = []
    for item in value:
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
            raise ValueError(f"each layer_bits entry must be a (regex, bits) pair, e.g. ('down_proj', 8); got {item!r}")
        pattern, bits = item
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"layer_bits pattern {pattern!r} is not a valid regular expression: {e}") from None
        if isinstance(bits, bool) or bits not in INTEGER_BITS + (FLOAT_LAYER,):
            raise ValueError(f"layer_bits for {pattern!r} must be one of 2, 3, 4, 5, 6, 8 or 16 (16 = keep the "
                             f"layer float); got {bits!r}")
        pairs.append((pattern, int(bits)))
    return tuple(pairs)


def _check_fitted_grid(method: str, symmetric: bool, grid: str) -> None:
    """HQQ and MSE fit their own asymmetric grid (integer zero-point, 0 on the grid): a setting asking for another
    grid would silently run something else, so it is refused."""
    if method not in ("hqq", "mse"):
        return
    if symmetric:
        raise ValueError(f"method={method!r} fits an asymmetric grid (a zero-point per group); symmetric=True would "
                         "run the plain absmax grid instead: set symmetric=False, or use method 'rtn' or 'gptq'")
    if grid != "integer-zero":
        raise ValueError(f"method={method!r} fits its own integer-zero grid; grid={grid!r} would be ignored: use "
                         "grid='integer-zero', or method 'rtn' for the seed's min-max rule")


def _choice(field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{field} must be one of {options}; got {value!r}")


def _expand(t: torch.Tensor, group_size: int, shape: tuple[int, int]) -> torch.Tensor:
    """Per-group values [out, n_groups] -> one value per weight [out, in] (per-tensor [1, 1] broadcasts)."""
    if group_size == -1:
        return t.expand(shape)
    return t.repeat_interleave(group_size, dim=1)[:, : shape[1]]


@dataclass
class QuantizedWeight:
    """A real quantized representation of one ``[out, in]`` matrix; ``dequantize()`` is the truth.

    Weight ≈ (codes − zeros) · scales, group by group along the input dimension. ``mask`` (optional, bool
    [out, in]) marks weights kept by pruning: pruned weights de-quantize to exactly 0.
    """

    codes: torch.Tensor           # uint8 [out, in], values in [0, 2**bits - 1]
    scales: torch.Tensor          # float32 [out, n_groups]; per-tensor [1, 1]
    zeros: torch.Tensor           # float32 [out, n_groups], zero-point in code units (symmetric: 2**(bits-1))
    bits: int
    group_size: int               # in_features for per-channel, -1 for per-tensor
    mask: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(codes − zero) · scale per weight, each group's scale and zero-point broadcast over its weights (never
        spelled out per weight: 1.2 vs 2.2 ms on a 1536×576 layer in groups of 128, measured here); pruned weights
        exactly 0. Computed in float32; ``dtype``: the result rounded to it as it is stored (the same values as
        ``.to(dtype)`` of the float32 result, without that second pass)."""
        codes = self.codes.to(torch.float32)
        if self.group_size == -1:   # one [1, 1] scale and zero-point
            w = ((codes - self.zeros) * self.scales).to(dtype)
        else:
            w = torch.empty(codes.shape, dtype=dtype, device=codes.device)
            rows, width = self.shape
            n = width // self.group_size
            whole = n * self.group_size
            if whole:
                grouped = (rows, n, self.group_size)
                torch.mul(codes[:, :whole].view(grouped) - self.zeros[:, :n, None], self.scales[:, :n, None],
                          out=w[:, :whole].view(grouped))
            if whole < width:   # a short last group
                torch.mul(codes[:, whole:] - self.zeros[:, n:], self.scales[:, n:], out=w[:, whole:])
        return w if self.mask is None else zero_pruned_(w, self.mask)


def _group_size(config: QuantizationConfig, in_features: int) -> int:
    return {"tensor": -1, "channel": in_features, "group": config.group_size}[config.granularity]


def _qmax(bits: int) -> int:
    return 2 ** bits - 1


def grid_parameters(x: torch.Tensor, bits: int, grid: str = "integer-zero",
                    symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of x [rows, cols], in code units: x ≈ (code − zero) · scale.

    The one implementation of every grid (RTN, GPTQ, the Learn page): symmetric absmax, or the asymmetric
    ``grid`` ("integer-zero": 0 on the grid, integer zero-point; "minmax": the seed's fractional zero-point).
    """
    if symmetric:   # scales rounded to 16-bit values, as the packed file stores and the size model counts them
        half = 2 ** (bits - 1)
        absmax = x.abs().amax(dim=1, keepdim=True)
        scale = exact_scale(torch.where(absmax > 0, absmax / (half - 1), torch.ones_like(absmax)))
        return scale, torch.full_like(scale, float(half))
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    if grid == "minmax":
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))  # a constant row: any span reproduces it
        scale = span / _qmax(bits)
        return scale, -lo / scale
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))  # an all-zero row: any scale reproduces it
    scale = exact_scale(span / _qmax(bits))
    return scale, torch.round(-lo / scale).clamp_(0, _qmax(bits))


def _grid(x: torch.Tensor, config: "QuantizationConfig") -> tuple[torch.Tensor, torch.Tensor]:
    return grid_parameters(x, config.bits, config.grid, config.symmetric)


def _fitted_grid(x: torch.Tensor, config: "QuantizationConfig",
                 second_moment: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid a group is rounded onto: HQQ and MSE fit their own (asymmetric) grids, RTN takes the config's."""
    if config.method == "hqq" and not config.symmetric:
        return hqq_grid(x, config.bits)
    if config.method == "mse" and not config.symmetric:
        return mse_grid(x, config.bits, second_moment)
    return _grid(x, config)


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp · mean(diag H) · I: with fewer calibration tokens than inputs H is singular, and a grid searched
    on it could trade error in directions the calibration text never excites."""
    h = h.to(torch.float32)
    return h + torch.eye(h.shape[0], device=h.device) * (damp * h.diagonal().mean().clamp_min(1e-12))


def _seed_codes(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The seed's min-max formula, literally, row by row (q_min = 0)."""
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return torch.round((x - lo) / span * (_qmax(bits) - 0) + 0).clamp_(0, _qmax(bits))


def codes_on_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round x to the nearest code of a fixed grid (used by GPTQ, re-quantization and the STE)."""
    return torch.round(x / scale + zero).clamp_(0, _qmax(bits))


def _column_groups(in_features: int, group_size: int) -> list[slice]:
    step = in_features if group_size == -1 else group_size
    return [slice(s, min(s + step, in_features)) for s in range(0, in_features, step)]


def quantize_tensor(w: torch.Tensor, config: QuantizationConfig,
                    second_moment: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of an ``[out, in]`` matrix with the config's bits, grid and granularity
    (with ``method="hqq"`` or ``"mse"``, onto the grid that method fits; GPTQ is ``gptq_quantize``). RTN never
    writes into ``w`` (compress hands it the layer's weight itself, possibly the base model's).
    ``second_moment`` [in, in] (method "mse"): E[x xᵀ] of the layer's inputs on calibration text (GPTQ's H/2)."""
    if not config.is_integer:
        raise ValueError(f"quantize_tensor makes integer codes (2–8 bits); bits={config.bits} is a dtype cast")
    w = w.detach().to(torch.float32)
    group_size = _group_size(config, w.shape[1])
    rows = w.reshape(1, -1) if group_size == -1 else w
    fit_on_moment = config.method == "mse" and second_moment is not None and group_size != -1
    moment = _damped(second_moment, config.damp) if fit_on_moment else None
    step = rows.shape[1] if group_size == -1 else group_size
    if config.method == "rtn":
        return _round_groups(rows, config, step, w.shape, group_size)
    codes, scales, zeros = [], [], []
    for cols in _column_groups(rows.shape[1], -1 if group_size == -1 else group_size):
        x = rows[:, cols]
        scale, zero = _fitted_grid(x, config, None if moment is None else moment[cols, cols])
        seed_rule = not config.symmetric and config.grid == "minmax" and config.method == "rtn"
        code = _seed_codes(x, config.bits) if seed_rule else codes_on_grid(x, scale, zero, config.bits)
        codes.append(code), scales.append(scale), zeros.append(zero)
    return QuantizedWeight(torch.cat(codes, 1).reshape(w.shape).to(torch.uint8), torch.cat(scales, 1),
                           torch.cat(zeros, 1), config.bits, group_size)


def _round_groups(rows: torch.Tensor, config: QuantizationConfig, step: int, shape: torch.Size,
                  group_size: int) -> QuantizedWeight:
    """RTN of every group at once, as the rows of one [rows · groups, step] matrix: a grid per row is a grid per
    group and no value depends on another group, so this is the loop over groups with one pass per operation. A
    short last group is filled up with copies of its own last column, which change neither its minimum, maximum
    nor absolute maximum (all an RTN grid reads); their codes are dropped."""
    cols = rows.shape[1]
    short = -cols % step
    filled = rows if not short else torch.cat([rows, rows[:, -1:].expand(-1, short)], 1)
    x = filled.reshape(-1, step)
    scale, zero = _grid(x, config)
    seed_rule = not config.symmetric and config.grid == "minmax"
    code = _seed_codes(x, config.bits) if seed_rule else codes_on_grid(x, scale, zero, config.bits)
    groups = filled.shape[1] // step
    code = code.reshape(rows.shape[0], -1)[:, :cols].to(torch.uint8).contiguous()
    return QuantizedWeight(code.reshape(shape), scale.reshape(rows.shape[0], groups),
                           zero.reshape(rows.shape[0], groups), config.bits, group_size)


def quantize_weight(w: torch.Tensor, config: QuantizationConfig, hessian: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, check=None, select=None) -> QuantizedWeight:
    """The quantizer ``config.method`` names (RTN, HQQ, MSE, GPTQ) on one ``[out, in]`` matrix; pruned weights
    (mask False) stay 0.

    GPTQ needs the layer's Hessian; the caller decides (and says) what runs when it has none. MSE scores its
    candidates on the same Hessian (its [group, group] blocks), or on the plain weight error when it is None.
    ``check()`` (GPTQ) runs between its lazy batches and may raise to cancel within the layer.
    """
    if config.method == "gptq":
        if hessian is None:
            raise ValueError("GPTQ needs the layer's calibration Hessian; none was collected for this layer")
        return gptq_quantize(w, hessian, config, mask, select=select, check=check)
    qw = quantize_tensor(w, config, hessian)
    qw.mask = None if mask is None else mask.to(torch.bool)
    return qw


def requantize(w: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
    """Codes of w on the fixed grid (scales, zeros) of ``like`` — how trained weights return to integers."""
    scales = _expand(like.scales, like.group_size, tuple(w.shape))
    zeros = _expand(like.zeros, like.group_size, tuple(w.shape))
    codes = codes_on_grid(w.detach().to(torch.float32), scales, zeros, like.bits).to(torch.uint8)
    return QuantizedWeight(codes, like.scales, like.zeros, like.bits, like.group_size, like.mask)


def fake_quantize(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """w rounded onto a fixed grid and de-quantized, in w's dtype and device (the forward of the STE)."""
    scales = _expand(scales, group_size, tuple(w.shape))
    zeros = _expand(zeros, group_size, tuple(w.shape))
    return (codes_on_grid(w.float(), scales, zeros, bits) - zeros).mul_(scales).to(w.dtype)


def _cholesky_of_inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, λ = damp · mean(diag H); more damping if H is not positive
    definite. With J the reversal permutation, J(H + λI)J = LLᵀ gives H + λI = (JLJ)(JLJ)ᵀ, so U = J L⁻¹ J: one
    Cholesky and one triangular inverse, a third of the work of inverting H and factoring the inverse."""
    mean_diag = h.diagonal().mean().clamp_min(1e-8)
    for attempt in range(6):
        damped = _reversed(h)
        damped.diagonal().add_(damp * 10 ** attempt * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            return _reversed(_lower_triangular_inverse(factor))
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even with damping; use more calibration text")


def _reversed(m: torch.Tensor) -> torch.Tensor:
    """JMJ, m with rows and columns in reverse order (a copy): the flattened matrix reversed, 5x faster than
    ``flip(0, 1)`` on CPU."""
    return m.reshape(-1).flip(0).reshape(m.shape)


def _lower_triangular_inverse(lower: torch.Tensor) -> torch.Tensor:
    """L⁻¹ by halves, [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹BA⁻¹, C⁻¹]]: matrix products instead of one triangular
    solve against the identity, which does not know its right-hand side is mostly zeros (2.3x faster at 1536)."""
    n = lower.shape[0]
    if n <= 256:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype, device=lower.device), upper=False)
    k = n // 2
    top, bottom = _lower_triangular_inverse(lower[:k, :k]), _lower_triangular_inverse(lower[k:, k:])
    inverse = torch.zeros_like(lower)
    inverse[:k, :k], inverse[k:, k:] = top, bottom
    inverse[k:, :k] = -(bottom @ lower[k:, :k]) @ top
    return inverse


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, config: QuantizationConfig,
                  mask: torch.Tensor | None = None, select=None, check=None) -> QuantizedWeight:
    """GPTQ on one ``[out, in]`` matrix given H = 2XXᵀ/n of its inputs; pruned weights (mask False) stay 0.

    Each column is rounded on its grid, and the rounding error, divided by the Cholesky diagonal, is pushed
    onto the not-yet-quantized columns (exact within a lazy batch, one matrix product for the rest). With
    ``config.gptq_searches_grid`` each group's grid is the MSE search's on the group's block of H, fitted when
    GPTQ reaches the group (on the columns as updated so far), so the updates start from the best grid.
    ``select`` (SparseGPT, sparsegpt.py) picks each lazy batch's keep-mask as it is reached (prune and quantize
    in one pass); ``check()`` is called between lazy batches and may raise to cancel within a layer.
    """
    w = w.detach().to(torch.float32)
    h = hessian.detach().to(torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # inputs never active carry no error signal; their columns are plain RTN
    group_size = _group_size(config, w.shape[1])
    order = torch.argsort(h.diagonal(), descending=True) if config.act_order else None
    # The loop runs on Wᵀ: column j of W is then the contiguous row j, and each step of a column is one vector op.
    columns = _rows_in_order(w.t(), order)
    keep = None if mask is None else _rows_in_order(mask.t().to(torch.float32), order)
    if select is not None and keep is None:
        keep = torch.ones_like(columns)
    moment = _damped(h, config.damp) if config.gptq_searches_grid else None
    lazy = config.granularity == "group" and not config.act_order
    grids = _LazyGrids(columns, config, group_size, moment) if lazy \
        else _FixedGrids(w, config, group_size, order, moment)
    hinv = _cholesky_of_inverse(h if order is None else h[order][:, order], config.damp)
    codes = _ColumnLoop(columns, hinv, config.bits, keep, select, check).run(grids)
    codes = (codes if order is None else codes[torch.argsort(order)]).to(torch.uint8).t().contiguous()
    if select is not None:
        mask = (keep if order is None else keep[torch.argsort(order)]).t().to(torch.bool).contiguous()
    scales, zeros = grids.tables
    return QuantizedWeight(codes, scales.to(torch.float32), zeros.to(torch.float32), config.bits, group_size,
                           None if mask is None else mask.to(torch.bool))


def _rows_in_order(t: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """A contiguous copy of t (never a view of the caller's tensor), its rows in ``order`` (None: as they are)."""
    return t.clone(memory_format=torch.contiguous_format) if order is None else t.index_select(0, order)


def gptq_quantize_rows(weights: list[torch.Tensor], hessian: torch.Tensor, config: QuantizationConfig,
                       masks: list[torch.Tensor] | None = None, check=None, select=None) -> list[QuantizedWeight]:
    """GPTQ on several matrices fed the same inputs (q/k/v, gate/up): one pass over their stacked rows.

    GPTQ treats each output row on its own (its grid, its rounding errors; the shared part, the inverse Hessian,
    depends on the inputs only), so stacking gives each matrix what its own call would — up to the summation
    order of one matrix product — with one column loop instead of one per matrix. Not for per-tensor grids,
    which span every row of one matrix.
    """
    if config.granularity == "tensor":
        raise ValueError("per-tensor grids span a whole matrix: quantize each matrix with gptq_quantize")
    stacked = gptq_quantize(torch.cat(weights), hessian, config, None if masks is None else torch.cat(masks),
                            select=select, check=check)
    out, start = [], 0
    for w in weights:
        rows = slice(start, start + w.shape[0])
        start = rows.stop
        out.append(QuantizedWeight(stacked.codes[rows].clone(), stacked.scales[rows].clone(),
                                   stacked.zeros[rows].clone(), stacked.bits, stacked.group_size,
                                   None if stacked.mask is None else stacked.mask[rows].clone()))
    return out


class _ColumnLoop:
    """GPTQ's sequential part on Wᵀ ``[in, out]`` (column j of W is row j): per column, rounding onto its grid and
    a rank-1 update of the rest of its lazy batch with the rounding error; one matrix product per batch for the
    columns after it. Preallocated buffers and in-place ops throughout, because at these sizes a column costs what
    its tensor ops cost to dispatch (~1–3 µs each), not their arithmetic.

    ``bits=None`` rounds nothing (SparseGPT alone): a column's error is then only its pruned weights, and the
    result holds the updated weights instead of codes. ``select(columns, diagonal, b0, b1)`` gives the keep-mask
    of a lazy batch when it is reached; ``check()`` runs before each batch."""

    def __init__(self, columns: torch.Tensor, hinv: torch.Tensor, bits: int | None, keep: torch.Tensor | None,
                 select=None, check=None):
        self.columns, self.keep, self.select, self.check = columns, keep, select, check
        self.qmax = None if bits is None else _qmax(bits)
        self.diagonal = hinv.diagonal().clone()
        # Row j of the factor over its diagonal: the raw error x − q then updates the later columns as the
        # textbook's (x − q)/d_j does with row j itself (equal up to float rounding), and the division leaves the loop.
        self.hinv = hinv / hinv.diagonal()[:, None]
        self.codes = torch.empty_like(columns)
        self.rounded = torch.empty(columns.shape[1], device=columns.device)
        self.errors = torch.empty(_LAZY_BLOCK, columns.shape[1], device=columns.device)

    def run(self, grids) -> torch.Tensor:
        """The codes ``[in, out]``, float (``bits=None``: the weights); ``grids(j)`` gives column j's
        (scale, zero) as ``[out]`` rows (unused without bits)."""
        n = self.columns.shape[0]
        for b0 in range(0, n, _LAZY_BLOCK):
            if self.check is not None:
                self.check()
            b1 = min(b0 + _LAZY_BLOCK, n)
            if self.select is not None:
                self.keep[b0:b1] = self.select(self.columns[b0:b1], self.diagonal[b0:b1], b0, b1)
            errors = self.errors[: b1 - b0]
            for col, err in zip(range(b0, b1), errors):
                if self.qmax is None:
                    self._pruned_column(col, b1, err)
                else:
                    self._column(col, b1, *grids(col), err)
            self.columns[b1:].addmm_(self.hinv[b0:b1, b1:].t(), errors, alpha=-1)
        return self.codes

    def _column(self, col: int, b1: int, scale: torch.Tensor, zero: torch.Tensor, err: torch.Tensor) -> None:
        x, code, q = self.columns[col], self.codes[col], self.rounded
        torch.addcdiv(zero, x, scale, out=code).round_().clamp_(0, self.qmax)  # x / scale + zero, rounded
        torch.sub(code, zero, out=q)
        if self.keep is not None:  # without a mask every weight is kept (× 1 changes nothing)
            q.mul_(self.keep[col])
        torch.addcmul(x, q, scale, value=-1, out=err)  # x − (code − zero) · scale: the rounding error
        self.columns[col + 1:b1].addr_(self.hinv[col, col + 1:b1], err, alpha=-1)

    def _pruned_column(self, col: int, b1: int, err: torch.Tensor) -> None:
        x, kept = self.columns[col], self.codes[col]
        torch.mul(x, self.keep[col], out=kept)
        torch.sub(x, kept, out=err)  # the pruned weights, the only error
        self.columns[col + 1:b1].addr_(self.hinv[col, col + 1:b1], err, alpha=-1)


class _LazyGrids:
    """Per-group grids without act-order: fitted when a group's first column is reached, on the columns as GPTQ has
    updated them so far (the lazy batch and the group size divide one another, so those columns are current).
    ``moment`` (damped H, or None): the grid is searched on the group's block of it (the MSE grid)."""

    def __init__(self, columns: torch.Tensor, config: QuantizationConfig, group_size: int,
                 moment: torch.Tensor | None = None):
        self.columns, self.config, self.group_size, self.moment = columns, config, group_size, moment
        self.scales, self.zeros = [], []

    def __call__(self, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        if col % self.group_size == 0:
            cols = slice(col, col + self.group_size)
            scale, zero = _group_grid(self.columns[cols].t(), self.config, self.moment, cols)
            self.scales.append(scale[:, 0].contiguous()), self.zeros.append(zero[:, 0].contiguous())
        return self.scales[-1], self.zeros[-1]

    @property
    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack(self.scales, 1), torch.stack(self.zeros, 1)


def _group_grid(x: torch.Tensor, config: QuantizationConfig, moment: torch.Tensor | None,
                cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's grid for GPTQ: searched on its block of the damped Hessian when given, else the config's."""
    if moment is None:
        return _grid(x, config)
    return mse_grid(x, config.bits, moment[cols, cols])


class _FixedGrids:
    """Grids computed once from the unquantized matrix: per-tensor, per-channel, or per-group with act-order
    (groups stay contiguous in the original column order, whatever order the columns are quantized in).
    ``moment``: the damped H in the original column order, to search per-group grids on."""

    def __init__(self, w: torch.Tensor, config: QuantizationConfig, group_size: int, order: torch.Tensor | None,
                 moment: torch.Tensor | None = None):
        rows = w.reshape(1, -1) if group_size == -1 else w
        parts = [_group_grid(rows[:, c], config, moment, c) for c in _column_groups(rows.shape[1], group_size)]
        self.tables = (torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1))
        scale_rows, zero_rows = (t.t().contiguous() for t in self.tables)  # [n_groups, out]: one row per group
        original = torch.arange(w.shape[1]) if order is None else order  # the original index of each column
        groups = [0] * w.shape[1] if group_size == -1 else (original // group_size).tolist()
        self._by_column = [(scale_rows[g], zero_rows[g]) for g in groups]

    def __call__(self, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._by_column[col]


# ---- whole-model transforms (used by compress.py) ----------------------------------------------------------

def cast_half_(model: nn.Module, dtype16: str) -> None:
    """bits=16: cast the whole model, so the forward really runs in half precision (real bf16/fp16 kernels)."""
    model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype16])


def half_round_trip(w: torch.Tensor, dtype16: str) -> torch.Tensor:
    """The value w takes after a cast to bf16/fp16 (the 16-bit 'fake quantization' used while distilling)."""
    return w.to({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype16]).to(w.dtype)
