"""Streamlit helpers shared by the pages: session defaults, the model sidebar, cached loading, progress, safe text.

Heavy objects (models) live in ``st.cache_resource`` and are never mutated: compress() works on a copy.
Per-person results (the trail of runs, the current report) live in ``st.session_state`` only, so two
browser sessions never see each other's work. Results are written to session state only once a run is
complete; a rerun that interrupts a run (a slider moved, Stop pressed) leaves the previous state intact.
"""
from __future__ import annotations

import gc
import html
import json
import re
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import streamlit as st

from lmcompress_core.report import plots
from lmcompress_core.compress import CompressionConfig
from lmcompress_core.methods.distill import DEFAULT_TEMPERATURE, DistillationConfig
from lmcompress_core.methods.prune import PruningConfig
from lmcompress_core.methods.quantize import QuantizationConfig
from pages.spans import span

HUB, LOCAL, UPLOAD = "Hugging Face id…", "Local folder…", "Upload an archive…"
MAX_TRAIL = 200           # runs kept per session (the trail chart and the JSON export)
RESULT_CACHE_SIZE = 64    # finished reports shared by identical requests across sessions
PROMPT_SHOWN_CHARS = 600  # a very long prompt is shown by its end (the part the models continue)
DEFAULT_PROMPT = "To be, or not to be, that is the question:"

SESSION_DEFAULTS = {
    "model_name": None,   # resolved on first run: ?model=… query parameter, else the default if ready, else tiny
    "trail": [],          # finished Report dicts, oldest first
    "current": None,      # the Report dict shown on Explore / Report / Presentation
    "stop_requested": False,
    "settings": {},       # Explore's slider values, kept across page switches
}

BITS = [2, 3, 4, 5, 6, 8, 16]
WIDGETS = {  # widget key -> default; values survive page switches through st.session_state["settings"]
    "bits": 4, "sparsity": 0, "temperature": DEFAULT_TEMPERATURE, "kd": False, "steps": 20,
    "granularity": "group", "group_size": 128, "symmetric": False, "method": "rtn",
    "prune_method": "magnitude", "pattern": "unstructured", "alpha": 0.5, "eval_tokens": 512,
    "new_tokens": 32, "latency_runs": 5, "runtime": "real", "grid": "integer-zero", "prompt": DEFAULT_PROMPT,
    "precise": False,
}


def build_config(s: dict) -> CompressionConfig:
    """Widgets -> CompressionConfig; the config classes validate and raise ValueError with a message."""
    q = QuantizationConfig(bits=s["bits"], granularity=s["granularity"], group_size=s["group_size"],
                           symmetric=s["symmetric"], method=s["method"], grid=s.get("grid", "integer-zero"))
    prune = s["sparsity"] > 0 or s["pattern"] != "unstructured"
    p = PruningConfig(sparsity=s["sparsity"] / 100, method=s["prune_method"], pattern=s["pattern"]) if prune else None
    d = DistillationConfig(temperature=s["temperature"], alpha=s["alpha"], steps=int(s["steps"])) if s["kd"] else None
    return CompressionConfig(quantization=q, pruning=p, distillation=d, runtime=s.get("runtime", "real"))


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:=])")


def through_app() -> None:
    """Run this page through app.py. Streamlit's old multipage mode (a ``pages/`` folder beside the entry script)
    stays on in a fresh server until the first ``st.navigation`` call, so the first session opened on a page's
    URL (a reload after a restart, a shared link) would run the page file alone, without the session defaults
    and the navigation. Switch that mode off and run again: app.py then calls st.navigation and runs the page.
    A no-op whenever app.py ran first (it sets the session defaults), e.g. in every AppTest."""
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory and "settings" not in st.session_state:   # app.py has not run
        PagesManager.uses_pages_directory = False
        st.rerun()


