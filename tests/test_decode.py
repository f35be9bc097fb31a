"""Our static-cache decode loop (runtime/decode.py) and its fused projections (runtime/fused.py), against
transformers' forward of the same model: the reference is the float simulation of the same codes."""
import copy
import threading

import pytest
import torch

from lmcompress_core.compress import CompressionConfig, compress
from lmcompress_core.measure.quality import TRANSFORMERS_LOOP, Steps, continue_with_cache, decode
from lmcompress_core.measure.speed import measure_latency, runtime_bytes
from lmcompress_core.methods.quantize import QuantizationConfig
from lmcompress_core.runtime.decode import LOOP, Decoder, decoder_for, refusal
from lmcompress_core.runtime.kernels import Int4Linear, Int8Linear

STEPS = 6
CONFIGS = {"int4-g32": dict(bits=4, group_size=32), "int3-g128": dict(bits=3, group_size=128),
           "int8-channel": dict(bits=8, granularity="channel"), "planes-6bit-g128": dict(bits=6, group_size=128)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def prompt(model, length=40, seed=0) -> torch.Tensor:
    return torch.randint(model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def transformers_logits(model, ids, steps=STEPS) -> torch.Tensor:
    """The last position's logits after the prompt and after each greedy step, by transformers' own cache."""
    out = model(input_ids=ids, use_cache=True)
    rows = [out.logits[0, -1].float()]
    for _ in range(steps):
        out = continue_with_cache(model, out, out.logits[:, -1:].argmax(-1))
        rows.append(out.logits[0, -1].float())
    return torch.stack(rows)


@torch.inference_mode()
def loop_logits(model, ids, steps=STEPS, capacity=None) -> torch.Tensor:
    run = Steps(model, capacity or ids.numel() + steps)
    assert run.loop == LOOP
    rows = [run.prompt(ids).float()]
    for _ in range(steps):
        rows.append(run.next(rows[-1].argmax().view(1, 1)).float())
    return torch.stack(rows)


@pytest.fixture(scope="module")
def tiny(tiny_loaded):
    return tiny_loaded.model


def test_float_model_gives_transformers_logits_to_float32_rounding(tiny):
    ids = prompt(tiny)
    assert rel(loop_logits(tiny, ids), transformers_logits(tiny, ids)) < 1e-5
    assert decoder_for(tiny).fused_calls() == 0   # float layers never fuse: the base model is left as it is


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_real_kernels_are_as_close_to_their_float_simulation_as_transformers_forward(tiny, kind):
    quantization = QuantizationConfig(**CONFIGS[kind])
    simulated = compress(tiny, CompressionConfig(quantization=quantization, runtime="simulate", head="float")).model
    real = compress(tiny, CompressionConfig(quantization=quantization, head="float")).model
    ids = prompt(tiny)
    reference = transformers_logits(simulated, ids)
    theirs, ours = transformers_logits(real, ids), loop_logits(real, ids)
    assert decoder_for(real).fused_calls() == 2 * tiny.config.num_hidden_layers
    # both run bf16 activations; ours may differ from theirs by that rounding, never drift further from the truth
    assert rel(ours, reference) <= 1.25 * rel(theirs, reference) + 1e-3, (rel(ours, reference), rel(theirs, reference))
    assert rel(ours, theirs) < 2 ** -5
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 64)], ids=["int4", "planes"])
def test_fusing_holds_the_codes_once_and_the_parts_still_run_alone(tiny, bits, group_size):
    model = compress(tiny, CompressionConfig(quantization=QuantizationConfig(bits=bits, group_size=group_size))).model
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, tiny.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = [p(x) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    codes, nbytes = [p.int4_codes() for p in (attn.q_proj, attn.k_proj)], runtime_bytes(model)
    decoder = decoder_for(model)
    assert decoder is decoder_for(model)   # built once per model
    with torch.inference_mode():
        after = [p(x) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        fused = decoder.blocks[0].qkv(x)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(a, b) for a, b in zip(before, fused))
    from lmcompress_core.runtime.kernels import INT4_WIDEN_FROM_ROWS

    many = torch.randn(INT4_WIDEN_FROM_ROWS, tiny.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():   # a long prompt: widened in the fused call as in each part alone
        alone, together = [p(many) for p in (attn.q_proj, attn.k_proj, attn.v_proj)], decoder.blocks[0].qkv(many)
    assert all(rel(b.float(), a.float()) < 2 ** -8 for a, b in zip(alone, together))
    assert all(torch.equal(c, p.int4_codes()) for c, p in zip(codes, (attn.q_proj, attn.k_proj)))
    assert attn.q_proj.packed.untyped_storage().data_ptr() == attn.v_proj.packed.untyped_storage().data_ptr()
    assert runtime_bytes(model) == nbytes   # the parts are views of the fused storage: nothing held twice


def test_mixed_kernels_run_part_by_part(tiny):
    model = compress(tiny, CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32))).model
    attn = model.model.layers[0].self_attn
    int8 = compress(tiny, CompressionConfig(quantization=QuantizationConfig(bits=8, granularity="channel"))).model
    attn.v_proj = int8.model.layers[0].self_attn.v_proj
    assert isinstance(attn.q_proj, Int4Linear) and isinstance(attn.v_proj, Int8Linear)
    decoder = Decoder(model)
    assert decoder.blocks[0].qkv is None and decoder.blocks[1].qkv is not None
    ids = prompt(tiny)
    assert rel(loop_logits(model, ids), transformers_logits(model, ids)) < 2 ** -5


