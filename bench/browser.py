"""Browser: what a person feels — from releasing a slider to the charts and generations, in a real Chromium.

`streamlit run app.py` on 127.0.0.1 (a fresh server per model, bench/server.py) is driven by headless Debian
Chromium through playwright, as bench/loadtest.py does. Explore draws three result charts (model size,
latency, perplexity) and the side-by-side generations. A monitor script inside the page (MONITOR_JS) watches
the DOM and stamps, on the browser's own clock from the key press or click that changes a setting:
  first chart   a result chart (not the dimmed "previous result" copy) shows data different from before, while
                the heading names the new configuration
  all charts    all three result charts show new data and the heading names the new configuration alone
  complete      all charts, the generations shown, and the script run finished (nothing running, no Stop)
  cold          from opening the URL to the first complete page (fresh server: imports, model load, first run)
Moves go to configurations not seen before (RTN bit-widths and magnitude sparsities; the headline is their
median); GPTQ and Wanda moves are reported apart, and so is a move back to a configuration already computed
("cached": no evaluate, the page and the browser alone; it also leaves pruning before the GPTQ moves).
On SmolLM2, moves are then made while the previous one still computes (at 10–90% of a median move's duration):
  abandon       from that key press to the interrupted run's script ending on the server (its span)

Where the time goes: the server writes timing spans (pages/spans.py, switched on by LMCOMPRESS_SPANS) for each
script run and for `measure.evaluate` with its stage timings; the websocket frames the browser receives are
counted. Each move is split into: release -> script start (browser, websocket, Streamlit scheduling), script
start -> evaluate (the page's preamble: sidebar, model cache, widgets), evaluate
(its timed stages, and outside them: calibration data, cache look-ups, the page's progress callbacks and partial
chart), evaluate -> script end (figures, generations, trail), and
script end -> complete (the last messages and Plotly drawing in the browser).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.loadtest import BITS_LABEL, CHROMIUM, CHROMIUM_ARGS, SPARSITY_LABEL, move
from bench.server import Server, cpu_seconds, process_tree

# what run() returns, key for key (bench/__main__.py checks it)
KEYS = ("headline", "models", "protocol", "how", "profile", "seconds")

WAIT_S = 300            # longest wait for one complete page (a cold SmolLM2 start on a loaded machine)
SETTLE_S = 1.0          # a complete page must stay complete (nothing running) this long before the next move
ROLES = ("size", "latency", "perplexity")
# issue 12: a move made while a run computes stops that run within 0.5 s. The interrupting key press comes at
# these fractions of a median move's duration (first chart to generations).
INTERRUPT_AT = (0.1, 0.3, 0.5, 0.7, 0.9)
# The same while distilling (Distil on at the page's default steps: SmolLM2's steps begin ~1.5 s into the run and
# take ~4 s each): Distil is switched off again these many seconds after it was switched on.
DISTIL_INTERRUPT_AT = (2.5, 3.8, 5.1, 6.4, 7.7)
DISTIL_LABEL = "Distil"   # Explore's toggle

# The monitor installed in every document before the app's own scripts. Charts are Plotly graph divs
# (.js-plotly-plot, whose .data holds the traces); a chart inside a "st-key-previous-*" container is the dimmed
# previous result and never counts. A chart is "new" when its trace values differ from those shown when armed.
MONITOR_JS = r"""
(() => {
  const ROLES = [["size", /^(<b>)*Model size/], ["latency", /^(<b>)*Latency/], ["perplexity", /^(<b>)*Perplexity/]];
  const bench = window.__lmBench = {armed: false, start: null, label: null, baseline: {}, marks: {}};
  const title = gd => { const t = (gd.layout || {}).title; return typeof t === "string" ? t : ((t || {}).text || ""); };
  bench.charts = () => {
    const out = {};
    for (const gd of document.querySelectorAll(".js-plotly-plot")) {
      if (gd.closest('[class*="st-key-previous-"]') || !gd.data) continue;
      const role = ROLES.find(([, re]) => re.test(title(gd)));
      if (role) (out[role[0]] = out[role[0]] || []).push(JSON.stringify(gd.data.map(t => [t.x, t.y, t.text])));
    }
    return out;
  };
  bench.headings = () => Array.from(document.querySelectorAll("h3")).map(h => (h.innerText || "").trim());
  bench.running = () => {
    const q = s => Array.from(document.querySelectorAll(s));
    return q('[data-testid="stStatusWidget"]').some(e => /running|stop/i.test(e.innerText || ""))
      || q("button").some(b => (b.innerText || "").trim() === "Stop") || q('[data-testid="stProgress"]').length > 0;
  };
  bench.errors = () => Array.from(document.querySelectorAll(
    '[data-testid="stException"], [data-testid="stAlertContentError"]')).map(e => (e.innerText || "").slice(0, 300));
  bench.check = () => {
    if (!bench.armed || bench.start === null) return;
    const now = performance.now(), marks = bench.marks, label = bench.label;
    const headings = bench.headings(), charts = bench.charts();
    const named = headings.some(h => h === label || h.endsWith(": " + label)), alone = headings.includes(label);
    const fresh = ROLES.map(([r]) => r).filter(r => (charts[r] || []).some(f => f !== bench.baseline[r]));
    if (named && fresh.length && marks.first == null) { marks.first = now; marks.first_role = fresh[0]; }
    if (alone && fresh.length === ROLES.length && marks.all == null) marks.all = now;
    const generations = !bench.generation || headings.includes("Generations");
    if (marks.all != null && generations && !bench.running() && marks.complete == null) marks.complete = now;
  };
  bench.arm = (label, generation, start) => {
    const charts = bench.charts();
    bench.baseline = Object.fromEntries(ROLES.map(([r]) => [r, (charts[r] || [])[0]]));
    Object.assign(bench, {label, generation, marks: {}, start: start === undefined ? null : start, armed: true});
  };
  const stamp = () => { if (bench.armed && bench.start === null) bench.start = performance.now(); };
  window.addEventListener("keydown", stamp, true);
  window.addEventListener("click", stamp, true);
  let queued = false;
  new MutationObserver(() => {
    if (!queued) { queued = true; setTimeout(() => { queued = false; bench.check(); }, 0); }
  }).observe(document, {subtree: true, childList: true, attributes: true, characterData: true});
  setInterval(bench.check, 50);
})();
"""


@dataclass(frozen=True)
class Action:
    """One change a person makes: a slider one step (+1/-1) or to its start ("home"), or a radio option."""
    widget: str            # the Explore widget key (pages.common.WIDGETS)
    value: object          # +1 / -1 / "home" for sliders, the option for radios

    def apply(self, settings: dict) -> dict:
        from pages.common import BITS

        s = dict(settings)
        if self.widget == "bits":
            s["bits"] = BITS[BITS.index(s["bits"]) + self.value]
        elif self.widget == "sparsity":
            s["sparsity"] = 0 if self.value == "home" else s["sparsity"] + 5 * self.value
        else:
            s[self.widget] = self.value
        return s


RTN_MOVES = [Action("bits", 1), Action("bits", 1), Action("sparsity", 1), Action("bits", -1), Action("sparsity", 1)]
# Wanda acts only with pruning on; leaving it (sparsity back to 0) returns to an RTN setting already computed
WANDA_MOVES = [Action("prune_method", "wanda"), Action("sparsity", 1), Action("sparsity", "home")]
GPTQ_MOVES = [Action("method", "gptq"), Action("bits", 1)]
RADIOS = {"method": ("Quantizer", {"gptq": "GPTQ", "rtn": "RTN", "hqq": "HQQ"}),
          "prune_method": ("Pruning method", {"wanda": "wanda", "magnitude": "magnitude"})}


def plan(rtn_moves: int, others: bool) -> list[Action]:
    """The moves of one model: `rtn_moves` RTN/magnitude moves, then (when `others`) the Wanda and GPTQ ones."""
    from pages.common import WIDGETS

    moves = [RTN_MOVES[i % len(RTN_MOVES)] for i in range(rtn_moves)]
    settings, seen = dict(WIDGETS), {describe(WIDGETS)[0].key()}
    for action in moves:
        settings = action.apply(settings)
        seen.add(describe(settings)[0].key())
    home = Action("sparsity", "home")
    if not others:   # sparsity back to 0, when that revisits a setting computed before, times the page alone
        revisit = settings["sparsity"] and describe(home.apply(settings))[0].key() in seen
        return moves + ([home] if revisit else [])
    prune_first = [] if settings["sparsity"] else [Action("sparsity", 1)]   # one more RTN/magnitude move
    return moves + prune_first + WANDA_MOVES + GPTQ_MOVES


def group(config) -> str:
    """Which headline a configuration's move counts in: GPTQ and Wanda apart, everything else RTN/magnitude."""
    if config.quantization is not None and config.quantization.method == "gptq":
        return "gptq"
    if config.pruning is not None and config.pruning.method == "wanda":
        return "wanda"
    return "rtn"


