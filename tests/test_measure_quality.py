"""measure_quality: llama.cpp-style statistics against an independent per-token computation."""
import numpy as np
import pytest
import torch

from lmcompress_core.compress import CompressionConfig, compress
from lmcompress_core.measure.quality import score_tokens, windows
from lmcompress_core.methods.layers import checking_blocks, transformer_blocks
from lmcompress_core.methods.quantize import QuantizationConfig

torch.set_num_threads(2)


def test_statistics_match_a_direct_computation(tiny_loaded):
    base = tiny_loaded.model
    quantized = compress(base, CompressionConfig(quantization=QuantizationConfig(bits=3, group_size=64))).model
    ids = torch.randint(0, 4096, (161,), generator=torch.Generator().manual_seed(0))
    stats = score_tokens(quantized, ids, context=64, stride=64, base_model=base).statistics()
    p, q, targets = [], [], []
    with torch.inference_mode():  # the same windows, scored independently in float64
        for begin, end, first in windows(ids.numel(), 64, 64):
            rows = slice(first - begin - 1, end - begin - 1)
            p.append(torch.log_softmax(base(input_ids=ids[None, begin:end]).logits[0].double(), -1)[rows])
            q.append(torch.log_softmax(quantized(input_ids=ids[None, begin:end]).logits[0].double(), -1)[rows])
            targets.append(ids[first:end])
    logp_base, logp, target = torch.cat(p).numpy(), torch.cat(q).numpy(), torch.cat(targets).numpy()
    kl = (np.exp(logp_base) * (logp_base - logp)).sum(-1)
    assert stats["tokens"] == len(kl)
    np.testing.assert_allclose([stats["kl_mean"], stats["kl_median"], stats["kl_p99"], stats["kl_p999"]],
                               [kl.mean(), np.median(kl), np.percentile(kl, 99), np.percentile(kl, 99.9)],
                               rtol=1e-3)
    assert stats["kl_p99"] > 2 * stats["kl_median"]
    same = (logp_base.argmax(-1) == logp.argmax(-1)).mean() * 100
    assert stats["same_top_percent"] == np.float64(same).round(10) or abs(stats["same_top_percent"] - same) < 1e-6
    rows = np.arange(len(target))
    delta_p = np.exp(logp[rows, target]) - np.exp(logp_base[rows, target])
    assert stats["rms_delta_p_percent"] == np.sqrt((delta_p ** 2).mean()) * 100 or \
        abs(stats["rms_delta_p_percent"] - np.sqrt((delta_p ** 2).mean()) * 100) < 1e-4
    assert 0 < stats["rms_delta_p_percent"] < 100


def test_exact_statistics_on_identical_models(tiny_loaded):
    ids = torch.randint(0, 4096, (100,), generator=torch.Generator().manual_seed(1))
    stats = score_tokens(tiny_loaded.model, ids, context=50, stride=50, base_model=tiny_loaded.model).statistics()
    assert stats["same_top_percent"] == 100 and stats["rms_delta_p_percent"] == 0
    assert abs(stats["kl_p999"]) < 1e-9
    assert score_tokens(tiny_loaded.model, ids, context=50, stride=50).statistics() is None


def test_a_window_is_abandoned_between_two_blocks(tiny_loaded):
    """check runs before every batch of windows (here both windows of 64 tokens run as one) and, inside its pass,
    before every transformer block and after the output head: what it raises leaves the pass there (the later
    blocks never run) and no hook stays on the model. The batch scores what each window alone scores."""
    model, ids = tiny_loaded.model, torch.randint(0, 4096, (129,), generator=torch.Generator().manual_seed(0))
    stack = transformer_blocks(model)[2]
    asked = []
    first = score_tokens(model, ids, context=64, stride=64, check=lambda done, total: asked.append(done))
    assert len(stack) > 2 and asked == [0] * (2 + len(stack)) + [2]
    with torch.no_grad():
        alone = [torch.log_softmax(model(input_ids=ids[b:e][None]).logits[0, f - b - 1: e - b - 1].float(), -1)
                 .gather(1, ids[f:e, None])[:, 0] for b, e, f in windows(129, 64, 64)]
    assert torch.allclose(first.nll, -torch.cat(alone), rtol=1e-5, atol=1e-5)

    ran = []
    watch = stack[-1].register_forward_pre_hook(lambda module, args: ran.append(1))

    class Moved(Exception):
        pass

    def stop_inside(done, total):
        asked.append(done)
        if len(asked) == 3:   # the window's own check, then two blocks
            raise Moved

    asked.clear()
    try:
        with pytest.raises(Moved):
            score_tokens(model, ids, context=64, stride=64, check=stop_inside)
    finally:
        watch.remove()
    assert not ran and all(not block._forward_pre_hooks for block in stack)
    assert torch.equal(score_tokens(model, ids, context=64, stride=64).nll, first.nll)   # scores as before


def test_only_the_scoring_thread_asks_between_blocks(tiny_loaded):
    """The base model is shared by every session: while one scores a window with its check, another session's
    pass on the same model runs no check of it."""
    import threading

    model, ids = tiny_loaded.model, torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    asked = []
    with torch.inference_mode(), checking_blocks(model, lambda: asked.append(threading.get_ident())):
        other = threading.Thread(target=lambda: model(input_ids=ids))
        other.start()
        other.join()
        assert asked == []
        model(input_ids=ids)
    assert asked == [threading.get_ident()] * (len(transformer_blocks(model)[2]) + 1)   # and after the head


def test_windows_run_together_only_when_of_one_length_and_within_the_token_cap():
    from lmcompress_core.measure.quality import _window_batches

    assert _window_batches(windows(513, 256, 256)) == [[0, 1]]                     # the app's 512 tokens: one pass
    assert _window_batches(windows(1025, 256, 256)) == [[0, 1], [2, 3]]            # the cap: 512 tokens a pass
    assert _window_batches(windows(300, 256, 256)) == [[0], [1]]                   # a short last window alone
    assert _window_batches(windows(513, 256, 256), max_tokens=256) == [[0], [1]]
