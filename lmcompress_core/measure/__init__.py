"""Measure: the protocol, and honest size, speed and quality measurements of a compressed model.

    protocol.py     EvalProtocol — what is measured and how; the key of the one result cache
    evaluation.py   evaluate(loaded, config, protocol) -> Report, stage by stage through a callback
    quality.py      sliding-window perplexity, KL statistics to the base, side-by-side generations
    speed.py        interleaved base/compressed latency, SpeedRatio, runtime bytes, memory bandwidth
    sensitivity.py  per-layer error of a setting, for the layers × bits heatmap
"""
from lmcompress_core.measure.evaluation import Report, cached_report, clear_cache, evaluate
from lmcompress_core.measure.protocol import EvalProtocol, calibration_for

__all__ = ["EvalProtocol", "Report", "cached_report", "calibration_for", "clear_cache", "evaluate"]
