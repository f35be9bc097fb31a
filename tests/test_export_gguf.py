"""GGUF export, checked by independent readers: transformers' GGUF loader and gguf's own GGUFReader.

Tolerances (derived, then checked with a margin):
* weights: GGUF stores each block's scale d as fp16, so Q4_0 / Q8_0 de-quantize to exactly
  (code − zero)·fp16(scale); Q4_1 also rounds m = −zero·fp16(scale) to fp16, an error ≤ 2⁻¹¹·|m| per weight.
* logits vs a model holding those fp16-scaled weights: fp32 summation order only (≤ 1e-5 · max|logit|).
* logits vs our compressed model (fp32 scales): every weight moves by a factor within 1 ± 2⁻¹¹, so every
  linear output moves by ≤ 2⁻¹¹ of Σ|w·x|; through the layers we allow 8·2⁻¹¹ ≈ 0.4% of max|logit|
  (measured ≈ 0.04%: a wrong q/k permutation or nibble order gives errors of order max|logit|).
"""
import copy
import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmcompress_core.compress import CompressionConfig, compress
from lmcompress_core.export import export_gguf, gguf_note
from lmcompress_core.export.gguf import block_type
from lmcompress_core.export._source import quantized_weights
from lmcompress_core.methods.layers import set_weight_matrix_
from lmcompress_core.models.loading import load_model, tiny_random_model
from lmcompress_core.methods.prune import PruningConfig
from lmcompress_core.methods.quantize import QuantizationConfig, _expand

FP16_EPS = 2.0 ** -11          # fp16 round-to-nearest relative error
LOGIT_TOLERANCE = 8 * FP16_EPS  # of max|logit|, see the module docstring

