"""Trade-offs: sweep a grid of configurations, Pareto frontiers, the table as CSV, per-layer sensitivity.

Sweeps and sensitivity run in this process or on Ray: a cluster address from the environment variable
LMCOMPRESS_RAY_ADDRESS or `ray_address` in .streamlit/secrets.toml, else a local Ray on this machine.
"""
import os
from dataclasses import replace

import pandas as pd
import streamlit as st

from lmcompress_core import sweep
from lmcompress_core.report import plots
from lmcompress_core.compress import Cancelled
from lmcompress_core.execute import make_executor
from lmcompress_core.measure.protocol import calibration_for
from lmcompress_core.measure.sensitivity import layer_sensitivity
from pages import common
from pages.common import WIDGETS, build_config

common.through_app()

st.title("Trade-offs")
st.caption("Evaluate a grid of configurations and keep the ones nothing else beats (the Pareto frontier).")
loaded = common.current_model()
if loaded is None:
    st.stop()


def ray_address() -> str | None:
    """The cluster to join: LMCOMPRESS_RAY_ADDRESS, else ray_address in secrets.toml, else None (local Ray)."""
    try:
        from_secrets = st.secrets.get("ray_address")
    except Exception:  # no secrets.toml at all
        from_secrets = None
    return os.environ.get("LMCOMPRESS_RAY_ADDRESS") or from_secrets or None


BACKENDS = {"serial": "This process (serial)",
            "ray": f"Ray: {ray_address() or 'local Ray on this machine'}"}


def chosen_executor():
    backend = st.session_state.get("sweep_backend", "serial")
    return make_executor(backend, address=ray_address() if backend == "ray" else None)


# A multiselect keeps its chips on one scrolling, faded line: in a quarter-width column "8" vanished and RTN read
# "TN". The form has two columns, and static CSS wraps the chips onto as many lines as they need.
st.html("<style>[data-testid='stMultiSelect'] .react-aria-ComboBox > div[role='group'] {height: auto !important;"
        " max-height: none !important; flex-wrap: wrap !important;}"
        "[data-testid='stMultiSelectTagsContainer'] {flex-wrap: wrap !important; overflow: visible !important;"
        " mask-image: none !important; -webkit-mask-image: none !important;}</style>")

with st.form("sweep_form"):
    c1, c2 = st.columns(2)
    c3, c4 = st.columns(2)
    bits = c1.multiselect("Bit-widths", [2, 3, 4, 5, 6, 8, 16], default=[2, 3, 4, 8])
    sparsities = c2.multiselect("Sparsity (%)", [0, 25, 50, 75, 90], default=[0, 50])
    methods = c3.multiselect("Quantizer", ["rtn", "gptq"], default=["rtn"], format_func=str.upper)
    eval_tokens = c4.select_slider("Evaluation tokens", [128, 256, 512, 1024], value=256)
    st.radio("Run on", list(BACKENDS), format_func=BACKENDS.get, horizontal=True, key="sweep_backend",
             help="Ray runs one configuration per worker, each worker loading the model once.")
    submitted = st.form_submit_button("Run sweep", type="primary")


def count(n: int) -> str:
    return f"{n} configuration{'' if n == 1 else 's'}"


def keep_partial(running: dict) -> None:
    """A sweep that did not finish (Stop, Streamlit's own stop, a rerun, a page switch): say so and keep its rows."""
    rows, total = running["rows"], running["total"]
    kept = (f"the {count(len(rows))} that finished {'is' if len(rows) == 1 else 'are'} kept, shown as a partial "
            "table until a sweep completes" if rows else "nothing from it was kept")
    previous = "the previous complete table is unchanged" if st.session_state.get("sweep") else "no complete table yet"
    st.info(f"Sweep stopped after {len(rows)} of {total} configurations: {kept}; {previous}.")
    if rows:
        st.session_state["sweep_partial"] = {"model": running["model"], "rows": rows, "total": total}


def collect_rows(progress) -> None:
    if progress.metrics.get("row") is not None:
        st.session_state["sweep_running"]["rows"].append(progress.metrics["row"])


def start_sweep(status, configs) -> dict | None:
    """Run the sweep with a Stop button and one progress bar; the finished result, or None (stopped / failed).

    Finished rows go into session_state["sweep_running"] as they come, so an interrupted sweep (the script
    stopped between two st calls) leaves them for the next run of the page to keep as partial.
    """
    st.session_state["stop_requested"] = False
    st.session_state["sweep_running"] = {"model": loaded.name, "rows": [], "total": len(configs)}
    with status.container(key="running-sweep"):   # hidden by app.py's CSS whenever no script runs
        st.button("Stop", on_click=common.request_stop, help="Stop after the configuration running now.")
        bar = st.progress(0.0, text=f"{len(configs)} configurations")
    try:
        protocol = replace(common.protocol(), eval_tokens=eval_tokens, generation=False, latency_runs=3)
        executor = chosen_executor()
        table = sweep.run_sweep(loaded, configs, callback=common.progress_callback(bar, collect_rows),
                                should_stop=common.should_stop, executor=executor, protocol=protocol)
        executor.release()  # a local Ray stays up for the next sweep; its workers go
    except Cancelled:
        status.empty()
        keep_partial(st.session_state.pop("sweep_running"))
        return None
    except ValueError as exc:
        st.session_state.pop("sweep_running", None)
        status.empty()
        common.error("Sweep failed", exc)
        return None
    st.session_state.pop("sweep_running", None)
    st.session_state.pop("sweep_partial", None)
    status.empty()
    return {"model": loaded.name, "table": table, "backend": table.attrs["backend"],
            "failures": table.attrs["failures"], "protocol": protocol.describe()}


