"""html_report.py: one self-contained, escaped HTML document."""
import re

from lmcompress_core.report import html_report
from test_plots import fake_report


def test_report_is_self_contained_and_has_every_section():
    doc = html_report.build_report(fake_report(), trail=[fake_report(), fake_report(bits=2, ppl=30.0)])
    for heading in ("The chosen setting", "Compared with the original", "Charts", "Generations",
                    "Every configuration tried", "Settings", "Protocol", "Results", "Machine and library versions"):
        assert f"<h2>{heading}</h2>" in doc
    assert doc.count("Plotly.newPlot") == 4          # size, latency, perplexity, trail
    assert "<script src=" not in doc and "<link" not in doc   # plotly.js is inlined: works offline
    assert "transformers" in doc and "python" in doc


def test_text_from_people_and_models_is_escaped():
    report = fake_report(model="<b>evil</b>")
    report["generation"] = {"prompt": "<script>alert(1)</script>", "base": "**bold** <img src=x onerror=1>",
                            "compressed": "**bold** <i>", "first_divergence": 9}
    doc = html_report.build_report(report)
    assert "<script>alert(1)" not in doc and "&lt;script&gt;alert(1)&lt;/script&gt;" in doc
    assert "<img src=x" not in doc and "<b>evil</b>" not in doc
    assert "**bold** &lt;i<mark>mg src=x" in doc


def test_divergence_marks_from_first_differing_character():
    assert html_report.first_difference("abcd", "abXd") == 2
    assert html_report.first_difference("ab", "abc") == 2
    assert html_report.divergence_html("same", "same") == "same"
    assert html_report.divergence_html("a<b", "a<c") == "a&lt;<mark>b</mark>"


def test_empty_session_still_builds():
    doc = html_report.build_report(None)
    assert "No run yet" in doc and "</html>" in doc


def test_machine_info_lists_libraries():
    info = html_report.machine_info()
    assert info["plotly"] != "not installed" and info["cpu_count"]


def test_token_level_divergence_is_marked_and_escaped():
    gen = {"prompt": "p", "base": "a<b>c", "compressed": "a<b>d", "first_divergence": 2,
           "base_tokens": ["a", "<b>", "c"], "compressed_tokens": ["a", "<b>", "d"]}
    base, comp = html_report.generation_pair_html(gen)
    assert base == "a&lt;b&gt;<mark>c</mark>" and comp == "a&lt;b&gt;<mark>d</mark>"
    same = dict(gen, first_divergence=None, compressed_tokens=["a", "<b>", "c"])
    assert "<mark>" not in html_report.generation_pair_html(same)[1]


def test_distillation_curve_is_included_when_recorded():
    report = fake_report()
    report["history"] = [{"step": 0, "loss": 2.0}, {"step": 1, "loss": 1.0, "ppl": 9.0}]
    doc = html_report.build_report(report)
    assert "Distillation curve" in doc and doc.count("Plotly.newPlot") == 4


def test_the_reader_gets_the_setting_and_the_comparison_first_and_the_internals_folded():
    doc = html_report.build_report(fake_report())
    order = [doc.index(h) for h in ("4-bit, groups of 128, round-to-nearest", "Compared with the original",
                                    "<h2>Charts</h2>", "<details>", "<h2>Settings</h2>", "</details>")]
    assert order == sorted(order)
    assert "2 MB, 25% of the original&#x27;s 8 MB" in doc and "Perplexity 12.00 against 10.00" in doc


def test_summary_says_how_each_comparison_was_measured():
    report = fake_report()
    report["base_latency"] = {"decode_tokens_per_s": 150.0, "prefill_ms": 3.05}
    report["speed"] = {"decode_text": "×2.00", "decode_ratio": 2.0, "prefill_ratio": 0.61}
    rows = {what: (value, how) for what, value, how in html_report.summary_rows(report)}
    assert rows["Size"][0].startswith("2 MB, 25% of the original") and "simulated" in rows["Size"][1]
    speed, how = rows["Speed"]
    assert "300 tokens per second" in speed and "(150 tokens per second, 3.05 ms)" in speed
    assert "generating is 2× faster and reading the prompt 1.6× slower" in speed   # prefill too, in words
    assert "alternately" in how and "5 timed runs" in how
    del report["speed"], report["base_latency"]
    report["latency"]["source"] = "greedy generation"           # exploring: no ratio, and the sentence says so
    speed, how = {w: (v, h) for w, v, h in html_report.summary_rows(report)}["Speed"]
    assert "faster" not in speed and "slower" not in speed and "no ratio" in how and "alternately" not in how
    assert "same 512 tokens of 'tiny-heldout'" in rows["Quality"][1] and "90%" in rows["Quality"][0]


def test_the_sessions_sweep_sensitivity_and_distillation_are_included_and_offline():
    import pandas as pd

    from lmcompress_core import sweep
    from test_sweep import fake_evaluate
    from types import SimpleNamespace

    table = sweep.run_sweep(SimpleNamespace(name="fake"), sweep.grid((2, 8), (0.0,)), evaluate=fake_evaluate)
    frame = pd.DataFrame({"layer": ["l0", "l0"], "bits": [2, 4], "rel_mse": [0.1, 0.01], "sqnr_db": [10.0, 20.0]})
    kd = {**fake_report(), "before": fake_report(ppl=14.0), "history": [{"step": 0, "loss": 2.0}],
          "config": {"distillation": {"mode": "recovery", "temperature": 2.0, "steps": 1}}}
    doc = html_report.build_report(fake_report(), sweep={"model": "fake", "table": table},
                                   sensitivity={"model": "tiny", "frame": frame}, distillation=kd)
    assert "<h2>Trade-offs: 2 configurations on fake</h2>" in doc and "original (uncompressed)" in doc
    assert "Per-layer sensitivity on tiny" in doc and "<h2>Distillation: distillation (recovery" in doc
    assert doc.count("Plotly.newPlot") == 3 + 2 + 1 + 2     # current, sweep, sensitivity, distillation
    assert len(re.findall(r"plotly\.js v\d", doc)) == 1 and "<script src=" not in doc   # inlined once: offline
