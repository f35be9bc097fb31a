"""SparseGPT: pruning with OBS weight updates from the calibration Hessian, on GPTQ's column loop.

Wanda removes the weights with the least |w|·‖x‖ and leaves the others as they are. SparseGPT (Frantar &
Alistarh 2023) visits the columns in GPTQ's order and pushes each removed weight's error onto the columns not
yet visited, with the same rank-1 updates GPTQ applies to rounding errors (the Optimal Brain Surgeon update
restricted to the columns still free), so the kept weights compensate for the removed ones. Written here
because it is the point of the project; it shares ``_ColumnLoop`` with GPTQ.

Masks are chosen a lazy batch (128 columns) at a time, on the weights as updated so far, by the OBS score
w²/U_jj² (U the upper Cholesky factor of H⁻¹, whose diagonal is the error of removing column j given the
columns after it): per output row, the batch's lowest scores (the row's share of the sparsity, so each row
ends with exactly round(sparsity · in) zeros, as Wanda's rows do), or with N:M, the N lowest of every M
consecutive inputs. With GPTQ quantization the same loop also rounds the kept weights (prune and quantize in
one pass: ``gptq_quantize(..., select=batch_masks(config))``).
"""
from __future__ import annotations

import torch

from lmcompress_core.methods.prune import PATTERNS, PruningConfig, _lowest_k_mask
from lmcompress_core.methods.quantize import _ColumnLoop, _cholesky_of_inverse


def batch_masks(config: PruningConfig):
    """The keep-mask of each lazy batch for ``_ColumnLoop``: ``select(columns [batch, out], diagonal [batch], b0,
    b1)`` gives a float 0/1 mask [batch, out] from the OBS scores (columns in the original order)."""
    nm = PATTERNS[config.pattern]
    sparsity = config.effective_sparsity

    def select(columns: torch.Tensor, diagonal: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        scores = (columns.square() / diagonal.square()[:, None]).t()   # [out, batch]: one row per output
        if nm is None:
            keep = _lowest_k_mask(scores, round(sparsity * b1) - round(sparsity * b0))
        else:
            n, m = nm
            if (b1 - b0) % m:
                raise ValueError(f"the {n}:{m} pattern needs in_features divisible by {m}")
            keep = _lowest_k_mask(scores.reshape(scores.shape[0], -1, m), n).reshape(scores.shape)
        return keep.t().to(columns.dtype)

    return select


def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, config: PruningConfig,
                    check=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weights with the kept ones updated, keep-mask) of one ``[out, in]`` matrix given H = 2XXᵀ/n of
    its inputs. ``w`` is not written; ``check()`` runs between lazy batches and may raise to cancel."""
    w = w.detach().to(torch.float32)
    h = hessian.detach().to(torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0   # inputs never active: their weights change no output, scored by magnitude alone
    columns = w.t().clone(memory_format=torch.contiguous_format)
    keep = torch.ones_like(columns)
    loop = _ColumnLoop(columns, _cholesky_of_inverse(h, config.damp), None, keep, batch_masks(config), check)
    pruned = loop.run(None)
    return pruned.t().contiguous(), keep.t().to(torch.bool).contiguous()
