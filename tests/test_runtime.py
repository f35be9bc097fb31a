"""The runtime modules: real int4/int8 kernels against float references and against the fp32 simulation.

Tolerances come from bf16: the real runtime runs activations, norms and attention in bf16, so its logits may
differ from the fp32 simulation's by about as much as the whole model cast to bf16 differs from fp32. Measured
(seq 64): real/simulated ≤ 1.27× that difference (2-bit per-channel on the random llama), ≈ 1.0–1.1× elsewhere;
the bound is 2×.
"""
import copy

import pytest
import torch
from torch import nn

from lmcompress_core.compress import CompressionConfig, compress
from lmcompress_core.measure.speed import runtime_bytes
from lmcompress_core.methods.quantize import QuantizationConfig, quantize_tensor
from lmcompress_core.runtime.kernels import (DequantLinear, Int4Linear, Int4PlanesLinear, Int8Embedding, Int8Linear,
                                             _where_kept, kernel_module)

torch.set_num_threads(2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_weight(out_features=48, in_features=128, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits, granularity, group_size", [
    (4, "group", 32), (4, "group", 128), (3, "channel", 128), (2, "tensor", 128), (4, "group", 64)])
def test_int4_kernel_matches_the_float_reference_and_returns_its_codes(bits, granularity, group_size):
    qw = quantize_tensor(random_weight(), QuantizationConfig(bits=bits, granularity=granularity,
                                                             group_size=group_size))
    module = Int4Linear(qw, None)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    reference = x @ qw.dequantize().t()
    assert rel(module(x.to(torch.bfloat16)), reference) < 2 ** -6  # bf16 activations, scales and output
    back = module.quantized_weight()
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scales, qw.scales)


@pytest.mark.parametrize("bits, group_size, pruned", [(5, 32, False), (6, 128, False), (8, 64, False),
                                                      (6, 32, True), (8, 128, True)])
def test_grouped_5_to_8_bit_codes_run_as_two_4bit_planes_on_the_int4_kernel(bits, group_size, pruned):
    """Two independent references: the float matmul of the de-quantized codes, and the same codes as one dense
    bf16 matrix (DequantLinear, what ran before). The codes come back exactly; 8 bits are held per weight."""
    from lmcompress_core.measure.speed import runtime_bytes

    w = random_weight(64, 256)
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.4 if pruned else None
    qw = quantize_tensor(w if mask is None else w * mask, QuantizationConfig(bits=bits, group_size=group_size))
    qw = type(qw)(qw.codes, qw.scales, qw.zeros, qw.bits, qw.group_size, mask)
    module, refusal = kernel_module(qw, None)
    assert refusal is None and isinstance(module, Int4PlanesLinear) and module.packed.shape[0] == 2 * 64
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    y = module(x.to(torch.bfloat16))
    assert rel(y, x @ qw.dequantize().t()) < 2 ** -7
    assert rel(y, DequantLinear(qw, None)(x.to(torch.bfloat16))) < 2 ** -7
    if mask is not None:   # pruned weights de-quantize to 0 through both planes, within the bf16 grid (as int4's)
        weights = module(torch.eye(256, dtype=torch.bfloat16)).t().float()
        assert weights[~mask].abs().max() <= 2 ** -6 * weights[mask].abs().max()
    back = module.quantized_weight()
    assert torch.equal(back.codes[mask] if pruned else back.codes, qw.codes[mask] if pruned else qw.codes)
    assert torch.equal(back.scales, qw.scales) and torch.equal(back.zeros, qw.zeros)
    codes_and_grid = runtime_bytes(module) - (module.mask_bits.numel() if pruned else 0)
    assert 64 * 256 <= codes_and_grid <= 64 * 256 * 1.6   # a byte a weight, plus bf16 planes' grid and fp32 grid


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_many_rows_at_once_run_the_int4_codes_widened_to_bf16_and_give_the_kernels_result(bits, monkeypatch):
    """A perplexity window's rows: the codes read out of the kernel's storage under its bf16 grid, one bf16 GEMM,
    the int4pack kernel not called; the same result as the kernel within bf16, and a token at a time stays on it."""
    from lmcompress_core.runtime import kernels

    qw = quantize_tensor(random_weight(128, 256), QuantizationConfig(bits=bits, group_size=64))
    module, _ = kernel_module(qw, None)
    rows = kernels.INT4_WIDEN_FROM_ROWS
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    calls = []
    real = torch.ops.aten._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or real(*a))
    widened, one_row = module(x), module(x[:1])
    monkeypatch.undo()
    assert len(calls) == 1   # the single row only
    by_kernel = module._finish(module._kernel_mm(x), x)
    assert rel(widened, by_kernel) < 2 ** -7 and rel(one_row, by_kernel[:1]) < 2 ** -7
    assert rel(widened, x.float() @ qw.dequantize().t()) < 2 ** -6
    assert torch.equal(module.widened(), module.widened()) and module.widened().dtype == torch.bfloat16