def init_session() -> None:
    fresh = "settings" not in st.session_state
    for key, value in SESSION_DEFAULTS.items():
        if key not in st.session_state:
            st.session_state[key] = value.copy() if isinstance(value, (list, dict)) else value
    if st.session_state["model_name"] is None:
        st.session_state["model_name"] = _initial_model()
    if fresh:  # a reload or a shared link: the URL carries the settings
        settings, ignored = settings_from_query(dict(st.query_params))
        st.session_state["settings"] = {**settings, **st.session_state["settings"]}
        st.session_state["ignored_query"] = ignored


MAX_URL_PROMPT = 500   # longer prompts stay out of the URL (a link still reproduces the compression setting)


def settings_to_query(settings: dict) -> dict[str, str]:
    """Explore's settings that differ from the defaults, as URL query parameters."""
    out = {}
    for key, default in WIDGETS.items():
        value = settings.get(key, default)
        if value == default or (key == "prompt" and len(str(value)) > MAX_URL_PROMPT):
            continue
        out[key] = ("1" if value else "0") if isinstance(default, bool) else str(value)
    return out


def settings_from_query(params: dict) -> tuple[dict, list[str]]:
    """(settings, names ignored) from URL query parameters; a value of the wrong type is ignored, not guessed."""
    settings, ignored = {}, []
    for key, raw in params.items():
        if key not in WIDGETS:
            continue
        default = WIDGETS[key]
        try:
            if isinstance(default, bool):
                if raw not in ("0", "1"):
                    raise ValueError(raw)
                settings[key] = raw == "1"
            else:
                settings[key] = type(default)(raw)
        except (TypeError, ValueError):
            ignored.append(key)
    return settings, ignored


def _initial_model() -> str:
    wanted = st.query_params.get("model")
    if wanted:
        return str(wanted)
    ready = {m["name"] for m in model_list() if m.get("available")}
    return "default" if "default" in ready else "tiny"


# ---------------------------------------------------------------- text shown as text

def md_escape(text: object) -> str:
    """Backslash-escape markdown (and HTML) so st.markdown/st.error show ``text`` literally."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def show_text(text: object, muted: bool = False) -> None:
    """Show text from a person or a model as plain text: escaped HTML, no markdown processing."""
    style = " style='color:#555'" if muted else ""
    st.html(f"<div{style}>{html.escape(str(text))}</div>")


def error(message: str, detail: object = "") -> None:
    st.error(message + (f": {md_escape(detail)}" if detail != "" else ""))


# ---------------------------------------------------------------- models

@st.cache_data(ttl=60, show_spinner=False)
def model_list() -> list[dict]:
    from lmcompress_core.models.loading import list_models

    return list_models()


def loaded_model(name: str):
    """The LoadedModel for ``name`` from the app's shared cache (loaded once per process, never mutated)."""
    return _load(name)


@st.cache_resource(max_entries=4, show_spinner=False)
def _load(name: str):
    # A ModelError is not cached: the next attempt (after fixing the path, say) tries again.
    from lmcompress_core.models.loading import load_model

    loaded = load_model(name)
    _out_of_the_collectors_way()
    return loaded


def _out_of_the_collectors_way() -> None:
    """Move every object alive now (the libraries, those a model load imports, the model) to the garbage
    collector's permanent generation. Streamlit collects all generations after every script run
    (runner.postScriptGC) and holds the interpreter for the whole scan: ~0.25 s with SmolLM2 loaded here (450,000
    objects), during which no other script runs and a distilling run cannot notice a click that stops it (0.26 s
    of a 0.58 s stop, measured in the browser). What is frozen lives as long as the server (modules, cached
    models); reference counting still frees anything that dies, only a reference cycle among frozen objects
    would stay."""
    gc.collect()
    gc.freeze()


def current_model():
    """Draw the model sidebar; the LoadedModel chosen there, or None after a clear message (the app stays usable)."""
    from lmcompress_core.models.loading import ModelError

    model_sidebar()
    name = st.session_state.get("model_name")
    if not name:
        st.info("Choose a model in the sidebar: pick one from the list, type a Hugging Face id or a folder, or "
                "upload an archive.")
        return None
    try:
        with st.spinner(f"Loading {md_escape(name)}…"):
            loaded = _load(name)
        model_card(loaded.card)
        return loaded
    except ModelError as exc:
        error(f"Cannot load model '{md_escape(name)}'", exc)
    except (OSError, ValueError, RuntimeError) as exc:
        error(f"Cannot load model '{md_escape(name)}' ({type(exc).__name__})", exc)
    st.caption("Pick another model in the sidebar; everything else keeps working.")
    return None


