"""`python -m bench.loadtest`: N browser sessions moving Explore's sliders on one `streamlit run app.py`.

    python -m bench.loadtest                    # 5 sessions x 2 rounds x 4 slider moves, ~5 min on 2 cores
    python -m bench.loadtest --sessions 3 --moves 2 --rounds 1   # a quick check

Every session is its own headless Debian Chromium (fresh profile) driven by playwright against a server on
127.0.0.1 only. A session opens Explore on the tiny model, then moves the Bit-width and Sparsity sliders with
the keyboard, one move at a time, waiting for each Report to finish. Checked and written to bench/loadtest.md
and bench/loadtest.json:
  - the server answers /_stcore/health throughout and is still up at the end;
  - its resident memory (server + children) levels off: the peak of round 2 is within 10% of round 1's;
  - every session ends showing its own results: the heading names its own last configuration, the packed
    size and perplexity on its charts equal an in-process `measure.evaluate` of that configuration, and its
    trail chart has exactly its own number of runs (nothing from another session leaked in);
  - errors: browser timeouts, exceptions or error boxes shown by the app, tracebacks in the server log.
Bounded: at most MAX_SESSIONS sessions, every wait has a timeout, the whole test has --timeout seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.server import Server

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_SESSIONS = 8
WAIT_S = 240          # longest wait for one Report under load
LEVEL_OFF = 1.10      # round-2 peak RSS / round-1 peak RSS at most this
BITS_LABEL, SPARSITY_LABEL = "Bit-width", "Sparsity (%)"


@dataclass
class Session:
    index: int
    moves: list[str]                       # slider labels moved in each round, in order
    bits_index: int = 2                    # position in pages.common.BITS (starts at the default, 4)
    sparsity: int = 0                      # percent
    requests: int = 0                      # slider moves sent
    runs: int = 1                          # Reports this session should have (the first page load is one)
    configurations: set = field(default_factory=set)   # distinct settings shown: the trail has one point each
    errors: list[str] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    seconds_per_move: list[float] = field(default_factory=list)


def plan(index: int, moves: int) -> list[str]:
    """Which slider each move touches (seeded per session); every move changes the configuration."""
    rng = random.Random(index)
    return [BITS_LABEL if rng.random() < 0.6 else SPARSITY_LABEL for _ in range(moves)]


def _step(session: Session, label: str, bits_count: int) -> int:
    """Direction of the next move of `label` that stays inside the slider's range."""
    if label == BITS_LABEL:
        up_ok, down_ok = session.bits_index < bits_count - 2, session.bits_index > 0   # never 16: no bf16 here
        position = session.bits_index
    else:
        up_ok, down_ok = session.sparsity < 30, session.sparsity > 0
        position = session.sparsity
    if up_ok and down_ok:
        return 1 if (session.index + position + session.requests) % 2 == 0 else -1
    return 1 if up_ok else -1


# ---------------------------------------------------------------- the app's expected state
def app_model():
    """The Explore page's own pieces, so the test follows the app: widget defaults, bits, config builder."""
    from pages.common import BITS, DEFAULT_PROMPT, WIDGETS, build_config

    return BITS, DEFAULT_PROMPT, WIDGETS, build_config


def expected_settings(session: Session) -> dict:
    bits, _, widgets, _ = app_model()
    return dict(widgets, bits=bits[session.bits_index], sparsity=session.sparsity)


def expected_label(session: Session) -> str:
    """The heading the page shows for the session's configuration (plain words, as Explore writes it)."""
    from lmcompress_core.report.plots import describe_config

    build_config = app_model()[3]
    return describe_config(build_config(expected_settings(session)).to_dict())


