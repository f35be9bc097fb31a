"""Pruning: validation messages, achieved sparsity within ±0.5%, exact N:M patterns, Wanda's metric."""
import pytest
import torch

from lmcompress_core.methods.prune import (PROBES, PruningConfig, _lowest_k_flat_mask, count_kept, global_masks, kept_values, kth_smallest,
                                          layer_mask, nm_mask)

torch.set_num_threads(2)


@pytest.mark.parametrize("kwargs, words", [
    ({"sparsity": 1.0}, "would remove every weight"),
    ({"sparsity": 1}, "would remove every weight"),
    ({"sparsity": 1.5}, "would remove every weight"),
    ({"sparsity": -0.1}, "between 0 and 0.95"),
    ({"sparsity": 0.97}, "between 0 and 0.95"),
    ({"sparsity": float("nan")}, "must be a number"),
    ({"sparsity": "half"}, "must be a number"),
    ({"method": "random"}, "method must be one of"),
    ({"pattern": "1:4"}, "pattern must be one of"),
    ({"scope": "model"}, "scope must be one of"),
    ({"method": "wanda", "scope": "global"}, "magnitude pruning only"),
])
def test_bad_config_is_refused_with_a_message(kwargs, words):
    with pytest.raises(ValueError, match=words):
        PruningConfig(**kwargs)


def test_nm_patterns_fix_the_sparsity():
    assert PruningConfig(sparsity=0.1, pattern="2:4").effective_sparsity == 0.5
    assert PruningConfig(sparsity=0.3).effective_sparsity == 0.3


def _weights(seed=0, shape=(96, 200)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.73, 0.95])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_achieved_sparsity_is_within_half_a_percent(sparsity, method):
    w = _weights()
    norms = torch.rand(200, generator=torch.Generator().manual_seed(1)) + 0.1
    mask = layer_mask(w, PruningConfig(sparsity=sparsity, method=method), norms)
    assert abs((~mask).float().mean().item() - sparsity) <= 0.005


def test_magnitude_removes_the_smallest_weights():
    w = _weights()
    mask = layer_mask(w, PruningConfig(sparsity=0.5))
    assert w[~mask].abs().max() <= w[mask].abs().min()


