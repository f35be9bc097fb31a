"""LM Compression Lab engine: load causal LMs, compress them (quantize, prune, distill) and measure honestly.

This package never imports streamlit; the app in app.py and pages/ is a thin layer over it. The names below are
its public API; everything else is an implementation detail of its modules.
"""
from lmcompress_core.compress import Cancelled, CompressedModel, CompressionConfig, Progress, compress
from lmcompress_core.methods.distill import DistillationConfig
from lmcompress_core.measure.evaluation import Report, cached_report, clear_cache, evaluate
from lmcompress_core.models.loading import LoadedModel, ModelError, list_models, load_model
from lmcompress_core.measure.protocol import EvalProtocol, calibration_for
from lmcompress_core.methods.prune import PruningConfig
from lmcompress_core.methods.quantize import QuantizationConfig

__all__ = ["Cancelled", "CompressedModel", "CompressionConfig", "DistillationConfig", "EvalProtocol", "LoadedModel",
           "ModelError", "Progress", "PruningConfig", "QuantizationConfig", "Report", "cached_report",
           "calibration_for", "clear_cache", "compress", "evaluate", "list_models", "load_model"]
