"""Bit-packing round trips, exact byte counts, sparse mask encodings, and the packed format on compressed models."""
import math

import pytest
import torch

from lmcompress_core.packing import (decode_mask, encode_mask, mask_encoding_nbytes, pack_codes, packed_nbytes,
                                     unpack_codes)


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


def test_codes_out_of_range_refused():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([16]), 4)
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
