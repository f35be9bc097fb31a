"""Recipes for other tools: each parses, carries our setting's numbers, and lists what it cannot express."""
import pytest
import yaml

from lmcompress_core.compress import CompressionConfig
from lmcompress_core.methods.distill import DistillationConfig
from lmcompress_core.export import recipes
from lmcompress_core.methods.prune import PruningConfig
from lmcompress_core.methods.quantize import QuantizationConfig


def _config(**quantization):
    return CompressionConfig(quantization=QuantizationConfig(**quantization))


def test_gptq_group_setting_in_all_three_tools():
    r = recipes(_config(bits=4, group_size=32, symmetric=True, method="gptq", act_order=True))
    stage = yaml.safe_load(r.llmcompressor_yaml)["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    weights = stage["config_groups"]["group_0"]["weights"]
    assert weights == {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
                       "actorder": "weight"}
    assert stage["ignore"] == ["lm_head"] and stage["dampening_frac"] == 0.01
    assert r.gptqmodel == {"bits": 4, "group_size": 32, "desc_act": True, "sym": True, "damp_percent": 0.01}
    assert r.llama_quantize.endswith(" Q4_0")
    assert any("imatrix" in x for x in r.cannot_express["llama-quantize"])
    assert not r.cannot_express["GPTQModel"]


def test_rtn_asymmetric_channel_maps_to_quantization_modifier():
    r = recipes(_config(bits=4, granularity="channel"))
    mods = yaml.safe_load(r.llmcompressor_yaml)["quant_stage"]["quant_modifiers"]
    assert list(mods) == ["QuantizationModifier"]
    assert mods["QuantizationModifier"]["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    assert r.gptqmodel["group_size"] == -1 and r.gptqmodel["sym"] is False
    assert r.llama_quantize.endswith(" Q4_1")
    assert any("always runs GPTQ" in x for x in r.cannot_express["GPTQModel"])
    assert any("zero-point" in x for x in r.cannot_express["llm-compressor"])


def test_int8_kernel_adds_smoothquant_and_dynamic_activations():
    r = recipes(_config(bits=8, granularity="channel", symmetric=True))
    stages = yaml.safe_load(r.llmcompressor_yaml)
    assert list(stages) == ["smooth_stage", "quant_stage"]
    assert stages["smooth_stage"]["smoothing_modifiers"]["SmoothQuantModifier"]["smoothing_strength"] == 0.75
    group = stages["quant_stage"]["quant_modifiers"]["QuantizationModifier"]["config_groups"]["group_0"]
    assert group["input_activations"]["dynamic"] is True
    assert any("SQNR" in x for x in r.cannot_express["llm-compressor"])


@pytest.mark.parametrize("pattern,method,modifier,structure", [
    ("2:4", "wanda", "WandaPruningModifier", "2:4"),
    ("4:8", "sparsegpt", "SparseGPTModifier", "4:8"),
    ("unstructured", "magnitude", "MagnitudePruningModifier", "0:0"),
])
def test_pruning_and_distillation_limits(pattern, method, modifier, structure):
    config = CompressionConfig(quantization=QuantizationConfig(bits=3), distillation=DistillationConfig(steps=5),
                               pruning=PruningConfig(sparsity=0.5, pattern=pattern, method=method))
    r = recipes(config)
    sparsity = yaml.safe_load(r.llmcompressor_yaml)["sparsity_stage"]["sparsity_modifiers"][modifier]
    assert sparsity["mask_structure"] == structure
    assert r.llama_quantize.endswith(" Q3_K_M")
    for tool in ("llm-compressor", "GPTQModel", "llama-quantize"):
        assert any("distillation" in x for x in r.cannot_express[tool]), tool
    assert any("pruning" in x for x in r.cannot_express["GPTQModel"])
    text = r.to_text()
    assert "llm-compressor cannot express" in text and "vLLM" in text


def test_half_precision_needs_no_quantizer():
    r = recipes(_config(bits=16, dtype16="fp16"))
    assert yaml.safe_load(r.llmcompressor_yaml) == {} and r.gptqmodel == {}
    assert "--outtype f16" in r.llama_quantize


def test_cli_writes_recipes_without_loading_a_model(tmp_path, capsys):
    from lmcompress_core.cli import main

    out = tmp_path / "recipes.txt"
    assert main(["export", "--bits", "4", "--symmetric", "--method", "gptq", "--format", "recipe", "--out", str(out)]) == 0
    text = out.read_text()
    assert "GPTQModifier" in text and '"desc_act": true' in text and "Q4_0" in text   # act-order: GPTQ's default
    assert main(["export", "--bits", "4", "--method", "gptq", "--no-act-order", "--format", "recipe",
                 "--out", str(out)]) == 0
    assert '"desc_act": false' in out.read_text()
