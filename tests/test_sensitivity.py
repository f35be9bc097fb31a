"""Per-layer sensitivity: one row per (layer, bits), error falling as bits grow, the model untouched."""
import math

import pytest
import torch

from lmcompress_core.compress import CompressionConfig
from lmcompress_core.methods.layers import linear_layers, weight_matrix
from lmcompress_core.methods.prune import PruningConfig
from lmcompress_core.methods.quantize import QuantizationConfig, quantize_tensor
from lmcompress_core.measure.sensitivity import layer_sensitivity

torch.set_num_threads(2)


def test_rows_cover_every_layer_and_error_falls_with_bits(random_arch):
    model = random_arch.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32))
    table = layer_sensitivity(model, config, bits_list=(2, 3, 4, 8, 16))
    layers = linear_layers(model)
    assert list(table.columns) == ["layer", "bits", "rel_mse", "sqnr_db"]
    assert len(table) == 5 * len(layers) and set(table["layer"]) == set(layers)
    for _, rows in table.groupby("layer"):
        errors = rows.sort_values("bits")["rel_mse"].tolist()
        assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_values_match_a_direct_computation(random_arch):
    model = random_arch.model
    name, module = next(iter(linear_layers(model).items()))
    config = CompressionConfig(quantization=QuantizationConfig(bits=3, granularity="channel"))
    row = layer_sensitivity(model, config, bits_list=(3,)).set_index("layer").loc[name]
    w = weight_matrix(module)
    rel = ((w - quantize_tensor(w, config.quantization).dequantize()) ** 2).sum() / (w ** 2).sum()
    assert math.isclose(row["rel_mse"], rel.item(), rel_tol=1e-5)
    assert math.isclose(row["sqnr_db"], -10 * math.log10(rel.item()), rel_tol=1e-5)


def test_pruning_adds_its_error_and_gptq_wanda_use_calibration(random_arch):
    model = random_arch.model
    ids = torch.randint(model.config.vocab_size, (4, 32))
    quant = QuantizationConfig(bits=8, granularity="channel", method="gptq")
    plain = layer_sensitivity(model, CompressionConfig(quantization=quant), (8,), calibration=ids)
    pruned = layer_sensitivity(model, CompressionConfig(quantization=quant, pruning=PruningConfig(0.5, method="wanda")),
                               (8,), calibration=ids)
    assert (pruned["rel_mse"] > 10 * plain["rel_mse"]).all()
    assert (pruned["rel_mse"] < 1).all()


def test_gptq_and_wanda_without_calibration_refuse_instead_of_running_something_else(random_arch):
    for config in (CompressionConfig(quantization=QuantizationConfig(bits=4, method="gptq")),
                   CompressionConfig(pruning=PruningConfig(0.5, method="wanda"))):
        with pytest.raises(ValueError, match="needs calibration"):
            layer_sensitivity(random_arch.model, config, (4,))
