"""Measurements: perplexity against a slow reference, KL/top-1, size three ways, packed format, latency, generation."""
import copy
from dataclasses import replace
import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import byte_bpe_tokenizer

from lmcompress_core.measure import evaluation
from lmcompress_core.compress import KERNEL_INT8, CompressionConfig, compress
from lmcompress_core.measure.quality import first_divergence, perplexity, score_tokens, windows
from lmcompress_core.measure.speed import measure_latency, ratio_text
from lmcompress_core.measure.protocol import EvalProtocol
from lmcompress_core.runtime.packing import load_compressed, pack_model, save_compressed
from lmcompress_core.methods.prune import PruningConfig
from lmcompress_core.methods.quantize import QuantizationConfig

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be. ") * 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one torch thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def tokenizer():
    return byte_bpe_tokenizer(TEXT, vocab_size=300)


def _gpt2(tokenizer, seed=0, width=64):
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=width, n_layer=2, n_head=2, n_positions=128, vocab_size=len(tokenizer))
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return _gpt2(tokenizer)


@pytest.fixture(scope="module")
def llama(tokenizer):
    torch.manual_seed(1)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, vocab_size=len(tokenizer),
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids(tokenizer):
    return torch.tensor(tokenizer(TEXT).input_ids[:97])


# ---------------------------------------------------------------- perplexity
def _reference_nll(model, ids, context, stride):
    """Independent slow reference: one forward per scored token over exactly the context its window gives it."""
    n, nll = ids.numel(), {}
    begin = 0
    while begin < n - 1:
        end = min(begin + context, n)
        for t in range(begin + 1, end):
            if t in nll:
                continue
            with torch.no_grad():
                logits = model(input_ids=ids[begin:t][None]).logits[0, -1].double()
            nll[t] = -torch.log_softmax(logits, -1)[ids[t]].item()
        if end == n:
            break
        begin += stride
    return torch.tensor([nll[t] for t in sorted(nll)], dtype=torch.float64)


@pytest.mark.parametrize("context,stride", [(32, 32), (32, 12), (128, 128)])
def test_perplexity_matches_slow_reference(gpt2, ids, context, stride):
    report, kl, top1 = perplexity(gpt2, ids, context=context, stride=stride, max_tokens=96)
    ref = _reference_nll(gpt2, ids, context, stride)
    assert report.tokens == ref.numel()
    assert report.value == pytest.approx(math.exp(ref.mean().item()), rel=1e-4)
    se = ref.std().item() / math.sqrt(ref.numel())
    assert report.stderr == pytest.approx(report.value * se, rel=1e-3)
    assert report.stderr > 0 and kl is None and top1 is None
    assert (report.context, report.stride) == (context, stride)


def test_windows_score_each_token_once():
    seen = []
    for begin, end, first in windows(100, 32, 12):
        assert begin < first < end <= begin + 32
        seen += list(range(first, end))
    assert seen == list(range(1, 100))


def test_kl_zero_and_top1_one_against_itself(gpt2, ids):
    report, kl, top1 = perplexity(gpt2, ids, context=32, stride=32, max_tokens=96, base_model=gpt2)
    assert kl == pytest.approx(0.0, abs=1e-6) and top1 == 1.0
    assert report.tokens == 93  # 97 tokens, 3 windows of 32: the first token of each window has no context


