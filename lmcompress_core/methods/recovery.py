"""What recovery distillation trains, and how the trained copy returns to exactly its compressed form.

Each compressed layer gets a parametrization for the length of training, so the forward always sees a weight the
compressed model can hold, and what is trained depends on what the layer holds:

* quantized layer, ``trains="grid"`` (default): its integer codes are frozen and its per-group scales train,
  as a log gain so one learning rate fits every layer (EfficientQAT's end-to-end step of training the
  quantization parameters only). The trained layer holds the same codes on the trained grid: same bits, same
  bytes, pruned weights still 0.
* quantized layer, ``trains="codes"``: the scales train as above and each weight's position on the grid trains too,
  in code units, straight through the rounding (STE), from where the float weight lies (its code plus the
  rounding residual, within ±0.49 so training starts at exactly the compressed model): a weight a tenth of a
  step from its rounding boundary flips after a few steps, one on a grid point does not. The trained layer
  holds the rounded positions as its codes on the trained grid: same bits, same bytes. Measured here, 40 steps:
  tiny model, 2-bit RTN g128: 0.67 of the lost perplexity recovered at code_lr 1e-3 (0.78 at 1e-2) against 0.36
  for the scales alone; SmolLM2, 2-bit MSE g64: 0.69 at 1e-3 (127.0 → 43.6, 250 s with the compression). At 1e-2
  SmolLM2 did worse than the scales alone (make bench of 1008a05, 45 steps: 3-bit RTN g64 0.11 against 0.63;
  2-bit MSE g64 127 → 512): too many codes flip at once in 30 blocks. At 1e-3, 55 steps, make bench: 2-bit MSE g64
  0.71 against 0.69 for the scales alone (320 s against 288 s with the compression); one run here before the
  scales became bf16 values, 3-bit RTN g64: 0.66 against 0.63. Opt-in: a small gain for the time.
* quantized layer, ``trains="weights"``: a float "latent" weight trains straight through the rounding (STE) on
  the fixed grid and is re-quantized at the end. A weight starts on a grid point and must move half a step
  (≈ 0.01 at 3 bits) before its code changes: at lr 1e-4 nothing changes for ~100 steps, at 1e-3 the flips
  are noisy. Kept to show why the grid is what trains.
* pruned-only layer: its kept weights train; the forward multiplies by the keep-mask, so pruned weights
  stay exactly 0.
* 16-bit layer: the weight trains through the bf16/fp16 round trip (STE).

With ``vectors=True`` every 1-D parameter (norm gains, biases) trains too: they are stored float whatever the
compression, so training them costs no size. Embeddings and the LM head stay the teacher's.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from lmcompress_core.methods.hqq import exact_scale
from lmcompress_core.methods.quantize import QuantizedWeight, _expand, fake_quantize, half_round_trip, requantize
from lmcompress_core.runtime.modules import CompressedEmbedding, CompressedLinear


ROUNDING_MARGIN = 0.49   # a position starts at most this far from its code (in steps): round() gives the code back


class _OnGrid(nn.Module):
    """Parametrization: the weight is (codes − zeros) · scales · e^gain, the codes frozen; only the gain trains."""

    def __init__(self, qw: QuantizedWeight):
        super().__init__()
        self.bits, self.group_size, self.shape = qw.bits, qw.group_size, qw.shape
        self.register_buffer("codes", qw.codes.clone())
        self.register_buffer("zeros", qw.zeros.float().clone())
        self.register_buffer("scales", qw.scales.float().clone())
        self.register_buffer("mask", None if qw.mask is None else qw.mask.clone())
        centred = qw.codes.float() - _expand(self.zeros, self.group_size, self.shape)
        self.register_buffer("centred", centred if qw.mask is None else centred * qw.mask)
        self.log_gain = nn.Parameter(torch.zeros_like(self.scales))
        # RTN/HQQ/MSE scales are exact 16-bit values (hqq.exact_scale): trained ones stay such values
        self.exact_scales = torch.equal(exact_scale(self.scales), self.scales)

    def trained_scales(self) -> torch.Tensor:
        scales = self.scales * self.log_gain.exp()
        if self.exact_scales:  # rounded to a 16-bit value in the forward, gradients straight through
            scales = scales + (exact_scale(scales) - scales).detach()
        return scales

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.centred * _expand(self.trained_scales(), self.group_size, self.shape)

    def trained(self) -> QuantizedWeight:
        scales = self.trained_scales().detach().contiguous()
        return QuantizedWeight(self.codes, scales, self.zeros, self.bits, self.group_size, self.mask)


class _Movable(_OnGrid):
    """Parametrization: the weight is (round(p) − zeros) · scales · e^gain; positions p and the gain train."""

    def __init__(self, qw: QuantizedWeight, float_weight: torch.Tensor | None):
        super().__init__(qw)
        self.centred = None   # the frozen codes' product: these codes move (a float [out, in] not held)
        self.qmax = 2 ** qw.bits - 1
        start = qw.codes.float()
        if float_weight is not None:   # the float weight's own position, a rounding away from its code
            scales = _expand(self.scales, self.group_size, self.shape)
            exact = float_weight.float() / scales + _expand(self.zeros, self.group_size, self.shape)
            start = start + (exact - start).clamp(-ROUNDING_MARGIN, ROUNDING_MARGIN).nan_to_num_(0.0)
        self.position = nn.Parameter(start.clamp_(0, self.qmax))

    def trained_codes(self) -> torch.Tensor:
        p = self.position   # rounded and kept on the grid in the forward; the gradient passes both unchanged
        return p + (p.clamp(0, self.qmax).round() - p).detach()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        centred = self.trained_codes() - _expand(self.zeros, self.group_size, self.shape)
        weight = centred * _expand(self.trained_scales(), self.group_size, self.shape)
        return weight if self.mask is None else weight * self.mask

    def trained(self) -> QuantizedWeight:
        codes = self.trained_codes().detach().to(torch.uint8)
        return QuantizedWeight(codes, self.trained_scales().detach().contiguous(), self.zeros, self.bits,
                               self.group_size, self.mask)


class _Straight(nn.Module):
    """Parametrization: the forward sees quantize(w)·mask (or w's 16-bit round trip), gradients reach w (STE)."""

    def __init__(self, quantized: QuantizedWeight | None, mask: torch.Tensor | None, half: str | None,
                 transpose: bool):
        super().__init__()
        self.half, self.transpose = half, transpose
        self.grid = None if quantized is None else (quantized.bits, quantized.group_size)
        self.register_buffer("scales", None if quantized is None else quantized.scales.clone())
        self.register_buffer("zeros", None if quantized is None else quantized.zeros.clone())
        self.register_buffer("mask", None if mask is None else mask.to(torch.float32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        m = w.t() if self.transpose else w
        if self.grid is not None:
            m = m + (fake_quantize(m, self.scales, self.zeros, *self.grid) - m).detach()
        elif self.half is not None:
            m = m + (half_round_trip(m, self.half) - m).detach()
        if self.mask is not None:
            m = m * self.mask
        return m.t() if self.transpose else m


def attach_(model: nn.Module, layers: dict[str, nn.Module], half: str | None, trains: str,
            vectors: bool, check=None, float_weights=None) -> dict[str, nn.Module]:
    """Freeze ``model``, then make trainable what recovery trains in ``layers``; returns the parametrized layers.
    ``check()`` (optional) before each layer may raise to cancel (a registration evaluates the constraint once).
    ``float_weights(name)`` (optional, ``trains="codes"``): the layer's float weight [out, in] or None, where its
    positions start."""
    for p in model.parameters():
        p.requires_grad_(False)
    attached = {}
    for name, m in layers.items():
        if check is not None:
            check()
        held = isinstance(m, (CompressedLinear, CompressedEmbedding))
        qw, mask = (m.quantized_weight(), m.keep_mask()) if held else (None, None)
        if qw is not None and trains == "codes":
            constraint = _Movable(qw, None if float_weights is None else float_weights(name))
        elif qw is not None and trains == "grid":
            constraint = _OnGrid(qw)
        elif qw is not None or mask is not None or half is not None:
            constraint = _Straight(qw, mask, half, isinstance(m, Conv1D))
            m.weight.requires_grad_(True)
        else:
            m.weight.requires_grad_(True)  # a chosen layer left float (mixed precision): it trains as it is
            continue
        parametrize.register_parametrization(m, "weight", constraint)
        attached[name] = m
    if vectors:
        for p in model.parameters():
            if p.dim() == 1:
                p.requires_grad_(True)
    return attached


def detach_(model: nn.Module, attached: dict[str, nn.Module]) -> None:
    """Remove the parametrizations: every layer holds its trained weight in its compressed form again."""
    for m in attached.values():
        constraint = m.parametrizations.weight[0]
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        if isinstance(constraint, _OnGrid):   # (and _Movable)
            m.set_quantized_(constraint.trained())
        elif isinstance(m, (CompressedLinear, CompressedEmbedding)) and m.quantized_weight() is not None:
            m.set_quantized_(requantize(m.weight.detach().float(), m.quantized_weight()))
    for p in model.parameters():
        p.requires_grad_(True)
