"""Methods: what compression does to a weight — quantize (RTN, GPTQ, the MSE grid search, HQQ), prune (magnitude,
Wanda, N:M), distill (KD loss, training loop; recovery.py: what a compressed model trains), and the bit-budget
autopilot that mixes widths per layer.

Each method is one frozen dataclass config validated in ``__post_init__`` plus the functions that apply it;
``lmcompress_core.compress`` is the one verb that runs them in order. ``layers.py`` says which layers of a
model are compressed and shows every weight as an [out, in] float matrix.
"""
from lmcompress_core.methods.distill import DistillationConfig
from lmcompress_core.methods.prune import PruningConfig
from lmcompress_core.methods.quantize import QuantizationConfig

__all__ = ["DistillationConfig", "PruningConfig", "QuantizationConfig"]