def model_card(card) -> None:
    """The loaded model's card in the sidebar; every field shown as plain text (cards can hold anything)."""
    with st.sidebar.expander("Model card"):
        for label, value in (("name", card.name), ("source", card.source), ("license", card.license),
                             ("parameters", f"{card.params:,}" if card.params else "unknown"),
                             ("", card.description), ("", card.notes)):
            if value:
                show_text(f"{label}: {value}" if label else value)


def _model_label(models: dict[str, dict]) -> Callable[[str], str]:
    def label(option: str) -> str:
        info = models.get(option)
        if info is None:
            return option
        params = f" · {info['params'] / 1e6:.1f}M" if info.get("params") else ""
        missing = "needs download" if info.get("source") == "hub" else "missing"
        ready = "" if info.get("available") else f" · {missing}"
        return f"{option}{params}{ready}"
    return label


def model_sidebar() -> None:
    """Model picker: default / tiny / hub presets, a hub id, a local folder, an uploaded archive."""
    models = {m["name"]: m for m in model_list()}
    options = list(models) + [HUB, LOCAL, UPLOAD]
    current = st.session_state["model_name"]
    kind = _custom_kind(current)
    index = options.index(current) if current in options else options.index(kind or HUB)
    with st.sidebar:
        st.header("Model")
        choice = st.selectbox("Model", options, index=index, format_func=_model_label(models),
                              key="model_choice", label_visibility="collapsed")
        name = _custom_name(choice, current) if choice in (HUB, LOCAL, UPLOAD) else choice
        if name != current:   # an empty custom field means "no model yet", never the previous one
            st.session_state["model_name"] = name or ""
        info = models.get(choice)
        if info and not info.get("available"):
            st.warning(md_escape(info.get("status") or "needs download, offline"))
        if info and info.get("description"):
            show_text(info["description"], muted=True)


def _custom_kind(name: str | None) -> str | None:
    """Which custom choice a model name came from; None for the listed models (default, tiny, presets)."""
    if not name or name in {m["name"] for m in model_list()}:
        return None
    if name.startswith(str(Path(tempfile.gettempdir()) / "lmcompress-upload-")):
        return UPLOAD
    return LOCAL if name and (name.startswith(("/", ".", "~")) or "\\" in name) else HUB


def _custom_name(choice: str, current: str | None) -> str | None:
    previous = current if current and _custom_kind(current) == choice else ""
    if choice == UPLOAD:
        return _uploaded_model(previous)
    key = "hub_id" if choice == HUB else "local_folder"
    if key not in st.session_state:
        st.session_state[key] = previous
    if choice == HUB:
        return st.text_input("Hugging Face id", key=key, placeholder="HuggingFaceTB/SmolLM2-135M").strip()
    return st.text_input("Folder with config.json + safetensors", key=key).strip()


def _uploaded_model(previous: str) -> str | None:
    upload = st.file_uploader("Model archive (.zip, .tar, .tar.gz)", type=["zip", "tar", "gz", "tgz"])
    if upload is None:
        return previous or ""
    extracted = st.session_state.setdefault("uploads", {})
    if upload.file_id in extracted:
        return extracted[upload.file_id]
    from lmcompress_core.models.archive import ArchiveError, extract_model_archive

    # The upload is untrusted: archive.py checks every member before writing anything into a temp folder.
    with tempfile.NamedTemporaryFile(prefix="lmcompress-archive-", suffix=".bin") as raw:
        raw.write(upload.getbuffer())
        raw.flush()
        try:
            folder = str(extract_model_archive(raw.name))
        except (ArchiveError, OSError) as exc:
            error("The archive was rejected", exc)
            return previous or ""
    extracted[upload.file_id] = folder
    return folder