def test_a_cache_grows_past_its_capacity_and_two_runs_never_share_one(tiny):
    ids, other = prompt(tiny, 300, seed=2), prompt(tiny, 20, seed=3)
    assert rel(loop_logits(tiny, ids, capacity=8), transformers_logits(tiny, ids)) < 1e-5
    decoder = decoder_for(tiny)
    with torch.inference_mode():
        first, second = decoder.new_cache(4), decoder.new_cache(4)
        decoder.forward(ids[:, :30], first)
        decoder.forward(other, second)   # interleaved: the second run writes only its own cache
        got = decoder.forward(ids[:, 30:31], first)
        alone = decoder.forward(ids[:, :31], decoder.new_cache(4))
    assert torch.allclose(got, alone, atol=1e-4)


def test_other_architectures_keep_transformers_forward_and_say_why(random_arch):
    model = random_arch.model
    if model.config.model_type in ("llama", "qwen2"):
        assert refusal(model) is None
        ids = prompt(model, 12)
        assert rel(loop_logits(model, ids), transformers_logits(model, ids)) < 1e-5
        return
    assert "not a Llama-family block" in refusal(model)
    assert decoder_for(model) is None and Steps(model, 8).loop == TRANSFORMERS_LOOP
    with pytest.raises(ValueError, match="cannot run this model"):
        Decoder(model)
    tokens, _ = decode(model, prompt(model, 12), 4)
    assert len(tokens) == 4


def test_latency_names_the_loop_it_timed_and_both_loops_give_the_same_tokens(tiny):
    model = compress(tiny, CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32))).model
    assert measure_latency(model, None, "int4", prompt_tokens=16, new_tokens=4, runs=1).loop == LOOP
    theirs = measure_latency(model, None, "int4", prompt_tokens=16, new_tokens=4, runs=1, own_loop=False)
    assert theirs.loop == TRANSFORMERS_LOOP
    ids = prompt(tiny, 16)
    greedy = decode(model, ids, 12)[0]
    assert greedy == transformers_logits(model, ids, 11).argmax(-1).tolist()
    assert greedy == decode(copy.deepcopy(model), ids, 12)[0]   # a copy rebuilds its own fused storage


def test_compiled_step_gives_the_eager_logits_and_serves_every_model_of_its_layout(tiny, monkeypatch):
    from torch._dynamo.utils import counters

    from lmcompress_core.runtime import compiled
    from lmcompress_core.runtime.decode import LOOP_COMPILED

    int4, int3 = (compress(tiny, CompressionConfig(quantization=QuantizationConfig(bits=b, group_size=32))).model
                  for b in (4, 3))
    decoder = decoder_for(int4)
    assert compiled.step_for(decoder, "off") is None and compiled.state(decoder) is None
    step = compiled.step_for(decoder, "wait")
    assert step is not None and compiled.state(decoder) == "ready"
    ids = prompt(tiny)
    for model in (int4, int3):
        graphs = counters["stats"]["unique_graphs"]
        eager = loop_logits(model, ids)
        run = Steps(model, ids.numel() + STEPS)
        run.step = compiled.step_for(decoder_for(model), "background")   # ready: no thread, no wait
        assert run.step is not None and compiled.layout(decoder_for(model)) == compiled.layout(decoder)
        rows = [run.prompt(ids).float()]
        for token in eager.argmax(-1)[:-1]:   # the eager run's tokens: a near tie may break the other way
            rows.append(run.next(token.view(1, 1)).float())
        # the graph rounds differently (fused kernels), within the bf16 activations' tolerance
        assert rel(torch.stack(rows), eager) < 2 ** -5
        assert counters["stats"]["unique_graphs"] == graphs   # int3 of int4's layout: no new graph
    assert Steps(int3, 16).loop == LOOP   # $LMCOMPRESS_COMPILE is "off" in the tests
    monkeypatch.setenv("LMCOMPRESS_COMPILE", "background")
    assert Steps(int3, 16).loop == LOOP_COMPILED and Steps(int3, 300).loop == LOOP   # 300 > the graph's cache