SETTINGS = {  # name -> (config, the GGUF type its linear layers must get)
    "q4_0": (QuantizationConfig(bits=4, group_size=32, symmetric=True), "Q4_0"),
    "q4_1": (QuantizationConfig(bits=4, group_size=32), "Q4_1"),
    "q8_0": (QuantizationConfig(bits=8, group_size=32, symmetric=True, int8_kernel=False), "Q8_0"),
    "q4_0_channel_gptq": (QuantizationConfig(bits=4, granularity="channel", symmetric=True, method="gptq"), "Q4_0"),
    "q4_1_group128": (QuantizationConfig(bits=4, group_size=128), "Q4_1"),
    "3bit_q4_0": (QuantizationConfig(bits=3, group_size=32), "Q4_0"),      # code − zero in [−7, 7]
    "2bit_mse_q4_0": (QuantizationConfig(bits=2, group_size=64, method="mse"), "Q4_0"),
    "6bit_q8_0": (QuantizationConfig(bits=6, group_size=32, int8_kernel=False), "Q8_0"),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one torch thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def random_llama():
    return tiny_random_model("llama")


def _compressed(loaded, quantization, sparsity=0.0, calibration=None):
    pruning = PruningConfig(sparsity=sparsity) if sparsity else None
    if quantization.method == "gptq" and calibration is None:
        calibration = torch.randint(0, len(loaded.tokenizer), (4, 64), generator=torch.Generator().manual_seed(0))
    # the simulated runtime keeps every tensor fp32, so the reloaded GGUF can be compared to 1e-5
    config = CompressionConfig(quantization=quantization, pruning=pruning, runtime="simulate")
    return compress(loaded.model, config, calibration)


def _reload(result):
    return AutoModelForCausalLM.from_pretrained(result.path.parent, gguf_file=result.path.name,
                                                dtype=torch.float32).eval()


def _fp16_scaled(qw):
    """(code − zero)·fp16(scale)·mask: what the GGUF blocks must de-quantize to (Q4_1 up to the m rounding)."""
    scales = _expand(qw.scales.to(torch.float16).to(torch.float32), qw.group_size, qw.shape)
    w = (qw.codes.to(torch.float32) - _expand(qw.zeros, qw.group_size, qw.shape)) * scales
    return w if qw.mask is None else w * qw.mask


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits[0].float()


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_random_llama_reloads_with_our_codes_and_logits(random_llama, tmp_path, setting, sparsity):
    quantization, expected_type = SETTINGS[setting]
    cm = _compressed(random_llama, quantization, sparsity)
    result = export_gguf(cm, random_llama.tokenizer, tmp_path / "model.gguf")
    reloaded = _reload(result)
    state = reloaded.state_dict()
    assert not result.converted, "every setting here is held bit for bit"
    for name, qw in quantized_weights(cm).items():
        w = state[f"{name}.weight"]
        if block_type(qw)[0] == gguf.GGMLQuantizationType.Q4_1:
            bound = FP16_EPS * (qw.zeros.abs() * qw.scales).max() + 1e-12
            assert (w - _fp16_scaled(qw)).abs().max() <= bound, name
        else:
            assert torch.equal(w, _fp16_scaled(qw)), name  # bit-exact codes, scales rounded to fp16
        if qw.mask is not None:
            assert bool((w[~qw.mask] == 0).all()), f"{name}: pruned weights must stay exactly 0"
    ids = torch.randint(0, len(random_llama.tokenizer), (1, 48), generator=torch.Generator().manual_seed(1))
    ours, theirs = _logits(cm.model, ids), _logits(reloaded, ids)
    scale = ours.abs().max()
    assert (ours - theirs).abs().max() <= LOGIT_TOLERANCE * scale
    reference = copy.deepcopy(cm.model)
    for name, qw in quantized_weights(cm).items():
        set_weight_matrix_(reference.get_submodule(name), state[f"{name}.weight"])
    assert (_logits(reference, ids) - theirs).abs().max() <= 1e-5 * scale
    linear_types = {t for n, t in result.tensor_types.items() if n.startswith("blk.") and "norm" not in n}
    if sparsity and expected_type == "Q4_1":  # pruned layers whose zeros Q4_1 cannot keep at 0: Q8_0, exactly
        assert linear_types <= {"Q4_1", "Q8_0"}
    else:
        assert linear_types == {expected_type}


def test_gguf_reader_lists_exactly_the_types_we_claim(random_llama, tmp_path):
    cm = _compressed(random_llama, SETTINGS["q4_0"][0])
    result = export_gguf(cm, random_llama.tokenizer, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(str(result.path))
    listed = {t.name: t.tensor_type.name for t in reader.tensors}
    assert listed == result.tensor_types
    assert listed["token_embd.weight"] == "F32" and listed["blk.0.attn_norm.weight"] == "F32"
    assert listed["blk.1.ffn_down.weight"] == "Q4_0" and listed["output.weight"] == "F32"  # lm_head not tied here
    q = reader.get_tensor(list(listed).index("blk.0.attn_v.weight"))
    codes = quantized_weights(cm)["model.layers.0.self_attn.v_proj"].codes.numpy()
    blocks = np.asarray(q.data).reshape(codes.shape[0], -1, 18)  # Q4_0 block: fp16 d + 16 bytes of nibbles
    nibbles = np.concatenate([blocks[..., 2:] & 0xF, blocks[..., 2:] >> 4], axis=-1).reshape(codes.shape)
    assert np.array_equal(nibbles, codes)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 2
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == random_llama.model.config.vocab_size


def test_tiny_model_reloads_with_its_tokenizer(tiny_loaded, tmp_path):
    cm = _compressed(tiny_loaded, SETTINGS["q4_1"][0])
    result = export_gguf(cm, tiny_loaded.tokenizer, tmp_path / "tiny.gguf")
    reloaded = _reload(result)
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
    ids = tiny_loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    tokenizer = AutoTokenizer.from_pretrained(result.path.parent, gguf_file=result.path.name)
    assert tokenizer(text)["input_ids"] == ids[0].tolist()
    ours, theirs = _logits(cm.model, ids), _logits(reloaded, ids)
    assert (ours - theirs).abs().max() <= LOGIT_TOLERANCE * ours.abs().max()
    assert result.type_counts()["Q4_1"] == 5 * 7 and not result.converted
    assert "output.weight" not in result.tensor_types  # tied embeddings: llama.cpp reuses token_embd


def test_other_architectures_are_refused_with_a_reason(tmp_path):
    loaded = tiny_random_model("gpt2")
    cm = _compressed(loaded, SETTINGS["q4_0"][0])
    with pytest.raises(ValueError, match="Llama-architecture"):
        export_gguf(cm, loaded.tokenizer, tmp_path / "x.gguf")


@pytest.mark.parametrize("quantization,expected", [
    (QuantizationConfig(bits=4, symmetric=True), "Q4_0 bit for bit"),
    (QuantizationConfig(bits=4), "Q4_1 bit for bit"),
    (QuantizationConfig(bits=8, symmetric=True), "Q8_0 bit for bit"),
    (QuantizationConfig(bits=3), "Q4_0 bit for bit"),
    (QuantizationConfig(bits=6, int8_kernel=False), "Q8_0 bit for bit"),
    (QuantizationConfig(bits=3, grid="minmax"), "Refused: GGUF export: 3-bit codes with fractional zero-points"),
    (QuantizationConfig(bits=16), "BF16, exactly"),
])
def test_note_says_what_is_exact_before_building(quantization, expected):
    note = gguf_note(CompressionConfig(quantization=quantization, pruning=PruningConfig(sparsity=0.5)))
    assert expected in note and ("stored as zeros" in note or note.startswith("Refused"))


def test_cli_exports_the_tiny_model_as_gguf(tmp_path, capsys):
    from lmcompress_core.cli import main

    rc = main(["export", "--model", "tiny", "--bits", "8", "--group-size", "32", "--symmetric", "--no-int8-kernel",
               "--format", "gguf", "--out", str(tmp_path), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["tensor_types"] == {"F32": 12, "Q8_0": 35}
    assert {t.tensor_type.name for t in gguf.GGUFReader(summary["out"]).tensors} == {"F32", "Q8_0"}
    assert "Q8_0 bit for bit" in summary["note"]


@pytest.mark.parametrize("argv,message", [
    (["export", "--bits", "4", "--out", "x"], "--format"),
    (["export", "--bits", "4", "--format", "onnx", "--out", "x"], "invalid choice"),
    (["export", "--model", "/no/such/folder", "--format", "gguf", "--out", "x"], "no such model folder"),
])
def test_cli_export_errors_are_one_line_exit_2(argv, message, capsys):
    from lmcompress_core.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_download_bytes_is_a_gguf_of_the_run_settings(tmp_path):
    from lmcompress_core.export import download_bytes, download_note

    q = QuantizationConfig(bits=4, group_size=32, symmetric=True)
    config = CompressionConfig(quantization=q, runtime="simulate").to_dict()
    data = download_bytes(load_model("tiny"), config, "gguf")
    (tmp_path / "d.gguf").write_bytes(data)
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "d.gguf")).tensors}
    assert data[:4] == b"GGUF" and types == {"F32", "Q4_0"}
    assert "Q4_0 bit for bit" in download_note(config, "gguf")
    # the app's real runtime runs the tied LM head and embedding from one int8 table: one Q8_0 token_embd
    real = download_bytes(load_model("tiny"), CompressionConfig(quantization=q).to_dict(), "gguf")
    (tmp_path / "r.gguf").write_bytes(real)
    by_name = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "r.gguf")).tensors}
    assert {t for n, t in by_name.items() if n.startswith("blk.") and "norm" not in n} == {"Q4_0"}
    assert by_name["token_embd.weight"] == "Q8_0" and "output.weight" not in by_name
    assert "F16" not in by_name.values()


