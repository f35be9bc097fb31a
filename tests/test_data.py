"""Shipped texts: present, clean, held-out plays really held out; token batches shaped and seeded."""
import pytest
import torch

from lmcompress_core.data import calibration_batches, default_text_for, load_text, text_names, token_ids


@pytest.mark.parametrize("name", ["tiny-train", "tiny-heldout", "web"])
def test_texts_load_and_have_no_boilerplate(name):
    text = load_text(name)
    assert len(text) > 100_000
    assert "gutenberg" not in text.lower() and "<w " not in text and "<note" not in text


def test_heldout_plays_never_in_training_text():
    train, heldout = load_text("tiny-train"), load_text("tiny-heldout")
    for line in ("Out, damned spot! out, I say!", "If music be the food of love, play on,",
                 "To-morrow, and to-morrow, and to-morrow,"):
        assert line in heldout and line not in train
    assert "MACBETH" not in train.split("\n", 3)[0]
    assert "\nFALSTAFF.\n" in train and "\nOTHELLO.\n" in train and "HAMLET" in train


def test_unknown_text_name():
    with pytest.raises(ValueError, match="tiny-heldout"):
        load_text("nope")
    assert set(text_names()) == {"tiny-train", "tiny-heldout", "web"}


def test_default_text_for():
    assert default_text_for("tiny") == "tiny-heldout"
    assert default_text_for("default") == "web" and default_text_for("gpt2") == "web"


def test_token_ids_and_calibration_batches(tiny_loaded):
    tok = tiny_loaded.tokenizer
    ids = token_ids(tok, "ROMEO.\nBut soft, what light through yonder window breaks?")
    assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() > 5
    text = load_text("tiny-heldout")
    a = calibration_batches(tok, text, n_samples=4, seq_len=32, seed=1)
    b = calibration_batches(tok, text, n_samples=4, seq_len=32, seed=1)
    c = calibration_batches(tok, text, n_samples=4, seq_len=32, seed=2)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_from_short_text_repeats(tiny_loaded):
    batch = calibration_batches(tiny_loaded.tokenizer, "Hail!", n_samples=2, seq_len=16)
    assert batch.shape == (2, 16)
    with pytest.raises(ValueError):
        calibration_batches(tiny_loaded.tokenizer, "", n_samples=2, seq_len=16)


def test_token_ids_are_computed_once_and_handed_out_as_copies():
    from lmcompress_core.models.loading import load_model

    tokenizer = load_model("tiny").tokenizer
    text = load_text("tiny-heldout")[:5000]
    first = token_ids(tokenizer, text)
    first[:] = -1   # a caller changing its copy changes nothing for the next one
    again = token_ids(tokenizer, text)
    assert torch.equal(again, torch.tensor(tokenizer(text, add_special_tokens=False).input_ids))
