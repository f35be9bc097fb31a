"""layers: which modules are compressed, [out, in] weights whatever the layout, calibration statistics."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmcompress_core.methods.layers import (DEFAULT_EXCLUDE, conv1d_to_linear_, input_statistics, linear_layers,
                                            set_weight_matrix_, transformer_blocks, weight_matrix)

torch.set_num_threads(2)


@pytest.mark.parametrize("name", ["lm_head", "model.embed_tokens", "transformer.wte", "transformer.wpe",
                                  "gpt_neox.embed_in", "embed_out", "model.decoder.embed_positions",
                                  "model.decoder.embed_tokens"])
def test_default_exclude_catches_embeddings_and_heads(name):
    import re

    assert any(re.search(p, name) for p in DEFAULT_EXCLUDE)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "transformer.h.1.mlp.c_fc",
                                  "gpt_neox.layers.0.attention.query_key_value", "model.decoder.layers.0.fc1"])
def test_default_exclude_keeps_block_layers(name):
    import re

    assert not any(re.search(p, name) for p in DEFAULT_EXCLUDE)


def test_every_architecture_exposes_its_block_layers(random_arch):
    model = random_arch.model
    layers = linear_layers(model)
    assert len(layers) >= 8
    head = model.get_output_embeddings()
    assert all(m is not head for m in layers.values())
    assert all(isinstance(m, (nn.Linear, Conv1D)) for m in layers.values())
    _, _, blocks = transformer_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers


def test_tied_weights_are_listed_once(random_arch):
    model = random_arch.model
    everything = linear_layers(model, exclude=(), embeddings=True)
    ids = [id(m.weight) for m in everything.values()]
    assert len(ids) == len(set(ids))


def test_conv1d_weights_are_seen_as_out_by_in_and_written_back():
    conv = Conv1D(nf=12, nx=5)  # stores [in=5, out=12]
    w = weight_matrix(conv)
    assert w.shape == (12, 5) and torch.equal(w, conv.weight.t())
    set_weight_matrix_(conv, torch.arange(60.0).reshape(12, 5))
    assert torch.equal(conv.weight, torch.arange(60.0).reshape(12, 5).t())
    w[0, 0] = 123.0  # a copy, not a view
    assert conv.weight[0, 0] != 123.0


def test_conv1d_becomes_an_equivalent_linear():
    model = nn.Sequential(Conv1D(nf=7, nx=4))
    x = torch.randn(3, 4)
    expected = model(x)
    conv1d_to_linear_(model, ["0"])
    assert isinstance(model[0], nn.Linear)
    torch.testing.assert_close(model(x), expected)


def test_input_statistics_match_a_direct_computation(random_arch):
    model = random_arch.model
    layers = linear_layers(model)
    name, module = next(iter(layers.items()))
    ids = torch.randint(model.config.vocab_size, (3, 10))
    captured = []
    handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    model(input_ids=ids)
    handle.remove()
    x = torch.cat(captured)
    stats = input_statistics(model, {name: module}, ids, hessian=True, batch_size=2)
    torch.testing.assert_close(stats.sq_norm[name], (x * x).sum(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.hessian[name], 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)
