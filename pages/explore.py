"""Explore (home): sliders for bit-width, sparsity and distillation -> one CompressionConfig -> live charts."""
import json

import streamlit as st

from lmcompress_core.report import plots
from lmcompress_core.compress import Cancelled, CompressionConfig
from pages import common
from pages.common import BITS, WIDGETS, build_config

common.through_app()


def restore_widgets() -> None:
    saved = st.session_state["settings"]
    for key, default in WIDGETS.items():
        if key not in st.session_state:
            st.session_state[key] = saved.get(key, default)


def sliders() -> None:
    """The three sliders and the Distil switch in one row: the charts come right under them."""
    bits, sparsity, temperature, kd = st.columns([4, 4, 4, 3])
    bits.select_slider("Bit-width", options=BITS, key="bits", format_func=lambda b: f"{b} (bf16)" if b == 16 else str(b),
                       help="Integer codes per weight (2–8); 16 = half-precision cast.")
    sparsity.slider("Sparsity (%)", 0, 95, step=5, key="sparsity",
                    help="Share of weights removed from the linear layers (N:M patterns fix it at 50%).")
    on = st.session_state["kd"]
    # the temperature only acts through distillation: disabled (and saying so) until distillation is on
    temperature.slider("Temperature (KD)", 0.5, 10.0, step=0.5, key="temperature", disabled=not on,
                       help="Softens the teacher's distribution in the KD loss." + (
                           "" if on else " Switch on Distil to use it; the Distillation page shows what T does."))
    kd.toggle("Distil", key="kd", help="Recovery distillation: fine-tune the compressed copy against the original.")
    kd.number_input("Steps", 0, 500, step=10, key="steps", disabled=not on, label_visibility="collapsed",
                    help="Distillation steps (a SmolLM2 step takes a few seconds).")


def settings_panel() -> None:
    """Below the results: the quantizer's details, the measurement protocol, the prompt; the URL follows."""
    with st.expander("Advanced"):
        c1, c2, c3, c4 = st.columns(4)
        c1.selectbox("Granularity", ["group", "channel", "tensor"], key="granularity")
        c1.selectbox("Group size", [32, 64, 128], key="group_size")
        c2.toggle("Symmetric (absmax)", key="symmetric")
        c2.radio("Quantizer", ["rtn", "gptq", "hqq", "mse"], key="method", format_func=str.upper, horizontal=True,
                 help="RTN rounds to nearest; GPTQ compensates each rounding error on calibration text; HQQ "
                      "fits each group's zero-point without calibration; MSE searches each group's scale and "
                      "zero-point for the least error weighted by the inputs' mean squares on calibration text.")
        c1.selectbox("Asymmetric grid", ["integer-zero", "minmax"], key="grid",
                     format_func={"integer-zero": "0 on the grid (integer zero-point)",
                                  "minmax": "min-max (the classic formula, fractional zero)"}.get)
        c2.selectbox("Runtime", ["real", "simulate", "dynamic_int8"], key="runtime",
                     format_func={"real": "real int4/int8 kernels (bf16, LM head int8)",
                                  "simulate": "simulate in fp32",
                                  "dynamic_int8": "8-bit: torch dynamic int8 (activations quantized too)"}.get,
                     help="What runs the integer codes: real weight-only kernels with the rest of the model in "
                          "bf16, de-quantized fp32 weights (codes, not kernels, decide quality), or torch's "
                          "dynamic int8 at 8 bits.")
        c3.radio("Pruning method", ["magnitude", "wanda", "sparsegpt"], key="prune_method", horizontal=True)
        c3.selectbox("Pattern", ["unstructured", "2:4", "4:8"], key="pattern")
        c4.slider("α (KD weight)", 0.0, 1.0, step=0.05, key="alpha")
        c4.select_slider("Generated tokens", [8, 16, 32, 64], key="new_tokens")
        # each protocol has its own knob: the quick one scores a chosen number of tokens and reads the latency
        # off the generation; the precise one scores 2048 tokens and times a chosen number of alternating runs
        if st.session_state["precise"]:
            c4.select_slider("Timed runs (median)", [1, 3, 5, 10], key="latency_runs",
                             help="Runs of the base and the compressed model, alternately, when measuring precisely.")
        else:
            c4.select_slider("Evaluation tokens", [128, 256, 512, 1024, 2048], key="eval_tokens",
                             help="Tokens scored for perplexity while exploring (measuring precisely scores 2048).")
    st.toggle("Measure precisely", key="precise",
              help="The full protocol (2048 tokens scored; the base and the compressed model timed alternately, "
                   "which gives the speed ratio) instead of the quick one used while exploring.")
    st.text_area("Prompt for the side-by-side generations", key="prompt", height=68, max_chars=20_000)


