"""Distillation: what the temperature does to the teacher's targets, and a live knowledge-distillation run."""
from dataclasses import asdict, replace

import streamlit as st

from lmcompress_core.measure import evaluation
from lmcompress_core.report import plots
from lmcompress_core.compress import Cancelled, CompressionConfig
from lmcompress_core.methods.distill import (DEFAULT_TEMPERATURE, TRAINS, DistillationConfig, format_duration,
                                             step_time_estimate, temperature_study, temperature_view)
from pages import common
from pages.common import WIDGETS, build_config

common.through_app()

st.title("Distillation")
loaded = common.current_model()
if loaded is None:
    st.stop()
settings = {**WIDGETS, **st.session_state["settings"]}
study = temperature_study()
TRAINS_SHORT = {"grid": "scales only", "codes": "scales and codes (experimental)"}
STEPS_CAP = 100          # the most make bench trains (tiny model); on SmolLM2 about 8 min on 2 CPU cores
LONG_RUN_S = 180         # above this estimate the page says so before the run starts


def temperature_caption(view) -> str:
    """What the top-k chart shows, in its own numbers: the mass of the top k and the entropy at both temperatures."""
    k, t = len(view.tokens), view.temperature
    effect = ("T > 1 moves probability from the top tokens to the runners-up and the long tail, keeping their order: "
              "the student also sees how the teacher ranks the wrong answers (the 'dark knowledge')." if t > 1 else
              "T < 1 sharpens the distribution towards the top token." if t < 1 else "T = 1 is the model's own distribution.")
    return (f"softmax(z / T) of the original model's logits for the token after the prompt, on the same {k} tokens at "
            f"both temperatures (the top {k} at T = 1), then the other {view.vocab - k:,} tokens together; log scale. "
            f"The top {k} hold {1 - view.rest[0]:.1%} at T = 1 and {1 - view.rest[1]:.1%} at T = {t:g}; the entropy "
            f"goes from {view.entropy[0]:.2f} to {view.entropy[1]:.2f} nats (uniform over the vocabulary: "
            f"{view.max_entropy:.2f}). {effect}")


def default_temperature_note() -> str:
    """Where the default temperature comes from, from the committed measurement."""
    if study is None or study.best is None:
        return f"The default T = {DEFAULT_TEMPERATURE:g} is shared with Explore; no temperature study is committed."
    agrees = ("its best" if study.best == DEFAULT_TEMPERATURE else
              f"not its best (T = {study.best:g}); the default is stale, rerun make bench")
    return (f"The default T = {DEFAULT_TEMPERATURE:g} (Explore and this page) is {agrees}: {study.best_mean:.0%} of the "
            f"lost perplexity recovered ({study.setting}). Temperatures differ little here, and on SmolLM2 only "
            f"T = {DEFAULT_TEMPERATURE:g} was measured.")


st.subheader("Temperature softens the teacher")
left, right = st.columns([1, 2])
with left:
    prompt = st.text_input("Prompt", value=settings["prompt"], max_chars=2000, key="kd_prompt")
    temperature = st.slider("Temperature T", 0.5, 10.0, value=float(settings["temperature"]), step=0.5,
                            key="kd_temperature", help="Starts at Explore's temperature (the shared default below).")
    top_k = st.slider("Top-k tokens shown", 3, 20, 10, key="kd_topk")
with right:
    if not prompt.strip():
        st.warning("The prompt is empty: type a few words to see the teacher's next-token distribution.")
    else:
        try:
            view = temperature_view(loaded.model, loaded.tokenizer, prompt, temperature, top_k)
        except ValueError as exc:
            common.error("Cannot compute the distribution", exc)
            st.stop()
        common.figure(plots.topk_figure(asdict(view)), temperature_caption(view))

st.subheader("Which temperature recovers most (measured)")
if study is None or study.best is None:
    st.info("No temperature study has been measured yet: `make bench` writes one (bench/results.json, section 5).")
else:
    common.figure(plots.recovery_by_temperature_figure(study.by_temperature, study.best),
                  f"Measured by make bench ({study.setting}): recovered fraction = "
                  "(ppl compressed − ppl after KD) / (ppl compressed − ppl original) on held-out text never trained "
                  "on; 1 = all of the lost perplexity recovered, below 0 = KD made it worse. Points: mean ± std over "
                  "seeds.")
st.caption(default_temperature_note())

st.subheader("Run knowledge distillation")
c1, c2, c3, c4 = st.columns(4)
mode = c1.radio("Student", ["recovery", "student"], key="kd_mode",
                format_func={"recovery": "compressed copy (recovery)", "student": "smaller model (fewer layers)"}.get)
steps = c2.number_input("Steps", 1, STEPS_CAP, value=min(STEPS_CAP, max(1, int(settings["steps"]))), step=10,
                        key="kd_steps")
alpha = c3.slider("α (KD weight)", 0.0, 1.0, float(settings["alpha"]), 0.05, key="kd_alpha")
keep_every = c4.selectbox("Keep every k-th layer", [2, 3, 4], key="kd_keep", disabled=mode != "student")
trains = st.radio("Quantized layers train", list(TRAINS_SHORT), key="kd_trains", horizontal=True,
                  format_func=TRAINS_SHORT.get, disabled=mode != "recovery",
                  help="Scales and codes: " + TRAINS["codes"] + ". SmolLM2 at 2 bits (MSE g64), 55 steps, make "
                       "bench: 0.71 of the lost perplexity recovered against 0.69 for the scales alone, each step "
                       "about 15% longer; the tiny model (2-bit RTN g128, 40 steps) 0.67 against 0.36. The size is "
                       "the same either way.")
