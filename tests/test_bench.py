"""The bench harness without running a benchmark: targets, report writing, the committed results' schema."""
import json
from pathlib import Path

import pytest

from bench import loadtest, report, targets

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results.json"


def _results(**headline):
    return {"headline": headline, "sections": {}, "machine": {"cpu": "test"}, "versions": {}, "scale": {}}


def test_targets_met_missed_and_unmeasured():
    rows = {r["key"]: r for r in targets.check(_results(int8_speedup_decode=3.5, eval_fraction_of_matmul_peak=0.2))}
    assert rows["int8_speedup_decode"]["met"] is True
    assert rows["eval_fraction_of_matmul_peak"]["met"] is False
    assert "Missed: 0.20 against 0.5: 60% short" in rows["eval_fraction_of_matmul_peak"]["note"]
    assert rows["interactive_s_tiny"]["met"] is None


@pytest.mark.parametrize("key,value,met", [("ppl_ratio_rtn4_g64_vs_torchao", 1.009, True),
                                           ("ppl_ratio_rtn4_g64_vs_torchao", 1.02, False),
                                           ("ppl_gptq3_over_rtn3", 1.0, False),
                                           ("ppl_wanda50_over_magnitude50", 1.0, True),
                                           ("interactive_s_default", 8.5, False)])
def test_target_thresholds(key, value, met):
    row = next(r for r in targets.check(_results(**{key: value})) if r["key"] == key)
    assert row["met"] is met


def test_markdown_renders_a_partial_run(tmp_path):
    results = _results()
    results["sections"] = {"speed": {"error": "RuntimeError: boom"},
                           "distillation": {"headline": {"kd_recovery_by_temperature": {"1": 30.0, "2": 29.0}},
                                            "rows": [{"temperature": 1, "perplexity": 30.0}], "steps": 5}}
    report.finish(results, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "This section failed: `RuntimeError: boom`" in text
    assert "T=1: 30.00, T=2: 29.00" in text
    assert json.loads((tmp_path / "results.json").read_text())["headline"]["kd_recovery_by_temperature"]["2"] == 29.0


def test_loadtest_moves_stay_in_range():
    session = loadtest.Session(0, loadtest.plan(0, 40))
    for label in session.moves:
        loadtest._apply(session, label, loadtest._step(session, label, bits_count=7))
        session.requests += 1
        assert 0 <= session.bits_index <= 5 and 0 <= session.sparsity <= 30
    assert loadtest._numbers(["12.5 MB<br>48%", "3 run(s)"]) == [12.5, 48.0, 3.0]


@pytest.mark.skipif(not RESULTS.exists(), reason="bench/results.json is written by `make bench`")
def test_committed_results_have_every_issue_key():
    results = json.loads(RESULTS.read_text())
    assert set(report.HEADLINE_KEYS) <= set(results["headline"])
    assert results["machine"]["cpu"] and results["versions"]["torch"]
    assert set(results["headline"]["kd_recovery_by_temperature"]) == {"1", "2", "4", "8"}
    assert all(t["met"] in (True, False) for t in results["targets"]), "every target measured"
