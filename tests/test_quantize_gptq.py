"""GPTQ against a textbook reference written here: one column at a time, no lazy batches, no transposed layout,
the inverse Hessian's Cholesky factor from float64 ``inv`` + ``cholesky``.

The fast loop in ``quantize.py`` reorders the same float32 arithmetic (lazy batches, Wᵀ, the error pre-divided
into the factor's rows), so a code can differ where a value sits within rounding noise of a rounding boundary; a
differing code then changes that row's later errors and grids (rows are independent). The thresholds allow that
in 2 of 48 rows, and no more; measured: every code equal in 57 of 64 cases, ≥ 99.6% in the others (all 8-bit but
one, ties being likelier on a finer grid), as the loop before the rewrite did. RTN, the same grids without error
feedback, agrees with the reference on 50–78% of the codes."""
import pytest
import torch

from lmcompress_core.methods.grid_search import mse_grid
from lmcompress_core.methods.quantize import (QuantizationConfig, QuantizedWeight, _cholesky_of_inverse,
                                              gptq_quantize, grid_parameters, quantize_tensor)

torch.set_num_threads(2)

OUT_FEATURES, IN_FEATURES = 48, 320  # 320: the last lazy batch (128 columns) is partial, as SmolLM2's 576


def _layer(seed: int, masked: bool):
    """Random weights, a random SPD Hessian 2XᵀX/n with correlated inputs and a few outliers, an optional mask."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(IN_FEATURES, IN_FEATURES, generator=g) / IN_FEATURES ** 0.5
    x = torch.randn(2 * IN_FEATURES, IN_FEATURES, generator=g) @ mixing
    x[:, :4] *= 10
    w = torch.randn(OUT_FEATURES, IN_FEATURES, generator=g) / IN_FEATURES ** 0.5
    mask = torch.rand(w.shape, generator=g) > 0.4 if masked else None
    return (w if mask is None else w * mask), 2 * x.t() @ x / x.shape[0], mask


def _textbook_gptq(w, h, config: QuantizationConfig, mask=None):
    """(codes, scales, zeros) of GPTQ done the plain way. Grids: per group from the updated weights when the
    group's first column is reached; from the unquantized weights with act-order, per channel and per tensor.
    Asymmetric integer-zero groups (``grid_search``): each group's grid is the MSE search on its block of H."""
    n = w.shape[1]
    damped = h.double() + config.damp * h.diagonal().mean().double() * torch.eye(n, dtype=torch.float64)
    order = torch.argsort(h.diagonal(), descending=True) if config.act_order else torch.arange(n)
    hinv = torch.linalg.cholesky(torch.linalg.inv(damped[order][:, order]), upper=True).float()
    step = {"tensor": n, "channel": n, "group": config.group_size}[config.granularity]
    grid_rows = w.reshape(1, -1) if config.granularity == "tensor" else w
    moment = h + torch.eye(n) * (config.damp * h.diagonal().mean())  # the searched grids' H, damped in float32

    def grid(x, start):
        if config.gptq_searches_grid:
            return mse_grid(x, config.bits, moment[start:start + step, start:start + step])
        return grid_parameters(x, config.bits, config.grid, config.symmetric)

    fixed = [grid(grid_rows[:, s:s + step] if config.granularity != "tensor" else grid_rows, s)
             for s in range(0, n, step)]
    moving = config.granularity == "group" and not config.act_order
    weights, keep = w[:, order].clone(), torch.ones_like(w) if mask is None else mask[:, order].float()
    codes, grids = torch.zeros_like(w), {}
    for j in range(n):
        group = int(order[j]) // step
        if moving and j % step == 0:
            grids[group] = grid(weights[:, j:j + step], j)
        scale, zero = grids[group] if moving else fixed[group]
        code = torch.round(weights[:, j:j + 1] / scale + zero).clamp(0, 2 ** config.bits - 1)
        q = (code - zero) * scale * keep[:, j:j + 1]
        codes[:, j] = code[:, 0]
        error = (weights[:, j] - q[:, 0]) / hinv[j, j]
        weights[:, j:] -= error[:, None] * hinv[j, j:][None, :]
    tables = [grids[g] for g in sorted(grids)] if moving else fixed
    return (codes[:, torch.argsort(order)], torch.cat([t[0] for t in tables], 1),
            torch.cat([t[1] for t in tables], 1))


def _output_error(q: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """Σ over rows of (q − w) H (q − w)ᵀ: the output error GPTQ minimises."""
    d = q - w
    return float(((d @ h) * d).sum())


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.isclose(a, b, rtol=1e-5, atol=0).float().mean().item()


CASES = [{"group_size": 32}, {"group_size": 128}, {"group_size": 64, "act_order": True},
         {"group_size": 32, "grid_search": False}, {"group_size": 64, "act_order": True, "grid_search": False},
         {"granularity": "channel"}, {"granularity": "channel", "act_order": True}, {"granularity": "tensor"},
         {"group_size": 32, "symmetric": True}, {"group_size": 64, "grid": "minmax"}]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: "-".join(f"{a}={v}" for a, v in k.items()))
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_gptq_matches_the_textbook_column_loop(bits, kwargs, masked):
    w, h, mask = _layer(seed=bits, masked=masked)
    config = QuantizationConfig(bits=bits, method="gptq", **kwargs)
    codes, scales, zeros = _textbook_gptq(w, h, config, mask)
    qw = gptq_quantize(w, h, config, mask)
    assert qw.codes.shape == w.shape and qw.scales.shape == scales.shape and qw.zeros.shape == zeros.shape
    same = qw.codes.float() == codes
    # a discrete choice can go the other way in one row: a searched grid whose candidates tie within rounding
    # noise (measured: 1 row of 48 at 8 bits, 99.4% of the codes), or a code at a rounding tie that the error
    # feedback carries along the rest of the row (1 row, 99.3%: 4-bit g64 act-order on the plain grid)
    assert same.all(dim=1).float().mean().item() >= 46 / 48 and same.float().mean().item() >= 0.99
    assert _agreement(qw.scales, scales) >= 0.98 and _agreement(qw.zeros, zeros) >= 0.98
    # where a row went the other way, it is as good: GPTQ's objective, the H-weighted error, within 1%
    textbook = QuantizedWeight(codes.to(torch.uint8), scales, zeros, qw.bits, qw.group_size, mask).dequantize()
    assert _output_error(qw.dequantize(), w, h) <= 1.01 * _output_error(textbook, w, h)
    if mask is not None:
        assert torch.all(qw.dequantize()[~mask] == 0)


def test_rtn_is_far_from_the_reference_so_the_thresholds_can_fail():
    """The code thresholds above separate GPTQ from the same grids without error feedback."""
    w, h, _ = _layer(seed=0, masked=False)
    config = QuantizationConfig(bits=4, method="gptq", granularity="channel")
    codes, _, _ = _textbook_gptq(w, h, config)
    same = quantize_tensor(w, config).codes.float() == codes
    assert same.float().mean().item() < 0.8 and same.all(dim=1).float().mean().item() < 46 / 48


@pytest.mark.parametrize("n", [200, 600])  # 600: the triangular inverse splits into halves (256 and below: one solve)
def test_cholesky_of_inverse_is_the_upper_factor_of_the_damped_inverse(n):
    x = torch.randn(2 * n, n, generator=torch.Generator().manual_seed(n))
    h = x.t() @ x / n
    u = _cholesky_of_inverse(h, 0.01)
    damped = h.double() + 0.01 * h.diagonal().mean().double() * torch.eye(n, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    assert ((u.double() - expected).norm() / expected.norm()).item() < 1e-5
