"""Calibration text never overlaps the tokens perplexity scores: a pasted text too short for that is refused."""
import pytest
import torch

from lmcompress_core import data
from lmcompress_core.compress import CompressionConfig
from lmcompress_core.measure.protocol import EvalProtocol, calibration_for
from lmcompress_core.methods.prune import PruningConfig
from lmcompress_core.methods.quantize import QuantizationConfig
from lmcompress_core.models.loading import tiny_random_model

CALIBRATED = [CompressionConfig(quantization=QuantizationConfig(bits=4, method="gptq")),
              CompressionConfig(quantization=QuantizationConfig(bits=4, method="mse")),
              CompressionConfig(pruning=PruningConfig(sparsity=0.5, method="wanda"))]


@pytest.fixture(scope="module")
def loaded():
    return tiny_random_model("llama")


@pytest.mark.parametrize("config", CALIBRATED, ids=["gptq", "mse", "wanda"])
def test_a_text_too_short_to_leave_unscored_tokens_is_refused(loaded, config):
    text = data.load_text("web")[:3000]
    n = data.token_ids(loaded.tokenizer, text).numel()
    protocol = EvalProtocol(text=text, eval_tokens=n - 100)   # 99 tokens left after the scored ones
    with pytest.raises(ValueError, match=f"calibration needs 128 tokens that are never scored.*at least {n + 29} "):
        calibration_for(loaded, config, protocol, n_samples=4, seq_len=128)


def test_calibration_windows_lie_after_the_scored_tokens(loaded):
    text = data.load_text("web")[:6000]
    ids = data.token_ids(loaded.tokenizer, text)
    eval_tokens, seq_len = ids.numel() // 2, 64
    windows = calibration_for(loaded, CALIBRATED[0], EvalProtocol(text=text, eval_tokens=eval_tokens),
                              n_samples=8, seq_len=seq_len)
    assert windows.shape == (8, seq_len)
    first_allowed = eval_tokens + 1   # perplexity scores positions 1..eval_tokens of ids[:eval_tokens + 1]
    starts = [s for w in windows for s in range(ids.numel() - seq_len + 1) if torch.equal(ids[s:s + seq_len], w)]
    assert len(starts) >= 8 and min(starts) >= first_allowed


def test_exactly_one_window_left_is_enough(loaded):
    text = data.load_text("web")[:3000]
    n = data.token_ids(loaded.tokenizer, text).numel()
    windows = calibration_for(loaded, CALIBRATED[0], EvalProtocol(text=text, eval_tokens=n - 1 - 32),
                              n_samples=2, seq_len=32)
    assert windows.shape == (2, 32)
