"""compress(): every architecture and every kind of config, the base model untouched, masks and codes kept."""
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmcompress_core.compress import (_HANDLERS, Cancelled, CompressedModel, CompressionConfig, Progress,
                                      compress)
from lmcompress_core.methods.distill import DistillationConfig
from lmcompress_core.methods.prune import PruningConfig
from lmcompress_core.methods.quantize import QuantizationConfig

torch.set_num_threads(2)

KD = dict(steps=3, batch_size=2, seq_len=32)
KINDS = {
    "rtn-4-group32": CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32)),
    "gptq-3-channel": CompressionConfig(quantization=QuantizationConfig(bits=3, granularity="channel", method="gptq")),
    "gptq-4-actorder": CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32, method="gptq",
                                                                         act_order=True)),
    "int8-kernel": CompressionConfig(quantization=QuantizationConfig(bits=8, granularity="channel")),
    "int8-dynamic": CompressionConfig(quantization=QuantizationConfig(bits=8, granularity="channel"),
                                      runtime="dynamic_int8"),
    "rtn-4-simulated": CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32), runtime="simulate"),
    "bf16": CompressionConfig(quantization=QuantizationConfig(bits=16)),
    "fp16": CompressionConfig(quantization=QuantizationConfig(bits=16, dtype16="fp16")),
    "magnitude-50": CompressionConfig(pruning=PruningConfig(sparsity=0.5)),
    "magnitude-global-70": CompressionConfig(pruning=PruningConfig(sparsity=0.7, scope="global")),
    "wanda-2:4": CompressionConfig(pruning=PruningConfig(method="wanda", pattern="2:4")),
    "recovery": CompressionConfig(pruning=PruningConfig(sparsity=0.5),
                                  quantization=QuantizationConfig(bits=4, group_size=32),
                                  distillation=DistillationConfig(**KD)),
    "student": CompressionConfig(distillation=DistillationConfig(mode="student", **KD)),
    "everything-int8": CompressionConfig(pruning=PruningConfig(sparsity=0.3, method="wanda"),
                                         quantization=QuantizationConfig(bits=8, method="gptq"),
                                         distillation=DistillationConfig(**KD), runtime="dynamic_int8"),
}


@pytest.fixture(scope="module")
def gpt2():
    from lmcompress_core.models.loading import tiny_random_model

    return tiny_random_model("gpt2").model


def calibration(model, n=8, seq_len=48, seed=0):
    return torch.randint(model.config.vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def effective_weight(module) -> torch.Tensor | None:
    """[out, in] weight a layer really applies: the float weight, or a kernel module run on an identity matrix."""
    from lmcompress_core.runtime.kernels import ActivationInt8Linear

    if isinstance(module, ActivationInt8Linear):
        return None  # torch's dynamic int8 quantizes its input: an identity matrix does not read its weight
    if isinstance(getattr(module, "weight", None), torch.Tensor):
        return module.weight.detach().float()
    eye = torch.eye(module.matrix_shape[1], dtype=torch.bfloat16)
    return (module(eye) - module(torch.zeros_like(eye[:1]))).float().t()  # minus the bias (distillation trains it)


def assert_masks_and_codes_hold(cm: CompressedModel):
    for name, module in cm.layers().items():
        qw, mask, w = module.quantized_weight(), module.keep_mask(), effective_weight(module)
        exact = isinstance(getattr(module, "weight", None), torch.Tensor)
        if qw is not None:
            assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) < 2 ** qw.bits
            if w is not None:  # kernels compute in bf16: within bf16 rounding of the de-quantized codes
                torch.testing.assert_close(w, qw.dequantize(), **({"atol": 1e-6, "rtol": 0} if exact else
                                                                  {"atol": 1e-2, "rtol": 1e-2}))
        if mask is not None and w is not None:
            # on int4pack a pruned weight is (z − 8)·s + zero with scale and zero held in bf16: zero up to bf16
            # roundings, measured ≈ 0.07 of a quantization step on the random gpt2; bound: 1/8 step
            bound = 1e-6 * float(w.abs().max()) if exact else float(qw.scales.max()) / 8
            assert w[~mask].abs().max() <= bound, f"pruned weights of {name} came back"