@pytest.mark.parametrize("shape, bits", [((1536, 576), 4), ((576, 1536), 2), ((48, 96), 3)])
def test_int4_codes_read_through_the_nibble_order_equal_the_kernels_own_view(shape, bits):
    # two independent readings of the packed bytes: the packer's nibble order (what quantized_weight uses on the
    # CPU) and the kernel itself run on an identity matrix with scale 1 and zero 8 (the container codes)
    w = random_weight(*shape)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(3)) > 0.3
    qw = quantize_tensor(w * mask, QuantizationConfig(bits=bits, group_size=32))
    qw = type(qw)(qw.codes, qw.scales, qw.zeros, qw.bits, qw.group_size, mask)
    module = Int4Linear(qw, None)
    unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(shape[1] // 32, shape[0], 2).contiguous()
    by_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(shape[1], dtype=torch.bfloat16), module.packed,
                                                           32, unit).t().round().to(torch.int32) - module.shift
    codes = module.quantized_weight().codes
    assert torch.equal(codes.to(torch.int32), by_kernel)
    assert torch.equal(codes[mask], qw.codes[mask])   # kept weights: their own codes; pruned ones the zero-point


def test_dequant_fallback_holds_its_dense_bf16_matrix_once_made_at_first_use():
    from lmcompress_core.measure.speed import runtime_bytes

    qw = quantize_tensor(random_weight(), QuantizationConfig(bits=6, group_size=32))
    module = DequantLinear(qw, None)
    assert module.dense.is_meta and module.dense.dtype == torch.bfloat16 and module.dense.shape == qw.shape
    before = runtime_bytes(module)   # counts the matrix it will hold
    x = torch.randn(3, qw.shape[1])
    y = module(x)
    assert not module.dense.is_meta and runtime_bytes(module) == before
    assert torch.equal(module.dense, qw.dequantize().to(torch.bfloat16))
    assert torch.equal(y, torch.nn.functional.linear(x.to(torch.bfloat16), module.dense).float())
    assert "dense" not in module.state_dict()   # the codes are what is stored; the dense matrix is rebuilt
    twin = DequantLinear(qw, None)   # two stand-ins of one shape are two matrices, not one shared
    assert runtime_bytes(torch.nn.Sequential(twin, DequantLinear(qw, None))) == 2 * before


def test_dequant_fallback_takes_the_simulation_weight_only_while_it_still_is_the_codes():
    from lmcompress_core.runtime.modules import CompressedLinear

    layer = CompressedLinear.from_layer(nn.Linear(128, 48))
    qw = quantize_tensor(random_weight(), QuantizationConfig(bits=6, group_size=32))
    layer.set_quantized_(qw)
    dense = layer.simulated_weight()
    assert dense is not None and torch.equal(dense, qw.dequantize())
    module = DequantLinear(layer.quantized_weight(), None, layer.mask_bits, dense)
    assert torch.equal(module.dense, qw.dequantize().to(torch.bfloat16))
    with torch.no_grad():
        layer.weight.add_(0.5)   # trained, say: no longer what the codes de-quantize to
    assert layer.simulated_weight() is None
    layer.set_quantized_(qw)
    assert torch.equal(layer.simulated_weight(), qw.dequantize())