# ---------------------------------------------------------------- results

def protocol(precise: bool | None = None):
    """The one measurement protocol of this session, from Explore's settings (its *Measure precisely* switch
    unless ``precise`` is given), shared by every page."""
    settings = {**WIDGETS, **st.session_state.get("settings", {})}
    return protocol_from_settings(settings, settings["precise"] if precise is None else precise)


def protocol_from_settings(s: dict, precise: bool = False):
    """Explore's widget values -> EvalProtocol (the benchmarks call this too, so they measure what the app does).
    Each protocol takes its own knob: the quick one the evaluation tokens, the precise one the timed runs."""
    from lmcompress_core.measure.protocol import EvalProtocol

    prompt = s["prompt"] if str(s["prompt"]).strip() else None
    changes = {"prompt": prompt, "generation": prompt is not None, "new_tokens": s["new_tokens"]}
    if precise:
        return EvalProtocol.precise(**changes, latency_runs=s["latency_runs"])
    return EvalProtocol.explore(**changes, eval_tokens=s["eval_tokens"])


def precision(report: dict) -> tuple[int, int]:
    """How precise a report's measurement is: the full protocol above the quick one, then more tokens scored."""
    proto = report.get("protocol") or {}
    return int(bool(proto.get("latency_base"))), int(proto.get("eval_tokens") or 0)


def setting_key(model: str, config: CompressionConfig) -> str:
    """One setting of one model, whatever protocol measured it: the trail's unit."""
    return json.dumps([model, config.key()], sort_keys=True)


def record_run(report: dict, key: str, setting_key: str) -> None:
    """Make a finished report current. The trail keeps one point per setting (``setting_key``: model and
    configuration): the most precise measurement of it, moved last; so a setting never shows two answers."""
    report = {**report, "run_key": key, "setting_key": setting_key}
    same = [r for r in st.session_state["trail"] if r.get("setting_key", r.get("run_key")) == setting_key]
    kept = max([report, *same], key=precision)   # max keeps the first of equals: on a tie, the new report
    trail = [r for r in st.session_state["trail"] if r.get("setting_key", r.get("run_key")) != setting_key]
    st.session_state["trail"] = (trail + [kept])[-MAX_TRAIL:]
    st.session_state["current"] = report


def trail_json() -> str:
    return json.dumps({"format": "lmcompress-trail", "version": 1, "runs": st.session_state["trail"]}, indent=1)


