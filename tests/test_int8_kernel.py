"""The int8 kernel path: SmoothQuant smoothing beats plain int8 on outlier channels, and the SQNR floor keeps layers fp32."""
import torch
from torch import nn

from lmcompress_core.runtime.int8_dynamic import (SmoothedInt8Linear, int8_linear, output_sqnr_db, smoothing_factors,
                                                  to_int8_kernel_)

torch.set_num_threads(2)


def outlier_inputs(n=256, features=64, channel=5, factor=100.0, seed=0):
    """Inputs whose one channel is `factor` times larger than the rest (what LLM activations look like)."""
    x = torch.randn(n, features, generator=torch.Generator().manual_seed(seed))
    x[:, channel] *= factor
    return x


def random_linear(features=64, out=48, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(features, out)


def test_smoothing_raises_int8_output_sqnr_on_an_outlier_channel():
    x, layer = outlier_inputs(), random_linear()
    absmax = x.abs().amax(dim=0)
    plain = output_sqnr_db(layer, int8_linear(layer), x)
    smoothed = output_sqnr_db(layer, int8_linear(layer, smoothing_factors(absmax, layer.weight, 0.5)), x)
    # per-tensor activation scales spend ~7 bits on the outlier: the 63 other channels round to a few levels
    assert plain < 25, plain
    assert smoothed >= 33 and smoothed >= plain + 10, (plain, smoothed)


def test_smoothing_is_the_identity_in_float():
    x, layer = outlier_inputs(), random_linear()
    s = smoothing_factors(x.abs().amax(dim=0), layer.weight, 0.5)
    smoothed = nn.Linear(64, 48)
    with torch.no_grad():
        smoothed.weight.copy_(layer.weight * s)
        smoothed.bias.copy_(layer.bias)
        torch.testing.assert_close(smoothed(x / s), layer(x), rtol=1e-5, atol=1e-4)
    assert s[5] > 5 * s.median()  # the outlier channel is the one divided down


def test_smoothing_factors_stay_finite_on_dead_channels_and_alpha_zero_is_off():
    w = torch.randn(8, 4)
    w[:, 2] = 0
    s = smoothing_factors(torch.tensor([0.0, 1.0, 3.0, 1e9]), w, 0.5)
    assert torch.isfinite(s).all() and (s > 0).all() and s[0] == 1 and s[2] == 1
    assert torch.allclose(smoothing_factors(torch.rand(4) + 0.5, torch.ones(8, 4), 0.0), torch.ones(4))


def test_int8_kernel_with_calibration_smooths_and_keeps_hopeless_layers_float():
    from lmcompress_core.models.loading import tiny_random_model

    model = tiny_random_model("llama").model.eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    ids = torch.randint(model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    reference = model(input_ids=ids).logits
    kept = to_int8_kernel_(model, names, ids, smooth_alpha=0.5, sqnr_floor_db=0.0)
    assert kept == [] and all(isinstance(model.get_submodule(n), SmoothedInt8Linear) for n in names)
    logits = model(input_ids=ids).logits
    assert (logits - reference).norm() / reference.norm() < 0.05
    assert to_int8_kernel_(tiny_random_model("llama").model.eval(), names, ids, 0.5, sqnr_floor_db=60) == names
