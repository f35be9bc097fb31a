"""Hugging Face folder export: plain ``AutoModelForCausalLM.from_pretrained(folder)`` (no code of ours) gives the
compressed model's logits exactly — same weights, same dtype, same kernels — for every architecture."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmcompress_core.compress import CompressionConfig, compress
from lmcompress_core.export import export_hf
from lmcompress_core.export._source import quantized_weights
from lmcompress_core.methods.layers import weight_matrix
from lmcompress_core.models.loading import load_model
from lmcompress_core.methods.prune import PruningConfig
from lmcompress_core.methods.quantize import QuantizationConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one torch thread (conftest.one_thread)."""


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _ids(loaded):
    return torch.randint(0, len(loaded.tokenizer), (1, 40), generator=torch.Generator().manual_seed(2))


def test_every_architecture_reloads_with_identical_logits(random_arch, tmp_path):
    config = CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32), pruning=PruningConfig(sparsity=0.5),
                               runtime="simulate")   # fp32 throughout: the reload must match bit for bit
    cm = compress(random_arch.model, config)
    result = export_hf(cm, random_arch.tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert result.dtype == "float32" and next(reloaded.parameters()).dtype == torch.float32
    ids = _ids(random_arch)
    assert torch.equal(_logits(cm.model, ids), _logits(reloaded, ids))
    name, qw = next(iter(quantized_weights(cm).items()))
    assert torch.equal(weight_matrix(reloaded.get_submodule(name)), qw.dequantize())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["lmcompress"]["config"]["quantization"]["bits"] == 4
    assert saved["lmcompress"]["config"]["pruning"]["sparsity"] == 0.5
    assert AutoTokenizer.from_pretrained(tmp_path)("To be")["input_ids"] == random_arch.tokenizer("To be")["input_ids"]


def test_bf16_runtime_is_kept_within_bf16_resolution(tiny_loaded, tmp_path):
    """Weights are identical; only RoPE's inverse frequencies differ (our whole-model cast rounds them to bf16,
    transformers keeps them fp32), so logits agree to bf16 resolution: ≤ 2⁻⁶·max|logit| (measured ≈ 2⁻⁸)."""
    cm = compress(tiny_loaded.model, CompressionConfig(quantization=QuantizationConfig(bits=16, dtype16="bf16")))
    result = export_hf(cm, tiny_loaded.tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert result.dtype == "bfloat16" and next(reloaded.parameters()).dtype == torch.bfloat16
    for name, p in cm.model.named_parameters():
        assert torch.equal(p, reloaded.get_parameter(name)), name
    ids = _ids(tiny_loaded)
    ours, theirs = _logits(cm.model, ids).float(), _logits(reloaded, ids).float()
    assert (ours - theirs).abs().max() <= 2.0 ** -6 * ours.abs().max()


def test_int8_kernel_model_exports_its_8bit_weights_in_float(tiny_loaded, tmp_path):
    config = CompressionConfig(quantization=QuantizationConfig(bits=8, granularity="channel", symmetric=True))
    cm = compress(tiny_loaded.model, config)
    assert "int8" in cm.kernel
    result = export_hf(cm, tiny_loaded.tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    dtype = getattr(torch, result.dtype)   # the real runtime runs bf16: the folder holds the codes in bf16
    for name, qw in quantized_weights(cm).items():
        assert torch.equal(weight_matrix(reloaded.get_submodule(name)), qw.dequantize().to(dtype).float()), name
    assert "int4/int8 kernels" in result.note and "not bit for bit" in result.note


def test_cli_exports_the_tiny_model_as_a_hf_folder(tmp_path, capsys):
    from lmcompress_core.cli import main

    rc = main(["export", "--model", "tiny", "--bits", "4", "--runtime", "simulate", "--format", "hf",
               "--out", str(tmp_path / "hf"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["dtype"] == "float32"
    reloaded = AutoModelForCausalLM.from_pretrained(summary["out"])
    assert reloaded.config.lmcompress["config"]["quantization"]["bits"] == 4


def test_download_bytes_zips_a_loadable_folder(tmp_path):
    import zipfile

    from lmcompress_core.export import download_bytes

    config = CompressionConfig(quantization=QuantizationConfig(bits=4)).to_dict()
    data = download_bytes(load_model("tiny"), config, "hf")
    (tmp_path / "m.zip").write_bytes(data)
    zipfile.ZipFile(tmp_path / "m.zip").extractall(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert reloaded.config.lmcompress["config"]["quantization"]["bits"] == 4
