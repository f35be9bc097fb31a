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
report = st.session_state.get("current")
if report is None:
    st.title("LM Compression Lab")
    st.markdown("No results yet — run a configuration on Explore first.")
    st.stop()

size, ppl, lat = report.get("size") or {}, report.get("perplexity") or {}, report.get("latency") or {}
speed = report.get("speed") or {}
st.title(plots.config_label(report.get("config")))
st.caption(common.md_escape(f"model: {report.get('model')} · kernel: {lat.get('kernel') or report.get('kernel')}"))
m1, m2, m3 = st.columns(3)
base_bytes = size.get("base_bytes") or 0
m1.metric("Packed size", f"{(size.get('packed_bytes') or 0) / plots.MB:.1f} MB",
          f"{(size.get('packed_bytes') or 0) / base_bytes:.0%} of base" if base_bytes else None, **QUIET)
m2.metric("Perplexity", f"{ppl.get('value') or 0:.2f}", f"base {report.get('base_perplexity') or 0:.2f}", **QUIET)
m3.metric("Decode", f"{lat.get('decode_tokens_per_s') or 0:.0f} tok/s",
          f"{plots.short_ratio(speed.get('decode_text'))} vs base" if speed else None, **QUIET)
trail = [r for r in st.session_state["trail"] if r.get("model") == report.get("model")]
current = next((i for i, r in enumerate(trail) if r.get("run_key") == report.get("run_key")), None)
charts = [plots.size_figure(report), plots.perplexity_figure(report), plots.latency_figure(report),
          plots.trail_figure(trail, current=current)]
for row in (charts[:2], charts[2:]):
    for col, fig in zip(st.columns(2), row):
        col.plotly_chart(big(fig), width="stretch", config={"displayModeBar": False})
common.generations(report.get("generation"))
