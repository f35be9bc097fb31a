"""Presentation mode: the current results in large type for a projector; no controls, no sidebar."""
import streamlit as st

from lmcompress_core.report import plots
from pages import common

common.through_app()

# Static CSS only (no user or model text): bigger type that still fits a 1024×768 projector, no sidebar or
# toolbar. Metric values and labels wrap instead of ending in "…": a number cut short is worse than none.
st.html("""<style>
section[data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"], header[data-testid="stHeader"]
  {display: none !important;}
.block-container {padding-top: 1rem; max-width: 100% !important;}
html, body, [data-testid="stMarkdownContainer"] p {font-size: clamp(18px, 2.2vw, 26px) !important;}
[data-testid="stMetricValue"], [data-testid="stMetricValue"] [data-testid="stMarkdownContainer"] p,
[data-testid="stMetricValue"] div {font-size: clamp(1.6rem, 3.6vw, 3.4rem) !important; line-height: 1.15;
  font-weight: 700;}
[data-testid="stMetricLabel"] [data-testid="stMarkdownContainer"] p {font-size: clamp(1rem, 1.6vw, 1.5rem) !important;}
[data-testid="stMetric"] *, [data-testid="stHeading"] *, h1 {white-space: normal !important;
  overflow: visible !important; text-overflow: clip !important; overflow-wrap: anywhere;}
</style>""")

QUIET = {"delta_color": "off", "delta_arrow": "off", "border": True}  # deltas are context, not changes


def big(fig):
    fig.update_layout(font={"size": 20}, height=500, title_font={"size": 24})
    fig.update_traces(selector={"type": "bar"}, textfont={"size": 20})
    return fig


st.page_link("pages/explore.py", label="Leave presentation", icon=":material/close:")


def result_for_this_link() -> dict | None:
    """A fresh session (Presentation opened from a link) has no result of its own: the link's setting on its
    model, from the app's result cache when another session measured it, else computed on request."""
    from lmcompress_core.compress import Cancelled
    from lmcompress_core.measure import evaluation

    try:
        loaded = common.loaded_model(st.session_state["model_name"])
        config = common.build_config({**common.WIDGETS, **st.session_state["settings"]})
    except Exception as exc:   # noqa: BLE001 - any failure to load or read the link is told, not raised
        common.error("This link's model or setting cannot be used", exc)
        return None
    protocol = common.protocol()
    cached = evaluation.cached_report(loaded, config, protocol)
    if cached is not None:
        return cached.to_dict()
    st.title(common.describe_config(config.to_dict()))
    st.markdown(f"No result for this setting on {common.md_escape(loaded.name)} yet in this session.")
    if not st.button("Measure it now", type="primary", key="present_measure",
                     help="Compresses a copy of the model and measures it, as Explore does (seconds to a minute)."):
        return None
    bar = st.progress(0.0, text="starting")
    try:
        report = common.evaluate_live(loaded, config, protocol, bar, lambda partial: None)
    except (Cancelled, ValueError) as exc:
        common.error("Not measured", exc)
        return None
    common.record_run(report, "present", common.setting_key(loaded.name, config))
    st.rerun()


report = st.session_state.get("current") or result_for_this_link()
if report is None:
    st.stop()

size, ppl, lat = report.get("size") or {}, report.get("perplexity") or {}, report.get("latency") or {}
speed = report.get("speed") or {}
st.title(plots.describe_config(report.get("config")))
st.caption(common.md_escape(f"{report.get('model')} · {plots.config_label(report.get('config'))} · "
                            f"{plots.kernel_kind(lat.get('kernel') or report.get('kernel'))} · "
                            f"{plots.protocol_name(report)}"))
m1, m2, m3 = st.columns(3)
base_bytes = size.get("base_bytes") or 0
m1.metric("Packed size", f"{(size.get('packed_bytes') or 0) / plots.MB:.1f} MB",
          f"{(size.get('packed_bytes') or 0) / base_bytes:.0%} of base" if base_bytes else None, **QUIET)
m2.metric("Perplexity", f"{ppl.get('value') or 0:.2f}", f"base {report.get('base_perplexity') or 0:.2f}", **QUIET)
m3.metric("Decode", f"{lat.get('decode_tokens_per_s') or 0:.0f} tok/s",
          f"{plots.short_ratio(speed.get('decode_text'))} vs base" if speed else None, **QUIET)
trail = [r for r in st.session_state["trail"] if r.get("model") == report.get("model")]
current = next((i for i, r in enumerate(trail) if r.get("setting_key") == report.get("setting_key")), None)
charts = [plots.size_figure(report), plots.perplexity_figure(report), plots.latency_figure(report),
          plots.trail_figure(trail, current=current)]
for row in (charts[:2], charts[2:]):
    for col, fig in zip(st.columns(2), row):
        col.plotly_chart(big(fig), width="stretch", config={"displayModeBar": False})
common.caveat(report)
common.generations(report.get("generation"))
