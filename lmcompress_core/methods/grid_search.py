"""MSE grid: each group's scale and integer zero-point searched to minimise the layer's output error.

Round-to-nearest takes the min-max grid as given; one outlier then stretches the step for the whole group. This
quantizer searches the grid instead (the clipping search of AWQ's ``auto_clip``, llama.cpp's ``make_qkx2_quants``
and GPTQ's ``mse`` option, written here for our integer-zero grid and scored on the layer output):

    minimise  δᵀ H_g δ  over s and integer z,   δ = s·(q − z) − w,   q = clamp(round(w / s + z), 0, 2^bits − 1)

for each output row and group g, with H_g = E[x_g x_gᵀ] the second moment of the group's inputs on calibration
text, so δᵀ H_g δ is the mean squared error the group adds to that output (GPTQ's Hessian, the block of the
group). The full block matters: activations have non-zero means and correlated channels, so errors of one sign
add up along the dot product; weighting by the diagonal alone (E[x_j²]) left the output error of a real layer of
the tiny model at 0.92 of RTN's at int3 g64 and 1.09 at int2 g32, the block brings both to 0.56. Without
calibration H = I and the plain weight error is minimised.

The search tries the range [min(w, 0), max(w, 0)] scaled by each factor in ``SHRINKS`` (112% to 52%) with the
zero-point rounded and moved by ±1 code, keeps the best per row, then refits the scale by least squares on the
fixed codes (closed form: s = dᵀH_g w / dᵀH_g d, d = q − z) and re-rounds, keeping only improvements. Scales stay
bfloat16 values (which float16 holds) and zero-points integer codes, so the packed format is the one RTN writes;
RTN's grid (factor 1, shift 0) is one of the candidates, so the error is never above RTN's. Cost: one
[rows, g] × [g, g] product per candidate (48) and group.
"""
from __future__ import annotations

import torch

from lmcompress_core.methods.hqq import exact_scale

SHRINKS = tuple(round(1.12 - 0.04 * i, 2) for i in range(16))   # range kept: 112% down to 52% (100% = RTN)
ZERO_SHIFTS = (-1, 0, 1)                             # zero-point candidates around the rounded one, in codes
REFITS = 3                                           # least-squares scale refits after the search


def _output_error(x: torch.Tensor, h: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor,
                  qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(δᵀHδ per row, codes) for x rounded onto the grid (scale, zero); H None = identity."""
    codes = torch.round(x / scale + zero).clamp_(0, qmax)
    delta = (codes - zero).mul_(scale).sub_(x)
    weighted = delta if h is None else delta @ h
    return (weighted * delta).sum(dim=1, keepdim=True), codes


def _refit_scale(x, h, scale, zero, codes):
    """The 16-bit scale minimising (s·d − x)ᵀH(s·d − x) for fixed codes (d = q − z); unchanged where undefined."""
    d = codes - zero
    hd = d if h is None else d @ h
    denominator = (hd * d).sum(dim=1, keepdim=True)
    fitted = (hd * x).sum(dim=1, keepdim=True) / denominator.clamp_min(1e-30)
    return torch.where((denominator > 0) & (fitted > 0), exact_scale(fitted), scale)


def mse_grid(x: torch.Tensor, bits: int,
             second_moment: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of x [rows, cols], in code units (x ≈ (code − zero) · scale), searched to minimise
    the output error δᵀHδ; ``second_moment`` H [cols, cols] is E[x xᵀ] of the group's inputs (None: identity)."""
    x = x.to(torch.float32)
    h = None if second_moment is None else second_moment.to(device=x.device, dtype=torch.float32)
    qmax = 2 ** bits - 1
    lo, hi = x.amin(dim=1, keepdim=True).clamp(max=0), x.amax(dim=1, keepdim=True).clamp(min=0)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))   # an all-zero row: any scale reproduces it
    shrinks = torch.tensor(SHRINKS, dtype=torch.float32, device=x.device)
    scales = exact_scale(span * shrinks / qmax).t().unsqueeze(2)   # [shrinks, rows, 1]: every candidate step at once
    minus_x, best_scale, best_zero, best_error = -x, None, None, None
    for i, shrink in enumerate(SHRINKS):
        scale = scales[i].contiguous()   # a column of [rows, shrinks]: a few % faster passes here when contiguous
        steps = x / scale                                        # shared by the zero-point candidates
        rounded_zero = torch.round(-lo * shrink / scale)
        for shift in ZERO_SHIFTS:
            zero = (rounded_zero + shift).clamp_(0, qmax)
            error = _candidate_error(minus_x, h, steps, scale, zero, qmax)
            if best_error is None:
                best_scale, best_zero, best_error = scale, zero, error
                continue
            better = error < best_error
            best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
            best_error = torch.where(better, error, best_error)
    return _refined(x, h, best_scale, best_zero, best_error, qmax)


def _candidate_error(minus_x, h, steps, scale, zero, qmax) -> torch.Tensor:
    """δᵀHδ per row for x (= −minus_x = steps · scale) rounded onto (scale, zero): ``_output_error``'s value, with
    the same rounding (ties included: de-quantized GGUF weights sit on half steps), in fewer passes over the group."""
    codes = torch.add(steps, zero).round_().clamp_(0, qmax).sub_(zero)
    delta = torch.addcmul(minus_x, codes, scale)
    return torch.linalg.vecdot(delta if h is None else delta @ h, delta).unsqueeze(1)


def _refined(x, h, scale, zero, error, qmax):
    """Alternate a least-squares scale for the current codes with re-rounding; keep a row's change only if it helps."""
    _, codes = _output_error(x, h, scale, zero, qmax)
    for _ in range(REFITS):
        fitted = _refit_scale(x, h, scale, zero, codes)
        new_error, new_codes = _output_error(x, h, fitted, zero, qmax)
        better = new_error < error
        scale, error = torch.where(better, fitted, scale), torch.where(better, new_error, error)
        codes = torch.where(better, new_codes, codes)
    return scale, zero