def test_every_architecture_prunes_quantizes_and_distills(random_arch):
    model = random_arch.model
    before = snapshot(model)
    config = CompressionConfig(pruning=PruningConfig(sparsity=0.5, method="wanda"),
                               quantization=QuantizationConfig(bits=4, group_size=32, method="gptq"),
                               distillation=DistillationConfig(**KD))
    cm = compress(model, config, calibration=calibration(model))
    assert_same_state(model, before)
    held = {n: m for n, m in cm.layers().items() if m is not cm.model.get_output_embeddings()}  # head: int8
    assert cm.model is not model and len(held) >= 8
    assert all(m.keep_mask() is not None and m.quantized_weight() is not None for m in held.values())
    assert_masks_and_codes_hold(cm)
    for name, module in held.items():
        assert abs((~module.keep_mask()).float().mean().item() - 0.5) <= 0.005
    assert [row["step"] for row in cm.history] == [0, 1, 2, 3]
    assert all(math.isfinite(row["loss"]) for row in cm.history) and "ppl" in cm.history[-1]
    logits = cm.model(input_ids=calibration(model, 2)).logits
    assert torch.isfinite(logits).all()
    assert cm.kernel.endswith("bf16 activations; LM head int8 (real, aten int8pack) + dense zeros — no sparse kernel")


@pytest.mark.parametrize("kind", list(KINDS))
def test_base_model_is_never_mutated(gpt2, kind):
    before = snapshot(gpt2)
    cm = compress(gpt2, KINDS[kind], calibration=calibration(gpt2))
    assert_same_state(gpt2, before)
    assert all(isinstance(m, Conv1D) for n, m in gpt2.named_modules() if n.endswith("c_attn"))
    assert_masks_and_codes_hold(cm)
    assert torch.isfinite(cm.model(input_ids=calibration(gpt2, 1)).logits.float()).all()


@pytest.mark.parametrize("kind, kernel", [
    ("rtn-4-simulated", "fp32 dense — quantization simulated"),
    ("rtn-4-group32", "int4 weight-only (real, aten int4pack, groups of 32), bf16 activations; "
                      "LM head int8 (real, aten int8pack)"),
    ("gptq-3-channel", "int4 weight-only (real, aten int4pack, groups of 64/128; 3-bit codes in the 4-bit "
                       "container), bf16 activations; LM head int8 (real, aten int8pack)"),
    ("int8-kernel", "int8 weight-only (real, aten int8pack), bf16 activations; LM head int8 (real, aten int8pack)"),
    ("int8-dynamic", "int8 (real, torch dynamic; activations quantized too; SmoothQuant α=0.75; "
                     "0 of 8 layers kept fp32)"),
    ("bf16", "bf16"), ("fp16", "fp16"),
    ("magnitude-50", "fp32 dense + dense zeros — no sparse kernel"),
    ("student", "fp32 dense"),
    ("everything-int8", "int8 (real, torch dynamic; activations quantized too; SmoothQuant α=0.75; "
                        "0 of 8 layers kept fp32)"
                        " + dense zeros — no sparse kernel"),
])
def test_kernel_says_what_really_runs(gpt2, kind, kernel):
    assert compress(gpt2, KINDS[kind], calibration=calibration(gpt2)).kernel == kernel


GROUPED6 = CompressionConfig(quantization=QuantizationConfig(bits=6, group_size=32))


@pytest.mark.parametrize("config", [
    CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32)),
    CompressionConfig(quantization=QuantizationConfig(bits=5, group_size=32), pruning=PruningConfig(0.5)),
    CompressionConfig(quantization=QuantizationConfig(bits=8, granularity="channel"), pruning=PruningConfig(0.3)),
    CompressionConfig(quantization=QuantizationConfig(bits=6, group_size=32, layer_bits=(("mlp", 3), (r"\.0\.", 16)))),
], ids=["4bit", "5bit-pruned-planes", "8bit-pruned", "mixed-planes"])
def test_codes_go_onto_kernels_without_their_float_weights_and_the_model_is_the_same(random_arch, config,
                                                                                      monkeypatch):
    """The real runtime releases each linear layer's float weight instead of writing the de-quantized matrix
    into it (the kernel modules read the codes): the model that comes out is the one the written weights gave,
    tensor for tensor, and nothing of it is left on the meta device."""
    _released_equals_written(random_arch.model, config, monkeypatch, dequantized=False)