def sync_url() -> None:
    st.session_state["settings"] = {k: st.session_state[k] for k in WIDGETS}
    query = {"model": st.session_state["model_name"], **common.settings_to_query(st.session_state["settings"])}
    if dict(st.query_params) != query:   # the URL reproduces this configuration (reload, shared link)
        st.query_params.from_dict(query)


FIGURES = {"size": plots.size_figure, "perplexity": plots.perplexity_figure, "latency": plots.latency_figure}


class Slots:
    """One placeholder per chart column, made when a chart is first drawn into it. Until then the column still
    shows the chart the script's previous run drew there: Streamlit keeps it, faded as stale, while the script
    runs. So while a new setting computes, the previous result stays on screen without being drawn again (three
    Plotly charts redrawn cost Chromium ~0.9 s of CPU per slider move, on the cores the engine needs)."""

    def __init__(self, columns: dict, keep_previous: bool):
        self.columns, self.made = columns, {}
        if not keep_previous:   # another model's charts (or none): cleared at once
            for name in columns:
                self.make(name)

    def make(self, name: str):
        """The placeholder of ``name``'s column, made on first use (a statement, never a bare expression: Streamlit's
        magic would write the returned object's docs onto the page)."""
        if name not in self.made:
            self.made[name] = self.columns[name].empty()
        return self.made[name]

    def __getitem__(self, name: str):
        return self.make(name)


def show_report(report: dict, slots: Slots, drawn: frozenset = frozenset()) -> None:
    """The three charts into their slots, but those ``drawn`` already by this run as their stage finished."""
    for name in FIGURES:
        if name not in drawn:
            show_chart(name, report, slots[name])


def show_chart(name: str, report: dict, slot, kind: str = "result") -> None:
    """One chart with its caption: a finished result ("result"), or drawn as its stage ended ("live")."""
    key = f"{kind}-{name}"
    with slot.container(key=key):
        common.figure(FIGURES[name](report), plots.headlines(report).get(name, ""), key=f"chart-{key}",
                      details=plots.report_how(report).get(name, ""))


def run(loaded, config: CompressionConfig, protocol, slots: Slots, heading: dict, drawn: set) -> dict | None:
    """The report for this configuration (cached, or computed with progress), or None when stopped/failed;
    ``drawn`` collects the charts drawn while computing (each as its stage finished: final, not drawn again).

    While it computes, the previous result stays on screen, faded (see Slots) under a "previous result" badge, and
    the heading says which configuration is being computed; nothing half-done is ever shown as a result.
    """
    from lmcompress_core.measure import evaluation

    key = json.dumps([loaded.name, config.key(), protocol.to_dict()], sort_keys=True)
    cached = evaluation.cached_report(loaded, config, protocol)
    if cached is None and st.session_state.get("stop_requested") and st.session_state.get("pending_key") == key:
        st.info("Stopped: the charts show the previous result. Move a slider or press Run to compute this "
                "configuration.")
        st.button("Run", on_click=lambda: st.session_state.update(stop_requested=False))
        return None
    st.session_state["stop_requested"] = False
    if cached is not None:
        report = cached.to_dict()
    else:
        report = _compute(loaded, config, protocol, slots, heading, key, drawn)
        if report is None:
            return None
    common.record_run(report, key, common.setting_key(loaded.name, config))
    return st.session_state["current"]


def _compute(loaded, config, protocol, slots, heading, key, drawn: set) -> dict | None:
    st.session_state["pending_key"] = key
    previous = _previous(loaded)
    heading["title"].subheader(f"Computing: {common.describe_config(config.to_dict())}")
    if previous is not None:
        heading["badge"].badge(f"previous result shown: {common.describe_config(previous.get('config'))}",
                               color="gray")
    running = heading["running"]
    with running.container():
        st.button("Stop", on_click=common.request_stop, help="Abandon this run; nothing half-done is kept.")
        bar = st.progress(0.0, text="starting")
        stream = {"label": st.empty(), "text": st.empty(), "kind": None}
    try:
        return common.evaluate_live(loaded, config, protocol, bar,
                                    lambda partial: _show_partial(partial, slots, drawn, heading),
                                    lambda event: _show_stream(event, stream))
    except Cancelled:
        st.info("Stopped: the charts show the previous result; nothing from this run was kept.")
    except ValueError as exc:
        common.error("Cannot run this configuration", exc)
    finally:
        running.empty()   # no Stop button and no half-done text once nothing runs
    drawn.clear()   # stopped or failed: the charts go back to the previous result, whole
    return None


