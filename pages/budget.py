"""Budget: a target size -> the autopilot's bits per layer (heatmap) -> per-layer overrides -> evaluated beside
uniform settings."""
from dataclasses import replace

import streamlit as st

from lmcompress_core.methods import autopilot
from lmcompress_core.measure import evaluation
from lmcompress_core.report import plots
from lmcompress_core.compress import Cancelled, CompressionConfig
from lmcompress_core.methods.quantize import QuantizationConfig
from pages import common

common.through_app()

UNIFORM_BITS = (2, 3, 4, 8)

st.title("Bit budget")
loaded = common.current_model()
if loaded is None:
    st.stop()

st.markdown("Give a size; the autopilot measures how much each layer hurts the model at each bit-width and spends "
            "the bits where they buy the most.", help="A second-order estimate of the KL each layer adds (Fisher "
            "information on calibration text), rescaled by the KL measured with every layer of its kind at that width.")
c1, c2, c3 = st.columns(3)
target = c1.slider("Target bits per weight", 2.5, 8.0, 3.5, 0.1, key="budget_bpw",
                   help="Average packed bits per weight of the quantized layers, scales and zero-points included.")
group_size = c2.selectbox("Group size", [64, 128], index=1, key="budget_group")
method = c3.radio("Quantizer", ["mse", "rtn", "hqq"], format_func=str.upper, horizontal=True, key="budget_method",
                  help="MSE: each group's grid searched for the least activation-weighted error (calibrated); "
                       "RTN: round to nearest; HQQ: fitted zero-points.")
base = QuantizationConfig(bits=4, group_size=group_size, method=method, int8_kernel=False)
budget = autopilot.BudgetConfig(target_bpw=target, base=base)


def measure_on_request() -> None:
    """The per-layer measurement takes minutes on a large model: it runs only when asked, shows time left, and
    stops when a control moves, Stop is pressed or the tab closes. Once measured it is kept on disk."""
    ids = autopilot.calibration_ids(loaded)
    if autopilot.cached_damage(loaded.model, ids, base, budget.choices, loaded.name) is not None:
        return
    expected = autopilot.expected_seconds(loaded.model, base)
    st.info(f"First the autopilot measures each layer's sensitivity with the {method.upper()} quantizer in groups of "
            f"{group_size}: about {common.duration(expected)} for {common.md_escape(loaded.name)} on 2 cores (an "
            "estimate). It is measured once per model and setting, then kept on disk for every session.")
    if not st.button("Measure sensitivity", type="primary", key="budget_measure"):
        st.stop()
    running = st.empty()
    with running.container(key="running-budget"):
        st.button("Stop", on_click=common.request_stop, key="budget_stop")
        bar = st.progress(0.0, text="starting")
    st.session_state["stop_requested"] = False
    try:
        autopilot.measure_damage(loaded.model, ids, base, budget.choices, model_name=loaded.name,
                                 callback=common.timed_callback(bar, "sensitivity"))
    except Cancelled:
        st.info("Stopped: nothing was kept. Press the button to measure again.")
        st.stop()
    running.empty()


try:
    measure_on_request()
    allocation = autopilot.allocate_for(loaded, budget)
except ValueError as exc:
    common.error("Cannot meet this budget", exc)
    st.stop()

def _override_clicked_cell() -> None:
    """A click on a heatmap cell sets that layer to that width (runs before the script reruns)."""
    clicked = plots.clicked_widths(st.session_state.get("budget_heatmap"))
    st.session_state["budget_overrides"] = {**st.session_state.get("budget_overrides", {}), **clicked}


overrides = st.session_state.setdefault("budget_overrides", {})
overrides = {name: bits for name, bits in overrides.items() if name in allocation.bits}
with st.expander("Override a layer", expanded=bool(overrides)):
    o1, o2, o3 = st.columns([3, 1, 1])
    layer = o1.selectbox("Layer", list(allocation.bits), key="budget_layer")
    bits = o2.selectbox("Bits", [2, 3, 4, 8, 16], key="budget_layer_bits",
                        format_func=lambda b: "float" if b == 16 else str(b))
    if o3.button("Set", key="budget_set"):
        overrides[layer] = bits
    if o3.button("Clear all", key="budget_clear", disabled=not overrides):
        overrides = {}
    st.session_state["budget_overrides"] = overrides
    if overrides:
        st.caption("Overridden: " + ", ".join(f"{common.md_escape(n)} → {b}" for n, b in overrides.items()))
allocation = autopilot.with_overrides(allocation, overrides, base)

st.metric("Bits per weight (packed, scales included)", f"{allocation.bits_per_weight:.3f}",
          delta=f"{allocation.bits_per_weight - target:+.3f} against the target", delta_color="inverse")
common.figure(plots.allocation_heatmap(allocation.damage, allocation.bits),
              "Click a cell to give that layer that width. Colour: KL (nats per token) the layer alone adds at that "
              "width, predicted as ½ Σ F·ΔW² with F the diagonal Fisher on 4 calibration sequences and rescaled by "
              "the KL measured with all layers of its kind at that width; ● the width chosen (greedy: most damage "
              "saved per extra bit) or set by hand.", key="budget_heatmap", on_select=_override_clicked_cell)

if st.button("Evaluate against uniform settings", key="budget_evaluate", type="primary"):
    mix = autopilot.rule_mix_for(loaded.model, budget)   # the same budget spent by a fixed k-quant style rule
    configs = [(f"autopilot {allocation.bits_per_weight:.2f}", "autopilot", allocation.bits_per_weight,
                allocation.config),
               (f"rule mix {mix.bits_per_weight:.2f}", "rule mix", mix.bits_per_weight, mix.config)]
    configs += [(f"uniform {b}-bit", "uniform", autopilot.uniform_bits_per_weight(loaded.model, b, group_size),
                 QuantizationConfig(bits=b, group_size=group_size, method=method, int8_kernel=False))
                for b in UNIFORM_BITS]
    protocol = replace(common.protocol(), latency=False, generation=False)   # the session's one protocol
    points, bar = [], st.progress(0.0, text="evaluating")
    try:
        for i, (label, kind, bpw, config) in enumerate(configs):
            bar.progress(i / len(configs), text=f"evaluating {label}")
            # every point simulated in fp32: the same kernels for all, so only the codes differ
            report = evaluation.evaluate(loaded, CompressionConfig(quantization=config, runtime="simulate"), protocol,
                                      should_stop=common.should_stop)
            points.append({"label": label, "kind": kind, "bits_per_weight": bpw,
                           "perplexity": report.perplexity.value, "stats": report.quality_stats})
    except Cancelled:
        st.warning("Stopped.")
    bar.empty()
    st.session_state["budget_points"] = points
points = st.session_state.get("budget_points")
if points:
    common.figure(plots.budget_figure(points),
                  "The autopilot, a fixed rule mix (more bits for attention v/o, MLP down and the first and last "
                  "blocks, as llama.cpp's k-quant presets do) and uniform widths, all with the same quantizer.",
                  details=f"Perplexity by this session's protocol ({common.protocol().describe()}), every setting "
                          "simulated in fp32 (de-quantized weights: the codes, not kernels, differ); bits per weight "
                          "counted as the packed file stores them.")
    st.dataframe([{"setting": p["label"], "bits per weight": round(p["bits_per_weight"], 3),
                   "perplexity": p["perplexity"], **(p["stats"] or {})} for p in points], hide_index=True)
