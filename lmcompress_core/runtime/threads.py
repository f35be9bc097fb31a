"""How many CPU threads torch uses for one model: small models run on one.

A model's matrices must be large enough for a second thread to pay for the synchronisation at every
operation. The tiny model's (256 wide) are not, and a thread that waits for a descheduled partner loses
most when the machine is busy, as it is in the browser (Chromium and Streamlit share the 2 cores). Measured
here (median `evaluate` of five slider moves at Explore's protocol, one thread vs two): tiny, quiet 0.50 vs
0.47 s; other core 40% busy 0.49 vs 0.57 s; busier still (a test run beside it) 0.59 vs 1.41 s. SmolLM2-135M
gains from two (quiet 6.6 vs 4.7 s, other core 40% busy 6.9 vs 6.3 s), so models from ``SINGLE_THREAD_BELOW``
parameters up keep torch's own setting. Reports say how many threads ran (``LatencyReport.threads``).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

SINGLE_THREAD_BELOW = 30_000_000   # parameters


def threads_for(model: nn.Module) -> int:
    """The torch thread count to run ``model`` with: 1 for a small model, else the process's setting."""
    params = sum(p.numel() for p in model.parameters())
    return 1 if params < SINGLE_THREAD_BELOW else torch.get_num_threads()


@contextmanager
def running(model: nn.Module):
    """Run the block with ``threads_for(model)`` torch threads, then go back to the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads_for(model))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