def test_layers_no_kernel_takes_make_their_dense_matrix_when_first_needed(monkeypatch):
    """A GPT-2 40 wide: no int4pack group fits its layers and 6-bit groups have no int8pack scale, so they run as
    dense bf16 matrices (DequantLinear), made lazily from released codes, handed over from written weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    narrow = GPT2LMHeadModel(GPT2Config(n_embd=40, n_layer=2, n_head=2, n_positions=64, vocab_size=300)).eval()
    _released_equals_written(narrow, GROUPED6, monkeypatch, dequantized=True)


def _released_equals_written(base, config, monkeypatch, dequantized: bool) -> None:
    import sys

    before = snapshot(base)
    released = compress(base, config)
    monkeypatch.setattr(sys.modules["lmcompress_core.compress"], "_kernels_next", lambda run, cfg: False)
    written = compress(base, config)   # the weights it borrows are its own before they are written
    assert_same_state(base, before)
    assert released.kernel == written.kernel and released.notes == written.notes
    from lmcompress_core.runtime.kernels import DequantLinear, prepare_

    # released codes make their dense bf16 matrices when first needed; the written weights hand theirs over
    lazy = sum(isinstance(m, DequantLinear) for m in released.model.modules())
    assert prepare_(written.model) == 0 and prepare_(released.model) == lazy and bool(lazy) == dequantized
    assert prepare_(released.model) == 0
    ours, theirs = released.model.state_dict(), written.model.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    pairs = zip(released.model.modules(), written.model.modules())
    dense = [(a.dense, b.dense) for a, b in pairs if isinstance(a, DequantLinear)]
    assert all(torch.equal(a, b) for a, b in dense) and bool(dense) == dequantized
    assert not any(t.is_meta for t in list(released.model.parameters()) + list(released.model.buffers()))
    ids = torch.randint(base.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(released.model(ids).logits, written.model(ids).logits)


@pytest.mark.parametrize("config", [
    CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32)),
    CompressionConfig(quantization=QuantizationConfig(bits=5, group_size=32), pruning=PruningConfig(0.5)),
    CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32, method="gptq"),
                      pruning=PruningConfig(0.3, method="wanda")),
    CompressionConfig(quantization=QuantizationConfig(bits=6, group_size=32, layer_bits=((r"\.0\.", 16),)),
                      pruning=PruningConfig(pattern="2:4"), head="float"),
    CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32), include_embeddings=True),
], ids=["4bit", "5bit-magnitude", "gptq-wanda", "mixed-nm-head-float", "embeddings"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_borrowed_weights_leave_the_base_untouched_and_the_model_is_a_copys(random_arch, config, dtype, monkeypatch):
    """When codes go straight onto kernels, the working copy borrows the base's linear and LM-head weights
    instead of copying them: the base keeps every value and never sees an in-place write (version counters), the
    compressed model shares no memory with it, and it equals, tensor for tensor, the model a full deep copy gives
    (twice: the second pruning reads its masks from the cache)."""
    import sys

    base = random_arch.model.to(dtype)
    before = snapshot(base)
    versions = {k: v._version for k, v in base.state_dict(keep_vars=True).items()}
    calib = calibration(base)
    borrowed = [compress(base, config, calibration=calib) for _ in range(2)]
    monkeypatch.setattr(sys.modules["lmcompress_core.compress"], "_borrowable", lambda model, cfg: [])
    copied = compress(base, config, calibration=calib)
    assert_same_state(base, before)
    assert {k: v._version for k, v in base.state_dict(keep_vars=True).items()} == versions
    memory = {t.untyped_storage().data_ptr() for t in list(base.parameters()) + list(base.buffers())}
    for cm in borrowed:
        held = [t for t in list(cm.model.parameters()) + list(cm.model.buffers()) if not t.is_meta]
        assert not any(t.untyped_storage().data_ptr() in memory for t in held)
        assert cm.kernel == copied.kernel and cm.notes == copied.notes
        ours, theirs = cm.model.state_dict(), copied.model.state_dict()
        assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_borrowed_weight_written_in_place_would_be_caught():
    """The check above can fail: an in-place write into a borrowed weight changes the base."""
    from lmcompress_core.models.loading import tiny_random_model
    from lmcompress_core.runtime.modules import borrowing_copy, own_borrowed_

    base = tiny_random_model("llama").model
    layer = "model.layers.0.mlp.up_proj"
    copy_, borrowed = borrowing_copy(base, [base.get_submodule(layer).weight])
    assert copy_.get_submodule(layer).weight is not base.get_submodule(layer).weight
    version = base.get_submodule(layer).weight._version
    with torch.no_grad():
        copy_.get_submodule(layer).weight.mul_(0)
    assert base.get_submodule(layer).weight._version > version and not base.get_submodule(layer).weight.any()
    fresh = tiny_random_model("llama").model
    copy_, borrowed = borrowing_copy(fresh, [fresh.get_submodule(layer).weight])
    assert own_borrowed_(copy_, borrowed) == 1
    with torch.no_grad():
        copy_.get_submodule(layer).weight.mul_(0)
    assert fresh.get_submodule(layer).weight.any()


def test_zero_sparsity_is_bit_identical(random_arch):
    model = random_arch.model
    cm = compress(model, CompressionConfig(pruning=PruningConfig(sparsity=0.0)))
    assert cm.layers() == {}
    assert_same_state(cm.model, snapshot(model))


def _masks(cm):
    """Keep-masks of the pruned layers (the int8 LM head holds codes, no mask)."""
    masks = {name: m.keep_mask() for name, m in cm.layers().items()}
    return {name: mask for name, mask in masks.items() if mask is not None}


@pytest.mark.parametrize("pruning", [PruningConfig(sparsity=0.5), PruningConfig(sparsity=0.7, scope="global"),
                                     PruningConfig(pattern="2:4")])
def test_magnitude_masks_are_reused_across_bit_widths_and_equal_fresh_ones(random_arch, pruning):
    from lmcompress_core.compress import MAGNITUDE_MASKS

    model = random_arch.model
    MAGNITUDE_MASKS.clear()
    fresh = compress(model, CompressionConfig(pruning=pruning, quantization=QuantizationConfig(bits=3, group_size=32)))
    assert MAGNITUDE_MASKS.models.get(model)   # kept for this base model
    reused = compress(model, CompressionConfig(pruning=pruning, quantization=QuantizationConfig(bits=4, group_size=32)))
    MAGNITUDE_MASKS.clear()
    recomputed = compress(model, CompressionConfig(pruning=pruning, quantization=QuantizationConfig(bits=4,
                                                                                                  group_size=32)))
    masks = _masks(reused)
    assert masks.keys() == _masks(fresh).keys() and masks
    assert all(torch.equal(masks[n], _masks(fresh)[n]) and torch.equal(masks[n], _masks(recomputed)[n]) for n in masks)
    for name in masks:   # the reused mask really zeroes the weights it removes
        module = reused.layers()[name]
        assert torch.equal(module.quantized_weight().dequantize()[~masks[name]],
                           torch.zeros(int((~masks[name]).sum())))
    out = lambda cm: cm.model(input_ids=calibration(model, 1)).logits.float()
    assert torch.equal(out(reused), out(recomputed))


def test_cached_head_codes_are_the_heads_own_and_a_changed_head_is_quantized_afresh(gpt2):
    from lmcompress_core.methods.layers import weight_matrix
    from lmcompress_core.methods.quantize import quantize_weight
    from lmcompress_core.runtime.finish import _head_codes

    per_channel = QuantizationConfig(bits=8, granularity="channel")
    w = weight_matrix(gpt2.get_output_embeddings())
    from lmcompress_core.runtime.finish import HEAD_CODES

    HEAD_CODES.clear()
    first, again = _head_codes(gpt2, w), _head_codes(gpt2, w.clone())
    assert again is first and torch.equal(first.codes, quantize_weight(w, per_channel).codes)
    changed = w.clone()
    changed[0, 0] += 1.0   # e.g. a head trained by distillation: never the base model's codes
    assert torch.equal(_head_codes(gpt2, changed).codes, quantize_weight(changed, per_channel).codes)
    assert not torch.equal(_head_codes(gpt2, changed).scales, first.scales)


def test_int8_kernel_runs_real_int8_and_stays_close(gpt2):
    ids = calibration(gpt2, 2)
    simulated = compress(gpt2, CompressionConfig(quantization=QuantizationConfig(bits=8, granularity="channel",
                                                                                 int8_kernel=False)))
    real = compress(gpt2, KINDS["int8-dynamic"])
    kinds = {n: type(m.kernel).__module__ for n, m in real.layers().items()}
    assert set(kinds.values()) == {"torch.ao.nn.quantized.dynamic.modules.linear"} and len(kinds) == 8
    assert isinstance(real.model.lm_head, nn.Linear)  # excluded layers stay float
    a, b = simulated.model(input_ids=ids).logits, real.model(input_ids=ids).logits
    assert (a - b).norm() / a.norm() < 0.02


def test_half_precision_casts_the_copy(gpt2):
    cm = compress(gpt2, KINDS["bf16"])
    assert {p.dtype for p in cm.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in gpt2.parameters()} == {torch.float32}
    assert cm.layers() == {}


def test_embeddings_and_head_stay_float_unless_asked(random_arch):
    model = random_arch.model
    head = model.get_output_embeddings().weight.detach().clone()
    cm = compress(model, KINDS["rtn-4-simulated"])
    assert torch.equal(cm.model.get_output_embeddings().weight, head)
    assert not any("embed" in n or "wte" in n or "lm_head" in n for n in cm.layers())
    everything = compress(model, CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32),
                                                   include_embeddings=True, runtime="simulate"))
    assert any(isinstance(m, nn.Embedding) for m in everything.layers().values())
    assert not torch.equal(everything.model.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_include_patterns_choose_layers(gpt2):
    cm = compress(gpt2, CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32), include=(r"mlp",)))
    body = [n for n, m in cm.layers().items() if m is not cm.model.get_output_embeddings()]  # head: int8
    assert body and all(".mlp." in n for n in body)


def test_progress_reaches_every_stage_in_order_and_cancel_stops(gpt2):
    seen = []
    compress(gpt2, KINDS["recovery"], calibration=calibration(gpt2), callback=seen.append)
    stages = [p.stage for p in seen]
    assert all(isinstance(p, Progress) for p in seen)
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == ["prune", "quantize", "distill", "finish", "done"]
    distill = [p for p in seen if p.stage == "distill"]
    assert distill[-1].step == distill[-1].total == 3 and "loss" in distill[-1].metrics
    assert all(" left" in p.message for p in distill[:-1]) and " left" not in distill[-1].message   # time to go

    before, calls = snapshot(gpt2), []
    with pytest.raises(Cancelled):
        compress(gpt2, KINDS["recovery"], calibration=calibration(gpt2),
                 should_stop=lambda: calls.append(1) or len(calls) > 20)
    assert_same_state(gpt2, before)


def test_distillation_asks_should_stop_within_each_block(gpt2):
    """Between two steps' reports should_stop is asked before each block of every pass (a step is ~4 s on
    SmolLM2; in the app, asking is where Streamlit stops a run for a new move), and a stop asked in the middle of
    a step stops it before its report."""
    from lmcompress_core.methods.layers import transformer_blocks

    blocks, events = len(transformer_blocks(gpt2)[2]), []
    compress(gpt2, KINDS["recovery"], calibration=calibration(gpt2),
             callback=lambda p: events.append(p.step) if p.stage == "distill" and "loss" in p.metrics else None,
             should_stop=lambda: events.append("asked") and False)
    reports = [i for i, e in enumerate(events) if e != "asked"]
    between = [events[i + 1:j] for i, j in zip(reports, reports[1:])]
    # an update step: the teacher's and the student's forward and the student's backward, block by block
    assert len(between) == 3 and all(len(asks) >= 3 * blocks for asks in between)

    asked_in_step_2 = []

    def stop() -> bool:
        if events[-1:] == [1]:
            asked_in_step_2.append(1)
        return len(asked_in_step_2) > 2 * blocks   # past the two forwards of step 2: in its backward

    events.clear()
    with pytest.raises(Cancelled):
        compress(gpt2, KINDS["recovery"], calibration=calibration(gpt2), should_stop=stop,
                 callback=lambda p: events.append(p.step) if p.stage == "distill" and "loss" in p.metrics else None)
    assert events[-1] == 1


def test_new_masks_ask_should_stop_between_layers(random_arch, monkeypatch):
    """Computing a new sparsity's masks (~0.3 s on SmolLM2) can be abandoned between two layers: should_stop
    turning True halfway stops compress before the other layers' masks are computed."""
    import sys

    from lmcompress_core.compress import MAGNITUDE_MASKS

    engine = sys.modules["lmcompress_core.compress"]   # the package's `compress` names the function

    config = CompressionConfig(pruning=PruningConfig(sparsity=0.35))
    MAGNITUDE_MASKS.clear()
    made, calls = [], []
    real = engine.layer_mask
    monkeypatch.setattr(engine, "layer_mask", lambda *a, **k: made.append(1) or real(*a, **k))
    compress(random_arch.model, config, should_stop=lambda: calls.append(len(made)) and False)
    layers = len(made)
    assert layers > 4 and calls.count(layers // 2) >= 1   # asked between masks, not only once they are all made
    MAGNITUDE_MASKS.clear()
    made.clear()
    with pytest.raises(Cancelled):
        compress(random_arch.model, config, should_stop=lambda: len(made) >= layers // 2)
    assert len(made) == layers // 2


def test_methods_that_need_text_say_so(gpt2):
    for config in (KINDS["gptq-3-channel"], KINDS["wanda-2:4"], KINDS["student"]):
        with pytest.raises(ValueError, match="calibration"):
            compress(gpt2, config)


@pytest.mark.parametrize("config, words", [
    (CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32, method="gptq"), include_embeddings=True,
                       runtime="simulate"), "quantized with RTN instead of GPTQ: "),
    (CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32, method="mse"), include_embeddings=True,
                       runtime="simulate"), "fitted by the MSE grid on the plain weight error, not the output error: "),
    (CompressionConfig(pruning=PruningConfig(sparsity=0.5, method="wanda"), include_embeddings=True),
     "pruned by magnitude instead of Wanda: "),
])
def test_fallbacks_are_named_in_the_notes(gpt2, config, words):
    """A layer the calibrated method cannot run as asked (an embedding has no calibration inputs) is named in the
    notes with what ran instead; the layers that did get their method are not."""
    cm = compress(gpt2, config, calibration=calibration(gpt2))
    said = [n for n in cm.notes if words in n]
    assert len(said) == 1, cm.notes
    named = said[0].split(words)[1].split(", ")
    assert "transformer.wte" in named and not any(".attn." in name or ".mlp." in name for name in named)