def test_kl_positive_for_a_different_model(gpt2, tokenizer, ids):
    scores = score_tokens(_gpt2(tokenizer, seed=5), ids, 32, 32, 96, base_model=gpt2)
    assert scores.kl_to_base > 0.01 and 0 <= scores.top1_agreement < 1
    assert torch.equal(scores.base_nll, score_tokens(gpt2, ids, 32, 32, 96).nll)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_scores_equal_an_independent_float64_computation(tokenizer, ids, dtype):
    """NLL, KL(base ‖ model) and top-1 agreement per token against float64 softmaxes of the same logits, and the
    scored log-probabilities bit for bit the float32 log_softmax of the logits (a bf16 model's converted first)."""
    from lmcompress_core.measure.quality import _scored_spans

    base, model = _gpt2(tokenizer, seed=1).to(dtype), _gpt2(tokenizer, seed=5).to(dtype)
    scores = score_tokens(model, ids, 32, 32, 96, base_model=base)
    flat, spans = _scored_spans(ids, 32, 32, 96)
    nll, base_nll, kl, agree = [], [], [], []
    with torch.no_grad():
        for begin, end, first in spans:
            rows = slice(first - begin - 1, end - begin - 1)
            window = flat[begin:end][None]
            q64 = torch.log_softmax(model(window).logits[0, rows].double(), -1)
            p64 = torch.log_softmax(base(window).logits[0, rows].double(), -1)
            targets = flat[first:end, None]
            nll.append(-q64.gather(1, targets)[:, 0]), base_nll.append(-p64.gather(1, targets)[:, 0])
            kl.append((p64.exp() * (p64 - q64)).sum(-1)), agree.append(p64.argmax(-1) == q64.argmax(-1))
            exact = -torch.log_softmax(model(window).logits[0].float()[rows], -1).gather(1, targets)[:, 0]
            done = sum(t.numel() for t in nll[:-1])
            assert torch.equal(exact, scores.nll[done:done + exact.numel()])
    assert torch.allclose(scores.nll.double(), torch.cat(nll), atol=1e-5)
    assert torch.allclose(scores.base_nll.double(), torch.cat(base_nll), atol=1e-5)
    assert torch.allclose(scores.kl_tokens.double(), torch.cat(kl), atol=1e-5, rtol=1e-4)
    assert scores.kl_to_base == pytest.approx(float(torch.cat(kl).mean()), rel=1e-4)
    assert torch.equal(scores.same_top, torch.cat(agree))


# ---------------------------------------------------------------- size and packed format
def test_size_three_ways_and_packed_ratio(llama):
    cm = compress(llama, CompressionConfig(quantization=QuantizationConfig(bits=4, granularity="channel"),
                                           runtime="simulate"))
    size = evaluation.measure_size(cm, llama)
    assert size.layers_packed_bytes <= 0.30 * size.layers_fp32_bytes
    assert size.simulated and "simulated" in size.note and size.runtime_bytes >= size.base_bytes
    assert size.theoretical_bytes < size.packed_bytes < size.base_bytes
    both = compress(llama, CompressionConfig(quantization=QuantizationConfig(bits=4, granularity="channel"),
                                             pruning=PruningConfig(sparsity=0.5)))
    assert evaluation.measure_size(both, llama).packed_bytes < size.packed_bytes


