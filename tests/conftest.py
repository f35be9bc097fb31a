"""Shared pytest fixtures: tiny offline models (never a download) and the project's trained tiny model."""
import os
import tempfile

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# a test's timings are never "busy": the suite itself loads the machine, and a busy report is not cached (the
# tests of that monkeypatch speed.machine_load)
os.environ["LMCOMPRESS_BUSY_LOAD"] = "1e9"
# the autopilot's measurements go to a folder of this test run: a test never reads another run's results
os.environ["LMCOMPRESS_SENSITIVITY_CACHE"] = tempfile.mkdtemp(prefix="lmcompress-sensitivity-")
torch.set_num_threads(min(2, os.cpu_count() or 1))
# no background torch.compile beside the tests (a minute of both cores, cold): tests/test_decode.py compiles on
# purpose, in "wait" mode
os.environ["LMCOMPRESS_COMPILE"] = "off"

ARCHITECTURES = ("gpt2", "opt", "gpt_neox", "llama", "qwen2")


@pytest.fixture(scope="session")
def tiny_loaded():
    """The model trained by this project (assets/models/tiny), loaded once per test session."""
    from lmcompress_core.models.loading import load_model

    return load_model("tiny")


@pytest.fixture(params=ARCHITECTURES)
def random_arch(request):
    """A seeded, randomly initialised tiny model of each supported architecture, built offline."""
    from lmcompress_core.models.loading import tiny_random_model

    return tiny_random_model(request.param)


def byte_bpe_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``text`` in the test (offline, well under a second)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def one_thread():
    """Models of width 64 run fastest on one thread, and OpenMP threads thrash on a busy shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- the browser tests (tests/e2e)

@pytest.fixture(scope="module")
def chromium():
    """One headless Debian chromium per module (never a downloaded browser build)."""
    from pathlib import Path

    from bench.loadtest import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (make browser)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Where the browser tests' screenshots go: $LMCOMPRESS_E2E_SCREENSHOTS, else a temporary folder."""
    from pathlib import Path

    folder = os.environ.get("LMCOMPRESS_E2E_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path