def test_mse_per_tensor_says_it_fits_the_weight_error(gpt2):
    config = CompressionConfig(quantization=QuantizationConfig(bits=4, granularity="tensor", method="mse"),
                               runtime="simulate")
    cm = compress(gpt2, config, calibration=calibration(gpt2))
    assert any("MSE grid per tensor" in n and "plain weight error" in n for n in cm.notes), cm.notes


def test_student_mode_keeps_every_other_block_and_its_masks(random_arch):
    model = random_arch.model
    config = CompressionConfig(pruning=PruningConfig(sparsity=0.5), distillation=DistillationConfig(mode="student", **KD))
    cm = compress(model, config, calibration=calibration(model))
    assert cm.model.config.num_hidden_layers == 1 and model.config.num_hidden_layers == 2
    assert len(cm.layers()) == len(compress(model, CompressionConfig(pruning=PruningConfig(0.5))).layers()) // 2
    assert_masks_and_codes_hold(cm)
    out = cm.model.generate(calibration(model, 1, 8), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_config_round_trips_and_keys_are_stable():
    config = KINDS["recovery"]
    again = CompressionConfig.from_dict(config.to_dict())
    assert again == config and again.key() == config.key()
    assert config.key() != KINDS["student"].key()
    assert CompressionConfig(include=["mlp"]).include == ("mlp",)


@pytest.mark.parametrize("build, words", [
    (lambda: CompressionConfig.from_dict({"bits": 4}), "unknown compression setting"),
    (lambda: CompressionConfig.from_dict({"quantization": {"bits": 7}}), "bits must be one of"),
    (lambda: CompressionConfig.from_dict({"pruning": {"sparsity": 1.0}}), "every weight"),
    (lambda: CompressionConfig.from_dict({"distillation": {"temperature": 0}}), "temperature"),
    (lambda: CompressionConfig.from_dict({"distillation": {"steps": -1}}), "steps"),
    (lambda: CompressionConfig.from_dict({"quantization": {"bitz": 4}}), "unknown QuantizationConfig"),
    (lambda: CompressionConfig(quantization={"bits": 4}), "QuantizationConfig or None"),
    (lambda: CompressionConfig(include=("(",)), "not a valid regular expression"),
    (lambda: QuantizationConfig(method="hqq", symmetric=True), "fits an asymmetric grid"),
    (lambda: QuantizationConfig(method="mse", grid="minmax"), "would be ignored"),
    (lambda: CompressionConfig(quantization=QuantizationConfig(bits=4), runtime="dynamic_int8"), "needs bits=8"),
])
def test_bad_settings_are_refused_before_anything_runs(build, words):
    with pytest.raises(ValueError, match=words):
        build()


def test_handlers_are_looked_up_by_config_type():
    assert set(_HANDLERS) == {QuantizationConfig, PruningConfig, DistillationConfig}


# ---- quality on the trained tiny model (assets/models/tiny) --------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_loaded):
    """The trained tiny model, 2048 held-out tokens as 8 windows of 256, and 16 calibration rows of training text."""
    from lmcompress_core.data import calibration_batches, load_text, token_ids

    tokenizer = tiny_loaded.tokenizer
    heldout = token_ids(tokenizer, load_text("tiny-heldout"))[:2048].reshape(8, 256)
    calib = calibration_batches(tokenizer, load_text("tiny-train"), n_samples=16, seq_len=256)
    return tiny_loaded.model, heldout, calib


@torch.no_grad()
def perplexity(model, windows):
    """exp(mean next-token cross-entropy) over independent windows (a local helper, not measure.perplexity)."""
    logits = model(input_ids=windows).logits[:, :-1].float()
    return math.exp(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


def quantized_ppl(tiny, runtime="real", **kwargs):
    model, heldout, calib = tiny
    return perplexity(compress(model, CompressionConfig(quantization=QuantizationConfig(**kwargs), runtime=runtime),
                               calibration=calib).model, heldout)


def test_tiny_perplexity_rises_as_bits_fall_and_8_bit_is_within_1_percent(tiny):
    model, heldout, _ = tiny
    base = perplexity(model, heldout)
    by_bits = [quantized_ppl(tiny, bits=b, runtime="simulate") for b in (8, 4, 3, 2)]
    assert by_bits[1:] == sorted(by_bits[1:]), by_bits
    assert by_bits[1] >= 0.99 * by_bits[0], by_bits  # 4-bit g128 is never better than 8-bit beyond noise
    assert by_bits[0] <= 1.01 * base
    assert by_bits[-1] > 1.5 * base  # 2 bits hurts as in a real LLM (measured ×2.3), so the ordering is not noise
    # the real int8 weight-only kernel, rest of the model in bf16, LM head int8
    assert quantized_ppl(tiny, bits=8, granularity="channel") <= 1.01 * base


def test_tiny_gptq_beats_rtn_at_2_bits(tiny):
    """Where RTN does real damage (2-bit g128: held-out perplexity ×2.3 on the shipped model) GPTQ takes back much
    of it (measured: 126 against RTN's 193 before issue 33)."""
    rtn = quantized_ppl(tiny, bits=2)
    gptq = quantized_ppl(tiny, bits=2, method="gptq")
    assert gptq < 0.85 * rtn, (gptq, rtn)


def test_tiny_gptq_beats_rtn_at_3_bits_with_the_cli_defaults(tiny):
    """Issue 33: sequential GPTQ from searched grids, as `evaluate --model tiny --bits 3 --method gptq` runs it
    (real kernels, groups of 128, act-order). Measured: 90.3 against RTN's 91.06; columns in order 89.1-89.4
    (act-order is the default for SmolLM2's sake: 11.94 against 13.42 at int3 g128); one-pass GPTQ on min-max
    grids, the method before, gave 92.6 (above RTN)."""
    rtn = quantized_ppl(tiny, bits=3)
    gptq = quantized_ppl(tiny, bits=3, method="gptq")
    in_order = quantized_ppl(tiny, bits=3, method="gptq", act_order=False)
    assert gptq < rtn and in_order < 0.99 * rtn, (gptq, in_order, rtn)


@torch.no_grad()
def kl_to(model, reference, windows) -> float:
    """Mean KL(reference ‖ model) per token over the windows, in nats."""
    ref = reference(input_ids=windows).logits.float().log_softmax(-1)
    ours = model(input_ids=windows).logits.float().log_softmax(-1)
    return (ref.exp() * (ref - ours)).sum(-1).mean().item()


def test_tiny_sequential_gptq_leaves_less_error_than_one_pass(tiny):
    """Layers fitted to the inputs the quantized layers before them give: the model's output error (KL to the
    float model on held-out text) is below one-pass GPTQ's. Measured at 3 bits g128, columns in order: 0.137
    against 0.142. With act-order the tiny model's one-pass is lower (0.136 against 0.142), SmolLM2's is not
    (perplexity 12.92 against 11.94 sequential, int3 g128), so sequential stays the default."""
    model, heldout, calib = tiny
    kl = {}
    for calibration_pass in ("sequential", "one-pass"):
        q = QuantizationConfig(bits=3, method="gptq", calibration_pass=calibration_pass, act_order=False)
        kl[calibration_pass] = kl_to(compress(model, CompressionConfig(quantization=q), calibration=calib).model,
                                     model, heldout)
    assert kl["sequential"] < kl["one-pass"], kl


@pytest.mark.parametrize("pattern,ratio", [("unstructured", 0.97), ("2:4", 0.95)])
def test_tiny_sparsegpt_is_below_wanda(tiny, pattern, ratio):
    """Measured held-out perplexity: 50% unstructured 89.7 against Wanda's 93.8; 2:4 96.0 against 105.7."""
    model, heldout, calib = tiny
    ppl = {}
    for method in ("wanda", "sparsegpt"):
        cm = compress(model, CompressionConfig(pruning=PruningConfig(0.5, method=method, pattern=pattern)),
                      calibration=calib)
        ppl[method] = perplexity(cm.model, heldout)
    assert ppl["sparsegpt"] <= ratio * ppl["wanda"], ppl
    masks = [m.keep_mask() for m in cm.layers().values()]
    assert all(abs((~k).float().mean().item() - 0.5) < 1e-6 for k in masks)


def test_tiny_sparsegpt_pruned_and_quantized_in_one_pass(tiny):
    """SparseGPT 2:4 with GPTQ 4-bit: the masks come out of GPTQ's column loop with the 2:4 pattern, pruned
    weights hold no value, and the model beats Wanda 2:4 then GPTQ (measured: 95.8 against 107.8)."""
    model, heldout, calib = tiny
    q = QuantizationConfig(bits=4, method="gptq")
    ppl = {}
    for method in ("wanda", "sparsegpt"):
        cm = compress(model, CompressionConfig(quantization=q, pruning=PruningConfig(method=method, pattern="2:4")),
                      calibration=calib)
        ppl[method] = perplexity(cm.model, heldout)
    masked = [m for m in cm.layers().values() if m.keep_mask() is not None]   # not the int8 LM head
    assert len(masked) == len(CompressionConfig().chosen_layers(model))
    for m in masked:
        keep = m.keep_mask()
        assert torch.all((~keep).reshape(keep.shape[0], -1, 4).sum(dim=2) == 2)
        assert torch.all(m.quantized_weight().dequantize()[~keep] == 0)
    assert ppl["sparsegpt"] <= 0.95 * ppl["wanda"], ppl
    # asked with GPTQ's default act-order, which would visit a 2:4 group's inputs out of order: it ran (and the
    # config that comes out says) columns in order, and a note says why
    assert q.act_order and not cm.config.quantization.act_order
    assert any("without act-order" in note and "2:4" in note for note in cm.notes)


@pytest.mark.parametrize("pruning", [PruningConfig(pattern="2:4"), PruningConfig(0.7)], ids=["2:4", "70%"])
def test_tiny_wanda_is_at_or_below_magnitude(tiny, pruning):
    import dataclasses

    model, heldout, calib = tiny
    ppl = {method: perplexity(compress(model, CompressionConfig(pruning=dataclasses.replace(pruning, method=method)),
                                       calibration=calib).model, heldout) for method in ("magnitude", "wanda")}
    assert ppl["wanda"] <= ppl["magnitude"], ppl


def test_tiny_recovery_distillation_wins_back_10_percent_after_pruning(tiny):
    # 80%, not 50%: the tiny model loses under 1% of perplexity at 50% magnitude pruning, nothing to recover
    model, heldout, calib = tiny
    before = snapshot(model)
    pruning = PruningConfig(0.8)
    pruned = perplexity(compress(model, CompressionConfig(pruning=pruning)).model, heldout)
    recovered = compress(model, CompressionConfig(pruning=pruning, distillation=DistillationConfig(
        steps=30, lr=1e-3, batch_size=4, seq_len=128, temperature=1.0, alpha=0.5)), calibration=calib)
    assert all(abs((~m.keep_mask()).float().mean().item() - 0.8) <= 0.005 for m in recovered.layers().values())
    assert_masks_and_codes_hold(recovered)
    assert perplexity(recovered.model, heldout) <= 0.9 * pruned
    assert_same_state(model, before)


def test_int8_notes_say_how_activations_are_quantized_and_whether_smoothing_ran(gpt2, tmp_path):
    from lmcompress_core.runtime.packing import load_compressed, save_compressed

    plain = compress(gpt2, KINDS["int8-dynamic"])
    assert plain.kernel == "int8 (real, torch dynamic; activations quantized too)"
    assert any("skipped" in n for n in plain.notes)
    smoothed = compress(gpt2, KINDS["int8-dynamic"], calibration=calibration(gpt2))
    assert any("per tensor at run time" in n for n in smoothed.notes)
    assert any("SmoothQuant" in n for n in smoothed.notes) and not any("skipped" in n for n in smoothed.notes)
    save_compressed(smoothed, gpt2, tmp_path)  # the unsmoothed codes plus each layer's smoothing factors
    ids = calibration(gpt2, 1)
    a, b = smoothed.model(input_ids=ids).logits, load_compressed(tmp_path, gpt2)(input_ids=ids).logits
    assert torch.equal(a, b)
