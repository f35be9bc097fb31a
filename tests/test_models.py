"""Model loading: every architecture offline, the safety refusals (pickle, remote code, `..`, corrupt files),
the offline hub message with a bounded wait, the memory pre-flight, the tiny model and the embedded default."""
import json
import pickle
import socket
import time

import pytest
import torch
from transformers import GPT2Config

from lmcompress_core.models import loading
from lmcompress_core.data import load_text, token_ids
from lmcompress_core.models.loading import ModelError, load_model, tiny_random_model
from lmcompress_core.models.train_tiny import heldout_perplexity

ARCHITECTURES = loading.RANDOM_ARCHITECTURES
TINY_HELDOUT_PPL_MAX = 110.0  # measured 97.1 on the first 2048 held-out tokens (v1); see MODEL_CARD.md


def _saved_random(arch, folder):
    """A random model of `arch` saved as a local model folder (safetensors + tokenizer)."""
    loaded = tiny_random_model(arch)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return loaded


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_random_architecture_runs_and_is_seeded(arch):
    a, b = tiny_random_model(arch), tiny_random_model(arch)
    ids = a.tokenizer("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = a.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(a.tokenizer))
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        assert torch.equal(logits, b.model(ids).logits)
    assert a.model.config.model_type == arch and a.card.params == sum(p.numel() for p in a.model.parameters())


def test_gpt2_uses_conv1d_layers():
    from transformers.pytorch_utils import Conv1D

    model = tiny_random_model("gpt2").model
    assert any(isinstance(m, Conv1D) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_local_folder_round_trip(arch, tmp_path):
    original = _saved_random(arch, tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.card.source == "local" and loaded.model.dtype == torch.float32 and not loaded.model.training
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original.model(ids).logits)


def test_unknown_architecture_name():
    with pytest.raises(ModelError, match="unknown architecture"):
        tiny_random_model("mamba9")


def _pickle_payload(marker):
    """Bytes whose unpickling would create `marker` (stands in for malicious code)."""

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    return pickle.dumps(Payload())


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_checkpoint_refused_and_never_unpickled(tmp_path, filename):
    folder, marker = tmp_path / "model", tmp_path / "marker.txt"
    folder.mkdir()
    GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100).save_pretrained(folder)
    (folder / filename).write_bytes(_pickle_payload(marker))
    with pytest.raises(ModelError, match="pickle"):
        load_model(str(folder))
    assert not marker.exists()


def test_pickle_payload_really_writes_marker(tmp_path):
    """Guards the test above: the payload is live, so 'marker not written' means 'never unpickled'."""
    marker = tmp_path / "marker.txt"
    pickle.loads(_pickle_payload(marker))
    assert marker.read_text() == "pwned"


def test_remote_code_model_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "my_secret_arch", "auto_map": {"AutoModelForCausalLM": "modeling_secret.SecretLM"}}))
    (tmp_path / "modeling_secret.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelError, match="remote code"):
        load_model(str(tmp_path))


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    with pytest.raises(ModelError, match="not supported"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("name", ["../secrets", "gpt2/../../etc", "a/..", "..", "models/../../../root"])
def test_dotdot_ids_refused(name):
    with pytest.raises(ModelError, match=r"'\.\.'"):
        load_model(name)


@pytest.mark.parametrize("name", ["/no/such/model/folder", "./my-modle", "~/typo-model", "C:\\models\\x"])
def test_missing_local_paths_named(name):
    with pytest.raises(ModelError, match="no such model folder") as err:
        load_model(name)
    assert repr(name) in str(err.value)


@pytest.mark.parametrize("name", ["", "   ", "gpt 2!", "owner/model/extra"])
def test_malformed_ids_refused(name):
    with pytest.raises(ModelError):
        load_model(name)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path))


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and the hub marked offline (as on this machine)."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_offline_preset_says_needs_download(empty_hf_cache):
    start = time.time()
    with pytest.raises(ModelError, match="needs download, offline") as err:
        load_model("gpt2")
    assert "'gpt2'" in str(err.value) and time.time() - start < 5


def test_silent_hub_bounded_wait(empty_hf_cache, monkeypatch):
    """A hub that accepts the connection but never answers: the probe gives up after its timeout."""
    import huggingface_hub.constants as hf_constants

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # never accept()ed, never answers
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "HUB_PROBE_TIMEOUT_S", 1.0)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    start = time.time()
    with pytest.raises(ModelError, match="needs download, offline"):
        load_model("EleutherAI/pythia-70m")
    silent.close()
    assert time.time() - start < 4


