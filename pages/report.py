"""Report: what a stakeholder needs first (the chosen setting in plain words, size / speed / quality against the
original and how each was measured, the trail, the session's sweep, sensitivity and distillation), engine
internals folded away; one click -> a self-contained HTML report; the runs history exported and imported as JSON."""
import streamlit as st

from lmcompress_core import sweep
from lmcompress_core.report import plots
from lmcompress_core.report import html_report
from pages import common

common.through_app()

st.title("Report")
common.model_sidebar()
current = st.session_state.get("current")
trail = list(st.session_state["trail"])
extras = {"sweep": st.session_state.get("sweep"), "sensitivity": st.session_state.get("sensitivity"),
          "distillation": st.session_state.get("kd_result")}


def lead(report: dict) -> None:
    """The chosen setting in plain words, then size, speed and quality against the original, each with its how."""
    common.config_heading(report.get("config"))
    st.caption(common.md_escape(f"on {report.get('model')}, measured by the {plots.protocol_name(report)}"))
    rows = html_report.summary_rows(report)
    for col, (what, value, how) in zip(st.columns(len(rows) or 1), rows):
        with col:
            st.markdown(f"**{what}**")
            st.markdown(common.md_escape(value))
            common.details(how)
    common.caveat(report)
    if common.precision(report)[0] == 0:
        offer_precise(report)


def offer_precise(report: dict) -> None:
    """A quick-protocol result: say so, and measure this same setting by the full protocol on request (never
    silently: the Report shows what Explore measured until asked)."""
    from lmcompress_core.compress import Cancelled, CompressionConfig

    st.info("These numbers come from the quick protocol used while exploring. The full protocol scores 2048 tokens "
            "and times the original and the compressed model alternately, which gives the speed ratio.")
    if not st.button("Measure precisely", key="report_precise"):
        return
    loaded = common.loaded_model(report["model"])
    config = CompressionConfig.from_dict(report["config"])
    bar = st.progress(0.0, text="starting")
    try:
        precise = common.evaluate_live(loaded, config, common.protocol(precise=True), bar, lambda partial: None)
    except (Cancelled, ValueError) as exc:
        common.error("Not measured", exc)
        return
    common.record_run(precise, "report-precise", common.setting_key(loaded.name, config))
    st.rerun()


def session_results() -> None:
    """The session's sweep (Trade-offs), per-layer sensitivity and distillation, when they exist."""
    if extras["sweep"] is not None:
        result = extras["sweep"]
        table = sweep.with_original(result["table"])
        st.subheader(f"Trade-offs: {len(result['table'])} configurations on {result['model']}")
        figures = plots.sweep_figures(table, sweep.latency_frontier_note(table))
        for col, fig, name in zip(st.columns(2), figures, ("size", "latency")):
            with col:
                common.figure(fig, key=f"report-sweep-{name}")
        with st.expander("The sweep's table"):
            st.dataframe(sweep.readable_table(table).drop(columns=[sweep.READABLE["config"]]), hide_index=True)
    if extras["sensitivity"] is not None:
        st.subheader(f"Per-layer sensitivity on {extras['sensitivity']['model']}")
        common.figure(plots.sensitivity_heatmap(extras["sensitivity"]["frame"]),
                      "Each layer quantized alone at each bit-width: SQNR of its weights; darker = more damaged.")
    if extras["distillation"] is not None:
        kd = extras["distillation"]
        st.subheader(f"Distillation: {plots.describe_config(kd.get('config'))}")
        left, right = st.columns(2)
        with left:
            common.figure(plots.stages_perplexity_figure(kd, kd.get("before")),
                          plots.report_how(kd).get("perplexity", ""))
        with right:
            common.figure(plots.loss_curve_figure(kd.get("history") or []), "KD loss per optimiser step.")


def engine_details(report: dict) -> None:
    with st.expander("Engine details: the settings as the engine stores them, the protocol, every number"):
        settings = html_report.flatten("", report.get("config") or {})
        st.dataframe([{"setting": k, "value": html_report.format_value(v)} for k, v in settings], hide_index=True,
                     width="stretch")
        st.caption(common.md_escape("Protocol: " + ", ".join(
            f"{k}={html_report.format_value(v)}" for k, v in (report.get("protocol") or {}).items())))
        rows = [{"measure": k, "value": html_report.format_value(v)} for k, v in html_report.results_rows(report)]
        st.dataframe(rows, hide_index=True, width="stretch", height=36 * (len(rows) + 1) + 4)


if current is None:
    st.info("No run yet in this session: move a slider on Explore, or import a runs history below.")
else:
    lead(current)
    title = f"LM Compression Lab — {current.get('model')}"
    # Built only when clicked (plotly.js is inlined: ~5 MB), from this session's own results.
    st.download_button("Download the HTML report", type="primary", mime="text/html",
                       file_name="lmcompress-report.html",
                       data=lambda: html_report.build_report(current, trail, title=title, **extras).encode("utf-8"))
    st.caption("One file with the same summary, the interactive charts, the generations, this session's sweep, "
               "sensitivity and distillation results, and the engine details folded at the end; it opens offline.")
    st.page_link("pages/present.py", label="Presentation mode (large type, no controls)", icon=":material/slideshow:")

if trail:
    st.subheader("Every setting tried")
for model in dict.fromkeys(r.get("model") for r in trail):   # one chart per model: sizes differ by 30×
    runs = [r for r in trail if r.get("model") == model]
    current_index = next((i for i, r in enumerate(runs)
                          if current and r.get("setting_key") == current.get("setting_key")), None)
    common.figure(plots.trail_figure(runs, current=current_index),
                  f"Every configuration tried on {model} in this session (a setting tried twice is one point).")
session_results()
if current is not None:
    engine_details(current)

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

if current is not None:
    st.divider()
    st.subheader("Take the compressed model away")
    common.export_download(current, key="report_export")
