"""The sequential calibration pass (methods/sequential.py) against the one-pass statistics of layers.py.

With a ``process`` that changes nothing, running the blocks one by one must give every layer the Hessian that
one pass through the whole model gives (``input_statistics``, written independently with forward pre-hooks
over batches): the block inputs, masks and position embeddings are then passed on correctly.
"""
import pytest
import torch

from lmcompress_core.methods.layers import input_statistics, linear_layers
from lmcompress_core.methods.sequential import compress_sequentially_, shared_input_groups


def _ids(model, n=4, seq_len=24):
    return torch.randint(0, model.config.vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(0))


def test_blocks_one_by_one_give_the_one_pass_hessians(random_arch, one_thread):
    model = random_arch.model.eval()
    layers = linear_layers(model)
    ids = _ids(model)
    seen = {}

    def record(names, hessian):
        for name in names:
            seen[name] = hessian

    outside = compress_sequentially_(model, layers, ids, record)
    reference = input_statistics(model, layers, ids, hessian=True, batch_size=2)
    assert set(seen) | set(outside) == set(layers) and seen
    for name, h in seen.items():
        expected = reference.hessian[name]
        assert ((h - expected).norm() / expected.norm()).item() < 1e-4, name


def test_layers_fed_the_same_input_are_grouped(random_arch, one_thread):
    model = random_arch.model.eval()
    groups = shared_input_groups(model, linear_layers(model), _ids(model))
    by_first = {g[0].rsplit(".", 1)[-1]: [n.rsplit(".", 1)[-1] for n in g] for g in groups}
    if model.config.model_type in ("llama", "qwen2"):
        assert by_first["q_proj"] == ["q_proj", "k_proj", "v_proj"] and by_first["gate_proj"] == ["gate_proj", "up_proj"]
    assert sum(len(g) for g in groups) == len(linear_layers(model))


def test_process_runs_before_the_layer_so_later_layers_see_its_change(one_thread):
    """Zeroing a block's first layers inside process must change what the layers after them receive."""
    from lmcompress_core.models.loading import tiny_random_model

    model = tiny_random_model("llama").model.eval()
    layers = linear_layers(model)
    ids = _ids(model)
    before = input_statistics(model, layers, ids, hessian=True).hessian
    seen = {}

    def zero_attention(names, hessian):
        for name in names:
            seen[name] = hessian
            if name.endswith("v_proj"):
                layers[name].weight.data.zero_()   # attention now outputs zeros: o_proj's input is 0

    compress_sequentially_(model, layers, ids, zero_attention)
    o_proj = next(n for n in layers if n.endswith("o_proj"))
    assert before[o_proj].abs().sum() > 0 and seen[o_proj].abs().sum() == 0


def test_cancel_between_blocks(one_thread):
    from lmcompress_core.models.loading import tiny_random_model

    model = tiny_random_model("llama").model.eval()

    def check():
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        compress_sequentially_(model, linear_layers(model), _ids(model), lambda n, h: None, check=check)