# ---------------------------------------------------------------- the browser side
async def _page_state(page) -> dict:
    return await page.evaluate("""() => {
        const q = (s) => Array.from(document.querySelectorAll(s));
        const running = q('[data-testid="stStatusWidget"]').some(e => /running|stop/i.test(e.innerText || ''));
        const stop = q('button').some(b => (b.innerText || '').trim() === 'Stop');
        const charts = q('[data-testid="stPlotlyChart"]').length;
        const headings = q('h3').map(h => (h.innerText || '').trim());
        const errors = q('[data-testid="stException"], [data-testid="stAlertContentError"]')
            .map(e => e.innerText.slice(0, 200));
        const trail = q('[data-testid="stPlotlyChart"]').filter(c => /Trail/.test(c.textContent || ''));
        // the "runs" trace is the trail's last scatter trace (the frontier's rings come first)
        const traces = trail.length ? trail[0].querySelectorAll('g.trace.scatter') : [];
        const trailPoints = traces.length ? traces[traces.length - 1].querySelectorAll('path.point').length : null;
        const bartext = q('[data-testid="stPlotlyChart"]')
            .map(c => Array.from(c.querySelectorAll('text.bartext')).map(t => t.textContent));
        const progress = q('[data-testid="stProgress"]').length;
        return {running, stop, charts, headings, errors, trailPoints, bartext, progress};
    }""")


async def wait_for_report(page, label: str, timeout_s: float = WAIT_S) -> dict:
    """Wait until the heading shows `label` and its run has finished (charts drawn, nothing running)."""
    deadline = time.monotonic() + timeout_s
    settled = 0
    while time.monotonic() < deadline:
        state = await _page_state(page)
        if state["errors"]:
            raise RuntimeError(f"the app shows an error: {state['errors'][0]}")
        done = (label in state["headings"] and not state["running"] and not state["stop"]
                and not state["progress"] and state["charts"] >= 3)
        settled = settled + 1 if done else 0
        if settled >= 3:   # stable over three polls: the rerun has really finished
            return state
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no finished Report for '{label}' within {timeout_s:.0f} s")


async def move(page, label: str, direction: int) -> None:
    # Streamlit's slider is a react-aria range input labelled with the widget's label.
    slider = page.locator(f'[data-testid="stSlider"] input[type="range"][aria-label="{label}"]').first
    await slider.focus()
    await page.keyboard.press("ArrowRight" if direction > 0 else "ArrowLeft")


def _apply(session: Session, label: str, direction: int) -> None:
    if label == BITS_LABEL:
        session.bits_index += direction
    else:
        session.sparsity += 5 * direction


async def run_session(pw, session: Session, url: str, rounds: int, barrier: asyncio.Barrier, marks: list,
                      server: Server) -> None:
    profile = tempfile.mkdtemp(prefix=f"lmcompress-loadtest-{session.index}-")
    bits_count = len(app_model()[0])
    context = None
    try:
        context = await pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        page = context.pages[0] if context.pages else await context.new_page()
        await page.goto(f"{url}/?model=tiny", wait_until="domcontentloaded", timeout=WAIT_S * 1000)
        await wait_for_report(page, expected_label(session))
        session.configurations.add(expected_label(session))
        for round_index in range(rounds):
            for label in session.moves:
                direction = _step(session, label, bits_count)
                start = time.monotonic()
                await move(page, label, direction)
                _apply(session, label, direction)
                session.requests += 1
                session.runs += 1
                await wait_for_report(page, expected_label(session))
                session.configurations.add(expected_label(session))
                session.seconds_per_move.append(time.monotonic() - start)
            if await _round_end(barrier) == 0:
                marks.append({"round": round_index + 1, "rss_bytes": server.rss(), "t": time.monotonic()})
        session.final = await _page_state(page)
    except Exception as exc:  # a failed session is a measured error, the others go on
        session.errors.append(f"{type(exc).__name__}: {exc}"[:300])
        await barrier.abort()   # the others stop waiting for this one at the end of a round
    finally:
        if context is not None:
            await context.close()
        shutil.rmtree(profile, ignore_errors=True)


async def _round_end(barrier: asyncio.Barrier) -> int | None:
    """Wait for every session to finish the round; None when a session failed (rounds are then not aligned)."""
    try:
        return await asyncio.wait_for(barrier.wait(), WAIT_S)
    except (asyncio.BrokenBarrierError, TimeoutError):
        return None


async def drive(server: Server, sessions: list[Session], rounds: int) -> list[dict]:
    from playwright.async_api import async_playwright

    marks: list[dict] = []
    barrier = asyncio.Barrier(len(sessions))
    async with async_playwright() as pw:
        await asyncio.gather(*(run_session(pw, s, server.url, rounds, barrier, marks, server) for s in sessions))
    return marks