def test_a_layer_leaving_its_model_hands_its_weight_over_unless_it_is_tied():
    from lmcompress_core.runtime.modules import as_compressed_, shared_parameters

    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(32, 16))
    model[1].weight = model[0].weight   # tied
    own, tied = model[2].weight, model[0].weight
    shared = shared_parameters(model)
    assert shared == {id(tied)}
    as_compressed_(model, "2", shared)
    as_compressed_(model, "0", shared)
    assert model[2].weight is own                                    # moved, not copied
    assert model[0].weight is not tied and torch.equal(model[0].weight, tied)
    model[0].set_quantized_(quantize_tensor(tied.detach(), QuantizationConfig(bits=2, group_size=32)))
    assert model[1].weight is tied and not torch.equal(model[0].weight, tied)   # its twin keeps its weight
    copied = nn.Sequential(nn.Linear(32, 16))
    before = copied[0].weight
    as_compressed_(copied, "0")                                      # without `shared`: always a copy
    assert copied[0].weight is not before and torch.equal(copied[0].weight, before)


def test_group_128_on_576_wide_inputs_runs_as_kernel_groups_of_64():
    qw = quantize_tensor(random_weight(32, 576), QuantizationConfig(bits=4, group_size=128))
    module, refusal = kernel_module(qw, None)
    assert refusal is None and isinstance(module, Int4Linear) and module.kernel_group == 64
    x = torch.randn(3, 576)
    assert rel(module(x.to(torch.bfloat16)), x @ qw.dequantize().t()) < 2 ** -6


@pytest.mark.parametrize("bits, symmetric", [(8, False), (8, True), (5, False), (6, True)])
def test_int8_kernel_is_exact_with_an_asymmetric_zero_point(bits, symmetric):
    qw = quantize_tensor(random_weight() + 0.7, QuantizationConfig(bits=bits, granularity="channel",
                                                                   symmetric=symmetric))
    bias = torch.randn(48)
    module = Int8Linear(qw, bias)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    assert rel(module(x.to(torch.bfloat16)), x @ qw.dequantize().t() + bias) < 2 ** -6
    assert torch.equal(module.quantized_weight().codes, qw.codes)
    assert module.weight_int8.dtype == torch.int8 and not hasattr(module, "codes")  # one copy of the codes


@pytest.mark.parametrize("rows", [1, 47, 48, 256])
def test_int8_layers_widen_their_codes_for_many_rows_and_give_the_kernels_result(rows, monkeypatch):
    from lmcompress_core.runtime import kernels

    qw = quantize_tensor(random_weight() + 0.7, QuantizationConfig(bits=8, granularity="channel"))
    module = Int8Linear(qw, None)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    calls = []
    real = torch.ops.aten._weight_int8pack_mm
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", lambda *a: calls.append(1) or real(*a))
    y = module(x)
    monkeypatch.undo()
    assert bool(calls) == (rows < kernels.INT8_WIDEN_FROM_ROWS)   # one token at a time on int8pack, many widened
    direct = real(x, module.weight_int8, module.kernel_scales)
    direct.addcmul_(x.sum(-1, keepdim=True), module.correction)
    assert rel(y, direct.float()) < 2 ** -7   # both bf16 results of the same codes
    assert rel(y, x.float() @ qw.dequantize().t()) < 2 ** -6


def test_layers_no_kernel_takes_fall_back_and_say_why():
    narrow = quantize_tensor(random_weight(40, 48), QuantizationConfig(bits=4, group_size=32))
    grouped = quantize_tensor(random_weight(40, 48), QuantizationConfig(bits=6, group_size=32))
    for qw, why in ((narrow, "multiples of 16"), (grouped, "one scale per output channel; shape 40×48")):
        module, refusal = kernel_module(qw, None)
        assert isinstance(module, DequantLinear) and why in refusal
        x = torch.randn(2, qw.shape[1])
        assert rel(module(x), x @ qw.dequantize().t()) < 2 ** -6


@pytest.fixture(scope="module")
def models():
    from lmcompress_core.models.loading import load_model, tiny_random_model

    return {"tiny": load_model("tiny").model, "llama": tiny_random_model("llama").model}


