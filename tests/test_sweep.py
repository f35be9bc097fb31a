"""sweep.py: the grid, the Pareto frontier, a sweep run (fake evaluator, then the real tiny model), failures,
results written as JSON lines and resumed, and the `sweep` command line. Ray runs are in test_execute.py."""
import json
from types import SimpleNamespace

import pytest

from lmcompress_core import sweep
from lmcompress_core.cli import main
from lmcompress_core.compress import Cancelled, CompressionConfig
from lmcompress_core.measure.protocol import EvalProtocol
from lmcompress_core.methods.quantize import QuantizationConfig
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
                            callback=seen.append, protocol=EvalProtocol(eval_tokens=64))
    assert len(table) == 6 and list(table.columns[:len(sweep.COLUMNS)]) == sweep.COLUMNS
    assert [p.step for p in seen] == [0, 1, 2, 3, 4, 5, 6] and seen[-1].total == 6
    # fake_report runs every configuration simulated (one kernel): a latency frontier would be noise
    assert table["pareto_size"].any() and not table["pareto_latency"].any()
    best = table.sort_values("perplexity").iloc[0]
    assert best["bits"] == 8 and best["sparsity_pct"] == 0.0 and best["pareto_size"]
    assert CompressionConfig.from_dict(json.loads(best["config"])).quantization.bits == 8
    assert "8-bit" in best["label"]


def test_run_sweep_stops_when_asked():
    calls = []
    with pytest.raises(Cancelled):
        sweep.run_sweep(SimpleNamespace(name="fake"), sweep.grid((2, 4, 8)), evaluate=fake_evaluate,
                        should_stop=lambda: len(calls) >= 1, callback=calls.append)


def test_real_sweep_on_the_tiny_model(tiny_loaded):
    # one scale per matrix: on the small tiny model group-wise 2-bit codes cost little (see test_pages)
    table = sweep.run_sweep(tiny_loaded, sweep.grid((2, 8), (0.0,), quantization=QuantizationConfig(granularity="tensor")),
                            protocol=EvalProtocol(eval_tokens=128, generation=False, latency_runs=1))
    by_bits = table.set_index("bits")
    assert by_bits.loc[2, "perplexity"] > by_bits.loc[8, "perplexity"]
    assert by_bits.loc[2, "size_mb"] < by_bits.loc[8, "size_mb"]
    assert table["pareto_size"].all()     # smaller but worse vs larger but better: both on the frontier


def test_failed_configuration_is_retried_once_then_left_out_and_listed():
    calls = []

    def broken_at_4_bits(loaded, config, should_stop=None, **kwargs):
        calls.append(config.quantization.bits)
        if config.quantization.bits == 4:
            raise RuntimeError("out of memory")
        return fake_evaluate(loaded, config, **kwargs)

    seen = []
    table = sweep.run_sweep(SimpleNamespace(name="fake"), sweep.grid((2, 4, 8), (0.0,)), evaluate=broken_at_4_bits,
                            callback=seen.append)
    assert calls == [2, 4, 4, 8] and sorted(table["bits"]) == [2, 8]
    assert table.attrs["failures"] == [{"label": "4-bit g128 asym RTN", "error": "RuntimeError: out of memory"}]
    assert any("retrying once" in p.message for p in seen) and seen[-1].step == 3


def counting(calls):
    from lmcompress_core.measure.evaluation import evaluate

    def evaluate_and_count(loaded, config, **kwargs):
        report = evaluate(loaded, config, **kwargs)
        calls.append(config.key())   # counted once finished, so should_stop sees finished configurations
        return report
    return evaluate_and_count


def test_resume_continues_an_interrupted_sweep_without_recomputing(tiny_loaded, tmp_path):
    out, configs, calls = tmp_path / "results.jsonl", sweep.grid((2, 3, 4), (0.0,)), []
    protocol = {"protocol": EvalProtocol(eval_tokens=128, latency=False, generation=False)}
    with pytest.raises(Cancelled):
        sweep.run_sweep(tiny_loaded, configs, evaluate=counting(calls), out=out, should_stop=lambda: len(calls) >= 1,
                        **protocol)
    assert len(calls) == 1 and len(out.read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="already holds results"):
        sweep.run_sweep(tiny_loaded, configs, evaluate=counting(calls), out=out, **protocol)
    seen = []
    table = sweep.run_sweep(tiny_loaded, configs, evaluate=counting(calls), out=out, resume=True,
                            callback=seen.append, **protocol)
    assert len(calls) == 3 and len(set(calls)) == 3          # each configuration evaluated exactly once
    assert list(table["bits"]) == [2, 3, 4] and table["perplexity"].notna().all()
    assert "(1 already done)" in seen[0].message and seen[0].step == 1
    other_protocol = sweep.run_sweep(tiny_loaded, configs[:1], evaluate=counting(calls), out=out, resume=True,
                                     protocol=EvalProtocol(eval_tokens=64, latency=False, generation=False))
    assert len(calls) == 4 and len(other_protocol) == 1      # another protocol is not "finished"


