"""Report: one click -> a self-contained HTML report; the session's runs history exported and imported as JSON."""
import streamlit as st

from lmcompress_core import plots, report_html
from pages import common

st.title("Report")
common.model_sidebar()
current = st.session_state.get("current")
trail = list(st.session_state["trail"])

if current is None:
    st.info("No run yet in this session: move a slider on Explore, or import a runs history below.")
else:
    st.subheader(plots.config_label(current.get("config")))
    rows = [{"measure": k, "value": report_html.format_value(v)} for k, v in report_html.results_rows(current)]
    st.dataframe(rows, hide_index=True, width="stretch", height=36 * (len(rows) + 1) + 4)
    title = f"LM Compression Lab — {current.get('model')}"
    # Built only when clicked (plotly.js is inlined: ~5 MB), from this session's own results.
    st.download_button("Download the HTML report", type="primary", mime="text/html",
                       file_name="lmcompress-report.html",
                       data=lambda: report_html.build_report(current, trail, title=title).encode("utf-8"))
    st.caption("One file with settings, tables, interactive charts, generations and machine/library versions; "
               "it opens offline in any browser.")
    st.page_link("pages/present.py", label="Presentation mode (large type, no controls)", icon=":material/slideshow:")

st.divider()
st.subheader("Runs history")
st.caption("Export before a server restart and import afterwards: the trail and the current run come back.")
left, right = st.columns(2)
with left:
    st.download_button(f"Export {len(trail)} run(s) as JSON", common.trail_json().encode("utf-8"),
                       file_name="lmcompress-runs.json", mime="application/json", disabled=not trail)
with right:
    upload = st.file_uploader("Import a runs history (JSON)", type=["json"], key="history_upload")
    imported = st.session_state.setdefault("imported_files", [])
    if upload is not None and upload.file_id not in imported:
        try:
            count = common.import_trail(upload.getvalue())
        except ValueError as exc:
            common.error("This file cannot be imported", exc)
        else:
            st.session_state["imported_files"] = imported + [upload.file_id]
            st.success(f"Imported {count} run(s).")
            st.rerun()
for model in dict.fromkeys(r.get("model") for r in trail):   # one chart per model: sizes differ by 30×
    runs = [r for r in trail if r.get("model") == model]
    current_index = next((i for i, r in enumerate(runs) if current and r.get("run_key") == current.get("run_key")),
                         None)
    common.figure(plots.trail_figure(runs, current=current_index),
                  f"Every configuration tried on {model} in this session (a setting tried twice is one point).")

if current is not None:
    st.divider()
    st.subheader("Take the compressed model away")
    common.export_download(current, key="report_export")
