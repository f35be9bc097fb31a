"""learn.py: the Learn page's numbers on real layers — levels, errors, masks, and the two classic mistakes."""
import pytest
import torch
from torch import nn

from lmcompress_core.report import learn


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def test_levels_are_the_minmax_grid(model):
    layer = learn.pick_layer(model)
    assert layer.name == "0" and layer.weight.shape == (32, 64)
    for bits in (2, 3, 4):
        weights, levels = learn.histogram_data(layer.weight, bits)
        assert len(levels) <= 2 ** bits and len(levels) >= 2 ** bits - 1
        assert min(levels) == pytest.approx(float(layer.weight.min()), abs=1e-6)
        steps = torch.tensor(sorted(levels)).diff()
        params = learn.minmax_parameters(layer.weight, bits)
        assert torch.allclose(steps.min(), torch.tensor(params["scale"]), rtol=1e-3)
    assert len(weights) == 32 * 64


def test_error_falls_with_bits(model):
    bits, errors = learn.error_vs_bits(learn.pick_layer(model).weight)
    assert bits[-1] == 16 and errors == sorted(errors, reverse=True)
    assert errors[0] > 100 * errors[bits.index(8)]


def test_masks_unstructured_and_two_of_four(model):
    masks = learn.pruning_masks(learn.pick_layer(model).weight, size=16)
    unstructured = torch.tensor(masks["unstructured 50%"])
    nm = torch.tensor(masks["2:4 semi-structured"])
    assert unstructured.shape == (16, 16) and unstructured.sum() == 128
    assert (nm.reshape(16, 4, 4).sum(-1) == 2).all()


def test_the_two_classic_mistakes_change_nothing(model):
    before = model[0].weight.detach().clone()
    demo = learn.mistakes_demo(model, "0", bits=3, sparsity=0.5)
    assert demo["quantize_mistake"] == 0.0 and demo["prune_mistake"] == 0.0
    assert demo["quantize_correct"] > 0.5 and demo["prune_correct"] == pytest.approx(0.5, abs=0.01)
    assert torch.equal(model[0].weight, before)       # the demo works on copies


def test_kd_temperature_table_softens():
    rows = learn.kd_temperature_table(torch.tensor([4.0, 2.0, 0.0, -1.0]))
    entropies = [r["entropy (nats)"] for r in rows]
    assert entropies == sorted(entropies) and rows[-1]["T² gradient factor"] == 64.0


def test_on_the_tiny_model(tiny_loaded):
    names = learn.layer_names(tiny_loaded.model)
    layer = learn.pick_layer(tiny_loaded.model, names[-1])
    assert layer.name == names[-1]
    logits = learn.next_token_logits(tiny_loaded.model, tiny_loaded.tokenizer, "ROMEO:")
    assert logits.shape[-1] == tiny_loaded.model.config.vocab_size


def test_integer_zero_levels_include_zero_and_match_the_printed_numbers(model):
    w = learn.pick_layer(model).weight
    for bits in (2, 3, 4):
        params = learn.minmax_parameters(w, bits, grid="integer-zero")
        _, levels = learn.histogram_data(w, bits, grid="integer-zero")
        assert 0.0 in levels and len(levels) <= 2 ** bits
        assert params["zero_point"] == round(params["zero_point"])
        steps = torch.tensor(sorted(levels)).diff()
        assert torch.allclose(steps.min(), torch.tensor(params["scale"]), rtol=1e-3)
        assert min(levels) == pytest.approx(-params["zero_point"] * params["scale"], rel=1e-5)
    seed_levels = learn.histogram_data(w, 3, grid="minmax")[1]
    assert 0.0 not in seed_levels
    assert set(learn.FORMULAS) == set(learn.GRIDS)


def test_error_fall_summary_says_the_measured_factor_per_bit():
    summary = learn.error_fall_summary([2, 3, 4, 6, 16], [2.0, 0.5, 0.1, 0.004, 1e-8])
    assert [(a, b) for a, b, _ in summary["factors"]] == [(2, 3), (3, 4), (4, 6)]   # no step to the float cast
    assert [round(f, 6) for _, _, f in summary["factors"]] == [4.0, 5.0, 5.0]       # 4 -> 6: 25× = 5× per bit
    assert summary["median"] == pytest.approx(5.0) and summary["worse_than_zero"] == [2]


def test_the_page_text_fits_a_narrow_page():
    for latex in learn.FORMULAS.values():   # one equation per line, not one long line
        assert latex.startswith(r"\begin{aligned}") and latex.count(r"\\") == 3
    for snippet in (learn.MISTAKE_QUANTIZE, learn.CORRECT_QUANTIZE, learn.MISTAKE_PRUNE, learn.CORRECT_PRUNE):
        assert max(map(len, snippet.splitlines())) <= 48, snippet
    assert set(learn.GRID_LABELS) == set(learn.GRIDS)
    assert all("seed" not in label + why for label, why in learn.GRID_LABELS.values())