def import_trail(raw: bytes) -> int:
    """Append runs from an exported JSON history; raises ValueError with a message for a bad file."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a JSON file ({exc})") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ValueError("no 'runs' list in this file — export it from the Report page")
    runs = [r for r in runs if isinstance(r.get("size"), dict) or isinstance(r.get("perplexity"), dict)]
    st.session_state["trail"] = (list(st.session_state["trail"]) + runs)[-MAX_TRAIL:]
    if runs and st.session_state["current"] is None:
        st.session_state["current"] = runs[-1]
    return len(runs)


# ---------------------------------------------------------------- progress and cancellation

# A change made while a run computes starts the new script run at once (Streamlit's fast reruns) and asks the old
# one to stop; the old run notices at its next check (per block, layer, window or token). But the new run's page
# script is Python that holds the interpreter lock most of the time, and the old run needs that lock between two
# tensor operations: on SmolLM2 a distilling run then took up to 0.53 s to reach its next check, instead of one
# block (browser bench). So a new run first waits, at most HANDOFF_S, for this session's running work to stop.
HANDOFF_S = 1.0
_WORK_LOCK = "work_lock"


def _work_lock() -> threading.Lock:
    if _WORK_LOCK not in st.session_state:
        st.session_state[_WORK_LOCK] = threading.Lock()
    return st.session_state[_WORK_LOCK]


def let_abandoned_work_stop(lock: threading.Lock | None = None, timeout: float = HANDOFF_S) -> bool:
    """At the top of each script run: wait (at most ``timeout``) until this session's running work, which the
    rerun has abandoned, has stopped and let go of the machine. Returns whether it had (no work: at once)."""
    lock = _work_lock() if lock is None else lock
    if lock.acquire(timeout=timeout):
        lock.release()
        return True
    return False


@contextmanager
def session_work(lock: threading.Lock | None = None, timeout: float = HANDOFF_S):
    """Hold this session's work lock while computing, so the next script run can wait for the stop; an abandoned
    run that does not let go within ``timeout`` is not waited for. Released without touching st (a stopping
    script raises at its next st call)."""
    lock = _work_lock() if lock is None else lock
    held = lock.acquire(timeout=timeout)
    try:
        yield
    finally:
        if held:
            lock.release()


def request_stop() -> None:
    st.session_state["stop_requested"] = True


def should_stop() -> bool:
    """Stop pressed, or nobody is waiting any more: the browser tab of this session was closed (its connection
    is gone), so the work it asked for is abandoned instead of running on for minutes."""
    return bool(st.session_state.get("stop_requested")) or not _connected()


def _connected() -> bool:
    from streamlit import runtime
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    if ctx is None or not runtime.exists():   # a bare script or an AppTest: no browser to lose
        return True
    return runtime.get_instance().is_active_session(ctx.session_id)


def duration(seconds: float) -> str:
    """'40 s', '3 min', '1 h 05 min': a duration for a person."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def timed_callback(bar, label: str) -> Callable[[int, int, str], None]:
    """A (done, total, what) callback: the bar with the time left (from the pace so far), redrawn at most every
    BAR_INTERVAL_S; raises compress.Cancelled once should_stop() is True (Stop, a closed tab)."""
    from lmcompress_core.compress import Cancelled

    started, last = time.perf_counter(), [0.0]

    def callback(done: int, total: int, what: str) -> None:
        if should_stop():
            raise Cancelled(f"{label} stopped")
        now = time.perf_counter()
        if now - last[0] < BAR_INTERVAL_S and done < total:
            return
        last[0] = now
        left = (now - started) / done * (total - done) if done else None
        eta = f" · about {duration(left)} left" if left is not None and done < total else ""
        bar.progress(min(done / max(total, 1), 1.0), text=f"{label}: {what}{eta}"[:160])
    return callback


# Where each stage of one evaluation sits on the single progress bar, in the order evaluate runs them (the
# engine's own compression stages share the first span): size, perplexity, the streamed generations, latency.
STAGE_SPANS = {"calibrate": (0.0, 0.3), "prune": (0.0, 0.3), "quantize": (0.0, 0.3), "distill": (0.0, 0.3),
               "finish": (0.0, 0.3), "compress": (0.0, 0.3), "size": (0.3, 0.35), "prepare": (0.35, 0.35),
               "perplexity": (0.35, 0.6),
               "generate": (0.6, 0.85), "latency": (0.85, 1.0)}
# exploring reads the latency off the greedy generation: it is done halfway through the generations
GENERATION_TIMED_SPANS = {**STAGE_SPANS, "generate": (0.6, 1.0), "latency": (0.6, 0.8)}
BAR_INTERVAL_S = 0.25  # the bar (and streamed text) is redrawn at most this often: each redraw is work for the
#                       browser too, which shares the 2 cores with the engine (the engine reports every layer, window, token)


def progress_callback(bar, on_metrics: Callable[[object], None] | None = None, spans: dict = STAGE_SPANS):
    """A core Progress callback driving ONE st.progress bar across all stages (it never runs backwards), the
    stage named in its text; ``on_metrics`` is an optional hook for partial results.

    A slider moved during a run is noticed at the script's next Streamlit call (should_stop reads the session
    state; redrawing the bar is another): Streamlit raises its rerun there, inside the engine, which reports
    and asks should_stop per layer, window, generated token and timed run — so the run stops within one of them.
    """
    shown, last = [0.0], [0.0]

    def callback(progress) -> None:
        total = max(int(progress.total or 0), 1)
        within = min(max(progress.step / total, 0.0), 1.0)
        low, high = spans.get(progress.stage, (0.0, 1.0))
        shown[0] = max(shown[0], low + (high - low) * within)
        now = time.perf_counter()
        # redraw at most every BAR_INTERVAL_S, and as each stage ends (a sweep's finished configuration): a redraw
        # per visible jump sent the bar ~10 times a second while compressing, for nothing the eye can follow
        if now - last[0] >= BAR_INTERVAL_S or progress.step >= total:
            last[0] = now
            bar.progress(shown[0], text=f"{progress.stage}: {progress.message}"[:160])
        if on_metrics is not None:
            on_metrics(progress)
    return callback