def test_list_models_offline(empty_hf_cache):
    rows = {row["name"]: row for row in loading.list_models()}
    json.dumps(list(rows.values()))
    assert rows["default"]["available"] and rows["default"]["source"] == "embedded"
    assert rows["tiny"]["available"] and rows["tiny"]["source"] == "project" and rows["tiny"]["params"] > 1e6
    for preset in loading.PRESETS:
        assert rows[preset]["available"] is False and rows[preset]["status"] == "needs download, offline"
        assert rows[preset]["source"] == "hub" and rows[preset]["params"] > 1e7


def test_memory_estimate_from_meta_device():
    from transformers import Qwen2Config

    # Qwen2.5-0.5B's published shape: 494M parameters, built on the meta device (no memory allocated).
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    assert 490e6 < loading.count_params(config) < 500e6
    assert loading.estimate_memory_bytes(config) == int(loading.count_params(config) * 4 * 1.5) + (256 << 20)


def test_preflight_refuses_before_loading(tmp_path, monkeypatch):
    _saved_random("llama", tmp_path)
    # Mock of the machine: pretend only 1 MiB of RAM is free.
    monkeypatch.setattr(loading, "available_ram_bytes", lambda: 1 << 20)
    called = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: called.append(1))
    with pytest.raises(ModelError, match=r"needs about 0\.\d\d GiB .* only 0\.00 GiB"):
        load_model(str(tmp_path))
    assert not called


def test_truncated_safetensors(tmp_path):
    _saved_random("opt", tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="truncated"):
        load_model(str(tmp_path))


def test_garbage_safetensors(tmp_path):
    _saved_random("gpt_neox", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelError, match="not a valid safetensors"):
        load_model(str(tmp_path))


def test_nan_weights_detected(tmp_path):
    _saved_random("qwen2", tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[header_end: header_end + 4096] = b"\xff" * 4096  # float32 0xffffffff is NaN
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="NaN"):
        load_model(str(tmp_path))


def test_tiny_model_heldout_perplexity(tiny_loaded):
    assert tiny_loaded.card.source == "project" and 3e6 < tiny_loaded.card.params < 15e6
    assert tiny_loaded.card.caveat == ""   # only the de-quantized default carries a caveat
    ids = token_ids(tiny_loaded.tokenizer, load_text("tiny-heldout"))
    ppl = heldout_perplexity(tiny_loaded.model, ids, context=256, stride=256, max_tokens=2048)
    assert ppl < TINY_HELDOUT_PPL_MAX


def test_tiny_model_second_load_is_fast(tiny_loaded):
    start = time.time()
    load_model("tiny")
    assert time.time() - start < 3


@pytest.mark.slow
def test_default_model_loads_and_answers():
    loading.prepare_default()  # converts the GGUF once per machine (~20 s), then a no-op
    start = time.time()
    loaded = load_model("default")
    seconds = time.time() - start
    # Measured 1.8 s for a repeat load on 2 oversubscribed cores (issue 2 asks < 3 s); margin for a busy CI.
    assert seconds < 10, f"cached default load took {seconds:.1f} s"
    assert loaded.card.source == "embedded" and loaded.card.params == 134_515_008
    assert "de-quantized" in loaded.card.notes and "4.5 bits" in loaded.card.notes
    assert "Q4_1" in loaded.card.caveat and loaded.card.caveat.count(". ") == 0   # one sentence
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = loaded.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, ids.shape[1]:])


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """The default-model cache in tmp_path, with the slow GGUF de-quantization replaced by a tiny llama."""
    monkeypatch.setenv("LMCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "gguf_path", lambda: tmp_path / "fake.gguf")

    def fake_load(source):
        loaded = tiny_random_model("llama")
        return loaded.model, loaded.tokenizer

    monkeypatch.setattr(loading, "_load_gguf", fake_load)
    return tmp_path / "cache"


def test_default_cache_is_rebuilt_when_damaged(fake_gguf):
    folder = loading.prepare_default()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    loaded = load_model("default")
    assert loaded.card.source == "embedded" and weights.stat().st_size > 1000


def test_interrupted_conversion_leaves_nothing(fake_gguf, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", boom)
    with pytest.raises(ModelError, match="disk full"):
        loading.prepare_default()
    assert list(fake_gguf.iterdir()) == []