try:
    base_config = build_config({**settings, "kd": False})
    config = CompressionConfig(
        quantization=base_config.quantization if mode == "recovery" else None,
        pruning=base_config.pruning if mode == "recovery" else None,
        distillation=DistillationConfig(temperature=temperature, alpha=alpha, steps=int(steps), mode=mode,
                                        keep_every=keep_every, trains=trains))
except ValueError as exc:
    common.error("Invalid setting", exc)
    st.stop()
estimate = step_time_estimate(loaded.name, loaded.card.params, config.distillation)
if estimate is not None:
    training_s = estimate.training_seconds(int(steps))
    say = st.warning if training_s > LONG_RUN_S else st.caption
    say(f"Estimated training time: about {format_duration(training_s)} ({estimate.seconds:.2f} s a step, "
        f"{estimate.source}); compressing and the two evaluations come on top. "
        + ("Fewer steps give a first result sooner. " if training_s > LONG_RUN_S else "")
        + "While it runs, the bar shows the time left from the steps done so far.")
source = ("quantization and pruning come from the Explore sliders" if mode == "recovery" else
          f"the student keeps every {keep_every}-th layer of the uncompressed model; Explore's quantization and "
          "pruning are not applied in this mode")
st.caption(f"Configuration: {common.md_escape(common.describe_config(config.to_dict()))} ({source}). "
           f"Protocol: {common.md_escape(common.protocol().describe())}.")
# the same run without training: the compressed copy (recovery) or the untrained smaller student
before_config = replace(config, distillation=replace(config.distillation, steps=0)) if mode == "student" else \
    replace(config, distillation=None)


def stopped_message(result: dict | None) -> str:
    kept = (f"the previous result ({common.describe_config(result['config'])}) is shown below" if result
            else "there is no earlier result")
    return f"Distillation stopped: nothing from that run was kept; {kept}."


def show_result(result: dict, previous: bool = False) -> None:
    """The finished run: heading, loss curve, base → before → after perplexity, generations; a previous one dimmed."""
    if previous:
        st.badge(f"previous result shown: {common.describe_config(result['config'])}", color="gray")
    else:
        common.config_heading(result["config"])
    left, right = st.columns(2)
    with left:
        common.figure(plots.loss_curve_figure(result.get("history") or []),
                      "KD loss = α·T²·KL(teacher_T ‖ student_T) + (1−α)·cross-entropy, per optimiser step; the "
                      "dotted perplexity is on held-out calibration windows (a quick check while training), not on "
                      "the evaluation text of the bar chart.", key=f"kd-{previous}-loss")
    with right:
        common.figure(plots.stages_perplexity_figure(result, result.get("before")),
                      plots.report_how(result).get("perplexity", ""), key=f"kd-{previous}-stages")
    st.markdown("**Original and distilled model, same prompt**")
    common.generations(result.get("generation"))


def run_distillation(notice, running) -> None:
    """One run with a Stop button, a progress bar and the live loss curve; the result kept only when it finishes."""
    st.session_state["stop_requested"] = False
    st.session_state["kd_running"] = True
    with running.container(key="running-kd"):   # hidden by app.py's CSS whenever no script runs
        st.button("Stop", on_click=common.request_stop, help="Abandon this run; nothing half-done is kept.")
        bar, curve = st.progress(0.0, text="starting"), st.empty()
    history: list[dict] = []

    def on_progress(progress) -> None:
        if progress.stage == "distill" and "loss" in progress.metrics:
            history.append(progress.metrics)
            curve.plotly_chart(plots.loss_curve_figure(history), width="stretch")

    protocol = replace(common.protocol(), prompt=prompt if prompt.strip() else None,
                       generation=bool(prompt.strip()), latency=False)
    try:
        callback = common.progress_callback(bar, on_progress)
        with common.session_work():
            before = evaluation.evaluate(loaded, before_config, replace(protocol, generation=False),
                                         callback=callback, should_stop=common.should_stop)
            report = evaluation.evaluate(loaded, config, protocol, callback=callback, should_stop=common.should_stop)
    except Cancelled:
        notice.info(stopped_message(st.session_state.get("kd_result")))
    except ValueError as exc:
        with notice:
            common.error("Cannot run distillation", exc)
    else:
        st.session_state["kd_result"] = {**report.to_dict(), "before": before.to_dict()}
    st.session_state["kd_running"] = False
    running.empty()


# Set while a run is under way and cleared only when it ends by itself: still set here means the last run was
# cut short (the app's Stop, Streamlit's own stop, a control moved, another page opened).
if st.session_state.pop("kd_running", False):
    st.info(stopped_message(st.session_state.get("kd_result")))
clicked = st.button("Run distillation", type="primary")
notice, running, result_slot = st.container(), st.empty(), st.empty()
if clicked:
    if st.session_state.get("kd_result") is not None:   # drawn first: a run stopped mid-way leaves it on screen
        with result_slot.container(key="previous-kd"):
            show_result(st.session_state["kd_result"], previous=True)
    run_distillation(notice, running)
result = st.session_state.get("kd_result")
if result is not None:
    with result_slot.container(key="result-kd"):
        show_result(result)