def describe(settings: dict) -> tuple[object, str]:
    """(CompressionConfig, the heading Explore shows for it) for a dict of widget values."""
    from lmcompress_core.report.plots import describe_config
    from pages.common import build_config

    config = build_config(settings)
    return config, describe_config(config.to_dict())


# ---------------------------------------------------------------- driving the page
async def perform(page, action: Action) -> None:
    if action.widget in RADIOS:
        label, options = RADIOS[action.widget]
        await _open_advanced(page)
        radio = page.locator('[data-testid="stRadio"]', has_text=label)
        await page.evaluate("() => window.__lmBench.armed = true")
        await radio.get_by_text(options[action.value], exact=True).click()
        return
    label = BITS_LABEL if action.widget == "bits" else SPARSITY_LABEL
    if action.value == "home":
        slider = page.locator(f'[data-testid="stSlider"] input[type="range"][aria-label="{label}"]').first
        await slider.focus()
        await page.keyboard.press("Home")
    else:
        await move(page, label, action.value)


async def _open_advanced(page) -> None:
    """Open the Advanced expander (no rerun) without the click counting as a setting change."""
    expander = page.locator('[data-testid="stExpander"] details').filter(
        has=page.locator("summary", has_text="Advanced")).first
    if await expander.get_attribute("open") is None:
        await page.evaluate("() => window.__lmBench.armed = false")
        await expander.locator("summary").click()
        await expander.locator('[data-testid="stRadio"]').first.wait_for()