CONFIGS = {
    "int4-g32": dict(bits=4, group_size=32), "int4-3bit-g128": dict(bits=3, group_size=128),
    "int4-2bit-channel": dict(bits=2, granularity="channel"), "int8-channel": dict(bits=8, granularity="channel"),
    "int8-5bit-symmetric": dict(bits=5, granularity="channel", symmetric=True),
    "planes-6bit-g32": dict(bits=6, group_size=32), "planes-8bit-g128": dict(bits=8, group_size=128),
    "planes-5bit-g64-symmetric": dict(bits=5, group_size=64, symmetric=True),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("name", ["tiny", "llama"])
def test_real_kernels_give_the_simulation_logits_within_bf16(models, name, kind):
    model = models[name]
    ids = torch.randint(model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    quantization = QuantizationConfig(**CONFIGS[kind])
    simulated = compress(model, CompressionConfig(quantization=quantization, runtime="simulate")).model
    real = compress(model, CompressionConfig(quantization=quantization, head="float")).model
    with torch.no_grad():
        fp32, bf16 = model(ids).logits, copy.deepcopy(model).to(torch.bfloat16)(ids).logits
        sim, got = simulated(ids).logits, real(ids).logits
    assert got.dtype == torch.bfloat16
    assert rel(got, sim) <= 2 * rel(bf16, fp32), (rel(got, sim), rel(bf16, fp32))


def test_tied_embedding_reads_the_int8_head_table_and_runtime_bytes_shrink(models):
    model = models["tiny"]
    cm = compress(model, CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32)))
    head, embedding = cm.model.get_output_embeddings(), cm.model.get_input_embeddings()
    assert isinstance(head, Int8Linear) and isinstance(embedding, Int8Embedding)
    assert embedding.weight_int8.data_ptr() == head.weight_int8.data_ptr()  # one table, held once
    ids = torch.tensor([[1, 5, 9]])
    rows = head.quantized_weight().dequantize()[ids[0]]
    assert rel(embedding(ids)[0], rows) < 2 ** -7
    # 4-bit codes (0.5 B) + a bf16 kernel scale/zero and the fp32 grid per group of 32 (12 B / 32) ≈ 0.875 B of
    # 4 B per weight, the int8 head ≈ 1 B of 4: the same derivation as SmolLM2's ≤ 35% (measured there: 22.7%)
    fraction = runtime_bytes(cm.model) / runtime_bytes(model)
    assert fraction <= 0.35, fraction
    assert "LM head int8" in cm.kernel and "int4 weight-only (real, aten int4pack, groups of 32)" in cm.kernel


def test_head_can_stay_float(models):
    cm = compress(models["tiny"], CompressionConfig(quantization=QuantizationConfig(bits=8, granularity="channel"),
                                                    head="float"))
    assert type(cm.model.get_output_embeddings()) is nn.Linear and cm.kernel.endswith("LM head bf16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: the CUDA dispatch of "
                                                          "Int4Linear / Int8Linear is only checked where one exists")
def test_cuda_dispatch_gives_the_cpu_result():
    for config in (QuantizationConfig(bits=4, group_size=32), QuantizationConfig(bits=8, granularity="channel")):
        qw = quantize_tensor(random_weight(64, 256), config)
        cpu, _ = kernel_module(qw, None)
        x = torch.randn(3, 256).to(torch.bfloat16)
        expected = cpu(x)
        gpu = copy.deepcopy(cpu).to("cuda")
        assert rel(gpu(x.cuda()).cpu(), expected) < 2 ** -6
        assert torch.equal(gpu.quantized_weight().codes.cpu(), qw.codes)


def test_small_models_run_on_one_thread_large_ones_keep_the_setting_and_it_comes_back():
    from lmcompress_core.runtime import threads

    before = torch.get_num_threads()
    small = nn.Linear(256, 256)
    large = nn.Linear(6000, 6000, device="meta")   # 36 M parameters, never allocated
    assert threads.threads_for(small) == 1 and threads.threads_for(large) == before
    with threads.running(small):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), threads.running(small):
        raise RuntimeError("a cancelled run")
    assert torch.get_num_threads() == before


def test_kept_codes_by_arithmetic_equal_torch_where():
    """The kernels fill pruned positions by uint8 arithmetic modulo 256 instead of torch.where: same bytes, for
    every pair of codes, with the fill per weight or broadcast per row."""
    codes = torch.arange(256, dtype=torch.uint8).repeat_interleave(256).view(256, 256)
    fill = torch.arange(256, dtype=torch.uint8).repeat(256).view(256, 256)
    mask = torch.rand(256, 256, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(_where_kept(mask, codes, fill), torch.where(mask, codes, fill))
    row_fill = fill[:, :1]
    assert torch.equal(_where_kept(mask, codes, row_fill), torch.where(mask, codes, row_fill))