# ---------------------------------------------------------------- checking what each session shows
def reference_reports(sessions: list[Session]) -> dict:
    """In-process Reports for the sessions' final configurations, computed as the page computes them."""
    from lmcompress_core.measure.evaluation import evaluate
    from lmcompress_core.models.loading import load_model
    from pages.common import protocol_from_settings

    _, prompt, widgets, build_config = app_model()
    loaded = load_model("tiny")
    out = {}
    for s in sessions:
        label = expected_label(s)
        if label not in out:
            config = build_config(expected_settings(s))
            out[label] = evaluate(loaded, config, protocol_from_settings({**widgets, "prompt": prompt})).to_dict()
    return out


def _numbers(texts: list[str]) -> list[float]:
    return [float(m) for t in texts for m in re.findall(r"\d+(?:\.\d+)?", t.replace(",", ""))]


def check_session(session: Session, reference: dict) -> list[str]:
    """What is wrong with the page the session ended on (empty: it shows its own, correct results)."""
    if session.errors or not session.final:
        return []
    problems = []
    label = expected_label(session)
    if label not in session.final["headings"]:
        problems.append(f"heading is not its own configuration '{label}'")
    report = reference[label]
    bars = session.final["bartext"]
    from lmcompress_core.report.plots import MB

    packed_mb = report["size"]["packed_bytes"] / MB
    size_numbers = _numbers(bars[0]) if bars else []
    if not any(abs(v - packed_mb) <= 0.005 * packed_mb + 0.01 for v in size_numbers):
        problems.append(f"size chart {bars[0] if bars else None} lacks packed {packed_mb:.3g} MB")
    ppl = report["perplexity"]["value"]
    ppl_numbers = _numbers(bars[2]) if len(bars) > 2 else []
    if not any(abs(v - ppl) <= 0.005 * ppl + 0.01 for v in ppl_numbers):
        problems.append(f"perplexity chart {bars[2] if len(bars) > 2 else None} lacks {ppl:.2f}")
    # The trail chart has one point per configuration this session showed (a setting tried twice is one point):
    # a point from another session would show here.
    if session.final.get("trailPoints") != len(session.configurations):
        problems.append(f"trail chart has {session.final.get('trailPoints')} points, this session showed "
                        f"{len(session.configurations)} configurations")
    return problems


