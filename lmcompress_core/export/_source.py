"""What every exporter reads from a CompressedModel: the integer codes of each compressed layer and the float tensors.

Compressed weights are moving onto their modules (``module.quantized_weight()``); older CompressedModels keep
them in ``cm.quantized``. ``quantized_weights`` reads both, module first, so the exporters work with either.
"""
from __future__ import annotations

from lmcompress_core.methods.quantize import QuantizedWeight


def quantized_weights(cm) -> dict[str, QuantizedWeight]:
    """{module name: QuantizedWeight} of every integer-quantized layer of ``cm.model``."""
    found = {}
    for name, module in cm.model.named_modules():
        reader = getattr(module, "quantized_weight", None)
        if callable(reader):
            qw = reader()
            if qw is not None:
                found[name] = qw
    if found:
        return found
    return dict(getattr(cm, "quantized", {}) or {})


def config_metadata(cm) -> dict:
    """The compression settings and what ran, as plain JSON-able values (stored beside every export)."""
    return {"config": cm.config.to_dict(), "kernel": cm.kernel, "notes": list(getattr(cm, "notes", []))}
