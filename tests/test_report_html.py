"""report_html.py: one self-contained, escaped HTML document."""
from lmcompress_core import report_html
from test_plots import fake_report


def test_report_is_self_contained_and_has_every_section():
    doc = report_html.build_report(fake_report(), trail=[fake_report(), fake_report(bits=2, ppl=30.0)])
    for heading in ("Settings", "Results", "Charts", "Generations", "Every configuration tried",
                    "Machine and library versions"):
        assert f"<h2>{heading}</h2>" in doc
    assert doc.count("Plotly.newPlot") == 4          # size, latency, perplexity, trail
    assert "<script src=" not in doc and "<link" not in doc   # plotly.js is inlined: works offline
    assert "transformers" in doc and "python" in doc


def test_text_from_people_and_models_is_escaped():
    report = fake_report(model="<b>evil</b>")
    report["generation"] = {"prompt": "<script>alert(1)</script>", "base": "**bold** <img src=x onerror=1>",
                            "compressed": "**bold** <i>", "first_divergence": 9}
    doc = report_html.build_report(report)
    assert "<script>alert(1)" not in doc and "&lt;script&gt;alert(1)&lt;/script&gt;" in doc
    assert "<img src=x" not in doc and "<b>evil</b>" not in doc
    assert "**bold** &lt;i<mark>mg src=x" in doc


def test_divergence_marks_from_first_differing_character():
    assert report_html.first_difference("abcd", "abXd") == 2
    assert report_html.first_difference("ab", "abc") == 2
    assert report_html.divergence_html("same", "same") == "same"
    assert report_html.divergence_html("a<b", "a<c") == "a&lt;<mark>b</mark>"


def test_empty_session_still_builds():
    doc = report_html.build_report(None)
    assert "No run yet" in doc and "</html>" in doc


def test_machine_info_lists_libraries():
    info = report_html.machine_info()
    assert info["plotly"] != "not installed" and info["cpu_count"]


def test_token_level_divergence_is_marked_and_escaped():
    gen = {"prompt": "p", "base": "a<b>c", "compressed": "a<b>d", "first_divergence": 2,
           "base_tokens": ["a", "<b>", "c"], "compressed_tokens": ["a", "<b>", "d"]}
    base, comp = report_html.generation_pair_html(gen)
    assert base == "a&lt;b&gt;<mark>c</mark>" and comp == "a&lt;b&gt;<mark>d</mark>"
    same = dict(gen, first_divergence=None, compressed_tokens=["a", "<b>", "c"])
    assert "<mark>" not in report_html.generation_pair_html(same)[1]


def test_distillation_curve_is_included_when_recorded():
    report = fake_report()
    report["history"] = [{"step": 0, "loss": 2.0}, {"step": 1, "loss": 1.0, "ppl": 9.0}]
    doc = report_html.build_report(report)
    assert "Distillation curve" in doc and doc.count("Plotly.newPlot") == 4