async def wait_complete(page, timeout_s: float = WAIT_S, back: bool = False) -> dict:
    """The marks of the armed change once the page is complete and has stayed idle for SETTLE_S. ``back``: a
    change back to the result on screen (no chart becomes new): once the heading names it and nothing runs."""
    deadline = time.monotonic() + timeout_s
    idle_since = None
    while time.monotonic() < deadline:
        state = await page.evaluate("() => ({marks: window.__lmBench.marks, start: window.__lmBench.start, "
                                    "running: window.__lmBench.running(), errors: window.__lmBench.errors(), "
                                    "named: window.__lmBench.headings().includes(window.__lmBench.label), "
                                    "origin: performance.timeOrigin})")
        if state["errors"]:
            raise RuntimeError(f"the app shows an error: {state['errors'][0]}")
        shown = state["named"] if back else state["marks"].get("complete") is not None
        done = shown and not state["running"]
        idle_since = (idle_since or time.monotonic()) if done else None
        if idle_since is not None and time.monotonic() - idle_since >= SETTLE_S:
            return state
        await asyncio.sleep(0.1)
    seen = await page.evaluate("() => ({headings: window.__lmBench.headings(), running: window.__lmBench.running(), "
                               "marks: window.__lmBench.marks, label: window.__lmBench.label})")
    raise TimeoutError(f"no complete page within {timeout_s:.0f} s; the page shows {seen}")