def evaluate_live(loaded, config, protocol, bar, on_partial: Callable[[dict], None],
                  on_stream: Callable[[dict], None] | None = None) -> dict:
    """Compress and measure with progress. Each finished stage hands the report so far to ``on_partial`` (size,
    then perplexity, then latency and generations in the protocol's order); ``on_stream`` gets the generated text
    as it grows ({"kind", "text"}), at most every BAR_INTERVAL_S.

    Returns the finished report as a plain dict. Raises compress.Cancelled when Stop was pressed.
    """
    from lmcompress_core.measure import evaluation

    streamed = [0.0]

    def partial(progress) -> None:
        if "partial" in progress.metrics:
            on_partial(progress.metrics["partial"])
        # the text so far, redrawn at most every BAR_INTERVAL_S: a redraw per token costs the page more than the
        # token (each is a message to the browser), and the finished text replaces it anyway
        now = time.perf_counter()
        if on_stream is not None and "generation_stream" in progress.metrics and now - streamed[0] >= BAR_INTERVAL_S:
            streamed[0] = now
            on_stream(progress.metrics["generation_stream"])

    callback = progress_callback(bar, on_metrics=partial,
                                 spans=GENERATION_TIMED_SPANS if protocol.times_generation() else STAGE_SPANS)
    with span("evaluate") as record, session_work():
        report = evaluation.evaluate(loaded, config, protocol, callback=callback, should_stop=should_stop).to_dict()
        record["stages"] = report.get("timings")
    return report


def figure(fig, caption: str = "", key: str | None = None, on_select=None, details: str = "") -> None:
    """A plotly figure, its caption (one plain sentence) and, one click away, ``details``: how it was measured.
    ``on_select`` (a callback) makes clicked points a selection event."""
    if on_select is None:
        st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False})
    else:
        st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False}, on_select=on_select,
                        selection_mode="points")
    if caption:
        st.caption(md_escape(caption))
    if details:
        details_popover(details)


def details_popover(text: str, label: str = "How it was measured") -> None:
    """The full, precise text behind a caption, in a popover: read on request, never a wall under a chart."""
    with st.popover(label, icon=":material/info:"):
        st.caption(md_escape(text[:1].upper() + text[1:]))


def details(text: str, label: str = "How it was measured") -> None:
    if text:
        details_popover(text, label)


def caveat(report: dict) -> None:
    """The model's caveat (SmolLM2 here was de-quantized from Q4_1), wherever its results are shown."""
    if report.get("model_caveat"):
        st.caption(":material/warning: " + md_escape(report["model_caveat"]))


def engine_notes(report: dict) -> None:
    """The engine's remarks on a run (layers on no kernel, fallbacks, smoothing), folded: one line until opened."""
    notes = report.get("notes") or []
    if notes:
        with st.expander(f"Engine notes ({len(notes)})"):
            for note in notes:
                st.caption(md_escape(note))


def generations(gen: dict | None) -> None:
    """Greedy continuations side by side with the first divergence highlighted; all text escaped."""
    from lmcompress_core.report.html_report import generation_pair_html

    if not gen:
        return
    base, comp = generation_pair_html(gen)
    prompt = gen.get("prompt") or ""
    shown = prompt if len(prompt) <= PROMPT_SHOWN_CHARS else "…" + prompt[-PROMPT_SHOWN_CHARS:]
    st.html(f"<div><b>Prompt:</b> <span style='white-space:pre-wrap'>{html.escape(shown)}</span></div>")
    if gen.get("notice"):
        st.info(md_escape(gen["notice"]))
    left, right = st.columns(2)
    box = ("<div style='white-space:pre-wrap;overflow-wrap:anywhere;background:#f4f6f8;padding:.8em;"
           "border-radius:6px'>{}</div>")
    with left:
        st.markdown("**Original**")
        st.html(box.format(base))
    with right:
        st.markdown("**Compressed**")
        st.html(box.format(comp))
    if gen.get("first_divergence") is None:
        st.caption("Greedy outputs are identical.")
    else:
        st.caption("Highlighted from the first token where the greedy outputs differ "
                   f"(token {gen['first_divergence']}).")