def test_global_scope_hits_the_target_over_all_layers_not_each():
    weights = {"small": _weights(1) * 0.1, "large": _weights(2)}
    masks = global_masks(weights, 0.5)
    removed = sum((~m).sum().item() for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs(removed - 0.5) <= 0.005
    assert (~masks["small"]).float().mean() > 0.8  # the small layer takes most of the cut
    assert (~masks["large"]).float().mean() < 0.2


def _large_chunks(kind: str) -> list[torch.Tensor]:
    """Three 1-D tensors large enough for kth_smallest's sampled bracket (n ≫ 4·PROBES)."""
    gen = torch.Generator().manual_seed(3)
    sizes = (40 * PROBES // 8, 3 * PROBES, 11 * PROBES // 4)
    chunks = [torch.randn(n, generator=gen).abs() * (i + 1) for i, n in enumerate(sizes)]
    if kind == "ties":  # de-quantized weights (SmolLM2 comes from Q4_1) repeat a handful of magnitudes
        chunks = [(c * 4).round() / 4 for c in chunks]
    if kind == "aliased":  # every sampled position holds a zero: the sample is useless and the bracket misses
        step = sum(c.numel() for c in chunks) // PROBES
        chunks = [c + 1 for c in chunks]
        for c in chunks:
            c[::step] = 0.0
    return chunks


@pytest.mark.parametrize("kind", ["continuous", "ties", "aliased"])
@pytest.mark.parametrize("fraction", [1e-6, 0.01, 0.5, 0.9, 1.0])
def test_kth_smallest_equals_a_full_selection(kind, fraction):
    chunks = _large_chunks(kind)
    everything = torch.cat(chunks)
    k = max(1, round(fraction * everything.numel()))
    assert kth_smallest(chunks, k) == torch.kthvalue(everything, k).values


@pytest.mark.parametrize("kind", ["continuous", "ties"])
def test_numpy_and_torch_selection_paths_agree(kind):
    """float32 contiguous CPU tensors take numpy's compares; float64 (or strided) ones torch's: same answers, and
    of tied scores at the threshold the first ones (by position) go on both paths."""
    chunks = _large_chunks(kind)
    k = round(0.3 * sum(c.numel() for c in chunks))
    assert kth_smallest(chunks, k) == kth_smallest([c.double() for c in chunks], k)
    scores = chunks[0]
    k = round(0.4 * scores.numel())
    fast, slow = _lowest_k_flat_mask(scores, k), _lowest_k_flat_mask(scores.double(), k)
    strided = _lowest_k_flat_mask(torch.stack([scores, scores], 1)[:, 0], k)
    assert torch.equal(fast, slow) and torch.equal(fast, strided) and (~fast).sum().item() == k
    threshold = scores[~fast].max()
    tied = (scores == threshold).nonzero().squeeze(1)
    removed = tied[~fast[tied]]
    if kind == "ties":
        assert 0 < removed.numel() < tied.numel()   # the threshold splits its ties
    kept = tied[fast[tied]]
    assert removed.numel() == 0 or kept.numel() == 0 or removed.max() < kept.min()


@pytest.mark.parametrize("tied", [False, True])
def test_layer_magnitude_removes_exactly_k_on_large_layers_even_with_ties(tied):
    w = torch.randn(512, 384, generator=torch.Generator().manual_seed(4))
    w = (w * 4).round() / 4 if tied else w
    mask = layer_mask(w, PruningConfig(sparsity=0.3))
    assert (~mask).sum().item() == round(0.3 * w.numel())
    assert w[~mask].abs().max() <= w[mask].abs().min()


@pytest.mark.parametrize("pattern, n, m", [("2:4", 2, 4), ("4:8", 4, 8)])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nm_pattern_is_exact(pattern, n, m, method):
    w = _weights(shape=(32, 128))
    mask = layer_mask(w, PruningConfig(pattern=pattern, method=method), torch.rand(128) + 0.1)
    per_group = mask.reshape(32, 128 // m, m).sum(dim=-1)
    assert torch.all(per_group == m - n)


def test_nm_refuses_widths_it_cannot_tile():
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.rand(4, 6), 2, 4)


def test_wanda_keeps_weights_on_loud_inputs_and_ranks_per_row():
    w = _weights(3, shape=(16, 64))
    norms = torch.ones(64)
    norms[:4] = 1e6  # four input features with enormous activations
    mask = layer_mask(w, PruningConfig(sparsity=0.5, method="wanda"), norms)
    assert mask[:, :4].all()
    assert torch.all(mask.sum(dim=1) == 32)  # every output row loses exactly half


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int64])
@pytest.mark.parametrize("transposed", [False, True])
def test_kept_values_and_their_count_are_torchs_boolean_indexing(dtype, transposed):
    gen = torch.Generator().manual_seed(4)
    t = (torch.randn(70, 90, generator=gen) * 50).to(dtype)
    mask = torch.rand(70, 90, generator=gen) > 0.3
    if transposed:   # not contiguous: row-major order of the logical layout all the same
        t, mask = t.t(), mask.t()
    kept = kept_values(t, mask)
    assert kept.dtype == dtype and torch.equal(kept, t[mask])
    assert count_kept(mask) == int(mask.sum()) and count_kept(torch.zeros(3, dtype=torch.bool)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zeroing_pruned_weights_is_the_bool_product_bit_for_bit(dtype):
    """zero_pruned_ reads the mask's bytes as 0/1: the product by the bool mask, sign of each zero included, also
    through a transposed (non-contiguous) mask."""
    from lmcompress_core.methods.prune import zero_pruned_

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 80, generator=gen).to(dtype)
    for mask in (torch.rand(48, 80, generator=gen) > 0.4, (torch.rand(80, 48, generator=gen) > 0.4).t()):
        expected = w * mask
        got = zero_pruned_(w.clone(), mask)
        assert got.dtype == dtype and torch.equal(got, expected)
        assert torch.equal(torch.signbit(got), torch.signbit(expected)) and bool(torch.signbit(got[~mask]).any())