def _show_partial(partial: dict, slots: Slots, drawn: set, heading: dict) -> None:
    """Each chart once, final as soon as its stage is done, while the run goes on (the heading says it is
    computing); once all three show this configuration, the heading names it and only the generations are
    still coming."""
    new = [name for name in FIGURES if partial.get(name) and name not in drawn]
    for name in new:
        drawn.add(name)
        show_chart(name, partial, slots[name], "live")
    if new and drawn.issuperset(FIGURES):
        with heading["title"].container():
            common.config_heading(partial.get("config"))
        heading["badge"].empty()


def _show_stream(event: dict, stream: dict) -> None:
    """The text generated so far: one message to the browser per redraw (the label only when it changes)."""
    if event["kind"] != stream["kind"]:
        stream["kind"] = event["kind"]
        label = {"greedy": "Compressed model, greedy", "sampled": "Compressed model, sampled"}[event["kind"]]
        stream["label"].caption(f"{label} (as it is generated):")
    with stream["text"]:
        common.show_text(event["text"])


def _previous(loaded) -> dict | None:
    current = st.session_state.get("current")
    return current if current is not None and current.get("model") == loaded.name else None


# Explore is for watching the charts move: less space above them than Streamlit's default page padding
st.html("<style>.block-container {padding-top: 4rem !important;} .block-container h3 {font-size: 1.35rem;}</style>")
loaded = common.current_model()
if loaded is None:
    st.stop()
restore_widgets()
if st.session_state.get("ignored_query"):
    st.warning("Ignored link parameter(s) with a value of the wrong kind: "
               + common.md_escape(", ".join(st.session_state.pop("ignored_query"))))
sliders()
heading = {"title": st.empty(), "badge": st.empty()}
cols = st.columns(3)
heading["running"] = st.empty()
results, settings_area = st.container(), st.container()
with settings_area:
    st.divider()
    settings_panel()
sync_url()
settings = st.session_state["settings"]
if not settings["prompt"].strip():
    st.warning("The prompt is empty: type some text for the models to continue. Generations are skipped.")
try:
    config = build_config(settings)
except ValueError as exc:
    common.error("Invalid setting", exc)
    st.stop()
protocol = common.protocol()
with settings_area:
    common.details(f"{protocol.describe()}.", label="Protocol: " + ("full" if settings["precise"] else "quick"))
slots = Slots(dict(zip(("size", "latency", "perplexity"), cols)), keep_previous=_previous(loaded) is not None)
drawn: set[str] = set()
report = run(loaded, config, protocol, slots, heading, drawn) or _previous(loaded)
if report is not None:
    if not drawn.issuperset(FIGURES):   # else named as the last chart was drawn: the heading names what they show
        with heading["title"].container():
            common.config_heading(report.get("config"))
        heading["badge"].empty()
    show_report(report, slots, drawn=frozenset(drawn))
    with results:
        common.caveat(report)
        common.engine_notes(report)
        gen_col, trail_col = st.columns([3, 2])
        with gen_col:
            if report.get("generation"):   # an empty prompt skips generations: no empty heading either
                st.subheader("Generations")
                common.generations(report["generation"])
                common.details(plots.report_how(report).get("generation", ""))
            with st.expander("Take this model away (GGUF, Hugging Face folder)"):
                common.export_download(report, key="explore_export")
        with trail_col:
            trail = [r for r in st.session_state["trail"] if r.get("model") == loaded.name]
            current = next((i for i, r in enumerate(trail) if r.get("setting_key") == report.get("setting_key")), None)
            common.figure(plots.trail_figure(trail, current=current),
                          f"Every setting tried on {loaded.name} in this session: size against perplexity.",
                          details="Packed size, perplexity ± standard error; a setting measured twice is one point, "
                                  "the more precise measurement; the dotted line joins the settings nothing beats.")
else:
    heading["title"].subheader(common.describe_config(config.to_dict()))