def test_codes_are_read_from_modules_when_they_carry_them(random_llama, tmp_path):
    """Compressed weights are moving onto their modules (``module.quantized_weight()``); the export reads
    them there first and falls back to ``CompressedModel.quantized``."""
    cm = _compressed(random_llama, SETTINGS["q4_0"][0])
    codes = dict(quantized_weights(cm))
    for module in cm.model.modules():  # after the move, only these layers answer with codes
        module.quantized_weight = lambda: None
    for name, qw in codes.items():
        cm.model.get_submodule(name).quantized_weight = lambda qw=qw: qw
    cm.quantized = {}
    assert quantized_weights(cm) == codes
    result = export_gguf(cm, random_llama.tokenizer, tmp_path / "model.gguf")
    assert result.type_counts()["Q4_0"] == 14


@pytest.mark.parametrize("dtype16,kind", [("bf16", "BF16"), ("fp16", "F16")])
def test_half_precision_cast_is_written_exactly(random_llama, tmp_path, dtype16, kind):
    cm = compress(random_llama.model, CompressionConfig(quantization=QuantizationConfig(bits=16, dtype16=dtype16)))
    result = export_gguf(cm, random_llama.tokenizer, tmp_path / "model.gguf")
    assert result.type_counts() == {kind: 16, "F32": 5}  # 14 linear + embeddings + lm_head; 5 norms in F32
    state = _reload(result).state_dict()
    for name, p in cm.model.named_parameters():
        assert torch.equal(p.float(), state[name]), name


@pytest.mark.parametrize("setting,runtime", [("q4_0", "simulate"), ("q4_1_group128", "real"), ("6bit_q8_0", "real"),
                                             ("3bit_q4_0", "real")])
