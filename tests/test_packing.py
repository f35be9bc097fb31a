"""Bit-packing round trips, exact byte counts, sparse mask encodings, and the packed format on compressed models."""
import json
import math

import pytest
import torch

from lmcompress_core.runtime.bits import pack_codes, packed_nbytes, unpack_codes
from lmcompress_core.runtime.packing import Planned, decode_mask, encode_mask, mask_encoding_nbytes, safetensors_nbytes


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 11, 13, 16])
@pytest.mark.parametrize("numel", [1, 7, 8, 1000, 4099])
def test_pack_round_trip_and_exact_bytes(bits, numel):
    gen = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 2 ** bits, (numel,), generator=gen)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(numel * bits / 8) == packed_nbytes(numel, bits)
    assert torch.equal(unpack_codes(packed, bits, numel).to(torch.int64), codes)


def test_four_bit_codes_go_two_per_byte_low_nibble_first():
    packed = pack_codes(torch.tensor([1, 2, 15, 0], dtype=torch.uint8), 4)
    assert packed.tolist() == [1 | 2 << 4, 15]


def test_three_bit_codes_cross_byte_boundaries():
    # eight 3-bit codes fill exactly three bytes: no padding bits inside the stream
    codes = torch.tensor([7, 0, 5, 3, 1, 6, 2, 4], dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    assert packed.numel() == 3
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert int.from_bytes(bytes(packed.tolist()), "little") == stream


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_packed_stream_matches_python_integers(bits, dtype):
    # independent reference: the whole stream as one Python integer, code i at bit i*bits
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 if dtype == torch.bool else 2 ** bits, (37,), generator=gen).to(dtype)
    stream = sum(int(c) << (bits * i) for i, c in enumerate(codes.tolist()))
    expected = stream.to_bytes(packed_nbytes(codes.numel(), bits), "little")
    assert bytes(pack_codes(codes, bits).tolist()) == expected


def test_codes_out_of_range_refused():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([-1, 2]), 3)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([1]), 0)


@pytest.mark.parametrize("density", [0.5, 0.25, 0.02])
def test_mask_encodings_round_trip_and_pick_the_smaller(density):
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(48, 300, generator=gen) < density
    fmt, parts = encode_mask(mask)
    sizes = mask_encoding_nbytes(mask)
    assert fmt == min(sizes, key=sizes.get)
    assert sum(p.numel() for p in parts.values()) == sizes[fmt]
    assert torch.equal(decode_mask(fmt, parts, tuple(mask.shape), int(mask.sum())), mask)
    if density == 0.5:
        assert fmt == "bitmask" and sizes["bitmask"] == 48 * 300 // 8
    if density == 0.02:
        assert fmt == "index"


@pytest.mark.parametrize("density", [0.5, 0.02])
def test_a_planned_mask_encoding_has_the_encoded_dtypes_and_shapes(density):
    mask = torch.rand(48, 300, generator=torch.Generator().manual_seed(1)) < density
    fmt, parts = encode_mask(mask)
    planned_fmt, planned = encode_mask(mask, planned=True)
    assert planned_fmt == fmt and all(isinstance(p, Planned) for p in planned.values())
    assert {k: (p.dtype, p.shape) for k, p in planned.items()} == {k: (p.dtype, tuple(p.shape)) for k, p in parts.items()}


@pytest.mark.parametrize("metadata", [None, {"format": "lmcompress-packed"}])
def test_file_size_from_the_layout_is_what_safetensors_writes(metadata):
    """safetensors_nbytes against the library's own bytes, from real tensors and from Planned stand-ins: ten dtypes,
    empty and 0-d tensors, sizes that carry the offsets across digit counts (so the library's order of the tensors,
    by dtype then name, must be followed), non-ASCII names."""
    from safetensors.torch import save

    dtypes = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
              torch.float32, torch.float64, torch.bool]
    shapes = [(0,), (), (7,), (3, 5), (1000,), (12345,), (2, 0, 3)]
    tensors = {f"layers.{i * 7919 % 101}.w{i}" + ("é" if i % 13 == 0 else ""): torch.zeros(shapes[i % len(shapes)],
                                                                                           dtype=dtypes[i % len(dtypes)])
               for i in range(70)}
    expected = len(save(tensors, metadata=metadata))
    assert safetensors_nbytes(tensors, metadata) == expected
    assert safetensors_nbytes({k: Planned(t.dtype, tuple(t.shape)) for k, t in tensors.items()}, metadata) == expected
    one = {"only": torch.zeros(3, dtype=torch.float16)}
    assert safetensors_nbytes(one, metadata) == len(save(one, metadata=metadata))