def config_label(config: dict | None) -> str:
    return plots.config_label(config)


def describe_config(config: dict | None) -> str:
    return plots.describe_config(config)


def export_download(report: dict, key: str) -> None:
    """Download the compressed model of ``report`` as GGUF or a Hugging Face folder. The file is built only on
    request (compressing a copy and writing it takes seconds to a minute, with progress); its size and what is
    quantized are shown before the download. A setting no GGUF type can hold says why instead of a button."""
    from lmcompress_core import export
    from lmcompress_core.compress import Cancelled, CompressionConfig

    fmt = st.radio("Export format", list(export.FORMATS), format_func=lambda f: export.FORMATS[f][0],
                   horizontal=True, key=f"{key}_format")
    refusal = export.gguf_refusal(CompressionConfig.from_dict(report["config"])) if fmt == "gguf" else None
    if refusal:
        st.warning(md_escape(f"No GGUF file for this setting: {refusal}"))
        return
    st.caption(md_escape(export.download_note(report["config"], fmt)))
    wanted = (report.get("run_key"), fmt)
    ready = st.session_state.get("export")   # one prepared file per session (a GGUF of SmolLM2 is ~100 MB)
    if ready is None or ready["for"] != wanted:
        if not st.button("Prepare the file", key=f"{key}_prepare"):
            return
        bar = st.progress(0.0, text="compressing a copy")
        try:
            made = export.prepare_download(loaded_model(report["model"]), report["config"], fmt,
                                           callback=timed_callback(bar, "export"))
        except (Cancelled, ValueError) as exc:
            error("Not exported", exc)
            return
        bar.empty()
        ready = st.session_state["export"] = {"for": wanted, "data": made.data, "summary": made.summary}
    st.caption(md_escape(f"Ready: {ready['summary']}."))
    label, file_name, mime = export.FORMATS[fmt]
    st.download_button(f"Download {label}", data=ready["data"], file_name=file_name, mime=mime,
                       key=f"{key}_download")
    if fmt == "gguf":
        llamacpp_readout(report, ready, key)


def llamacpp_readout(report: dict, ready: dict, key: str) -> None:
    """llama.cpp on the prepared GGUF, on request: its perplexity on this report's tokens and its decode speed beside
    ours. Without llama.cpp built here, one line says how to enable it."""
    from lmcompress_core.measure import llamacpp
    from lmcompress_core.measure.protocol import EvalProtocol

    if llamacpp.import_llama_cpp()[0] is None:
        st.caption(md_escape(f"{llamacpp.HOW_TO_ENABLE}; then this file runs in llama.cpp here, beside our numbers."))
        return
    if "llamacpp" not in ready:
        if not st.button("Run this file in llama.cpp", key=f"{key}_llamacpp"):
            return
        with st.spinner("llama.cpp: perplexity on the same tokens, then its decode speed"):
            ready["llamacpp"] = llamacpp.run_bytes(ready["data"], loaded_model(report["model"]),
                                                   EvalProtocol(**report["protocol"]))
    ppl, latency = report.get("perplexity") or {}, report.get("latency") or {}
    st.caption(md_escape(llamacpp.sentence(ready["llamacpp"], ppl.get("value"), latency.get("decode_tokens_per_s"))))


def config_heading(config: dict | None) -> None:
    """A configuration as a plain-language heading; the compact notation (4-bit g128 asym RTN) on hover."""
    st.subheader(describe_config(config), help=f"In short: {config_label(config)}")
