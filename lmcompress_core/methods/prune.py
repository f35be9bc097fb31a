"""Pruning: the config and keep-masks by magnitude (per layer or global), Wanda, and N:M semi-structured patterns.

A mask is a bool ``[out, in]`` tensor, True = weight kept. Pruned weights are set to exact zeros in the dense
matrix (there is no sparse kernel on this CPU; measure.py says so), and compress.py keeps the masks so that
quantization and distillation leave those zeros in place.

Wanda scores a weight by |W_ij| · ‖X_j‖₂ (its magnitude times the norm of the input feature it multiplies, over
calibration tokens) and compares weights within each output row, as in Sun et al. 2023. SparseGPT (masks chosen
with the calibration Hessian, kept weights updated) lives in ``sparsegpt.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MAX_SPARSITY = 0.95
PATTERNS = {"unstructured": None, "2:4": (2, 4), "4:8": (4, 8)}
METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class PruningConfig:
    sparsity: float = 0.5         # fraction of weights removed, [0, 0.95]; N:M patterns fix it at N/M
    # "magnitude" | "wanda" | "sparsegpt" (Wanda and SparseGPT need calibration token ids; SparseGPT also
    # updates the kept weights to make up for the removed ones, sparsegpt.py)
    method: str = "magnitude"
    pattern: str = "unstructured" # "unstructured" | "2:4" | "4:8" (N of every M consecutive inputs are zeroed)
    scope: str = "layer"          # "layer" | "global": rank magnitudes within each layer or across all (magnitude only)
    damp: float = 0.01            # SparseGPT: Hessian damping, fraction of the mean diagonal (as GPTQ's)

    def __post_init__(self):
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s != s:
            raise ValueError(f"sparsity must be a number between 0 and {MAX_SPARSITY} (0–95%); got {s!r}")
        if s >= 1:
            raise ValueError(f"sparsity {s:.0%} would remove every weight of the chosen layers; "
                             f"choose at most {MAX_SPARSITY:.0%}")
        if not 0 <= s <= MAX_SPARSITY:
            raise ValueError(f"sparsity must be between 0 and {MAX_SPARSITY} (0–95%); got {s!r}")
        _choice("method", self.method, METHODS)
        _choice("pattern", self.pattern, tuple(PATTERNS))
        _choice("scope", self.scope, ("layer", "global"))
        if self.scope == "global" and self.method != "magnitude":
            raise ValueError("scope='global' ranks weights across layers and applies to magnitude pruning only; "
                             "Wanda and SparseGPT compare weights within each output row — use scope='layer'")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp <= 1:
            raise ValueError(f"damp (SparseGPT Hessian damping) must be in (0, 1], typically 0.01; got {self.damp!r}")

    @property
    def effective_sparsity(self) -> float:
        nm = PATTERNS[self.pattern]
        return self.sparsity if nm is None else nm[0] / nm[1]


def _choice(field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{field} must be one of {options}; got {value!r}")


def _lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask removing exactly the k lowest scores of each row (a 2-D tensor) or of the whole 1-D tensor."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    index = torch.topk(scores, k, dim=-1, largest=False).indices
    return keep.scatter_(-1, index, False)


PROBES = 1 << 14  # values sampled to bracket a k-th smallest value before the exact selection


def kth_smallest(chunks: list[torch.Tensor], k: int) -> torch.Tensor:
    """The exact k-th smallest (1-based) of the values of several 1-D tensors, as ``torch.kthvalue`` of their
    concatenation would give, without concatenating or selecting over all of them: a strided sample brackets
    the rank, one counting pass finds how many lie below the bracket, and the selection runs on the few values
    inside it (a full selection over SmolLM2's 106 M weights takes ~1.5 s; this reads them twice)."""
    n = sum(c.numel() for c in chunks)
    step = n // PROBES
    if step < 4:
        return torch.kthvalue(torch.cat(chunks), k).values
    probe = torch.cat([c[::step] for c in chunks])
    rank = k / n * probe.numel()
    margin = 4 * (rank * (1 - k / n)) ** 0.5 + 2  # four standard deviations of the sample rank
    lo_rank, hi_rank = int(rank - margin), int(rank + margin) + 1
    lo = torch.kthvalue(probe, lo_rank).values if lo_rank >= 1 else probe.new_tensor(float("-inf"))
    hi = torch.kthvalue(probe, hi_rank).values if hi_rank <= probe.numel() else probe.new_tensor(float("inf"))
    below = sum(_count_below(c, lo) for c in chunks)
    band = torch.cat([_between(c, lo, hi) for c in chunks])
    if below < k <= below + band.numel():
        return torch.kthvalue(band, k - below).values
    return torch.kthvalue(torch.cat(chunks), k).values  # the sample missed (rare): select over everything


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_numpy(t: torch.Tensor) -> np.ndarray | None:
    """A contiguous float32 CPU tensor as a numpy array over the same memory (None for anything else). numpy
    compares and picks such arrays in one thread at 2–3x torch's speed here (a 1536x576 layer: count below a
    value 0.09 vs 0.23 ms, values in a range 0.41 vs 0.69 ms), which matters on a core shared with a browser."""
    if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
        return None
    return t.detach().numpy()


def _count_below(t: torch.Tensor, value: torch.Tensor) -> int:
    a = _as_numpy(t)
    return count_kept(t < value) if a is None else int(np.count_nonzero(a < value.item()))


def _between(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """t's values v with lo <= v <= hi, in order (1-D t)."""
    a = _as_numpy(t)
    if a is None:
        return kept_values(t, (t >= lo) & (t <= hi))
    return torch.from_numpy(a[(a >= lo.item()) & (a <= hi.item())])


def _above(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    a = _as_numpy(t)
    return t > value if a is None else torch.from_numpy(a > value.item())


def _positions_equal(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Indices of the entries of 1-D t equal to value, ascending."""
    a = _as_numpy(t)
    if a is None:
        return (t == value).nonzero().squeeze(1)
    return torch.from_numpy(np.flatnonzero(a == value.item()))


def count_kept(mask: torch.Tensor) -> int:
    """How many entries of a bool tensor are True (numpy's count on the CPU: 16x ``mask.sum()`` on a 1536x576
    mask, measured here)."""
    if mask.device.type != "cpu" or not mask.is_contiguous():
        return int(mask.sum())
    return int(np.count_nonzero(mask.numpy()))


def zero_pruned_(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t *= mask`` in place for a bool keep-mask, its bytes read as uint8 0/1: the same values (the sign of each
    zero too), 4x faster than torch's bool promotion (0.07 vs 0.29 ms on a 1536x576 fp32 layer, 0.14 vs 0.52 in
    bf16, measured here)."""
    return t.mul_(mask.view(torch.uint8) if mask.dtype == torch.bool else mask)


def kept_values(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """t's values where mask is True, in row-major order (as ``t[mask]``). On the CPU numpy's compress picks them
    from t's raw bits (5x ``torch.masked_select`` on a 1536x576 layer, measured here)."""
    if t.device.type != "cpu" or mask.device.type != "cpu":
        return torch.masked_select(t, mask)
    raw = t.detach().contiguous().reshape(-1)
    raw = raw.view(_SAME_WIDTH_INT[raw.element_size()])
    picked = np.compress(mask.contiguous().reshape(-1).numpy(), raw.numpy())
    return torch.from_numpy(picked).view(t.dtype)


def _lowest_k_flat_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of a 1-D tensor removing exactly its k lowest scores; of tied scores at the threshold, the
    first ones (by position) go."""
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = kth_smallest([scores], k)
    keep = _above(scores, threshold)
    surplus = scores.numel() - count_kept(keep) - k  # ties at the threshold removed beyond k
    if surplus > 0:
        keep[_positions_equal(scores, threshold)[-surplus:]] = True
    return keep


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Remove round(sparsity·n) lowest-scored weights, per output row (Wanda) or over the whole layer."""
    if per_row:
        return _lowest_k_mask(scores, round(sparsity * scores.shape[1]))
    return _lowest_k_flat_mask(scores.reshape(-1), round(sparsity * scores.numel())).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M pattern: in every M consecutive inputs of a row, the N lowest scores are removed."""
    out_features, in_features = scores.shape
    if in_features % m:
        raise ValueError(f"the {n}:{m} pattern needs in_features divisible by {m}; a layer has {in_features}")
    groups = scores.reshape(out_features, in_features // m, m)
    return _lowest_k_mask(groups, n).reshape(out_features, in_features)


def scores(w: torch.Tensor, config: PruningConfig, input_sq_norm: torch.Tensor | None) -> torch.Tensor:
    """Importance of each weight: |W| (magnitude) or |W|·‖X_j‖₂ (Wanda; needs the inputs' squared norms). For
    SparseGPT, whose masks come from its column loop, Wanda's score is its estimate without the weight updates
    (SparseGPT's score with H's diagonal alone), as the per-layer sensitivity scan uses it."""
    if config.method in ("wanda", "sparsegpt") and input_sq_norm is not None:
        return w.abs() * input_sq_norm.sqrt().to(w.dtype)[None, :]
    return w.abs()


def layer_mask(w: torch.Tensor, config: PruningConfig, input_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask of one ``[out, in]`` matrix for the config (scope='layer')."""
    s = scores(w, config, input_sq_norm)
    nm = PATTERNS[config.pattern]
    if nm is not None:
        return nm_mask(s, *nm)
    return unstructured_mask(s, config.sparsity, per_row=config.method != "magnitude")


def global_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Magnitude pruning across layers: one threshold on |W| over every chosen weight."""
    magnitudes = {name: w.abs() for name, w in weights.items()}
    k = round(sparsity * sum(m.numel() for m in magnitudes.values()))
    if k == 0:
        return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    threshold = kth_smallest([m.reshape(-1) for m in magnitudes.values()], k)
    return {name: m > threshold for name, m in magnitudes.items()}