# ---- the int8 kernel path: smoothed layers and layers the SQNR floor kept fp32 reload exactly -------------

@pytest.fixture(scope="module")
def int8_models():
    from lmcompress_core.models.loading import tiny_random_model

    return {arch: tiny_random_model(arch).model for arch in ("gpt2", "llama")}


# 0 dB: every layer smoothed int8; 35 dB: a mix (measured: 3 of 8 gpt2, 4 of 14 llama layers kept fp32); 60: all fp32
@pytest.mark.parametrize("floor", [0.0, 35.0, 60.0])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_smoothed_int8_model_reloads_with_identical_logits(int8_models, arch, floor, tmp_path):
    from safetensors.torch import load_file

    from lmcompress_core.compress import CompressionConfig, compress
    from lmcompress_core.measure.evaluation import measure_size
    from lmcompress_core.runtime.int8_dynamic import SmoothedInt8Linear
    from lmcompress_core.runtime.modules import CompressedLinear
    from lmcompress_core.runtime.kernels import ActivationInt8Linear
    from lmcompress_core.runtime.packing import SMOOTHING_SUFFIX, WEIGHTS_FILE, load_compressed, save_compressed
    from lmcompress_core.methods.quantize import QuantizationConfig

    base = int8_models[arch]
    ids = torch.randint(base.config.vocab_size, (8, 48), generator=torch.Generator().manual_seed(0))
    config = QuantizationConfig(bits=8, granularity="channel", int8_sqnr_floor_db=floor)
    cm = compress(base, CompressionConfig(quantization=config, runtime="dynamic_int8"), calibration=ids)
    written = save_compressed(cm, base, tmp_path)
    assert written == sum(f.stat().st_size for f in tmp_path.iterdir())
    assert measure_size(cm, base).packed_bytes == written   # counted from the layout, smoothing factors included
    reloaded = load_compressed(tmp_path, base)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids[:2]).logits, cm.model(input_ids=ids[:2]).logits)

    saved, layers = cm.layers(), json.loads((tmp_path / "compression.json").read_text())["layers"]
    smoothed = [n for n, m in saved.items() if isinstance(getattr(m, "kernel", None), SmoothedInt8Linear)]
    kept_float = [n for n, m in saved.items() if isinstance(m, CompressedLinear)]
    assert len(smoothed) + len(kept_float) == len(saved)
    assert {0.0: not kept_float, 35.0: smoothed and kept_float, 60.0: not smoothed}[floor]
    stored = load_file(str(tmp_path / WEIGHTS_FILE))
    for name in smoothed:  # the factors are real bytes in the file, counted in the layer's packed bytes
        key, again = name + SMOOTHING_SUFFIX, reloaded.get_submodule(name)
        assert layers[name]["smoothing_factors"] == key and stored[key].dtype == torch.float32
        assert layers[name]["bytes"] == sum(t.numel() * t.element_size() for k, t in stored.items()
                                            if k.startswith(name + ".weight.") or k == key)
        assert isinstance(again, ActivationInt8Linear) and torch.equal(again.kernel.smooth, saved[name].kernel.smooth)
        assert torch.equal(again.kernel.weight().int_repr(), saved[name].kernel.weight().int_repr())
    for name in kept_float:  # the same float weights (the 8-bit de-quantized codes) in the simulation module again
        again = reloaded.get_submodule(name)
        assert type(again) is CompressedLinear and SMOOTHING_SUFFIX not in str(layers[name])
        assert torch.equal(again.weight, saved[name].weight)
        assert torch.equal(again.weight, saved[name].quantized_weight().dequantize())


@pytest.mark.parametrize("grid, symmetric, zeros_dtype", [("integer-zero", False, "codes"), ("integer-zero", True, "codes"),
                                                          ("minmax", False, "float32")])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_points_are_packed_at_the_code_width_when_they_are_codes(grid, symmetric, zeros_dtype, bits):
    from lmcompress_core.methods.quantize import QuantizationConfig, quantize_tensor
    from lmcompress_core.runtime.packing import pack_layer, unpack_layer_parts

    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(bits))
    qw = quantize_tensor(w, QuantizationConfig(bits=bits, group_size=64, grid=grid, symmetric=symmetric))
    tensors, meta = pack_layer("layer", None, qw)
    assert meta["zeros_dtype"] == zeros_dtype
    if zeros_dtype == "codes":  # 24 rows × 4 groups of integer zero-points, `bits` bits each
        assert tensors["layer.weight.zeros"].numel() == (24 * 4 * bits + 7) // 8
    back, _, _ = unpack_layer_parts("layer", meta, tensors)
    assert torch.equal(back.zeros, qw.zeros) and torch.equal(back.dequantize(), qw.dequantize())
