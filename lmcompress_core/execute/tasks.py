"""The work an executor can run, by name: each takes the worker's LoadedModel and one plain-data payload.

A remote worker receives only the task's name, the payload and the options (all plain data) and looks the
function up here, so nothing but data crosses a process boundary: configurations travel as
``CompressionConfig.to_dict()``, reports come back as ``Report.to_dict()``.
"""
from __future__ import annotations

from collections.abc import Callable


def evaluate_config(loaded, payload: dict, evaluate: Callable | None = None, protocol: dict | None = None,
                    should_stop=None) -> dict:
    """``measure.evaluate`` of one configuration ({"config": CompressionConfig.to_dict()}) by the protocol
    (EvalProtocol.to_dict()) as a plain Report dict."""
    from lmcompress_core.compress import CompressionConfig
    from lmcompress_core.measure.evaluation import evaluate as measure_evaluate
    from lmcompress_core.measure.protocol import EvalProtocol

    report = (evaluate or measure_evaluate)(loaded, CompressionConfig.from_dict(payload["config"]),
                                            protocol=EvalProtocol(**(protocol or {})), should_stop=should_stop)
    return report if isinstance(report, dict) else report.to_dict()


def sensitivity_at_bits(loaded, payload: dict, should_stop=None) -> dict:
    """Per-layer sensitivity rows at one bit-width ({"config", "bits", "calibration": token id lists or None})."""
    import torch

    from lmcompress_core.compress import CompressionConfig
    from lmcompress_core.measure.sensitivity import layer_sensitivity

    calibration = payload.get("calibration")
    frame = layer_sensitivity(loaded.model, CompressionConfig.from_dict(payload["config"]), (payload["bits"],),
                              None if calibration is None else torch.tensor(calibration))
    return {"rows": frame.to_dict("records")}


TASKS: dict[str, Callable] = {"evaluate": evaluate_config, "sensitivity": sensitivity_at_bits}


def task_function(name: str) -> Callable:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
