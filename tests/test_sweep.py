"""sweep.py: the grid, the Pareto frontier, and a sweep run (fake evaluator, then the real tiny model)."""
import json
from types import SimpleNamespace

import pytest

from lmcompress_core import sweep
from lmcompress_core.compress import Cancelled, CompressionConfig
from test_plots import fake_report


def test_grid_is_every_combination_without_duplicates():
    configs = sweep.grid(bits=(2, 4, 16, 32), sparsities=(0.0, 0.5), methods=("rtn", "gptq"))
    keys = [c.key() for c in configs]
    assert len(keys) == len(set(keys))
    # 2 and 4 bits x 2 methods x 2 sparsities + (16-bit, float) x 2 sparsities (GPTQ folds into RTN there)
    assert len(configs) == 2 * 2 * 2 + 2 * 2
    floats = [c for c in configs if c.quantization is None]
    assert len(floats) == 2 and {c.pruning is None for c in floats} == {True, False}
    assert all(c.pruning is None or c.pruning.sparsity == 0.5 for c in configs)


def test_grid_rejects_bad_values_with_the_config_message():
    with pytest.raises(ValueError, match="sparsity"):
        sweep.grid(bits=(4,), sparsities=(1.0,))
    with pytest.raises(ValueError, match="bits"):
        sweep.grid(bits=(7,))


def test_pareto_mask_minimises_both_axes():
    assert sweep.pareto_mask([1, 2, 3, 2], [5, 4, 6, 4]) == [True, True, False, True]
    assert sweep.pareto_mask([], []) == []


def fake_evaluate(loaded, config, should_stop=None, **kwargs):
    bits = config.quantization.bits if config.quantization else 32
    sparsity = config.pruning.sparsity if config.pruning else 0.0
    report = fake_report(bits=bits, ppl=10 + 40 / bits + 10 * sparsity, packed=bits * 250_000 * (1 - sparsity))
    report["latency"]["decode_tokens_per_s"] = 100.0 + bits
    return report


def test_run_sweep_rows_progress_and_frontiers():
    seen = []
    table = sweep.run_sweep(SimpleNamespace(name="fake"), sweep.grid((2, 4, 8), (0.0, 0.5)), evaluate=fake_evaluate,
                            callback=seen.append, eval_tokens=64)
    assert len(table) == 6 and list(table.columns[:len(sweep.COLUMNS)]) == sweep.COLUMNS
    assert [p.step for p in seen] == [0, 1, 2, 3, 4, 5, 6] and seen[-1].total == 6
    assert table["pareto_size"].any() and table["pareto_latency"].any()
    best = table.sort_values("perplexity").iloc[0]
    assert best["bits"] == 8 and best["sparsity"] == 0.0 and best["pareto_size"]
    assert CompressionConfig.from_dict(json.loads(best["config"])).quantization.bits == 8
    assert "8-bit" in best["label"]


def test_run_sweep_stops_when_asked():
    calls = []
    with pytest.raises(Cancelled):
        sweep.run_sweep(SimpleNamespace(name="fake"), sweep.grid((2, 4, 8)), evaluate=fake_evaluate,
                        should_stop=lambda: len(calls) >= 1, callback=calls.append)


def test_real_sweep_on_the_tiny_model(tiny_loaded):
    from lmcompress_core.protocol import EvalProtocol

    table = sweep.run_sweep(tiny_loaded, sweep.grid((2, 8), (0.0,)),
                            protocol=EvalProtocol(eval_tokens=128, generation=False, latency_runs=1))
    by_bits = table.set_index("bits")
    assert by_bits.loc[2, "perplexity"] > by_bits.loc[8, "perplexity"]
    assert by_bits.loc[2, "size_mb"] < by_bits.loc[8, "size_mb"]
    assert table["pareto_size"].all()     # smaller but worse vs larger but better: both on the frontier
