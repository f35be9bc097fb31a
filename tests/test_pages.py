"""One AppTest per page on the tiny model, plus the UI robustness cases of issue 7.

Numbers are read back from the plotly figure JSON the page sends, so "moving a slider changes the
plotted data in the right direction" is checked on what a person would see.
"""
import json
import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app.py")
MODEL = os.environ.get("LMCOMPRESS_APP_TEST_MODEL", "tiny")
TIMEOUT = 180


def app(model: str = MODEL, **state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["model"] = model
    at.session_state["settings"] = {"eval_tokens": 128, "new_tokens": 8, "latency_runs": 1, **state}
    return at


def figures(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def figure_titled(at: AppTest, prefix: str) -> dict:
    for fig in figures(at):
        title = fig["layout"].get("title", {}).get("text", "")
        if title.startswith(prefix):
            return fig
    raise AssertionError(f"no figure titled {prefix!r} in {[f['layout'].get('title') for f in figures(at)]}")


def choose_model(at: AppTest, name: str) -> None:
    """Pick a sidebar option by its name (the options shown carry ' · params · needs download' suffixes)."""
    box = at.selectbox(key="model_choice")
    box.select_index(next(i for i, label in enumerate(box.options) if label.split(" · ")[0] == name)).run()


def no_exceptions(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def html_text(at: AppTest) -> str:
    return "\n".join(h.proto.body for h in at.get("html"))


@pytest.fixture(scope="module")
def explore():
    # Per-tensor min-max: on the small tiny model, group-wise 2-bit codes cost little, so the effect of
    # the bit-width is clearest with one scale per matrix.
    at = app(granularity="tensor").run()
    no_exceptions(at)
    return at


# ---------------------------------------------------------------- Explore

def test_explore_shows_size_latency_perplexity_trail_and_generations(explore):
    titles = [f["layout"]["title"]["text"] for f in figures(explore)]
    assert titles[0] == "Model size" and titles[1].startswith("Latency<br>") and titles[2].startswith("Perplexity")
    assert titles[3].startswith("Trail")
    assert "Original" in [m.value.strip("*") for m in explore.markdown]
    assert any("how" in c.value or "median" in c.value.lower() for c in explore.caption)


def test_bit_width_slider_moves_perplexity_and_size_the_right_way(explore):
    explore.select_slider(key="bits").set_value(8).run()
    no_exceptions(explore)
    ppl8 = figure_titled(explore, "Perplexity")["data"][0]["y"][1]
    packed8 = figure_titled(explore, "Model size")["data"][0]["y"][2]
    explore.select_slider(key="bits").set_value(2).run()
    no_exceptions(explore)
    ppl2 = figure_titled(explore, "Perplexity")["data"][0]["y"][1]
    packed2 = figure_titled(explore, "Model size")["data"][0]["y"][2]
    assert ppl2 > ppl8 * 1.05, (ppl2, ppl8)
    assert packed2 < packed8
    kl = [float(r["kl_to_base"]) for r in explore.session_state["trail"][-2:]]
    assert kl[1] > 10 * kl[0]
    trail = figure_titled(explore, "Trail")
    runs = [t for t in trail["data"] if t["name"] == "runs"][0]
    assert len(runs["y"]) >= 3 and runs["y"][-1] == pytest.approx(ppl2)


def test_sparsity_slider_raises_perplexity(explore):
    explore.select_slider(key="bits").set_value(8).run()
    base = figure_titled(explore, "Perplexity")["data"][0]["y"][1]
    explore.slider(key="sparsity").set_value(80).run()
    no_exceptions(explore)
    assert figure_titled(explore, "Perplexity")["data"][0]["y"][1] > base
    explore.slider(key="sparsity").set_value(0).run()


def test_html_and_markdown_in_the_prompt_are_shown_as_text(explore):
    explore.text_area(key="prompt").input("<script>alert('x')</script> **bold** [link](http://e.x)").run()
    no_exceptions(explore)
    body = html_text(explore)
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; **bold** [link](http://e.x)" in body
    assert "<script>" not in body


def test_empty_prompt_warns_and_still_measures(explore):
    explore.text_area(key="prompt").input("   ").run()
    no_exceptions(explore)
    assert any("prompt is empty" in w.value for w in explore.warning)
    assert figure_titled(explore, "Perplexity")


def test_very_long_prompt_is_truncated_with_a_notice(explore):
    explore.text_area(key="prompt").input("All the world's a stage. " * 120).run()
    no_exceptions(explore)
    assert any("truncated" in i.value for i in explore.info)
    explore.text_area(key="prompt").input("ROMEO:").run()


def test_stop_keeps_the_previous_results(explore, monkeypatch):
    from lmcompress_core import Cancelled

    before = list(explore.session_state["trail"])

    def cancelled(*args, **kwargs):
        raise Cancelled("stopped")

    monkeypatch.setattr("lmcompress_core.measure.evaluation.evaluate", cancelled)
    explore.select_slider(key="bits").set_value(5).run()
    no_exceptions(explore)
    assert any("Stopped" in i.value for i in explore.info)
    assert explore.session_state["trail"] == before     # nothing half-written
    assert figure_titled(explore, "Perplexity")        # the previous report is still drawn


def test_invalid_model_id_gives_a_clear_message_and_the_app_stays_usable():
    at = app(model="no-such-org/../model").run()
    no_exceptions(at)
    assert at.error and "no-such-org/../model" in at.error[0].value.replace("\\", "")
    choose_model(at, MODEL)
    no_exceptions(at)
    assert not at.error and figure_titled(at, "Perplexity")


def test_two_sessions_share_the_model_but_not_results():
    from pages import common

    one = app().run()
    model = common._load(MODEL).model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    one.select_slider(key="bits").set_value(2).run()
    two = app().run()
    no_exceptions(one)
    no_exceptions(two)
    assert common._load(MODEL).model is model                       # loaded once per process
    assert all((model.state_dict()[k] == v).all() for k, v in weights.items())   # never mutated
    assert len(one.session_state["trail"]) == 2 and len(two.session_state["trail"]) == 1
    assert two.session_state["current"]["config"]["quantization"]["bits"] == 4


def test_a_loaded_model_is_out_of_the_collectors_scans():
    """Streamlit collects every generation after each script run; the libraries and the cached model are moved
    to the permanent generation when a model loads, so those scans skip them (and nothing is lost: an object
    that dies is still freed by reference counting)."""
    import gc
    import weakref

    from pages import common
    from lmcompress_core.models.loading import tiny_random_model

    try:
        model = tiny_random_model("llama").model
        assert any(o is model for o in gc.get_objects())
        common._out_of_the_collectors_way()
        assert gc.get_freeze_count() > 0 and not any(o is model for o in gc.get_objects())
        gone = weakref.ref(model)
        del model
        assert gone() is None                                # frozen, still freed when nothing holds it
    finally:
        gc.unfreeze()


def test_a_new_script_run_waits_for_its_sessions_abandoned_work_to_let_go():
    """The handoff at the top of each script run: it returns only once the running work (holding the session's
    work lock) has stopped; work that never lets go is waited for no longer than the timeout, and a run that
    could not take the lock does not release the holder's."""
    import threading
    import time

    from pages import common

    lock, events, started = threading.Lock(), [], threading.Event()

    def work():
        with common.session_work(lock):
            started.set()
            time.sleep(0.2)
            events.append("old work stopped")

    worker = threading.Thread(target=work)
    worker.start()
    started.wait()
    assert common.let_abandoned_work_stop(lock, timeout=60)
    events.append("new run goes on")
    worker.join()
    assert events == ["old work stopped", "new run goes on"] and not lock.locked()

    lock.acquire()                                       # work that never stops
    assert not common.let_abandoned_work_stop(lock, timeout=0.01)
    with common.session_work(lock, timeout=0.01):
        pass
    assert lock.locked()                                 # still the stuck run's
    lock.release()


def test_uploaded_archive_with_a_path_escape_is_rejected(tmp_path):
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("../escape.txt", "outside")
    at = app().run()
    choose_model(at, "Upload an archive…")
    at.sidebar.get("file_uploader")[0].set_value(("model.zip", buffer.getvalue(), "application/zip")).run()
    no_exceptions(at)
    assert any("archive was rejected" in e.value for e in at.sidebar.error)
    assert not at.main.error and any("Choose a model" in i.value for i in at.info)   # no stale error, no stale model
    choose_model(at, MODEL)
    assert figure_titled(at, "Perplexity")      # nothing was lost: the earlier results come back


def test_custom_model_choices_start_empty_and_explain_a_file_path(tmp_path):
    at = app().run()
    choose_model(at, "Hugging Face id…")
    no_exceptions(at)
    assert at.sidebar.text_input(key="hub_id").value == ""      # never pre-filled with the listed model's name
    assert not at.get("plotly_chart") and any("Choose a model" in i.value for i in at.info)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a folder")
    choose_model(at, "Local folder…")
    at.sidebar.text_input(key="local_folder").input(str(weights)).run()
    no_exceptions(at)
    assert any("is a file; choose the folder" in e.value for e in at.main.error)


def test_streamlit_config_is_hardened_for_a_shared_server():
    import tomllib

    config = tomllib.loads((Path(APP).parent / ".streamlit" / "config.toml").read_text())
    assert config["client"]["showErrorDetails"] == "type"
    assert config["client"]["toolbarMode"] == "viewer"
    assert 0 < config["server"]["maxUploadSize"] <= 1000
    assert config["server"]["enableXsrfProtection"] is True
    assert config["browser"]["gatherUsageStats"] is False


# ---------------------------------------------------------------- other pages

def test_tradeoffs_sweep_table_pareto_and_sensitivity():
    at = app().run()
    at.switch_page("pages/tradeoffs.py").run()
    no_exceptions(at)
    at.multiselect[0].set_value([2, 8])
    at.multiselect[1].set_value([0])
    at.button[0].click().run()    # the form's submit button
    no_exceptions(at)
    table = at.dataframe[0].value
    assert sorted(table["bits"]) == [2, 8, 32] and table.iloc[0]["setting"] == "original (uncompressed)"
    assert table.set_index("bits").loc[2, "perplexity"] > table.set_index("bits").loc[8, "perplexity"]
    assert "sparsity (%)" in table and "same top-1 token as original (%)" in table
    size_chart = figure_titled(at, "Size vs perplexity")
    labels = [text for trace in size_chart["data"] for text in trace.get("text") or []]
    assert sorted(labels) == ["2-bit", "8-bit", "original"]       # printed beside the points, not only on hover
    assert figure_titled(at, "Latency vs perplexity")
    assert at.get("download_button")
    [b for b in at.button if b.label == "Compute sensitivity"][0].click().run()
    no_exceptions(at)
    heat = figure_titled(at, "Per-layer sensitivity")
    assert heat["data"][0]["type"] == "heatmap" and len(heat["data"][0]["x"]) == 4


def stop_on_call(monkeypatch, n: int) -> None:
    """Streamlit's own stop (StopException, as its Stop button raises it) at the n-th evaluation."""
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    from lmcompress_core.measure import evaluation

    real, calls = evaluation.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise StopException()
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluation, "evaluate", evaluate)


def run_sweep_form(at: AppTest, bits: list[int]) -> None:
    at.multiselect[0].set_value(bits)
    at.multiselect[1].set_value([0])
    at.select_slider[0].set_value(128)
    at.button[0].click().run()


def test_a_sweep_stopped_mid_way_keeps_the_previous_table_and_its_finished_rows(monkeypatch):
    at = app().run()
    at.switch_page("pages/tradeoffs.py").run()
    run_sweep_form(at, [8])
    assert len(at.dataframe[0].value) == 2                     # the original and 8-bit
    stop_on_call(monkeypatch, 2)
    run_sweep_form(at, [2, 3, 4])                              # stopped while evaluating 3-bit
    no_exceptions(at)
    at.run()                                                   # whatever the person does next reruns the page
    no_exceptions(at)
    assert any("Sweep stopped after 1 of 3 configurations" in i.value and "previous complete table is unchanged"
               in i.value for i in at.info), [i.value for i in at.info]
    complete, partial = at.dataframe[0].value, at.dataframe[1].value
    assert list(complete["bits"]) == [32, 8] and list(partial["bits"]) == [32, 2]
    assert any("Partial sweep (stopped): 1 of 3" in h.value for h in at.subheader)
    monkeypatch.undo()
    run_sweep_form(at, [2])                                    # a new sweep starts and replaces the table
    no_exceptions(at)
    assert list(at.dataframe[0].value["bits"]) == [32, 2] and not any("stopped" in i.value for i in at.info)


def test_distillation_stopped_says_nothing_was_kept(monkeypatch):
    at = app(steps=2).run()
    at.switch_page("pages/distillation.py").run()
    stop_on_call(monkeypatch, 1)
    [b for b in at.button if b.label == "Run distillation"][0].click().run()
    at.run()
    no_exceptions(at)
    assert any(i.value.startswith("Distillation stopped: nothing from that run was kept; there is no earlier result")
               for i in at.info), [i.value for i in at.info]


def test_distillation_temperature_flattens_and_kd_runs():
    at = app(steps=2).run()
    at.switch_page("pages/distillation.py").run()
    no_exceptions(at)
    measured = figure_titled(at, "Recovery distillation: recovered fraction vs temperature")["data"][0]
    assert list(measured["x"]) == [1.0, 2.0, 4.0, 8.0]   # the committed bench study, mean ± std per T
    at.slider(key="kd_temperature").set_value(8.0).run()
    chart = figure_titled(at, "Teacher's next-token")
    bars = chart["data"]
    assert bars[0]["x"] == bars[1]["x"] and bars[0]["x"][-1].startswith("other")   # same tokens, then the rest
    assert max(bars[1]["y"][:-1]) < max(bars[0]["y"][:-1])   # T = 8 is flatter than T = 1 on the top tokens ...
    assert bars[1]["y"][-1] > bars[0]["y"][-1]               # ... and moves probability to the other tokens
    low, _ = chart["layout"]["yaxis"]["range"]                # log axis below the smallest bar: all bars visible
    assert chart["layout"]["yaxis"]["type"] == "log" and 10 ** low < min(bars[0]["y"] + bars[1]["y"])
    assert any("entropy goes from" in c.value for c in at.caption)
    assert at.number_input(key="kd_steps").max == 100
    assert any("Estimated training time: about" in c.value and "measured on this model" in c.value
               for c in [*at.caption, *at.warning])
    at.number_input(key="kd_steps").set_value(2)
    [b for b in at.button if b.label == "Run distillation"][0].click().run()
    no_exceptions(at)
    curve = figure_titled(at, "Distillation: loss")
    assert [p for p in curve["data"][0]["x"]] == [0, 1, 2]
    assert "Original" in [m.value.strip("*") for m in at.markdown]


def test_explore_and_distillation_start_at_the_same_temperature():
    from lmcompress_core.methods.distill import DEFAULT_TEMPERATURE
    from pages.common import WIDGETS

    assert WIDGETS["temperature"] == DEFAULT_TEMPERATURE
    at = app().run()
    at.switch_page("pages/distillation.py").run()
    assert at.slider(key="kd_temperature").value == DEFAULT_TEMPERATURE


def test_learn_shows_levels_errors_masks_and_the_two_mistakes():
    at = app().run()
    at.switch_page("pages/learn.py").run()
    no_exceptions(at)
    hist = figure_titled(at, at.selectbox(key="learn_layer").value)
    assert len(hist["layout"]["shapes"]) == 8                       # 3 bits: 2**3 levels drawn
    at.select_slider(key="learn_bits").set_value(2).run()
    assert len(figure_titled(at, at.selectbox(key="learn_layer").value)["layout"]["shapes"]) == 4
    errors = figure_titled(at, "Quantization error")["data"][0]["y"]
    assert errors == sorted(errors, reverse=True)
    assert len(at.code) == 4 and len(at.latex) >= 3
    assert all(code.proto.wrap_lines for code in at.code)            # key comments never scroll out of sight
    assert any("weights changed: 0%" in m.value for m in at.markdown)
    assert any("per bit" in c.value and "Measured on this layer" in c.value for c in at.caption)


def test_report_page_exports_and_imports_the_runs_history():
    at = app().run()
    exported = {"format": "lmcompress-trail", "version": 1, "runs": list(at.session_state["trail"])}
    at.switch_page("pages/report.py").run()
    no_exceptions(at)
    labels = [b.proto.label for b in at.get("download_button")]
    assert any("HTML report" in label for label in labels) and any("JSON" in label for label in labels)

    fresh = app().run()         # "after a server restart": a new session
    fresh.switch_page("pages/report.py").run()
    fresh.file_uploader(key="history_upload").set_value(
        ("runs.json", json.dumps(exported).encode(), "application/json")).run()
    no_exceptions(fresh)
    assert len(fresh.session_state["trail"]) == 2


def test_report_leads_with_the_setting_and_includes_the_sessions_other_results():
    import pandas as pd

    at = app().run()
    at.switch_page("pages/report.py").run()
    no_exceptions(at)
    assert at.subheader[0].value.startswith("4-bit, groups of 128, round-to-nearest")
    leads = [m.value for m in at.markdown]
    assert "**Size**" in leads and "**Speed**" in leads and "**Quality**" in leads
    assert any("of the original" in m for m in leads)
    assert at.expander[0].label.startswith("Engine details")
    assert not [s for s in at.subheader if s.value.startswith(("Trade-offs", "Per-layer", "Distillation"))]
    frame = pd.DataFrame({"layer": ["l0", "l0"], "bits": [2, 4], "rel_mse": [0.1, 0.01], "sqnr_db": [10.0, 20.0]})
    at.session_state["sensitivity"] = {"model": MODEL, "frame": frame}
    at.session_state["kd_result"] = {**at.session_state["current"], "before": at.session_state["current"]}
    at.run()
    no_exceptions(at)
    headings = [s.value for s in at.subheader]
    assert f"Per-layer sensitivity on {MODEL}" in headings and any(h.startswith("Distillation: ") for h in headings)
    assert figure_titled(at, "Per-layer sensitivity") and figure_titled(at, "Perplexity: base, before and after")


def test_report_import_rejects_a_bad_file():
    at = app().run()
    at.switch_page("pages/report.py").run()
    at.file_uploader(key="history_upload").set_value(("x.json", b"{not json", "application/json")).run()
    no_exceptions(at)
    assert at.error and "cannot be imported" in at.error[0].value


def test_presentation_mode_has_large_results_and_no_controls():
    at = app().run()
    at.switch_page("pages/present.py").run()
    no_exceptions(at)
    assert [m.label for m in at.metric] == ["Packed size", "Perplexity", "Decode"]
    assert not at.slider and not at.select_slider and not at.selectbox and not at.button
    assert len(figures(at)) == 4


def test_model_card_text_and_messages_are_never_markup():
    def script():
        from types import SimpleNamespace

        from pages import common

        card = SimpleNamespace(name="<img src=x onerror=alert(1)>", source="local", license="**MIT**",
                               params=None, description="# Heading <script>x()</script>", notes="")
        common.model_card(card)
        common.error("Cannot load model", "[click](javascript:alert(1)) <b>bold</b>")

    at = AppTest.from_function(script, default_timeout=TIMEOUT)
    at.run()
    no_exceptions(at)
    body = html_text(at)
    assert "&lt;img src=x onerror=alert(1)&gt;" in body and "<img" not in body
    assert "# Heading &lt;script&gt;x()&lt;/script&gt;" in body and "license: **MIT**" in body
    assert at.error[0].value.endswith(r"\[click\]\(javascript\:alert\(1\)\) \<b\>bold\</b\>")


def test_settings_round_trip_through_the_url_and_bad_values_are_named():
    from pages.common import WIDGETS, settings_from_query, settings_to_query

    settings = {**WIDGETS, "bits": 3, "kd": True, "temperature": 1.5, "prompt": "Hello", "precise": True}
    query = settings_to_query(settings)
    assert query == {"bits": "3", "kd": "1", "temperature": "1.5", "prompt": "Hello", "precise": "1"}   # defaults out
    restored, ignored = settings_from_query({**query, "sparsity": "lots", "symmetric": "maybe", "other": "x"})
    assert restored == {"bits": 3, "kd": True, "temperature": 1.5, "prompt": "Hello", "precise": True}
    assert ignored == ["sparsity", "symmetric"]


def test_a_link_reproduces_a_configuration():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update({"model": MODEL, "bits": "8", "eval_tokens": "128", "new_tokens": "8",
                            "latency_runs": "1", "granularity": "tensor"})
    at.run()
    no_exceptions(at)
    assert at.select_slider(key="bits").value == 8
    assert at.subheader[0].value.startswith("8-bit")


def test_a_run_abandoned_while_generating_shows_only_the_previous_result(explore, monkeypatch):
    """Partial charts and streamed tokens go while the run is abandoned mid-generation: nothing of it is kept."""
    from lmcompress_core import Cancelled

    explore.select_slider(key="bits").set_value(8).run()
    before = list(explore.session_state["trail"])
    shown = figure_titled(explore, "Perplexity")["data"][0]["y"]

    def stops_after_one_token(*args, on_token=None, **kwargs):
        on_token("greedy", "half a sentence")
        raise Cancelled("a slider moved")

    monkeypatch.setattr("lmcompress_core.measure.evaluation.generate_side_by_side", stops_after_one_token)
    explore.select_slider(key="bits").set_value(6).run()
    no_exceptions(explore)
    assert any("Stopped" in i.value for i in explore.info)
    assert explore.session_state["trail"] == before
    assert figure_titled(explore, "Perplexity")["data"][0]["y"] == shown   # the previous run's, not the partial
    assert "half a sentence" not in html_text(explore)
    assert not any("as it is generated" in c.value for c in explore.caption)


def test_the_bar_reaches_the_end_only_with_the_last_token_when_latency_is_read_off_the_generation():
    # exploring: the latency is done after the greedy half of the generations, so the bar must not jump to the end
    # there (the sampled half still runs); the timed-runs order keeps latency last
    from pages import common

    class Bar:
        def __init__(self):
            self.values = []

        def progress(self, value, text=""):
            self.values.append(value)

    class P:
        def __init__(self, stage, step, total):
            self.stage, self.step, self.total, self.message, self.metrics = stage, step, total, "", {}

    events = [P("generate", i, 8) for i in range(1, 5)] + [P("latency", 1, 1)] + \
             [P("generate", i, 8) for i in range(5, 9)]
    bar = Bar()
    callback = common.progress_callback(bar, spans=common.GENERATION_TIMED_SPANS)
    after = []
    for event in events:
        callback(event)
        after.append(bar.values[-1] if bar.values else 0.0)
    assert after[4] == pytest.approx(0.8)   # latency done = the greedy half of the generations
    assert max(after[:-1]) < 1.0 and after[-1] == 1.0
    assert common.STAGE_SPANS["latency"][0] >= common.STAGE_SPANS["generate"][1]


# ---------------------------------------------------------------- one protocol per question, controls that act

def test_measure_precisely_travels_in_the_url_and_each_protocol_shows_only_its_own_knob():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update({"model": MODEL, "precise": "1", "new_tokens": "8", "latency_runs": "1"})
    at.run()
    no_exceptions(at)
    assert at.toggle(key="precise").value is True
    keys = {s.key for s in at.select_slider}
    assert "latency_runs" in keys and "eval_tokens" not in keys        # the precise protocol scores 2048 tokens
    assert at.session_state["current"]["protocol"]["latency_runs"] == 1  # and times the chosen number of runs
    at.toggle(key="precise").set_value(False).run()
    keys = {s.key for s in at.select_slider}
    assert "eval_tokens" in keys and "latency_runs" not in keys        # quick: the latency comes from generating
    assert at.query_params.get("precise") in (None, [], "0", ["0"])


def test_the_trail_keeps_one_point_per_setting_the_most_precise():
    from pages import common

    def run(precise_first: bool):
        state = {"trail": []}
        quick = {"protocol": {"latency_base": False, "eval_tokens": 512}, "config": {"q": 4}}
        full = {"protocol": {"latency_base": True, "eval_tokens": 2048}, "config": {"q": 4}}
        other = {"protocol": {"latency_base": False, "eval_tokens": 512}, "config": {"q": 3}}
        import streamlit as st
        for report, key, setting in ([(full, "a", "s4"), (quick, "b", "s4")] if precise_first
                                     else [(quick, "b", "s4"), (full, "a", "s4")]) + [(other, "c", "s3")]:
            st.session_state.update(state)
            common.record_run(report, key, setting)
            state = {"trail": st.session_state["trail"], "current": st.session_state["current"]}
        return state

    for precise_first in (True, False):
        state = run(precise_first)
        assert [r["setting_key"] for r in state["trail"]] == ["s4", "s3"]
        assert state["trail"][0]["protocol"]["eval_tokens"] == 2048   # the most precise measurement of s4


def test_explore_captions_are_one_sentence_with_the_details_one_click_away(explore):
    captions = [c.value for c in explore.caption]
    headline = next(c for c in captions if c.startswith("Perplexity"))
    assert len(headline) < 200 and "quick protocol" in headline
    popovers = explore.get("popover")
    assert len(popovers) >= 3                                      # how each chart was measured, on request
    folded = {c.value for box in [*popovers, *explore.expander] for c in box.get("caption")}
    assert any(len(c) > 400 for c in folded)                       # the long texts are there, folded
    assert all(len(c) < 250 for c in captions if c not in folded), [c for c in captions if len(c) >= 250]


def test_presentation_opened_from_a_link_measures_the_links_setting_on_request():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update({"model": MODEL, "bits": "3", "eval_tokens": "128", "new_tokens": "8"})
    at.switch_page("pages/present.py").run()
    no_exceptions(at)
    assert not at.metric and at.button(key="present_measure")
    assert at.title[0].value.startswith("3-bit")                  # the link's setting, in plain words
    at.button(key="present_measure").click().run()
    no_exceptions(at)
    assert [m.label for m in at.metric] == ["Packed size", "Perplexity", "Decode"]
    assert at.title[0].value.startswith("3-bit, groups of 128")


def test_work_stops_when_its_tab_is_closed(monkeypatch):
    """A closed tab (its connection gone) stops the session's work at the next report, like Stop does."""
    from lmcompress_core.compress import Cancelled
    from pages import common

    class Bar:
        texts: list = []

        def progress(self, value, text=""):
            self.texts.append(text)

    callback = common.timed_callback(Bar(), "sensitivity")
    callback(1, 4, "2-bit")
    assert Bar.texts and Bar.texts[-1].startswith("sensitivity: 2-bit")
    monkeypatch.setattr(common, "_connected", lambda: False)
    with pytest.raises(Cancelled):
        callback(2, 4, "3-bit")
    assert common.should_stop()


def test_an_export_says_its_size_and_what_is_quantized_before_the_download():
    at = app().run()
    at.switch_page("pages/report.py").run()
    no_exceptions(at)
    assert not at.get("download_button") or all("GGUF" not in b.proto.label for b in at.get("download_button"))
    at.button(key="report_export_prepare").click().run()
    no_exceptions(at)
    ready = next(c.value for c in at.caption if c.value.startswith("Ready"))
    assert "MB" in ready and "Q4" in ready                         # the plan's size and its block types
    assert any("GGUF" in b.proto.label for b in at.get("download_button"))
    at.switch_page("pages/explore.py").run()
    at.select_slider(key="bits").set_value(8).run()
    at.switch_page("pages/report.py").run()                        # another setting: prepared again on request
    assert at.button(key="report_export_prepare")


def test_the_exported_gguf_runs_in_llamacpp_on_request_or_says_how_to_enable_it(monkeypatch, tmp_path):
    from lmcompress_core.measure import llamacpp

    built = llamacpp.import_llama_cpp()[0] is not None
    if not built:   # this machine has no llama.cpp: the page says how to get it, in one line
        monkeypatch.setenv("LMCOMPRESS_LLAMACPP", str(tmp_path))
    at = app().run()
    at.switch_page("pages/report.py").run()
    at.button(key="report_export_prepare").click().run()
    no_exceptions(at)
    if not built:
        captions = [c.value.replace("\\", "") for c in at.caption]   # markdown escapes off
        assert any("`make llamacpp` builds llama-cpp-python" in c for c in captions)
        assert not [b for b in at.button if b.key == "report_export_llamacpp"]
        return
    at.button(key="report_export_llamacpp").click().run()
    no_exceptions(at)
    captions = [c.value.replace("\\", "") for c in at.caption]
    line = next(c for c in captions if c.startswith("llama.cpp on the exported GGUF"))
    assert "perplexity" in line and "(ours " in line and "tokens/s" in line