# ---------------------------------------------------------------- report
def summarise(server: Server, sessions: list[Session], marks: list[dict], started: float, problems: dict,
              args, log_tracebacks: int) -> dict:
    rss = [b for _, b in server.samples]
    round_peaks = []
    t0 = server._t0
    previous = 0.0
    for mark in marks:
        until = mark["t"] - t0
        window = [b for t, b in server.samples if previous <= t <= until]
        round_peaks.append(max(window) if window else None)
        previous = until
    levels_off = None   # not checked with a single round
    if len(round_peaks) >= 2:
        levels_off = None not in round_peaks[-2:] and round_peaks[-1] <= LEVEL_OFF * round_peaks[-2]
    moves = [m for s in sessions for m in s.seconds_per_move]
    errors = [f"session {s.index}: {e}" for s in sessions for e in s.errors]
    errors += [f"session {i}: {p}" for i, ps in problems.items() for p in ps]
    if log_tracebacks:
        errors.append(f"server log: {log_tracebacks} traceback(s)")
    return {
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sessions": len(sessions), "rounds": args.rounds, "moves_per_round": args.moves,
        "requests": sum(s.requests for s in sessions),
        "reports_expected": sum(s.runs for s in sessions),
        "errors": len(errors), "error_details": errors,
        "server_up_at_end": server.alive() and server.healthy(),
        "rss_start_mb": rss[0] / 2**20 if rss else None,
        "rss_peak_mb": max(rss) / 2**20 if rss else None,
        "rss_end_mb": rss[-1] / 2**20 if rss else None,
        "rss_peak_by_round_mb": [p / 2**20 if p else None for p in round_peaks],
        "memory_levels_off": levels_off,
        "sessions_with_own_results": sum(1 for s in sessions if not s.errors and not problems.get(s.index)),
        "per_session": [{"session": s.index, "requests": s.requests, "runs": s.runs,
                         "final_configuration": expected_label(s), "errors": s.errors + problems.get(s.index, [])}
                        for s in sessions],
        "seconds_per_move_median": sorted(moves)[len(moves) // 2] if moves else None,
        "seconds_per_move_max": max(moves) if moves else None,
        "wall_s": time.monotonic() - started,
        "rss_timeline_mb": [(round(t, 1), round(b / 2**20, 1))
                            for t, b in server.samples[:: max(1, len(server.samples) // 120)]],
    }


def passed(result: dict) -> bool:
    return (result["errors"] == 0 and result["server_up_at_end"] and result["memory_levels_off"] is not False
            and result["sessions_with_own_results"] == result["sessions"])


def markdown(result: dict) -> str:
    ok = passed(result)
    peaks = ", ".join(f"{p:.0f}" if p else "—" for p in result["rss_peak_by_round_mb"])
    lines = [
        "# Load test — concurrent sessions on `streamlit run app.py`", "",
        f"Generated {result['generated']} by `make loadtest` (`python -m bench.loadtest`) in "
        f"{result['wall_s']:.0f} s. Verdict: **{'pass' if ok else 'FAIL'}**.", "",
        f"{result['sessions']} concurrent sessions (headless Debian Chromium, fresh profile each, playwright) "
        f"against one server on 127.0.0.1; each opened Explore on the tiny model and made "
        f"{result['rounds']} x {result['moves_per_round']} keyboard moves of the Bit-width and Sparsity sliders, "
        "waiting for each Report before the next move.", "",
        "| measure | value |", "|---|---|",
        f"| sessions (N) | {result['sessions']} |",
        f"| requests (slider moves) | {result['requests']} |",
        f"| Reports shown (moves + first loads) | {result['reports_expected']} |",
        f"| errors | {result['errors']} |",
        f"| server up at the end | {result['server_up_at_end']} |",
        f"| sessions ending on their own, correct results | {result['sessions_with_own_results']} / "
        f"{result['sessions']} |",
        f"| server RSS start / peak / end (MB) | {result['rss_start_mb']:.0f} / {result['rss_peak_mb']:.0f} / "
        f"{result['rss_end_mb']:.0f} |",
        f"| peak RSS per round (MB) | {peaks} |",
        f"| memory levels off (round 2 peak ≤ {LEVEL_OFF:.2f} x round 1) | {result['memory_levels_off']} |",
        f"| seconds per move, median / max | {result['seconds_per_move_median'] or 0:.1f} / "
        f"{result['seconds_per_move_max'] or 0:.1f} |",
        "",
        "Own, correct results: the heading names the session's own last configuration, the packed size and "
        "perplexity drawn on its charts equal an in-process `measure.evaluate` of that configuration, and its "
        "trail chart holds exactly its own runs.", "",
    ]
    if result["error_details"]:
        lines += ["Errors:", ""] + [f"- {e}" for e in result["error_details"]] + [""]
    return "\n".join(lines)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=5)
    parser.add_argument("--moves", type=int, default=4, help="slider moves per session per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="bound on the whole browser part, seconds")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= MAX_SESSIONS:
        parser.error(f"--sessions must be 1..{MAX_SESSIONS}")
    if args.moves < 1 or args.rounds < 1:
        parser.error("--moves and --rounds must be at least 1")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    started = time.monotonic()
    sessions = [Session(i, plan(i, args.moves)) for i in range(args.sessions)]
    with Server() as server:
        print(f"[loadtest] server {server.url} (pid {server.process.pid}); {args.sessions} sessions", flush=True)
        try:
            marks = asyncio.run(asyncio.wait_for(drive(server, sessions, args.rounds), args.timeout))
        except TimeoutError:
            marks = []
            for s in sessions:
                if not s.final and not s.errors:
                    s.errors.append(f"the test ran past --timeout {args.timeout:.0f} s")
        up = server.alive() and server.healthy()
        log_text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
    print(f"[loadtest] browsers done; server up: {up}; checking results in-process", flush=True)
    reference = reference_reports([s for s in sessions if s.final and not s.errors])
    problems = {s.index: check_session(s, reference) for s in sessions}
    result = summarise(server, sessions, marks, started, problems, args, log_text.count("Traceback"))
    result["server_up_at_end"] = up
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loadtest.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "loadtest.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