def seconds(state: dict) -> dict:
    """Browser marks as seconds since the change (or since navigation for the cold start) and as epoch times."""
    marks, start, origin = state["marks"], state["start"] or 0.0, state["origin"]
    out = {f"{name}_s": (marks[name] - start) / 1000 for name in ("first", "all", "complete")
           if marks.get(name) is not None}
    out["first_role"] = marks.get("first_role")
    out["epoch"] = {"start": (origin + start) / 1000,
                    **{name: (origin + marks[name]) / 1000 for name in ("first", "all", "complete") if name in marks}}
    return out


# ---------------------------------------------------------------- where the time goes
def cpu_now(server: Server) -> dict:
    """CPU seconds used so far by the server's processes and by this bench's Chromium processes."""
    chromium = [p for p in process_tree(os.getpid()) if "chrom" in _name(p)]
    return {"server": cpu_seconds(process_tree(server.process.pid)), "browser": cpu_seconds(chromium)}


def _name(proc) -> str:
    try:
        return proc.name().lower()
    except psutil.Error:
        return ""


def _used(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def read_spans(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def breakdown(epoch: dict, spans: list[dict], frames: list[tuple[float, int]], cpu: dict) -> dict:
    """One change's seconds by phase, from the browser marks, the server's spans and the websocket frames, with
    the CPU seconds the server and Chromium used meanwhile (on a 2-core machine the browser competes)."""
    start, end = epoch["start"], epoch.get("complete", epoch["start"])
    inside = sorted((s for s in spans if start - 0.05 <= s["start"] <= end), key=lambda s: s["start"])
    scripts = [s for s in inside if s["span"] == "script"]
    evals = [s for s in inside if s["span"] == "evaluate"]
    received = [b for t, b in frames if start <= t <= end]
    out = {"script_runs": len(scripts), "frames": len(received), "bytes": sum(received),
           "largest_frame_bytes": max(received, default=0), "server_cpu_s": cpu["server"],
           "browser_cpu_s": cpu["browser"]}
    if not scripts:
        return out
    first, last = scripts[0], scripts[-1]
    out.update(to_script_s=first["start"] - start, script_s=sum(s["end"] - s["start"] for s in scripts),
               to_complete_after_script_s=end - last["end"])
    if evals:
        ev = evals[-1]
        stages = {k: v for k, v in (ev.get("stages") or {}).items() if isinstance(v, (int, float))}
        out.update(preamble_s=ev["start"] - last["start"], evaluate_s=ev["end"] - ev["start"],
                   evaluate_stages_s=stages, evaluate_unstaged_s=ev["end"] - ev["start"] - sum(stages.values()),
                   after_evaluate_s=last["end"] - ev["end"])
    return out


COUNTS = ("script_runs", "bytes", "largest_frame_bytes")   # whole numbers: a median of two is rounded
PHASES = ("to_script_s", "preamble_s", "evaluate_s", "evaluate_unstaged_s", "after_evaluate_s",
          "to_complete_after_script_s", "script_runs", "bytes", "largest_frame_bytes", "server_cpu_s",
          "browser_cpu_s")


def median_profile(moves: list[dict]) -> dict:
    """The median of each phase over the counted RTN/magnitude moves, and of each engine stage."""
    rows = [m["profile"] for m in moves]
    out = {p: _median([r.get(p) for r in rows]) for p in PHASES}
    out.update({p: round(out[p]) for p in COUNTS if out.get(p) is not None})
    stages = sorted({k for r in rows for k in (r.get("evaluate_stages_s") or {})})
    out["evaluate_stages_s"] = {k: _median([(r.get("evaluate_stages_s") or {}).get(k) for r in rows]) for k in stages}
    return out


def _median(values: list):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- a move while a run computes
async def _walk_to_unseen(page, settings: dict, seen: set) -> dict:
    """Sparsity up a step at a time (each page waited for, nothing measured) until one more step is a
    configuration not computed before: the interrupted runs must have something to compute."""
    step = Action("sparsity", 1)
    while describe(step.apply(settings))[0].key() in seen:
        settings = step.apply(settings)
        await page.evaluate("l => window.__lmBench.arm(l, true)", describe(settings)[1])
        await perform(page, step)
        await wait_complete(page)
    return settings


async def _interrupt(page, spans_path: Path, settings: dict, seen: set, after_s: float) -> tuple[dict, dict]:
    """Sparsity up a step, and again ``after_s`` later while that run computes (both configurations new): how long
    the first run went on after the second key press, from its script span's end on the server (stop_s; None
    when it had finished before), and how it ended (the exception Streamlit stopped it with)."""
    step = Action("sparsity", 1)
    settings = step.apply(settings)
    seen.add(describe(settings)[0].key())
    begun = time.time()
    await perform(page, step)
    await asyncio.sleep(after_s)
    settings = step.apply(settings)
    config, label = describe(settings)
    seen.add(config.key())
    await page.evaluate("l => window.__lmBench.arm(l, true)", label)
    await perform(page, step)
    pressed = seconds(await wait_complete(page))["epoch"]["start"]
    return settings, {"after_s": after_s, **interrupted(read_spans(spans_path), begun, pressed)}


async def _interrupt_distil(page, spans_path: Path, settings: dict, after_s: float) -> dict:
    """Distil on (a long run), then off again ``after_s`` later while it trains (back to the configuration on
    screen, computed before): how long the distilling run went on after the second click, and how it ended."""
    begun = time.time()
    await page.get_by_text(DISTIL_LABEL, exact=True).click()
    await asyncio.sleep(after_s)
    await page.evaluate("l => window.__lmBench.arm(l, true)", describe(settings)[1])
    await page.get_by_text(DISTIL_LABEL, exact=True).click()
    pressed = seconds(await wait_complete(page, back=True))["epoch"]["start"]
    return {"after_s": after_s, **interrupted(read_spans(spans_path), begun, pressed)}


def interrupted(spans: list[dict], begun: float, pressed: float) -> dict:
    """Of the script runs started from ``begun`` (a move) until ``pressed`` (the next key press, epoch seconds):
    how long after ``pressed`` the last of them ended (stop_s; None when all had ended before) and how."""
    first = [s for s in spans if s["span"] == "script" and begun - 0.05 <= s["start"] < pressed]
    running = [s for s in first if s["end"] >= pressed]
    if not running:
        return {"stop_s": None, "outcome": "finished before the second move"}
    last = max(running, key=lambda s: s["end"])
    return {"stop_s": last["end"] - pressed, "outcome": last["outcome"]}


# ---------------------------------------------------------------- one model
async def _session(pw, server: Server, name: str, actions: list[Action], spans_path: Path,
                   interrupt: bool = False) -> dict:
    from pages.common import WIDGETS

    profile = tempfile.mkdtemp(prefix="lmcompress-browser-bench-")
    frames: list[tuple[float, int]] = []
    sockets: list[str] = []   # more than one: the page lost its connection and reconnected (counted, reported)
    context = await pw.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
    try:
        page = context.pages[0] if context.pages else await context.new_page()
        page.on("websocket", lambda ws: (sockets.append(ws.url), ws.on(
            "framereceived", lambda payload: frames.append((time.time(), len(payload))))))
        settings = dict(WIDGETS)
        config, label = describe(settings)
        await page.add_init_script(MONITOR_JS + f"window.__lmBench.arm({json.dumps(label)}, true, 0);")
        cpu = cpu_now(server)
        await page.goto(f"{server.url}/?model={name}", wait_until="commit", timeout=WAIT_S * 1000)
        cold = seconds(await wait_complete(page))
        cold["profile"] = breakdown(cold["epoch"], read_spans(spans_path), frames, _used(cpu, cpu_now(server)))
        print(f"[browser] {name}: cold start {cold.get('complete_s', 0):.1f} s", flush=True)
        seen, moves = {config.key()}, []
        for action in actions:
            settings = action.apply(settings)
            config, label = describe(settings)
            await page.evaluate("l => window.__lmBench.arm(l, true)", label)
            cpu = cpu_now(server)
            await perform(page, action)
            result = seconds(await wait_complete(page))
            result.update(widget=action.widget, value=action.value, configuration=label, group=group(config),
                          counted=config.key() not in seen,
                          profile=breakdown(result["epoch"], read_spans(spans_path), frames,
                                            _used(cpu, cpu_now(server))))
            seen.add(config.key())
            moves.append(result)
            print(f"[browser] {name}: {action.widget} -> {label}: first chart {result.get('first_s', 0):.2f} s, "
                  f"complete {result.get('complete_s', 0):.2f} s", flush=True)
        stops = []
        if interrupt:
            duration = _median([m.get("complete_s") for m in moves if m["counted"]]) or 2.0
            settings = await _walk_to_unseen(page, settings, seen)
            for fraction in INTERRUPT_AT:
                settings, stop = await _interrupt(page, spans_path, settings, seen, fraction * duration)
                stops.append(stop)
                print(f"[browser] {name}: a move {stop['after_s']:.2f} s into a run stopped it after "
                      f"{stop['stop_s'] if stop['stop_s'] is None else round(stop['stop_s'], 2)} s", flush=True)
        distilling = []
        for after_s in DISTIL_INTERRUPT_AT if interrupt else ():
            distilling.append(await _interrupt_distil(page, spans_path, settings, after_s))
            print(f"[browser] {name}: Distil off {after_s:.2f} s into a distilling run stopped it after "
                  f"{distilling[-1]['stop_s'] if distilling[-1]['stop_s'] is None else round(distilling[-1]['stop_s'], 2)} s",
                  flush=True)
        budget_s = await _open_budget(context, server.url, name)
        print(f"[browser] {name}: Bit budget's controls on screen {budget_s:.2f} s after opening it", flush=True)
        return {"cold": cold, "moves": moves, "websocket_connections": len(sockets), "interrupts": stops,
                "distil_interrupts": distilling, "budget_controls_s": budget_s}
    finally:
        await context.close()
        shutil.rmtree(profile, ignore_errors=True)


async def _open_budget(context, url: str, name: str) -> float:
    """Seconds from opening Bit budget in a new tab (a new session on the warm server) to its controls and its
    first action on screen: the Measure button, or the allocation when the measurement is already on disk (issue
    30: opening a page never starts minutes of work)."""
    page = await context.new_page()
    try:
        start = time.perf_counter()
        await page.goto(f"{url}/budget?model={name}", wait_until="commit", timeout=WAIT_S * 1000)
        await page.locator('[data-testid="stSlider"]', has_text="Target bits per weight").wait_for(timeout=WAIT_S * 1000)
        ready = page.get_by_role("button", name="Measure sensitivity").or_(page.locator(".js-plotly-plot"))
        await ready.first.wait_for(timeout=WAIT_S * 1000)
        return time.perf_counter() - start
    finally:
        await page.close()


def measure_model(name: str, actions: list[Action], interrupt: bool = False) -> dict:
    """A fresh server for `name`, one browser session: the cold start, then each action in turn, then (with
    ``interrupt``) moves made while the previous run computes."""
    from playwright.async_api import async_playwright

    from lmcompress_core.models.loading import prepare_default

    if name == "default":
        prepare_default()   # the cold start is measured once the model is prepared (`make run` does it first)

    async def drive(server, spans_path):
        async with async_playwright() as pw:
            return await _session(pw, server, name, actions, spans_path, interrupt)

    folder = Path(tempfile.mkdtemp(prefix="lmcompress-browser-bench-"))
    spans_path = folder / "spans.jsonl"
    started = time.perf_counter()
    server = Server(log_path=folder / "streamlit.log", env={"LMCOMPRESS_SPANS": str(spans_path)})
    try:
        server.start()
        server_start_s = time.perf_counter() - started
        measured = asyncio.run(drive(server, spans_path))
        log = server.log_path.read_text(errors="replace")
    finally:
        server.stop()
    shutil.rmtree(folder, ignore_errors=True)
    if "Traceback" in log:
        raise RuntimeError(f"the server log of model {name} holds a traceback: {log[log.index('Traceback'):][:500]}")
    return summarise(measured, server_start_s)


def summarise(measured: dict, server_start_s: float) -> dict:
    moves = measured["moves"]
    by_group = {}
    for g in ("rtn", "wanda", "gptq", "cached"):   # cached: back to a configuration already computed (page alone)
        counted = [m for m in moves if (not m["counted"] if g == "cached" else m["counted"] and m["group"] == g)]
        if counted:
            by_group[g] = {f"{k}_s": _median([m.get(f"{k}_s") for m in counted]) for k in ("first", "all", "complete")}
            by_group[g]["moves"] = len(counted)
            by_group[g]["complete_each_s"] = [m.get("complete_s") for m in counted]
    rtn = [m for m in moves if m["counted"] and m["group"] == "rtn"]
    stops = measured.get("interrupts") or []
    return {"server_start_s": server_start_s, "cold_s": measured["cold"].get("complete_s"),
            "cold_profile": measured["cold"]["profile"], "groups": by_group,
            "websocket_connections": measured["websocket_connections"],
            "profile": median_profile(rtn), "moves": moves, "interrupts": stops,
            "abandon_s": _largest_stop(stops), "distil_interrupts": measured.get("distil_interrupts") or [],
            "abandon_distil_s": _largest_stop(measured.get("distil_interrupts") or []),
            "budget_controls_s": measured.get("budget_controls_s")}


def _largest_stop(stops: list[dict]) -> float | None:
    return max((s["stop_s"] for s in stops if s["stop_s"] is not None), default=None)


# ---------------------------------------------------------------- the section
HOW = ("headless Debian Chromium (playwright) against `streamlit run app.py` on 127.0.0.1, a fresh server per "
       "model, Explore at its default settings; a setting changed with the keyboard (sliders) or a click (radios); "
       "times on the browser's clock from that key press or click to the DOM state (a MutationObserver in the "
       "page); medians over the moves to configurations not seen before")


def run(ctx) -> dict:
    from bench.interactivity import app_protocol

    start = time.perf_counter()
    smoke = ctx.scale.name == "smoke"
    rtn_moves = 2 if smoke else max(5, ctx.scale.runs)
    names = ["tiny", "default"] if ctx.scale.include_default else ["tiny"]
    # GPTQ and Wanda on the tiny model of a full run only: on SmolLM2 their calibration would take most of the
    # section's time, and a smoke run checks the harness, not the methods
    models = {name: measure_model(name, plan(rtn_moves, others=name == "tiny" and not smoke),
                                  interrupt=name == "default") for name in names}
    headline = {}
    for name, m in models.items():
        rtn = m["groups"].get("rtn", {})
        first = next((move for move in m["moves"] if move["counted"]), {})   # the first move after the cold start
        headline.update({f"browser_first_move_all_s_{name}": first.get("all_s"),f"browser_first_chart_s_{name}": rtn.get("first_s"),
                         f"browser_all_charts_s_{name}": rtn.get("all_s"),
                         f"browser_complete_s_{name}": rtn.get("complete_s"),
                         f"browser_cold_s_{name}": m["cold_s"],
                         f"browser_budget_controls_s_{name}": m["budget_controls_s"]})
        if m["interrupts"]:
            headline[f"browser_abandon_s_{name}"] = m["abandon_s"]
        if m["distil_interrupts"]:
            headline[f"browser_abandon_distil_s_{name}"] = m["abandon_distil_s"]
    return {"headline": headline, "models": models, "protocol": app_protocol().to_dict(), "how": HOW,
            "profile": {name: m["profile"] for name, m in models.items()},
            "seconds": time.perf_counter() - start}
