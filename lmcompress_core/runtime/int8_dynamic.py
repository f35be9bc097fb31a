"""The real int8 kernel path: 8-bit layers run on torch's dynamic int8 Linear, smoothed and checked first.

torch's dynamic int8 Linear stores weights as int8 per output channel but quantizes its input per tensor at run
time (one scale per batch), so one outlier activation channel costs every other channel its resolution.
With calibration text, each layer is first smoothed as in SmoothQuant: inputs are divided by per-channel factors
s and the weight columns multiplied by s, which is the identity in float and moves the activation outliers into
the weights, where the per-channel int8 scales absorb them. A layer whose int8 output SQNR on calibration inputs
still stays below a floor keeps running in fp32 (its weights stay 8-bit fake-quantized), so the worst layers do
not spoil the model. ``compress.py`` calls :func:`to_int8_kernel_` last; ``packing.py`` rebuilds the same layers.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear


def to_int8_kernel_(model: nn.Module, names, calibration: torch.Tensor | None = None, smooth_alpha: float = 0.0,
                    sqnr_floor_db: float = 0.0, check=None) -> list[str]:
    """Run the named layers with torch's dynamic int8 kernel (int8 weights per channel, activations per batch).

    torch.ao.quantization is deprecated but present in torch 2.13 and, on CPU, far faster than fp32 for
    linear layers; its deprecation warnings are silenced here only. Conv1D layers become nn.Linear first.
    With ``calibration`` token ids, each layer is first smoothed (``smooth_alpha`` > 0, see :func:`smoothing_factors`)
    and then layers whose int8 output SQNR on the calibration inputs stays below ``sqnr_floor_db`` are left in
    float. Returns the names left in float.
    """
    from lmcompress_core.methods.layers import conv1d_to_linear_

    names = list(names)
    conv1d_to_linear_(model, names)
    if calibration is None:
        for name in names:
            model.set_submodule(name, int8_linear(model.get_submodule(name)))
        return []
    inputs = int8_calibration_inputs(model, names, calibration, check)
    kept_float = []
    for name in names:
        layer = model.get_submodule(name)
        absmax, rows = inputs[name]
        smooth = smoothing_factors(absmax, layer.weight, smooth_alpha) if smooth_alpha > 0 else None
        int8 = int8_linear(layer, smooth)
        if output_sqnr_db(layer, int8, rows) < sqnr_floor_db:
            kept_float.append(name)  # still too lossy after smoothing: the fp32 layer stays
        else:
            model.set_submodule(name, int8)
    return kept_float


class SmoothedInt8Linear(DynamicInt8Linear):
    """torch's dynamic int8 Linear on x / s with weight columns scaled by s (SmoothQuant): in float the identity.

    The kernel quantizes its input per tensor at run time, so one outlier channel ruins every other channel's
    resolution; dividing inputs by s_j and multiplying weight column j by s_j moves that range into the weights,
    whose int8 scales are per output channel. Subclassing keeps the module a torch dynamic int8 Linear (same
    name, weight(), bias()), so size measurement and packing see it as one.
    """

    def __init__(self, linear: nn.Linear, smooth: torch.Tensor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's quantized-tensor deprecation notice, as in _plain_int8_linear
            super().__init__(linear.in_features, linear.out_features, bias_=linear.bias is not None,
                             dtype=torch.qint8)
        # plain attributes, like the kernel's own scale: not buffers, so the float architecture the packed format
        # rebuilds from never meets one it lacks; ``smooth`` itself is kept because packing stores it (1/(1/s) != s)
        self.smooth = smooth.detach().to(torch.float32)
        self.inverse_smooth = 1.0 / self.smooth
        scaled = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            scaled.weight.copy_(linear.weight.detach().float() * smooth)
            if linear.bias is not None:
                scaled.bias.copy_(linear.bias.detach().float())
        packed = _plain_int8_linear(scaled)
        self.set_weight_bias(packed.weight(), packed.bias())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.inverse_smooth)

    def _get_name(self):
        return "SmoothedDynamicQuantizedLinear"


def _plain_int8_linear(linear: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig

        linear.qconfig = per_channel_dynamic_qconfig
        try:
            return DynamicInt8Linear.from_float(linear)
        finally:
            del linear.qconfig


def int8_linear(linear: nn.Linear, smooth: torch.Tensor | None = None) -> nn.Module:
    """A torch dynamic int8 copy of a float nn.Linear (per-channel int8 weights), smoothed when ``smooth`` is given."""
    return _plain_int8_linear(linear) if smooth is None else SmoothedInt8Linear(linear, smooth)


_SMOOTH_RANGE = (1e-4, 1e4)  # clamp on s: a dead channel (max|X_j| = 0) or a zero column must not give 0 or inf


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max|W_:,j|^(1−α) per input channel j of an ``[out, in]`` weight.

    α = 0.5 splits each channel's range evenly between activations and weights; channels with no activation or
    no weight keep s = 1.
    """
    w_absmax = weight.detach().abs().amax(dim=0).float()
    a = act_absmax.float()
    s = a.clamp_min(1e-8).pow(alpha) / w_absmax.clamp_min(1e-8).pow(1 - alpha)
    s = torch.where((a > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s.clamp(*_SMOOTH_RANGE)


_SAMPLE_SEQUENCES = 2  # calibration sequences whose whole inputs are kept per layer to measure its int8 output SQNR


@torch.no_grad()
def int8_calibration_inputs(model: nn.Module, names, calibration: torch.Tensor, check=None, batch_size: int = 4):
    """{name: (per-input-channel max|x| over all calibration tokens, the inputs of the first two sequences)}.

    Whole sequences, not sampled rows: the kernel's per-tensor activation range is set by a sequence's largest
    value (often one token, such as the first), and the SQNR check must see that range as inference will.
    """
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().float()
            absmax, sample = found.get(name, (torch.zeros(x.shape[-1]), x[:_SAMPLE_SEQUENCES].clone()))
            found[name] = (torch.maximum(absmax, x.reshape(-1, x.shape[-1]).abs().amax(dim=0)), sample)
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for start in range(0, calibration.shape[0], batch_size):
            if check is not None:
                check()
            model(input_ids=calibration[start:start + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found


@torch.no_grad()
def output_sqnr_db(reference: nn.Module, approx: nn.Module, x: torch.Tensor) -> float:
    """10·log10(‖y‖² / ‖y − ŷ‖²) of two layers' outputs on the same inputs (inf: identical)."""
    y, y_hat = reference(x), approx(x)
    noise = (y - y_hat).pow(2).mean()
    return float("inf") if noise == 0 else (10 * torch.log10(y.pow(2).mean() / noise)).item()
