"""Shared pytest fixtures: tiny offline models (never a download) and the project's trained tiny model."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

ARCHITECTURES = ("gpt2", "opt", "gpt_neox", "llama", "qwen2")


@pytest.fixture(scope="session")
def tiny_loaded():
    """The model trained by this project (assets/models/tiny), loaded once per test session."""
    from lmcompress_core.models import load_model

    return load_model("tiny")


@pytest.fixture(params=ARCHITECTURES)
def random_arch(request):
    """A seeded, randomly initialised tiny model of each supported architecture, built offline."""
    from lmcompress_core.models import tiny_random_model

    return tiny_random_model(request.param)