def test_the_plan_says_size_and_types_before_writing_and_the_file_is_that(random_llama, tiny_loaded, tmp_path,
                                                                          setting, runtime):
    from lmcompress_core.export import plan_gguf

    for loaded in (random_llama, tiny_loaded):   # untied and tied embeddings
        cm = compress(loaded.model, CompressionConfig(quantization=SETTINGS[setting][0], runtime=runtime))
        plan = plan_gguf(cm, loaded.tokenizer)
        path = tmp_path / f"{loaded.name}-{setting}.gguf"
        assert not path.exists()
        result = export_gguf(cm, loaded.tokenizer, path, plan=plan)
        assert path.stat().st_size == plan.file_bytes == result.file_bytes
        listed = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
        assert listed == plan.tensor_types == result.tensor_types
        assert f"{plan.file_bytes / 1e6:.1f} MB" in plan.summary() and "F16" not in listed.values()


def test_the_int8_head_is_q8_0_once_when_tied_and_stays_close_to_ours(random_llama, tiny_loaded, tmp_path):
    """The real runtime runs the LM head (and a tied embedding) from one int8 per-channel table; its codes leave
    int8 around their zero-points, so the file re-rounds it to Q8_0: each weight within half a Q8_0 step (absmax
    of its block / 127 / 2, d rounded to fp16) of what our head computes with, and said in `converted`."""
    q = QuantizationConfig(bits=4, group_size=32)
    for loaded, tied in ((tiny_loaded, True), (random_llama, False)):
        cm = compress(loaded.model, CompressionConfig(quantization=q))
        result = export_gguf(cm, loaded.tokenizer, tmp_path / f"{loaded.name}.gguf")
        types = result.tensor_types
        head = "token_embd.weight" if tied else "output.weight"
        assert types[head] == "Q8_0" and ("output.weight" in types) is not tied
        assert not tied or "token_embd.weight" in types and list(types).count("token_embd.weight") == 1
        assert tied or types["token_embd.weight"] == "BF16"   # the untied embedding ran in bf16
        assert [entry.split(":")[0] for entry in result.converted] == ["model.embed_tokens" if tied else "lm_head"]
        ours = cm.model.get_output_embeddings().quantized_weight().dequantize()
        reader = gguf.GGUFReader(str(result.path))
        raw = next(t for t in reader.tensors if t.name == head)
        theirs = torch.from_numpy(gguf.quants.dequantize(np.asarray(raw.data), gguf.GGMLQuantizationType.Q8_0))
        step = ours.reshape(ours.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
        bound = (step / 2 * (1 + 2 * FP16_EPS) + 127 * step * FP16_EPS).expand(-1, -1, 32).reshape(ours.shape)
        assert bool(((theirs.reshape(ours.shape) - ours).abs() <= bound + 1e-7).all())


def test_progress_is_reported_tensor_by_tensor(random_llama, tmp_path):
    cm = _compressed(random_llama, SETTINGS["q4_0"][0])
    calls = []
    result = export_gguf(cm, random_llama.tokenizer, tmp_path / "m.gguf", callback=lambda *a: calls.append(a))
    assert [c[2] for c in calls] == list(result.tensor_types)
    done = [c[0] for c in calls]
    assert done == sorted(done) and done[-1] == calls[0][1] and len(set(done)) == len(done)


def test_codes_no_gguf_type_holds_are_refused_and_nothing_is_written(random_llama, tmp_path, capsys):
    from lmcompress_core.cli import main
    from lmcompress_core.export import plan_gguf

    q = QuantizationConfig(bits=3, group_size=32, grid="minmax")
    cm = _compressed(random_llama, q)
    for attempt in (lambda: plan_gguf(cm, random_llama.tokenizer),
                    lambda: export_gguf(cm, random_llama.tokenizer, tmp_path / "x.gguf")):
        with pytest.raises(ValueError, match="3-bit codes with fractional zero-points .* have no GGUF type"):
            attempt()
    assert not (tmp_path / "x.gguf").exists()
    argv = ["export", "--model", "/no/such/folder", "--bits", "3", "--grid", "minmax", "--format", "gguf",
            "--out", str(tmp_path / "y")]
    assert main(argv) == 2   # refused from the settings, before the (missing) model is looked for
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: GGUF export: 3-bit codes") and "\n" not in err and not (tmp_path / "y").exists()


def test_a_failed_write_leaves_no_partial_file(random_llama, tmp_path):
    from lmcompress_core.export import plan_gguf

    cm = _compressed(random_llama, SETTINGS["q4_0"][0])
    plan = plan_gguf(cm, random_llama.tokenizer)

    def broken():
        raise RuntimeError("disk full")

    plan.tensors[3].make = broken
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(cm, random_llama.tokenizer, tmp_path / "m.gguf", plan=plan)
    assert not (tmp_path / "m.gguf").exists()