def show_sweep(result: dict, previous: bool = False) -> None:
    """Charts, table and CSV of one sweep (the original model as the first row); a previous one is dimmed."""
    table = sweep.with_original(result["table"])
    if previous:
        st.badge(f"previous result shown: {count(len(result['table']))} on {result['model']}", color="gray")
    else:
        st.subheader(f"{count(len(result['table']))} on {result['model']}, beside the original")
        st.caption(common.md_escape(f"Ran on {result.get('backend', 'this process')}. "
                                    f"Protocol: {result.get('protocol', 'not recorded')}."))
        for failure in result.get("failures", []):
            st.warning(common.md_escape(f"{failure['label']} failed twice and is left out: {failure['error']}"))
    key = "previous" if previous else "result"
    note = sweep.latency_frontier_note(table)
    size_fig, latency_fig = plots.sweep_figures(table, note)
    left, right = st.columns(2)
    with left:
        common.figure(size_fig, "" if previous else "Size: bytes of the packed files of each compressed setting, fp32 "
                      "bytes for the original; perplexity on the model's evaluation text, the same tokens for every "
                      "point.", key=f"{key}-size-chart")
    with right:
        common.figure(latency_fig, "" if previous else "Median of 3 timed decode runs per configuration on this "
                      "machine's CPU threads, each timed alternately with the original (the original's point is the "
                      "median of those runs)." + (f" No frontier: {note}." if note else ""),
                      key=f"{key}-latency-chart")
    shown = sweep.readable_table(table)
    st.dataframe(shown.drop(columns=[sweep.READABLE["config"]]), hide_index=True, width="stretch")
    if not previous:
        st.download_button("Download the table (CSV)", shown.to_csv(index=False).encode("utf-8"),
                           file_name=f"sweep-{result['model'].replace('/', '_')}.csv", mime="text/csv")


notice, status, result_slot = st.container(), st.empty(), st.empty()
interrupted = st.session_state.pop("sweep_running", None)
if interrupted is not None:
    with notice:
        keep_partial(interrupted)
if submitted:
    try:
        configs = sweep.grid(bits or [4], [s / 100 for s in sparsities or [0]], methods or ["rtn"])
    except ValueError as exc:
        common.error("Invalid sweep", exc)
        st.stop()
    if st.session_state.get("sweep") is not None:   # drawn first: a sweep stopped mid-way leaves it on screen
        with result_slot.container(key="previous-sweep"):
            show_sweep(st.session_state["sweep"], previous=True)
    with notice:
        finished = start_sweep(status, configs)
    if finished is not None:
        st.session_state["sweep"] = finished

result = st.session_state.get("sweep")
if result is not None:
    with result_slot.container(key="result-sweep"):
        show_sweep(result)
partial = st.session_state.get("sweep_partial")
if partial is not None:
    st.subheader(f"Partial sweep (stopped): {len(partial['rows'])} of {partial['total']} configurations "
                 f"on {partial['model']}")
    table = sweep.with_original(sweep.with_pareto(pd.DataFrame(partial["rows"], columns=sweep.COLUMNS)))
    st.dataframe(sweep.readable_table(table).drop(columns=[sweep.READABLE["config"]]), hide_index=True,
                 width="stretch")

st.divider()
st.subheader("Per-layer sensitivity")
st.caption("Each layer quantized alone at each bit-width: signal-to-quantization-noise ratio of its weights.")
try:
    explore_config = build_config({**WIDGETS, **st.session_state["settings"], "kd": False})
except ValueError as exc:
    common.error("Invalid Explore setting", exc)
    st.stop()
sens_bits = st.multiselect("Bit-widths to compare", [2, 3, 4, 5, 6, 8], default=[2, 3, 4, 8], key="sens_bits")
st.caption(f"Other settings from Explore: {common.md_escape(plots.config_label(explore_config.to_dict()))}")
if st.button("Compute sensitivity"):
    try:
        with st.spinner("Quantizing each layer at each bit-width…"):
            calibration = calibration_for(loaded, explore_config, common.protocol())   # GPTQ / Wanda need it
            executor = chosen_executor()
            frame = layer_sensitivity(loaded, explore_config, bits_list=tuple(sens_bits or [4]),
                                      calibration=calibration, executor=executor)
            executor.release()
    except ValueError as exc:
        common.error("Cannot compute sensitivity", exc)
    else:
        st.session_state["sensitivity"] = {"model": loaded.name, "frame": frame, "backend": executor.describe()}
sens = st.session_state.get("sensitivity")
if sens is not None:
    common.figure(plots.sensitivity_heatmap(sens["frame"]),
                  f"{sens['model']}: SQNR = 10·log10(‖W‖² / ‖W − Ŵ‖²) per layer; darker = more damaged. "
                  f"Ran on {sens.get('backend', 'this process')}.")
