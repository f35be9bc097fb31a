"""The tiny model's training recipe, checked at toy scale (the real run takes ~20 min and is not repeated)."""
import math

import torch

from lmcompress_core.train_tiny import (TinyConfig, build_model, heldout_perplexity, lr_at, train,
                                        train_tokenizer)

TEXT = ("ROMEO.\nBut soft, what light through yonder window breaks?\n\n"
        "JULIET.\nO Romeo, Romeo, wherefore art thou Romeo?\n\n") * 40


def test_learning_rate_schedule():
    cfg = TinyConfig(steps=1000, warmup=100, lr=1e-3)
    assert lr_at(0, cfg) == 1e-5 and math.isclose(lr_at(99, cfg), 1e-3)
    assert math.isclose(lr_at(999, cfg), 1e-4, rel_tol=1e-3)  # decays to 10% of the peak
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(100, 999))


def test_tokenizer_round_trips_and_learns_names():
    tok = train_tokenizer(TEXT, vocab_size=300)
    text = "ROMEO.\nWherefore art thou?"
    assert tok.decode(tok(text).input_ids) == text
    assert len(tok("ROMEO").input_ids) == 1  # frequent name merged into one token


def test_toy_training_reduces_perplexity():
    cfg = TinyConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, seq_len=32,
                     batch_size=4, steps=30, warmup=5, lr=1e-2)
    tok = train_tokenizer(TEXT, vocab_size=300)
    ids = torch.tensor(tok(TEXT).input_ids)
    model = build_model(cfg, len(tok))
    before = heldout_perplexity(model, ids, context=32, stride=32, max_tokens=256)
    train(cfg, ids, model, log=lambda *a, **k: None)
    after = heldout_perplexity(model, ids, context=32, stride=32, max_tokens=256)
    assert after < before / 3
