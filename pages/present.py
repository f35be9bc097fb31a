"""Presentation mode: the current results in large type for a projector; no controls, no sidebar."""
import streamlit as st

from lmcompress_core import plots
from pages import common

# Static CSS only (no user or model text): bigger type, no sidebar or toolbar.
st.html("""<style>
section[data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"], header[data-testid="stHeader"]
  {display: none !important;}
.block-container {padding-top: 1.5rem; max-width: 100% !important;}
html, body, [data-testid="stMarkdownContainer"] p {font-size: 26px !important;}
[data-testid="stMetricValue"], [data-testid="stMetricValue"] [data-testid="stMarkdownContainer"] p,
[data-testid="stMetricValue"] div {font-size: 3.6rem !important; line-height: 1.15; font-weight: 700;}
[data-testid="stMetricLabel"] [data-testid="stMarkdownContainer"] p {font-size: 1.5rem !important;}
</style>""")


QUIET = {"delta_color": "off", "delta_arrow": "off", "border": True}  # deltas are context, not changes


def big(fig):
    fig.update_layout(font={"size": 22}, height=520, title_font={"size": 26})
    return fig


report = st.session_state.get("current")
if report is None:
    st.title("LM Compression Lab")
    st.markdown("No results yet — run a configuration on Explore first.")
else:
    size, ppl, lat = report.get("size") or {}, report.get("perplexity") or {}, report.get("latency") or {}
    st.title(plots.config_label(report.get("config")))
    st.caption(common.md_escape(f"model: {report.get('model')}"))
    m1, m2, m3 = st.columns(3)
    base_bytes = size.get("base_bytes") or 0
    m1.metric("Packed size", f"{(size.get('packed_bytes') or 0) / plots.MB:.1f} MB",
              f"{(size.get('packed_bytes') or 0) / base_bytes:.0%} of base" if base_bytes else None,
              **QUIET)
    m2.metric("Perplexity", f"{ppl.get('value') or 0:.2f}",
              f"base {report.get('base_perplexity') or 0:.2f}", **QUIET)
    m3.metric("Decode", f"{lat.get('decode_tokens_per_s') or 0:.0f} tok/s", lat.get("kernel"), **QUIET)
    charts = [plots.size_figure(report), plots.perplexity_figure(report), plots.latency_figure(report),
              plots.trail_figure(st.session_state["trail"], current=len(st.session_state["trail"]) - 1)]
    for row in (charts[:2], charts[2:]):
        for col, fig in zip(st.columns(2), row):
            col.plotly_chart(big(fig), width="stretch", config={"displayModeBar": False})
    common.generations(report.get("generation"))
st.page_link("pages/explore.py", label="Leave presentation")