def test_cli_sweep_resume_and_one_line_errors(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    argv = ["sweep", "--model", "tiny", "--sparsity", "0", "--method", "rtn", "--eval-tokens", "128", "--no-latency",
            "--out", str(out)]
    assert main(argv + ["--bits", "2,3"]) == 0, capsys.readouterr().err
    assert "2 configurations on serial" in capsys.readouterr().out
    assert main(argv + ["--bits", "2,3,4"]) == 2
    assert "already holds results" in capsys.readouterr().err
    assert main(argv + ["--bits", "2,3,4", "--resume", "--json"]) == 0
    captured = capsys.readouterr()
    assert [row["bits"] for row in json.loads(captured.out)["rows"]] == [2, 3, 4]
    assert len(out.read_text().splitlines()) == 3            # only the 4-bit configuration was added
    assert "(2 already done)" in captured.err


@pytest.mark.parametrize("extra,message", [
    (["--bits", "2,x"], "not a comma-separated list of int"),
    (["--backend", "dask"], "invalid choice"),
    (["--num-cpus", "2"], "apply to the ray backend"),
    (["--sparsity", "1.0"], "sparsity"),
])
def test_cli_sweep_errors_are_one_line_exit_2(extra, message, tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path / "r.jsonl")] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def timed_like(kernel: str, ranges: dict):
    """fake_evaluate with base figures and a decode speed range (original time ÷ its time) per bit-width."""
    def evaluate(loaded, config, should_stop=None, **kwargs):
        report = fake_evaluate(loaded, config)
        bits = config.quantization.bits if config.quantization else 32
        low, high = ranges[bits]
        text = "≈ 1× (within the noise of the runs)" if low <= 1.0 <= high else f"×{(low + high) / 2:.2f}"
        report.update(speed={"decode_text": text, "decode_range": [low, high]},
                      base_latency={"decode_tokens_per_s": 100.0})
        report["latency"]["kernel"] = kernel.format(bits=bits)
        return report
    return evaluate


def test_the_original_is_a_row_with_its_own_figures_and_joins_the_frontier():
    table = sweep.run_sweep(SimpleNamespace(name="fake"), sweep.grid((2, 8), (0.0, 0.5)),
                            evaluate=timed_like("k{bits}", {2: (1.5, 1.8), 8: (0.9, 1.1)}))
    full = sweep.with_original(table)
    original = full.iloc[0]
    assert original["is_original"] and original["short_label"] == "original" and len(full) == len(table) + 1
    assert original["perplexity"] == 10.0 and original["size_mb"] == pytest.approx(8.0)   # fake_report's base
    assert original["decode_tokens_per_s"] == 100.0 and original["kl_to_base"] == 0.0
    assert original["pareto_size"]          # nothing is better than 10.0: the original is on the frontier
    assert sweep.with_original(full).equals(full)        # added once
    assert list(full["short_label"][1:]) == ["2-bit", "2-bit, 50% pruned", "8-bit", "8-bit, 50% pruned"]


def test_no_latency_frontier_from_one_kernel_or_from_noise():
    same = sweep.with_original(sweep.run_sweep(
        SimpleNamespace(name="fake"), sweep.grid((2, 8), (0.0,)),
        evaluate=timed_like("fp32 dense — quantization simulated", {2: (1.5, 1.8), 8: (0.5, 0.6)})))
    assert "same kernel (fp32 dense)" in sweep.latency_frontier_note(same) and not same["pareto_latency"].any()
    noisy = sweep.with_original(sweep.run_sweep(
        SimpleNamespace(name="fake"), sweep.grid((2, 8), (0.0,)),
        evaluate=timed_like("k{bits}", {2: (0.8, 1.3), 8: (0.9, 1.2)})))
    assert "beyond the spread" in sweep.latency_frontier_note(noisy) and not noisy["pareto_latency"].any()
    real = sweep.with_original(sweep.run_sweep(
        SimpleNamespace(name="fake"), sweep.grid((2, 8), (0.0,)),
        evaluate=timed_like("k{bits}", {2: (1.5, 1.8), 8: (0.9, 1.2)})))
    assert sweep.latency_frontier_note(real) == "" and real["pareto_latency"].any()


def test_readable_table_says_percent_with_units_as_the_page_does():
    table = sweep.with_original(sweep.run_sweep(SimpleNamespace(name="fake"), sweep.grid((4,), (0.5,)),
                                                evaluate=timed_like("k", {4: (1.0, 1.2)})))
    shown = sweep.readable_table(table)
    row = shown.iloc[1]
    assert row["sparsity (%)"] == 50.0 and row["same top-1 token as original (%)"] == pytest.approx(90.0)
    assert row["quantizer"] == "RTN" and shown.iloc[0]["setting"] == sweep.ORIGINAL_LABEL
    csv = shown.to_csv(index=False)
    assert csv.splitlines()[0].startswith("setting,bits,sparsity (%),quantizer,size (MB)")
    assert '"sparsity": 0.5' in shown.iloc[1]["config (JSON, sparsity as a fraction 0-1)"]


def test_each_finished_row_reaches_the_callback_for_partial_results():
    seen = []
    table = sweep.run_sweep(SimpleNamespace(name="fake"), sweep.grid((2, 4), (0.0,)), evaluate=fake_evaluate,
                            callback=seen.append)
    rows = [p.metrics["row"] for p in seen if p.metrics.get("row")]
    assert [r["bits"] for r in rows] == [2, 4] and rows[0]["perplexity"] == table.iloc[0]["perplexity"]
