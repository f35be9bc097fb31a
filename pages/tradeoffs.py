"""Trade-offs: sweep a grid of configurations, Pareto frontiers, the table as CSV, per-layer sensitivity.

Sweeps and sensitivity run in this process or on Ray: a cluster address from the environment variable
LMCOMPRESS_RAY_ADDRESS or `ray_address` in .streamlit/secrets.toml, else a local Ray on this machine.
"""
import os
from dataclasses import replace

import streamlit as st

from lmcompress_core import plots, sweep
from lmcompress_core.compress import Cancelled
from lmcompress_core.execute import make_executor
from lmcompress_core.protocol import calibration_for
from lmcompress_core.sensitivity import layer_sensitivity
from pages import common
from pages.common import WIDGETS, build_config

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


with st.form("sweep_form"):
    c1, c2, c3, c4 = st.columns(4)
    bits = c1.multiselect("Bit-widths", [2, 3, 4, 5, 6, 8, 16], default=[2, 3, 4, 8])
    sparsities = c2.multiselect("Sparsity (%)", [0, 25, 50, 75, 90], default=[0, 50])
    methods = c3.multiselect("Quantizer", ["rtn", "gptq"], default=["rtn"], format_func=str.upper)
    eval_tokens = c4.select_slider("Evaluation tokens", [128, 256, 512, 1024], value=256)
    st.radio("Run on", list(BACKENDS), format_func=BACKENDS.get, horizontal=True, key="sweep_backend",
             help="Ray runs one configuration per worker, each worker loading the model once.")
    submitted = st.form_submit_button("Run sweep", type="primary")

if submitted:
    try:
        configs = sweep.grid(bits or [4], [s / 100 for s in sparsities or [0]], methods or ["rtn"])
    except ValueError as exc:
        common.error("Invalid sweep", exc)
        st.stop()
    st.button("Stop", on_click=common.request_stop)
    st.session_state["stop_requested"] = False
    bar = st.progress(0.0, text=f"{len(configs)} configurations")
    try:
        protocol = replace(common.protocol(), eval_tokens=eval_tokens, generation=False, latency_runs=3)
        executor = chosen_executor()
        table = sweep.run_sweep(loaded, configs, callback=common.progress_callback(bar),
                                should_stop=common.should_stop, executor=executor, protocol=protocol)
        executor.release()  # a local Ray stays up for the next sweep; its workers go
    except Cancelled as exc:
        st.info(f"Sweep stopped ({exc}); the previous table is kept.")
    except ValueError as exc:
        common.error("Sweep failed", exc)
    else:
        st.session_state["sweep"] = {"model": loaded.name, "table": table, "backend": table.attrs["backend"],
                                     "failures": table.attrs["failures"]}
    bar.empty()

result = st.session_state.get("sweep")
if result is not None:
    table = result["table"]
    st.subheader(f"{len(table)} configurations on {result['model']}")
    st.caption(f"Ran on {result.get('backend', 'this process')}.")
    for failure in result.get("failures", []):
        st.warning(f"{failure['label']} failed twice and is left out: {failure['error']}")
    left, right = st.columns(2)
    with left:
        common.figure(plots.pareto_figure(table, "size_mb", "perplexity", "Size vs perplexity",
                                          "packed size (MB)", "perplexity", frontier="pareto_size"),
                      "Packed size from the bytes really written; perplexity on the model's evaluation text.")
    with right:
        common.figure(plots.pareto_figure(table, "decode_ms_per_token", "perplexity", "Latency vs perplexity",
                                          "decode time per token (ms)", "perplexity", frontier="pareto_latency"),
                      "Median of 3 timed decode runs per configuration on this machine's CPU threads.")
    shown = table.drop(columns=["config"])
    st.dataframe(shown, hide_index=True, width="stretch")
    st.download_button("Download the table (CSV)", table.to_csv(index=False).encode("utf-8"),
                       file_name=f"sweep-{result['model'].replace('/', '_')}.csv", mime="text/csv")

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