def test_grouped_5_6_and_8_bit_codes_share_one_compiled_layout_their_own(tiny):
    """Two 4-bit planes whatever the width: one graph serves 5-, 6- and 8-bit codes in groups of 128, not int4's."""
    from lmcompress_core.runtime import compiled

    layouts = set()
    for bits in (5, 6, 8):
        model = compress(tiny, CompressionConfig(quantization=QuantizationConfig(bits=bits, group_size=128))).model
        decoder = decoder_for(model)
        assert compiled.compilable(decoder) and decoder.fused_calls() == 2 * tiny.config.num_hidden_layers
        layouts.add(compiled.layout(decoder))
    int4 = compress(tiny, CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=128))).model
    assert len(layouts) == 1 and compiled.layout(decoder_for(int4)) not in layouts


def test_a_layout_compiles_in_the_background_and_runs_eager_meanwhile(tiny, monkeypatch):
    from lmcompress_core.runtime import compiled

    model = compress(tiny, CompressionConfig(quantization=QuantizationConfig(bits=8, granularity="channel"))).model
    decoder = decoder_for(model)
    started = []
    monkeypatch.setattr(compiled, "_compile", lambda d, key: started.append(key))   # the thread's work, noted
    assert compiled.step_for(decoder, "background") is None and compiled.state(decoder) is None
    assert not started   # the tiny model runs one thread: never compiled beside a person's moves
    monkeypatch.setattr(compiled, "_small", lambda d: False)   # as a model of SmolLM2's size is
    monkeypatch.setattr(compiled, "BACKGROUND_DELAY_S", 0.0)   # (30 s: off a cold start's first charts)
    assert compiled.step_for(decoder, "background") is None   # never waits: eager now
    for thread in threading.enumerate():   # the compiling thread (the real one at the lowest CPU priority)
        if thread.name == "lmcompress-compile":
            thread.join()
    assert compiled.state(decoder) == "compiling" and started == [compiled.layout(decoder)]
    assert compiled.step_for(decoder, "background") is None and len(started) == 1   # one compilation per layout
    monkeypatch.setitem(compiled._states, compiled.layout(decoder), "failed: TestError")
    assert compiled.step_for(decoder, "background") is None   # a failed compile stays eager


def test_decode_bytes_are_the_runtime_bytes_less_what_no_step_reads(tiny):
    from lmcompress_core.measure.speed import decode_bytes
    from lmcompress_core.runtime.kernels import Int8Embedding

    assert tiny.config.tie_word_embeddings and decode_bytes(tiny) == runtime_bytes(tiny)   # the table is the head
    model = compress(tiny, CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32))).model
    grids = sum(4 * (m.scales.numel() + m.zeros.numel()) for m in model.modules()
                if isinstance(m, (Int4Linear, Int8Linear)))   # the exact grids kept for packing and export
    embedding = model.get_input_embeddings()   # its rows' scales are views of the head's grid: no bytes of its own
    assert isinstance(embedding, Int8Embedding)
    assert embedding.row_scales.untyped_storage().data_ptr() == model.lm_head.scales.untyped_storage().data_ptr()
    assert runtime_bytes(model) - decode_bytes(model) == grids


def test_a_timed_pair_runs_both_models_through_the_same_loop(tiny, monkeypatch):
    from lmcompress_core.measure.speed import measure_latency_pair
    from lmcompress_core.runtime import compiled
    from lmcompress_core.runtime.decode import LOOP_COMPILED

    model = compress(tiny, CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32))).model
    assert compiled.compile_now(model) == "ready"   # the compressed model's step is compiled, the base's is not
    monkeypatch.setenv("LMCOMPRESS_COMPILE", "background")   # the tiny base: never compiled in the background
    assert Steps(model, 24).loop == LOOP_COMPILED and Steps(tiny, 24).loop == LOOP
    base, ours, _ = measure_latency_pair(tiny, model, None, ("fp32", "int4"), prompt_tokens=16, new_tokens=4, runs=1)
    assert base.loop == ours.loop == LOOP   # never a compiled step against an eager one
    assert measure_latency(model, None, "int4", prompt_tokens=16, new_tokens=4, runs=1).loop == LOOP_COMPILED
