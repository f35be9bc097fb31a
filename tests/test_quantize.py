"""Quantization: config validation, both asymmetric grids against references, SQNR floors, GPTQ and HQQ beat RTN,
per-layer bit-widths.

The int8 kernel path (smoothing, the SQNR safety net) is tested in test_int8_kernel.py."""
import numpy as np
import pytest
import torch

from lmcompress_core.compress import CompressionConfig
from lmcompress_core.methods.quantize import (QuantizationConfig, QuantizedWeight, gptq_quantize, grid_parameters,
                                              quantize_tensor, requantize)

torch.set_num_threads(2)


def sqnr_db(w: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * torch.log10(w.pow(2).mean() / (w - approx).pow(2).mean()).item()


@pytest.mark.parametrize("kwargs, words", [
    ({"bits": 7}, "bits must be one of 2, 3, 4, 5, 6, 8 or 16"),
    ({"bits": 1}, "bits must be one of"),
    ({"bits": 32}, "bits must be one of"),
    ({"bits": True}, "bits must be one of"),
    ({"granularity": "row"}, "granularity must be one of"),
    ({"group_size": 100}, "group_size must be 32, 64 or 128"),
    ({"method": "awq"}, "method must be one of"),
    ({"grid": "fractional"}, "grid must be one of"),
    ({"layer_bits": "down_proj"}, "layer_bits must be a sequence"),
    ({"layer_bits": (("down_proj", 7),)}, "layer_bits for 'down_proj' must be one of"),
    ({"layer_bits": (("(", 8),)}, "not a valid regular expression"),
    ({"layer_bits": (("down_proj",),)}, r"\(regex, bits\) pair"),
    ({"bits": 16, "layer_bits": (("down_proj", 8),)}, "needs integer base bits"),
    ({"bits": 8, "layer_bits": (("down_proj", 4),)}, "int8_kernel=False"),
    ({"damp": 0}, "damp"),
    ({"dtype16": "fp8"}, "dtype16 must be one of"),
])
def test_bad_config_is_refused_with_a_message(kwargs, words):
    with pytest.raises(ValueError, match=words):
        QuantizationConfig(**kwargs)


def test_group_size_is_free_when_not_grouping():
    assert QuantizationConfig(granularity="channel", group_size=100).group_size == 100


@pytest.mark.parametrize("kwargs", [{"smooth_alpha": -0.1}, {"smooth_alpha": 1.5}, {"smooth_alpha": True},
                                    {"int8_sqnr_floor_db": -1}, {"int8_sqnr_floor_db": "20"}])
def test_bad_int8_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        QuantizationConfig(**kwargs)


# 96 inputs: three groups of 32; 80: the last group is 16 wide (SmolLM2's 576 at groups of 128 end in 64)
@pytest.mark.parametrize("bits, width", [(2, 96), (3, 96), (4, 96), (8, 96), (3, 80), (5, 80)])
def test_seed_formula_matches_an_independent_reference(bits, width):
    w = torch.randn(16, width, generator=torch.Generator().manual_seed(bits))
    qw = quantize_tensor(w, QuantizationConfig(bits=bits, granularity="group", group_size=32, grid="minmax"))
    x = w.numpy().astype(np.float32)
    q_min, q_max = np.float32(0), np.float32(2 ** bits - 1)
    assert qw.codes.is_contiguous() and qw.scales.shape == (16, -(-width // 32))
    for cols in (slice(s, s + 32) for s in range(0, width, 32)):
        block = x[:, cols]
        for r in range(16):
            lo, hi = block[r].min(), block[r].max()
            ref = np.round((block[r] - lo) / (hi - lo) * (q_max - q_min) + q_min)
            np.testing.assert_array_equal(qw.codes[r, cols].numpy(), ref.astype(np.uint8))
            dequant = lo + ref * (hi - lo) / (q_max - q_min)
            np.testing.assert_allclose(qw.dequantize()[r, cols].numpy(), dequant, atol=1e-6)


def _bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even) by their bits: the top 16 of each 32."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("bits, width", [(2, 96), (3, 96), (4, 96), (8, 96), (4, 80), (6, 80)])
def test_integer_zero_grid_matches_an_independent_reference(bits, width):
    w = torch.randn(16, width, generator=torch.Generator().manual_seed(bits))
    w[:4] = w[:4].abs() + 0.5  # rows of one sign: the range must still be widened to include 0
    qw = quantize_tensor(w, QuantizationConfig(bits=bits, granularity="group", group_size=32))
    x, q_max = w.numpy().astype(np.float32), 2 ** bits - 1
    assert qw.codes.is_contiguous() and qw.scales.shape == (16, -(-width // 32))
    for cols in (slice(s, s + 32) for s in range(0, width, 32)):
        block = x[:, cols]
        lo, hi = np.minimum(block.min(1, keepdims=True), 0), np.maximum(block.max(1, keepdims=True), 0)
        scale = _bfloat16(((hi - lo) / q_max).astype(np.float32))
        zero = np.clip(np.round(-lo / scale), 0, q_max)
        ref = np.clip(np.round(block / scale) + zero, 0, q_max)
        np.testing.assert_array_equal(qw.codes[:, cols].numpy(), ref.astype(np.uint8))
        np.testing.assert_allclose(qw.dequantize()[:, cols].numpy(), (ref - zero) * scale, atol=1e-6)
    assert torch.equal(qw.zeros, qw.zeros.round())


# (rows, width, group_size, scales shape): whole groups, a short last group, one short group, channel, tensor
@pytest.mark.parametrize("rows, width, group, grid", [(8, 96, 32, (8, 3)), (8, 80, 32, (8, 3)), (8, 20, 32, (8, 1)),
                                                      (8, 96, 96, (8, 1)), (8, 96, -1, (1, 1))])
@pytest.mark.parametrize("masked", [False, True])
def test_dequantize_is_the_per_weight_formula_bit_for_bit(rows, width, group, grid, masked):
    gen = torch.Generator().manual_seed(width + group)
    codes = torch.randint(0, 16, (rows, width), generator=gen, dtype=torch.uint8)
    scales, zeros = torch.rand(grid, generator=gen) * 0.1, torch.rand(grid, generator=gen) * 15
    mask = torch.rand(rows, width, generator=gen) > 0.3 if masked else None
    got = QuantizedWeight(codes, scales, zeros, 4, group, mask).dequantize()
    # reference: each weight's own group index spelled out, in float32 like the formula
    index = torch.zeros(width, dtype=torch.long) if group == -1 else torch.arange(width) // group
    per_weight = (lambda t: t.expand(rows, width) if group == -1 else t[:, index])
    expected = (codes.float() - per_weight(zeros)) * per_weight(scales)
    if masked:
        expected = expected * mask
    assert got.is_contiguous() and torch.equal(got, expected)
    assert torch.equal(torch.signbit(got), torch.signbit(expected))   # even the sign of each zero
    bf16 = QuantizedWeight(codes, scales, zeros, 4, group, mask).dequantize(torch.bfloat16)   # rounded as stored
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.view(torch.int16), expected.bfloat16().view(torch.int16))


def test_zero_is_exactly_on_the_integer_zero_grid_only():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    w[:, ::3] = 0
    exact = quantize_tensor(w, QuantizationConfig(bits=3, group_size=32)).dequantize()
    assert torch.all(exact[:, ::3] == 0)
    seed = quantize_tensor(w, QuantizationConfig(bits=3, group_size=32, grid="minmax")).dequantize()
    assert (seed[:, ::3] != 0).float().mean() > 0.5  # the seed's fractional zero-point misses 0


def test_grid_parameters_is_what_quantize_tensor_uses():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    for grid in ("integer-zero", "minmax"):
        qw = quantize_tensor(w, QuantizationConfig(bits=4, granularity="channel", grid=grid))
        scale, zero = grid_parameters(w, 4, grid)
        assert torch.allclose(qw.scales, scale) and torch.allclose(qw.zeros, zero)


# Floors calibrated to what min-max RTN achieves on N(0, 1) rows of 1024 (torchao's 44 − (8 − b)·6.02 dB rule
# shifted down: a 1024-wide row spans about ±3.3σ, costing ~2 dB at 8 bits and a little more at 2 bits).
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("symmetric, floor_at_8", [(False, 39.5), (True, 36.5)])
def test_per_channel_sqnr_floor(bits, symmetric, floor_at_8):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    qw = quantize_tensor(w, QuantizationConfig(bits=bits, granularity="channel", symmetric=symmetric))
    assert sqnr_db(w, qw.dequantize()) >= floor_at_8 - (8 - bits) * 6.02


def test_finer_granularity_is_more_accurate():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    errors = [sqnr_db(w, quantize_tensor(w, QuantizationConfig(bits=4, **kw)).dequantize())
              for kw in ({"granularity": "tensor"}, {"granularity": "channel"}, {"group_size": 128}, {"group_size": 32})]
    assert errors == sorted(errors)


@pytest.mark.parametrize("granularity, group_size, scale_shape", [
    ("tensor", 128, (1, 1)), ("channel", 128, (24, 1)), ("group", 64, (24, 4)), ("group", 128, (24, 2))])
def test_representation_shapes_and_codes(granularity, group_size, scale_shape):
    w = torch.randn(24, 256)
    qw = quantize_tensor(w, QuantizationConfig(bits=3, granularity=granularity, group_size=group_size))
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (24, 256)
    assert int(qw.codes.max()) <= 7
    assert tuple(qw.scales.shape) == scale_shape == tuple(qw.zeros.shape)
    assert qw.group_size == {"tensor": -1, "channel": 256, "group": group_size}[granularity]


def test_symmetric_zero_is_exact_and_mask_zeroes():
    w = torch.randn(8, 64)
    w[:, ::2] = 0
    qw = quantize_tensor(w, QuantizationConfig(bits=4, granularity="channel", symmetric=True))
    assert torch.all(qw.dequantize()[:, ::2] == 0)
    asym = quantize_tensor(w, QuantizationConfig(bits=4, granularity="channel"))
    asym.mask = w != 0
    assert torch.all(asym.dequantize()[:, ::2] == 0)


def test_requantize_is_identity_on_the_grid():
    w = torch.randn(32, 128)
    qw = quantize_tensor(w, QuantizationConfig(bits=3, group_size=32))
    assert torch.equal(requantize(qw.dequantize(), qw).codes, qw.codes)


def _correlated_layer(seed=0, out_features=64, in_features=128, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=g) / in_features ** 0.5
    x = torch.randn(tokens, in_features, generator=g) @ mixing + 0.1 * torch.randn(tokens, in_features, generator=g)
    x[:, :8] *= 10  # a few outlier features, as real LLM activations have
    w = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5
    return w, x, 2 * x.t() @ x / tokens


def _output_error(w, approx, x):
    return ((x @ (w - approx).t()) ** 2).mean().item()


@pytest.mark.parametrize("kwargs", [
    {"granularity": "channel"}, {"group_size": 32}, {"group_size": 64, "act_order": True},
    {"granularity": "channel", "act_order": True}, {"granularity": "tensor"}, {"group_size": 32, "symmetric": True}])
def test_gptq_output_error_is_lower_than_rtn(kwargs):
    w, x, h = _correlated_layer()
    cfg = QuantizationConfig(bits=3, method="gptq", **kwargs)
    rtn = _output_error(w, quantize_tensor(w, cfg).dequantize(), x)
    gptq = gptq_quantize(w, h, cfg)
    assert gptq.codes.dtype == torch.uint8 and int(gptq.codes.max()) <= 7
    assert _output_error(w, gptq.dequantize(), x) < 0.5 * rtn


def test_gptq_codes_reproduce_its_weights_and_keep_pruned_zeros():
    w, x, h = _correlated_layer(seed=1)
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    qw = gptq_quantize(w * mask, h, QuantizationConfig(bits=4, group_size=32, method="gptq"), mask)
    approx = qw.dequantize()
    assert torch.all(approx[~mask] == 0)
    assert isinstance(qw, QuantizedWeight) and tuple(qw.scales.shape) == (64, 4)
    rtn = quantize_tensor(w * mask, QuantizationConfig(bits=4, group_size=32)).dequantize() * mask
    assert _output_error(w * mask, approx, x) < _output_error(w * mask, rtn, x)


def test_gptq_cuts_the_output_error_of_every_layer_of_the_trained_tiny_model(tiny_loaded):
    from lmcompress_core.data import calibration_batches, load_text
    from lmcompress_core.methods.layers import input_statistics, linear_layers, weight_matrix

    calib = calibration_batches(tiny_loaded.tokenizer, load_text("tiny-train"), n_samples=8, seq_len=256)
    layers = linear_layers(tiny_loaded.model)
    hessians = input_statistics(tiny_loaded.model, layers, calib, hessian=True).hessian
    cfg = QuantizationConfig(bits=3, method="gptq")
    ratios = []
    for name, module in layers.items():
        w, h = weight_matrix(module), hessians[name]

        def error(approx):  # tr(ΔW H ΔWᵀ) = 2/n · ‖X ΔWᵀ‖², the layer's output error on calibration inputs
            d = w - approx
            return torch.einsum("oi,ij,oj->", d, h, d).item()

        ratios.append(error(gptq_quantize(w, h, cfg).dequantize()) / error(quantize_tensor(w, cfg).dequantize()))
    # measured on the shipped model: max 0.67, median 0.50 (RTN itself is 1)
    assert max(ratios) < 0.8 and sorted(ratios)[len(ratios) // 2] < 0.6


def test_gptq_uses_the_integer_zero_grid():
    w, x, h = _correlated_layer(seed=3)
    qw = gptq_quantize(w, h, QuantizationConfig(bits=3, group_size=32, method="gptq"))
    assert torch.equal(qw.zeros, qw.zeros.round()) and int(qw.zeros.max()) <= 7


def test_layer_bits_first_match_wins_and_16_keeps_float():
    cfg = QuantizationConfig(bits=4, layer_bits=(("down_proj", 8), (r"layers\.0\.", 16), ("proj", 3)),
                             int8_kernel=False)
    assert cfg.for_layer("model.layers.0.mlp.down_proj").bits == 8
    assert cfg.for_layer("model.layers.0.self_attn.q_proj") is None
    assert cfg.for_layer("model.layers.1.self_attn.q_proj").bits == 3
    other = cfg.for_layer("model.layers.1.fc")
    assert other.bits == 4 and other.layer_bits == ()


def test_layer_bits_round_trip_through_json():
    import json

    config = CompressionConfig(quantization=QuantizationConfig(bits=3, layer_bits=[["mlp", 4], ["lm_head", 16]]))
    assert config.quantization.layer_bits == (("mlp", 4), ("lm_head", 16))
    again = CompressionConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.key() == config.key()


def test_mixed_precision_compresses_each_layer_at_its_bits(random_arch):
    from lmcompress_core.compress import compress
    from lmcompress_core.methods.layers import linear_layers, weight_matrix

    layers = list(linear_layers(random_arch.model))
    first, second = layers[0], layers[1]
    q = QuantizationConfig(bits=3, group_size=32, layer_bits=((f"^{first}$", 16), (f"^{second}$", 8)),
                           int8_kernel=False)
    cm = compress(random_arch.model, CompressionConfig(quantization=q, runtime="simulate"))
    quantized = {name: m.quantized_weight() for name, m in cm.layers().items()}
    assert first not in quantized and quantized[second].bits == 8
    assert {qw.bits for name, qw in quantized.items() if name != second} == {3}
    float_layer = linear_layers(cm.model)[first]
    assert torch.equal(weight_matrix(float_layer), weight_matrix(linear_layers(random_arch.model)[first]))


# ---- calibration statistics reused across settings ---------------------------------------------------------

def _codes(cm) -> dict:
    return {name: m.quantized_weight() for name, m in cm.layers().items()}


def _counting_statistics(monkeypatch) -> list:
    import importlib

    compress_module = importlib.import_module("lmcompress_core.compress")
    calls, real = [], compress_module.input_statistics
    monkeypatch.setattr(compress_module, "input_statistics", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_second_gptq_setting_reuses_the_hessians_and_quantizes_bit_identically(random_arch, monkeypatch):
    from lmcompress_core.compress import CALIBRATION_STATS, compress

    calls = _counting_statistics(monkeypatch)
    model = random_arch.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    # one-pass: its Hessians come from the float model and serve every setting (sequential GPTQ's do not)
    three, four = (CompressionConfig(quantization=QuantizationConfig(bits=b, group_size=32, method="gptq",
                                                                     calibration_pass="one-pass"),
                                     runtime="simulate") for b in (3, 4))
    CALIBRATION_STATS.clear()
    fresh = compress(model, four, calibration=calib)
    CALIBRATION_STATS.clear()
    compress(model, three, calibration=calib)
    progress = []
    reused = compress(model, four, calibration=calib, callback=progress.append)
    assert len(calls) == 2   # the third compression ran no calibration pass
    assert any("reused" in p.message for p in progress if p.stage == "calibrate")
    for name, qw in _codes(fresh).items():
        again = _codes(reused)[name]
        assert torch.equal(qw.codes, again.codes) and torch.equal(qw.scales, again.scales), name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the base is never touched


def test_calibration_statistics_are_keyed_by_calibration_and_pruning(random_arch, monkeypatch):
    from lmcompress_core.compress import CALIBRATION_STATS, compress
    from lmcompress_core.methods.prune import PruningConfig

    calls = _counting_statistics(monkeypatch)
    model = random_arch.model
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    gptq = QuantizationConfig(bits=4, group_size=32, method="gptq", calibration_pass="one-pass")
    CALIBRATION_STATS.clear()
    compress(model, CompressionConfig(quantization=gptq, runtime="simulate"), calibration=calib)
    compress(model, CompressionConfig(pruning=PruningConfig(sparsity=0.3, method="wanda")), calibration=calib)
    assert len(calls) == 1   # Wanda's input norms come from the same unpruned pass as GPTQ's Hessians
    pruned = CompressionConfig(quantization=gptq, pruning=PruningConfig(sparsity=0.3), runtime="simulate")
    compress(model, pruned, calibration=calib)
    assert len(calls) == 2   # GPTQ after pruning sees the pruned copy's inputs: another pass
    compress(model, CompressionConfig(quantization=gptq, runtime="simulate"), calibration=calib[:, 1:])
    assert len(calls) == 3   # other calibration ids: another pass


def test_gptq_reports_each_layer_with_the_time_left(random_arch):
    from lmcompress_core.compress import CALIBRATION_STATS, compress

    model = random_arch.model
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    CALIBRATION_STATS.clear()
    seen_by_pass = {}
    for calibration_pass in ("one-pass", "sequential"):
        seen = seen_by_pass[calibration_pass] = []
        q = QuantizationConfig(bits=4, group_size=32, method="gptq", calibration_pass=calibration_pass)
        compress(model, CompressionConfig(quantization=q, runtime="simulate"), calibration=calib,
                 callback=seen.append)
        layers = [p for p in seen if p.stage == "quantize"]
        assert [p.step for p in layers] == list(range(1, len(layers) + 1)) and len(layers) > 1
        assert all("s left" in p.message and p.metrics["remaining_s"] >= 0 for p in layers)
        assert layers[-1].metrics["remaining_s"] == 0
    # one-pass: every hooked layer of every batch (sequential GPTQ calibrates layer by layer as it quantizes)
    one_pass = seen_by_pass["one-pass"]
    assert len([p for p in one_pass if p.stage == "calibrate"]) > len([p for p in one_pass if p.stage == "quantize"])


def test_layers_fed_the_same_inputs_share_one_hessian_and_are_quantized_together_as_alone(random_arch):
    """q/k/v (and gate/up) get bit-identical Hessians; GPTQ over their stacked rows gives each what its own call
    gives, up to the summation order of one matrix product."""
    from lmcompress_core.compress import CALIBRATION_STATS, compress
    from lmcompress_core.methods.layers import input_statistics, linear_layers, weight_matrix

    model = random_arch.model
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    layers = linear_layers(model)
    hessians = input_statistics(model, layers, calib, hessian=True).hessian
    shared = [n for n in hessians if any(hessians[n] is hessians[o] for o in hessians if o != n)]
    if random_arch.name.removeprefix("random-") in ("llama", "qwen2", "opt"):
        assert any(n.endswith("q_proj") for n in shared) and any(n.endswith("k_proj") for n in shared)
    # one-pass: the reference Hessians above are the float model's (sequential ones depend on the quantized layers)
    cfg = QuantizationConfig(bits=3, group_size=32, method="gptq", calibration_pass="one-pass")
    CALIBRATION_STATS.clear()
    together = compress(model, CompressionConfig(quantization=cfg, runtime="simulate"), calibration=calib)
    for name, qw in _codes(together).items():
        alone = gptq_quantize(weight_matrix(layers[name]), hessians[name], cfg)
        assert (qw.codes == alone.codes).float().mean() > 0.999, name
        assert torch.allclose(qw.dequantize(), alone.dequantize(), atol=1e-4 * float(alone.scales.max()) + 1e-6)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("granularity", ["group", "channel", "tensor"])
def test_symmetric_scales_are_stored_in_16_bits_as_counted(method, granularity):
    """Symmetric absmax scales are float16 values, so the packed file stores them as float16 (lossless) and the
    theoretical size's 16 bits per scale is the truth; the zero-points are codes."""
    from lmcompress_core.compress import compress
    from lmcompress_core.measure.evaluation import measure_size
    from lmcompress_core.models.loading import tiny_random_model

    base = tiny_random_model("llama").model
    ids = torch.randint(base.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    q = QuantizationConfig(bits=4, granularity=granularity, group_size=32, symmetric=True, method=method)
    cm = compress(base, CompressionConfig(quantization=q, runtime="simulate"), calibration=ids)
    for module in cm.layers().values():
        scales = module.quantized_weight().scales
        assert torch.equal(scales.to(torch.float16).to(torch.float32), scales)
    assert measure_size(cm, base).scale_dtypes == ["codes", "float16"]