@pytest.mark.parametrize("config", [
    CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32)),
    CompressionConfig(quantization=QuantizationConfig(bits=3, granularity="channel", symmetric=True),
                      pruning=PruningConfig(sparsity=0.5)),
    CompressionConfig(pruning=PruningConfig(sparsity=0.9)),
    CompressionConfig(quantization=QuantizationConfig(bits=16), pruning=PruningConfig(sparsity=0.5, pattern="2:4")),
    CompressionConfig(quantization=QuantizationConfig(bits=8)),
], ids=["4bit-g32", "3bit-sym-pruned", "pruned90", "bf16-2:4", "int8"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reload_gives_identical_logits(request, arch, config, ids, tmp_path):
    base = request.getfixturevalue(arch)
    cm = compress(base, config)
    written = save_compressed(cm, base, tmp_path)
    assert written == sum(f.stat().st_size for f in tmp_path.iterdir())
    reloaded = load_compressed(tmp_path, base)
    with torch.no_grad():
        expected, got = cm.model(ids[None]).logits, reloaded(ids[None]).logits
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert json.loads((tmp_path / "compression.json").read_text())["kernel"] == cm.kernel


@pytest.mark.parametrize("config", [
    CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32)),
    CompressionConfig(quantization=QuantizationConfig(bits=5, group_size=32), pruning=PruningConfig(sparsity=0.3)),
    CompressionConfig(quantization=QuantizationConfig(bits=3, granularity="channel", symmetric=True),
                      pruning=PruningConfig(sparsity=0.5)),
    CompressionConfig(quantization=QuantizationConfig(bits=4, grid="minmax"), runtime="simulate"),
    CompressionConfig(quantization=QuantizationConfig(bits=3, method="hqq", group_size=32)),
    CompressionConfig(quantization=QuantizationConfig(bits=2, granularity="tensor"), pruning=PruningConfig(sparsity=0.9)),
    CompressionConfig(pruning=PruningConfig(sparsity=0.9)),
    CompressionConfig(quantization=QuantizationConfig(bits=16), pruning=PruningConfig(sparsity=0.5, pattern="2:4")),
    CompressionConfig(quantization=QuantizationConfig(bits=8)),
    CompressionConfig(quantization=QuantizationConfig(bits=6, layer_bits=(("fc|mlp", 4), ("attn", 16)))),
], ids=["4bit-g32", "5bit-g32-pruned", "3bit-sym-pruned", "minmax-sim", "hqq", "2bit-tensor-pruned90", "pruned90",
        "bf16-2:4", "int8", "mixed"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_size_is_counted_from_the_layout_byte_for_byte(request, arch, config, tmp_path):
    """The size stage lays the format out (pack_model planned: no codes packed, nothing written): the same
    metadata and the same tensor names, dtypes and shapes as packing, and the byte count of the files written."""
    base = request.getfixturevalue(arch)
    cm = compress(base, config)
    tensors, meta = pack_model(cm, base)
    planned, planned_meta = pack_model(cm, base, planned=True)
    assert planned_meta == meta
    assert ({k: (t.dtype, tuple(t.shape)) for k, t in planned.items()}
            == {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
    assert evaluation.measure_size(cm, base).packed_bytes == save_compressed(cm, base, tmp_path)


def test_sparse_layers_store_only_kept_codes(llama):
    cm = compress(llama, CompressionConfig(quantization=QuantizationConfig(bits=4, granularity="channel"),
                                           pruning=PruningConfig(sparsity=0.5)))
    tensors, meta = pack_model(cm, llama)
    name, layer = next((n, lay) for n, lay in meta["layers"].items() if n != "lm_head")  # the head is int8, unpruned
    assert layer["sparse"] == "bitmask" and layer["nnz"] == int(cm.layers()[name].keep_mask().sum())
    assert tensors[f"{name}.weight.codes"].numel() == math.ceil(layer["nnz"] * 4 / 8)


def test_kernel_labels_and_int8_runtime_bytes(gpt2):
    int8 = compress(gpt2, CompressionConfig(quantization=QuantizationConfig(bits=8, granularity="channel")))
    assert int8.kernel.startswith(KERNEL_INT8) and "(real" in int8.kernel
    size = evaluation.measure_size(int8, gpt2)
    assert not size.simulated and size.runtime_bytes < size.base_bytes
    four = compress(gpt2, CompressionConfig(quantization=QuantizationConfig(bits=4), runtime="simulate"))
    assert "simulated" in four.kernel


# ---------------------------------------------------------------- latency and generation
def test_latency_report(gpt2, tokenizer):
    lat = measure_latency(gpt2, tokenizer, "fp32 dense", prompt_tokens=16, new_tokens=4, runs=5)
    assert lat.prefill_ms > 0 and lat.decode_tokens_per_s > 0 and lat.runs == 5
    assert lat.threads == torch.get_num_threads() and lat.prompt_tokens == 16
    assert lat.bandwidth_gb_s > 0.1 and lat.roofline_tokens_per_s > 0


def test_generation_side_by_side(gpt2, tokenizer):
    other = copy.deepcopy(gpt2)  # a different head: greedy choices change
    torch.manual_seed(0)
    other.lm_head.weight = torch.nn.Parameter(torch.randn_like(gpt2.lm_head.weight))
    same = evaluation.generate_side_by_side(gpt2, gpt2, tokenizer, "a single man", new_tokens=8, seed=1)
    assert same.first_divergence is None and same.base == same.compressed
    assert same.sampled_base == same.sampled_compressed and len(same.compressed_logprobs) == 8
    assert all(lp <= 0 for lp in same.compressed_logprobs)
    diff = evaluation.generate_side_by_side(gpt2, other, tokenizer, "a single man", new_tokens=8, seed=1)
    assert diff.first_divergence is not None and diff.base == same.base


def test_generation_prompt_checks(gpt2, tokenizer):
    with pytest.raises(ValueError, match="prompt is empty"):
        evaluation.generate_side_by_side(gpt2, gpt2, tokenizer, "  \n", new_tokens=4)
    long = evaluation.generate_side_by_side(gpt2, gpt2, tokenizer, TEXT * 3, new_tokens=4)
    assert "truncated" in long.notice and long.prompt_tokens == 124


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_student_distillation_reloads_with_fewer_layers(llama, ids, tmp_path):
    from lmcompress_core.methods.distill import DistillationConfig

    calibration = ids[:64].repeat(4, 1)
    config = CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32),
                               distillation=DistillationConfig(steps=2, mode="student", seq_len=32, batch_size=2))
    cm = compress(llama, config, calibration=calibration)
    save_compressed(cm, llama, tmp_path)
    reloaded = load_compressed(tmp_path, llama)
    assert reloaded.config.num_hidden_layers == 1
    with torch.no_grad():
        assert torch.equal(reloaded(ids[None]).logits, cm.model(ids[None]).logits)
    size = evaluation.measure_size(cm, llama)
    assert not size.simulated and size.runtime_bytes < size.base_bytes


# ---------------------------------------------------------------- evaluate -> Report
@pytest.fixture
def loaded(gpt2, tokenizer):
    from lmcompress_core.models.loading import LoadedModel, ModelCard

    evaluation.clear_cache()
    card = ModelCard("test-gpt2", "local", "random test model", "n/a", None, "")
    return LoadedModel(name="test-gpt2", model=gpt2, tokenizer=tokenizer, card=card)


FAST = EvalProtocol(eval_tokens=96, context=32, stride=32, new_tokens=4, latency_runs=5, prompt_tokens=8,
                    decode_tokens=2, text=TEXT)


def test_codes_no_kernel_takes_are_de_quantized_after_size_before_anything_is_timed(tokenizer, monkeypatch):
    """Codes no kernel takes (a GPT-2 40 wide: no int4pack group fits, and 6-bit groups have no int8pack scale)
    run as dense bf16 matrices: they are made in their own stage after the size (which reads the codes only) and
    before perplexity, so no timed pass (the prompt pass the latency reads) makes them."""
    from lmcompress_core.models.loading import LoadedModel, ModelCard
    from lmcompress_core.runtime import kernels

    evaluation.clear_cache()
    card = ModelCard("test-gpt2-narrow", "local", "random test model, 40 wide", "n/a", None, "")
    loaded = LoadedModel(name="test-gpt2-narrow", model=_gpt2(tokenizer, width=40), tokenizer=tokenizer, card=card)

    made_at = []
    real_matrix = kernels.DequantLinear.dense_matrix

    def spy(module):
        if module.dense.is_meta:
            made_at.append(stage[-1])
        return real_matrix(module)

    stage = [""]
    monkeypatch.setattr(kernels.DequantLinear, "dense_matrix", spy)
    config = CompressionConfig(quantization=QuantizationConfig(bits=6, group_size=32))
    report = evaluation.evaluate(loaded, config, replace(FAST, prompt="a single man"),
                                 callback=lambda p: stage.append(p.stage))
    assert made_at and set(made_at) == {"prepare"}
    assert "prepare" in report.timings and list(report.timings).index("prepare") < list(report.timings).index(
        "perplexity")
    assert "de-quantized once to dense bf16" in report.kernel


def test_evaluate_report_stages_and_json(loaded):
    seen = []
    config = CompressionConfig(quantization=QuantizationConfig(bits=4, granularity="channel"),
                               pruning=PruningConfig(sparsity=0.5), runtime="simulate")
    report = evaluation.evaluate(loaded, config, replace(FAST, prompt="a single man"), callback=seen.append)
    stages = [p.stage for p in seen if p.stage in ("compress", "size", "latency", "generate", "perplexity")]
    assert list(dict.fromkeys(stages)) == ["compress", "size", "perplexity", "generate", "latency"]
    assert "done" not in {p.stage for p in seen}
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["perplexity"]["tokens"] == 93 and data["perplexity"]["text"] == "pasted text"
    assert data["kl_to_base"] > 0 and 0 < data["top1_agreement"] <= 1
    assert data["base_perplexity"] > 0 and data["size"]["packed_bytes"] < data["size"]["base_bytes"]
    assert {"size", "latency", "roofline", "perplexity", "kl_to_base", "top1_agreement", "generation"} <= set(
        data["how"])
    # a model this small runs on one torch thread (runtime/threads.py), and the label says so
    assert "simulated" in data["how"]["size"] and "on cpu with 1 thread" in data["how"]["latency"]
    assert data["latency"]["threads"] == 1 and data["base_latency"]["threads"] == 1
    base = data["base_latency"]   # the base model timed alternately with the compressed one
    assert base["kernel"] == "float32 dense (base)" and base["prompt_tokens"] == data["latency"]["prompt_tokens"]
    assert base["prefill_ms"] > 0 and base["decode_tokens_per_s"] > 0 and len(base["prefill_ms_runs"]) == 5
    # simulated quantization and dense zeros: no speedup is claimed, whatever the noise says
    assert data["speed"]["decode_text"].startswith("≈ 1×") and data["speed"]["prefill_text"].startswith("≈ 1×")
    assert data["protocol"] == FAST.to_dict() | {"prompt": "a single man"}


def test_evaluate_is_cached_and_uncompressed_model_agrees_with_base(loaded):
    config = CompressionConfig()
    first = evaluation.evaluate(loaded, config, FAST)
    assert first.kl_to_base == pytest.approx(0, abs=1e-6) and first.top1_agreement == 1.0
    assert first.perplexity.value == pytest.approx(first.base_perplexity, rel=1e-6)
    again = evaluation.evaluate(loaded, config, FAST)
    assert again.timings == {"cached": True} and again.perplexity == first.perplexity
    assert evaluation.cached_report(loaded, config, FAST).perplexity == first.perplexity
    other_prompt = evaluation.evaluate(loaded, config, replace(FAST, prompt="in want"))
    assert other_prompt.timings["perplexity"] == "cached"
    assert evaluation.cached_report(loaded, config, replace(FAST, seed=9)) is None


def test_evaluate_can_be_cancelled(loaded):
    from lmcompress_core.compress import Cancelled

    with pytest.raises(Cancelled):
        evaluation.evaluate(loaded, CompressionConfig(), FAST, should_stop=lambda: True)


def test_evaluate_a_given_compressed_model(loaded):
    cm = compress(loaded.model, CompressionConfig(quantization=QuantizationConfig(bits=8, granularity="channel")))
    report = evaluation.evaluate(loaded, None, replace(FAST, generation=False), compressed=cm)
    assert "compress" not in report.timings and report.generation is None
    assert report.config == cm.config.to_dict() and report.latency.kernel == cm.kernel
    assert cm.kernel.startswith(KERNEL_INT8)


@pytest.mark.parametrize("ratios, simulated, text", [
    ([1.9, 2.1, 2.0], False, "×2.00"),
    ([0.5, 0.6, 0.55], False, "×0.55"),
    ([0.9, 1.1, 1.05], False, "≈ 1× (within the noise of the runs)"),
    ([3.0, 3.1, 2.9], True, "≈ 1× (simulated: nothing runs faster)"),
])
def test_speed_ratio_text_claims_only_what_every_round_agrees_on(ratios, simulated, text):
    assert ratio_text(ratios, simulated) == text


def test_protocol_validates_and_keys_by_text_hash():
    with pytest.raises(ValueError, match="stride"):
        EvalProtocol(context=64, stride=128)
    with pytest.raises(ValueError, match="eval_tokens"):
        EvalProtocol(eval_tokens=0)
    assert EvalProtocol(text="abc").key("h1") != EvalProtocol(text="abc").key("h2")
    assert EvalProtocol.explore().eval_tokens < EvalProtocol.precise().eval_tokens


def test_base_continuations_are_computed_once_for_every_setting(loaded, monkeypatch):
    calls = []
    real = evaluation.base_continuations
    monkeypatch.setattr(evaluation, "base_continuations", lambda *a, **k: calls.append(1) or real(*a, **k))
    protocol = replace(FAST, latency=False, prompt="a single man")
    first = evaluation.evaluate(loaded, CompressionConfig(), protocol)
    second = evaluation.evaluate(loaded, CompressionConfig(pruning=PruningConfig(sparsity=0.5)), protocol)
    assert len(calls) == 1 and first.generation.base == second.generation.base


def test_explore_protocol_times_the_compressed_model_alone_and_claims_no_ratio(loaded):
    protocol = EvalProtocol.explore(eval_tokens=96, context=32, stride=32, new_tokens=4, latency_runs=2,
                                    prompt_tokens=8, decode_tokens=2, text=TEXT)
    config = CompressionConfig(quantization=QuantizationConfig(bits=4))
    report = evaluation.evaluate(loaded, config, replace(protocol, generation=False))   # no generation: timed runs
    assert report.base_latency is None and report.speed is None and report.latency.runs == 2
    assert report.latency.source == "timed runs" and report.latency.prompt_tokens == 8
    how = report.to_dict()["how"]
    assert "compressed model alone" in how["latency"] and "No speed ratio" in how["latency"]
    assert "float32" in how["perplexity"] and report.kernel in how["perplexity"]


def test_exploring_generates_greedy_only_and_precise_adds_the_sampled_pair(loaded):
    config = CompressionConfig(quantization=QuantizationConfig(bits=4))
    kinds = []
    listen = lambda p: kinds.append(p.metrics["generation_stream"]["kind"]) if "generation_stream" in p.metrics \
        else None  # noqa: E731
    explore = EvalProtocol.explore(eval_tokens=96, context=32, stride=32, new_tokens=5, text=TEXT, prompt="a single man")
    gen = evaluation.evaluate(loaded, config, explore, callback=listen).generation
    assert gen.sampled_base is None and gen.sampled_compressed is None and set(kinds) == {"greedy"}
    assert "greedy only" in explore.describe()
    precise = replace(EvalProtocol.precise(eval_tokens=96, context=32, stride=32, new_tokens=5, text=TEXT,
                                           prompt="a single man"), latency=False)
    full = evaluation.evaluate(loaded, config, precise).generation
    assert full.sampled_base and full.sampled_compressed and full.compressed == gen.compressed
    assert "greedy only" not in precise.describe()


def test_exploring_reads_latency_off_the_greedy_generation_and_draws_it_before_the_sampled_one(loaded):
    protocol = EvalProtocol.explore(eval_tokens=96, context=32, stride=32, new_tokens=5, text=TEXT,
                                    prompt="a single man", sampled=True)
    order = []
    report = evaluation.evaluate(
        loaded, CompressionConfig(quantization=QuantizationConfig(bits=4)), protocol,
        callback=lambda p: order.append(p.stage if "partial" in p.metrics else p.metrics.get(
            "generation_stream", {}).get("kind")))
    lat = report.latency
    assert report.base_latency is None and report.speed is None and lat.source == "greedy generation"
    assert lat.new_tokens == len(report.generation.compressed_tokens) and lat.runs == 1
    assert lat.prompt_tokens == report.generation.prompt_tokens and lat.decode_tokens_per_s > 0
    assert "latency" not in report.timings   # no timed runs of its own
    kept = [s for s in order if s is not None]
    # the latency chart comes after the last greedy token and before the first sampled one
    assert kept.index("latency") == max(i for i, s in enumerate(kept) if s == "greedy") + 1
    assert kept.index("latency") < kept.index("sampled") and kept[-1] == "generate"
    assert "greedy generation" in report.to_dict()["how"]["latency"]


def test_exploring_hands_the_latency_over_once_the_protocols_decode_steps_are_timed(loaded):
    protocol = EvalProtocol.explore(eval_tokens=96, context=32, stride=32, new_tokens=12, decode_tokens=4,
                                    text=TEXT, prompt="a single man")
    order = []
    report = evaluation.evaluate(
        loaded, CompressionConfig(quantization=QuantizationConfig(bits=3)), protocol,
        callback=lambda p: order.append(p.stage if "partial" in p.metrics else p.metrics.get(
            "generation_stream", {}).get("kind")))
    assert len(report.generation.compressed_tokens) == 12
    lat = report.latency
    assert lat.source == "greedy generation" and lat.new_tokens == 4 and lat.runs == 1
    kept = [s for s in order if s is not None]
    # drawn while the continuation goes on: after the 4th timed step, i.e. before the 5th token is streamed
    assert kept[:kept.index("latency")].count("greedy") == 4 and kept.count("greedy") == 12
    assert "median of its first 4 per-token steps" in report.to_dict()["how"]["latency"]


def test_decode_times_every_forward_pass_and_nothing_else(loaded, monkeypatch):
    from lmcompress_core.measure import quality

    # a clock that only moves when the model runs (1 per forward) or when on_token runs (100 per call)
    clock = [0.0]
    monkeypatch.setattr(quality.time, "perf_counter", lambda: clock[0])
    hook = loaded.model.register_forward_pre_hook(lambda *_: clock.__setitem__(0, clock[0] + 1))
    forward_s = []
    try:
        ids = loaded.tokenizer("a single man", return_tensors="pt").input_ids[0]
        tokens, _ = quality.decode(loaded.model, ids, 4, forward_s=forward_s,
                                   on_token=lambda toks: clock.__setitem__(0, clock[0] + 100))
    finally:
        hook.remove()
    assert len(tokens) == 4 and forward_s == [1.0] * 5   # the prompt's pass, then one per new token; no on_token


def test_base_scores_are_computed_once_and_give_the_numbers_of_a_fresh_pass(loaded, monkeypatch):
    calls = []
    real = evaluation.base_scores
    monkeypatch.setattr(evaluation, "base_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    protocol = replace(FAST, latency=False, generation=False)
    four = CompressionConfig(quantization=QuantizationConfig(bits=4, granularity="channel"), runtime="simulate")
    evaluation.evaluate(loaded, CompressionConfig(pruning=PruningConfig(sparsity=0.5)), protocol)
    reused = evaluation.evaluate(loaded, four, protocol)
    assert len(calls) == 1   # the second configuration reused the base model's log-probabilities
    evaluation.clear_cache()
    fresh = evaluation.evaluate(loaded, four, protocol)
    assert len(calls) == 2
    assert reused.kl_to_base == fresh.kl_to_base and reused.perplexity == fresh.perplexity
    assert reused.base_perplexity == fresh.base_perplexity and reused.quality_stats == fresh.quality_stats


def test_generations_stream_token_by_token_and_the_stream_ends_as_the_report(loaded):
    streamed = {"greedy": [], "sampled": []}

    def listen(progress):
        if "generation_stream" in progress.metrics:
            event = progress.metrics["generation_stream"]
            streamed[event["kind"]].append(event["text"])

    config = CompressionConfig(quantization=QuantizationConfig(bits=3, granularity="channel"), runtime="simulate")
    report = evaluation.evaluate(loaded, config, replace(FAST, prompt="a single man", new_tokens=6, latency=False),
                              callback=listen)
    gen = report.generation
    assert len(streamed["greedy"]) == len(gen.compressed_tokens) > 1
    assert streamed["greedy"][-1] == gen.compressed and streamed["sampled"][-1] == gen.sampled_compressed
    assert all(later.startswith(earlier) for earlier, later in zip(streamed["greedy"], streamed["greedy"][1:]))


def test_partial_reports_fill_in_stage_by_stage(loaded):
    partials = []
    evaluation.evaluate(loaded, CompressionConfig(quantization=QuantizationConfig(bits=4)), FAST,
                     callback=lambda p: partials.append((p.stage, p.metrics["partial"])) if "partial" in p.metrics
                     else None)
    assert [stage for stage, _ in partials] == ["size", "perplexity", "generate", "latency"]
    after_size, after_ppl = partials[0][1], partials[1][1]
    assert after_size["size"] and after_size["perplexity"] is None and after_size["latency"] is None
    assert after_ppl["perplexity"]["value"] > 0 and after_ppl["generation"] is None


def _forward_counter(counts: list):
    """Counts every forward of a whole causal LM (not of its submodules) in this process."""
    from transformers import PreTrainedModel

    return torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: counts.append(1) if isinstance(module, PreTrainedModel) else None)


def test_an_abandoned_run_stops_within_one_unit_of_work_and_caches_nothing(loaded):
    """Whenever should_stop turns True, at most one window, token or timed run (1 + decode_tokens forwards)
    still runs before Cancelled; no report of that configuration is cached."""
    from lmcompress_core.compress import Cancelled

    config = CompressionConfig(quantization=QuantizationConfig(bits=5, granularity="channel"))
    protocol = replace(FAST, prompt="a single man", latency_runs=2)
    asked, all_forwards = [], []
    handle = _forward_counter(all_forwards)
    try:
        evaluation.evaluate(loaded, config, protocol, should_stop=lambda: asked.append(1) and False, use_cache=False)
    finally:
        handle.remove()
    assert len(all_forwards) > 2 * len(asked) // 3   # the counter sees the forwards the checks interleave with
    for stop_at in range(1, len(asked), 3):
        evaluation.clear_cache()
        calls, forwards, flipped = [], [], []

        def should_stop():
            calls.append(1)
            if len(calls) >= stop_at and not flipped:
                flipped.append(len(forwards))
            return bool(flipped)

        handle = _forward_counter(forwards)
        try:
            with pytest.raises(Cancelled):
                evaluation.evaluate(loaded, config, protocol, should_stop=should_stop)
        finally:
            handle.remove()
        assert len(forwards) - flipped[0] <= 1 + protocol.decode_tokens, stop_at
        assert evaluation.cached_report(loaded, config, protocol) is None


def test_a_speed_timed_on_a_busy_machine_is_marked_and_never_cached(loaded, monkeypatch):
    """A latency taken while more work waited than there are cores is shown with its load, and the report is not
    kept: the same setting asked again is timed again (a cached slow time was shown 40 minutes later before)."""
    from lmcompress_core.measure import speed
    from lmcompress_core.report import plots

    monkeypatch.setattr(speed, "machine_load", lambda: (9.0, True))
    config = CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32), runtime="simulate")
    report = evaluation.evaluate(loaded, config, FAST)
    assert report.latency.busy and report.latency.load_average == 9.0
    assert evaluation.cached_report(loaded, config, FAST) is None
    assert "busy (load 9.0" in plots.headlines(report.to_dict())["latency"]
    monkeypatch.setattr(speed, "machine_load", lambda: (0.3, False))
    again = evaluation.evaluate(loaded, config, FAST)
    assert not again.latency.busy and evaluation.cached_report(loaded, config, FAST) is not None


def test_the_machine_load_reads_busy_only_past_the_cores(monkeypatch):
    from lmcompress_core.measure import speed

    monkeypatch.setattr(speed.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("LMCOMPRESS_BUSY_LOAD", raising=False)
    for load, busy in ((0.4, False), (2.6, False), (4.1, True), (7.0, True)):
        monkeypatch.setattr(speed.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert speed.machine_load() == (load, busy)
