"""A self-contained HTML report of a session, written for a reader who did not run it.

It leads with the chosen setting in plain words and how it compares with the original on size, speed and quality
(each with how it was measured), then the charts, the generations, every configuration tried, and the session's
sweep, per-layer sensitivity and distillation results when there are any. Engine internals (the settings as the
engine stores them, layer-name patterns, the protocol, the full results, the machine) sit in a folded
``<details>`` section at the end. ``summary_rows`` gives the page the same lead.

The file opens offline: plotly.js is inlined once (``include_plotlyjs=True`` on the first chart) and
nothing else is fetched. Every piece of text that came from a person or a model (prompts,
generations, model names, config values) goes through ``html.escape`` - the report never renders
someone's ``<script>`` or markdown as markup.
"""
from __future__ import annotations

import datetime as _dt
import html
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

from lmcompress_core.report import plots

LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "streamlit", "plotly", "pandas", "numpy")

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;
     padding:0 1em;color:#1a1a1a;line-height:1.45}
h1{font-size:2em;margin-bottom:.2em} h2{border-bottom:2px solid #0072B2;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.95em} th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:left;vertical-align:top} th{background:#f0f4f8}
.gen{display:grid;grid-template-columns:1fr 1fr;gap:1em} .gen pre{white-space:pre-wrap;background:#f7f7f7;
padding:.8em;border-radius:6px;margin:0;font-size:1em} mark{background:#ffd27f} .how{color:#555;font-size:.9em;margin-top:.4em}
.muted{color:#666} .lead{font-size:1.25em} details{margin-top:2em} summary{font-size:1.3em;cursor:pointer}
"""


def machine_info() -> dict[str, str]:
    """Machine and library versions, as strings (for the report and the app's footer)."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
    }
    for name in LIBRARIES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "not installed"
    return info


def first_difference(a: str, b: str) -> int:
    """Index of the first character where two texts differ (len of the shorter when one extends the other)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def divergence_html(text: str, other: str) -> str:
    """``text`` escaped, with everything from its first difference to ``other`` wrapped in <mark>."""
    i = first_difference(text, other)
    if text == other:
        return html.escape(text)
    return html.escape(text[:i]) + "<mark>" + html.escape(text[i:]) + "</mark>"


def tokens_html(tokens: Sequence[str], first_divergence: int | None) -> str:
    """Generated token pieces, escaped, with every token from the first divergent one wrapped in <mark>."""
    if first_divergence is None or first_divergence >= len(tokens):
        return html.escape("".join(tokens))
    return (html.escape("".join(tokens[:first_divergence])) + "<mark>"
            + html.escape("".join(tokens[first_divergence:])) + "</mark>")


def generation_pair_html(generation: Mapping) -> tuple[str, str]:
    """(base, compressed) greedy continuations as escaped HTML, the divergence marked (token-level when known)."""
    base_tokens, comp_tokens = generation.get("base_tokens"), generation.get("compressed_tokens")
    if base_tokens is not None and comp_tokens is not None:
        i = generation.get("first_divergence")
        return tokens_html(base_tokens, i), tokens_html(comp_tokens, i)
    base, comp = generation.get("base") or "", generation.get("compressed") or ""
    return divergence_html(base, comp), divergence_html(comp, base)


def generations_html(generation: Mapping | None) -> str:
    """Base and compressed continuations side by side, the first divergence highlighted; all escaped."""
    if not generation:
        return "<p class='muted'>No generation recorded.</p>"
    base, comp = generation_pair_html(generation)
    prompt = html.escape(generation.get("prompt") or "")
    notice = generation.get("notice")
    sampled = ""
    if generation.get("sampled_base") is not None:
        sampled = (f"<p class='muted'>Sampled with seed {html.escape(str(generation.get('seed')))}:</p>"
                   f"<div class='gen'><pre>{html.escape(generation.get('sampled_base') or '')}</pre>"
                   f"<pre>{html.escape(generation.get('sampled_compressed') or '')}</pre></div>")
    return (f"<p><b>Prompt:</b> <code>{prompt}</code></p>"
            + (f"<p class='muted'>{html.escape(notice)}</p>" if notice else "")
            + f"<div class='gen'><div><h3>base (greedy)</h3><pre>{base}</pre></div>"
            f"<div><h3>compressed (greedy)</h3><pre>{comp}</pre></div></div>" + sampled)


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(format_value(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def format_value(value: Any) -> str:
    """A table cell: floats to 4 significant digits, None as a dash."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    """A nested dict as ("a.b.c", value) rows (settings as the engine stores them)."""
    if isinstance(value, Mapping):
        out = []
        for k, v in value.items():
            out += flatten(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    return [(prefix, value)]


def results_rows(report: Any) -> list[tuple[str, Any]]:
    """The headline numbers of one report as (name, value) rows."""
    data = plots.as_dict(report)
    size, lat, ppl = data.get("size") or {}, data.get("latency") or {}, data.get("perplexity") or {}
    base = plots._base_ppl(data)
    return [
        ("model", data.get("model")), ("configuration", plots.config_label(data.get("config"))),
        ("base size (MB)", (size.get("base_bytes") or 0) / plots.MB),
        ("theoretical size (MB)", (size.get("theoretical_bytes") or 0) / plots.MB),
        ("packed size (MB)", (size.get("packed_bytes") or 0) / plots.MB),
        ("runtime size (MB)", (size.get("runtime_bytes") or 0) / plots.MB),
        ("perplexity", ppl.get("value")), ("± stderr", ppl.get("stderr")),
        ("base perplexity", base.get("value")),
        ("KL to base (nats)", data.get("kl_to_base")), ("top-1 agreement", data.get("top1_agreement")),
        ("prefill (ms)", lat.get("prefill_ms")), ("decode (tokens/s)", lat.get("decode_tokens_per_s")),
        ("kernel", lat.get("kernel")),
    ]


def summary_rows(report: Any) -> list[tuple[str, str, str]]:
    """(what, how it compares with the original, how that was measured) for size, speed and quality, in words."""
    data = plots.as_dict(report)
    rows = [_size_summary(data), _speed_summary(data), _quality_summary(data)]
    return [row for row in rows if row is not None]


def _size_summary(data: Mapping) -> tuple[str, str, str] | None:
    size = data.get("size") or {}
    packed, base = size.get("packed_bytes"), size.get("base_bytes")
    if not packed or not base:
        return None
    memory = (" In memory while it runs it still takes the original's bytes (the compression is simulated)."
              if size.get("simulated") else "")
    return ("Size", f"{packed / plots.MB:.3g} MB, {packed / base:.0%} of the original's {base / plots.MB:.3g} MB.",
            "Bytes of the compressed files (codes bit-packed with their scales; counted from their layout, equal "
            "to the files written); the original counted at 32-bit floats." + memory)


def _speed_summary(data: Mapping) -> tuple[str, str, str] | None:
    """Prefill and decode in one sentence, and how they were timed: alternately with the original (a ratio in
    words: '1.6× slower', never '×0.61'), or the compressed model alone while exploring (no ratio claimed)."""
    lat, base, speed = data.get("latency") or {}, data.get("base_latency") or {}, data.get("speed") or {}
    if not lat.get("decode_tokens_per_s"):
        return None
    value = (f"{lat['decode_tokens_per_s']:.3g} tokens per second while generating and {lat.get('prefill_ms') or 0:.3g} "
             f"ms to read a {lat.get('prompt_tokens')}-token prompt")
    if speed.get("decode_ratio") and base.get("decode_tokens_per_s"):
        value += (f"; against the original ({base['decode_tokens_per_s']:.3g} tokens per second, "
                  f"{base.get('prefill_ms') or 0:.3g} ms) generating is {plots.slower_or_faster(speed['decode_ratio'])} "
                  f"and reading the prompt {plots.slower_or_faster(speed.get('prefill_ratio'))}")
        how = (f"Median of {lat.get('runs')} timed runs of each model, the original and the compressed one "
               "alternately in the same call")
    else:
        how = ("The compressed model alone, read off its greedy generation (exploring's quick protocol): no ratio "
               "with the original, which was not timed alongside" if lat.get("source") == "greedy generation"
               else f"Median of {lat.get('runs')} timed runs of the compressed model alone: no ratio with the original")
    busy = " Timed while the machine was busy: slower than usual." if lat.get("busy") else ""
    return ("Speed", value + ".", f"{how}, on {lat.get('device', 'cpu')} with {lat.get('threads')} thread(s). What "
            f"ran: {lat.get('kernel') or 'not recorded'}{_loop(lat)}.{busy}")


def _loop(lat: Mapping) -> str:
    return f", through the {lat['loop']}" if lat.get("loop") else ""


def _quality_summary(data: Mapping) -> tuple[str, str, str] | None:
    ppl, base = data.get("perplexity") or {}, plots._base_ppl(data)
    if ppl.get("value") is None:
        return None
    versus = f" against {base['value']:.2f} for the original" if base.get("value") is not None else ""
    agree = (f"; both models pick the same most likely next token {data['top1_agreement']:.0%} of the time"
             if data.get("top1_agreement") is not None else "")
    return ("Quality", f"Perplexity {ppl['value']:.2f}{versus} (lower is better){agree}.",
            f"Scored on the same {ppl.get('tokens')} tokens of '{ppl.get('text') or 'the evaluation text'}' for both "
            f"models, in windows of {ppl.get('context')} tokens; ± {ppl.get('stderr') or 0:.2f} standard error.")


def _summary_html(rows: Sequence[tuple[str, str, str]]) -> str:
    head = "<tr><th></th><th>compared with the original</th><th>how it was measured</th></tr>"
    body = "".join(f"<tr><th>{html.escape(what)}</th><td>{html.escape(value)}</td>"
                   f"<td class='how'>{html.escape(how)}</td></tr>" for what, value, how in rows)
    return f"<table>{head}{body}</table>"


def _figure_html(fig, first: bool) -> str:
    # The first chart carries plotly.js inline (about 4 MB) so the file works without a network.
    return fig.to_html(full_html=False, include_plotlyjs=True if first else False,
                       config={"displaylogo": False})


def trail_table_html(trail: Sequence[Any]) -> str:
    points = plots.trail_points(trail)
    head = "<tr><th>run</th><th>model</th><th>configuration</th><th>packed MB</th><th>perplexity</th></tr>"
    rows = "".join(
        f"<tr><td>{p['run']}</td><td>{html.escape(str(p['model']))}</td><td>{html.escape(p['label'])}</td>"
        f"<td>{format_value(p['size_mb'])}</td><td>{format_value(p['perplexity'])}</td></tr>" for p in points)
    return f"<table>{head}{rows}</table>"


def frame_html(df) -> str:
    """A DataFrame as an escaped HTML table (cells formatted like the other tables)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_value(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


class _Charts:
    """Figures as HTML; the first one carries plotly.js."""

    def __init__(self):
        self.first = True

    def __call__(self, fig) -> str:
        out = _figure_html(fig, self.first)
        self.first = False
        return out


def build_report(report: Any, trail: Sequence[Any] = (), title: str = "LM Compression Lab report",
                 machine: Mapping[str, str] | None = None, notes: str = "", sweep: Mapping | None = None,
                 sensitivity: Mapping | None = None, distillation: Mapping | None = None) -> str:
    """One HTML document for the current report, the session trail and, when given, the session's sweep
    ({"model", "table"}: a sweep table), per-layer sensitivity ({"model", "frame"}) and distillation (a Report
    dict with its "before" Report); opens offline in any browser."""
    data = plots.as_dict(report)
    chart = _Charts()
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='muted'>Generated {_dt.datetime.now().isoformat(timespec='seconds')} "
             "by LM Compression Lab.</p>"]
    if notes:
        parts.append(f"<p>{html.escape(notes)}</p>")
    parts += _current_html(data, chart) if data else ["<p class='muted'>No run yet in this session.</p>"]
    if trail:
        parts += ["<h2>Every configuration tried</h2>", chart(plots.trail_figure(trail)), trail_table_html(trail)]
    parts += _sweep_html(sweep, chart) + _sensitivity_html(sensitivity, chart) + _distillation_html(distillation, chart)
    parts += _details_html(data, machine or machine_info()) + ["</body></html>"]
    return "\n".join(parts)


def _current_html(data: Mapping, chart: _Charts) -> list[str]:
    how = plots.report_how(data)
    parts = ["<h2>The chosen setting</h2>",
             f"<p class='lead'>{html.escape(plots.describe_config(data.get('config')))} "
             f"<span class='muted'>on {html.escape(str(data.get('model')))}, measured by the "
             f"{html.escape(plots.protocol_name(data))}</span></p>",
             *([f"<p class='how'>Caveat: {html.escape(data['model_caveat'])}</p>"] if data.get("model_caveat") else []),
             "<h2>Compared with the original</h2>", _summary_html(summary_rows(data)), "<h2>Charts</h2>"]
    for name, builder in (("size", plots.size_figure), ("latency", plots.latency_figure),
                          ("perplexity", plots.perplexity_figure)):
        parts += [chart(builder(data)), f"<p class='how'>{html.escape(how.get(name, ''))}</p>"]
    if data.get("history"):
        parts += ["<h3>Distillation curve</h3>", chart(plots.loss_curve_figure(data["history"]))]
    return parts + ["<h2>Generations</h2>", generations_html(data.get("generation"))]


def _sweep_html(result: Mapping | None, chart: _Charts) -> list[str]:
    if not result:
        return []
    from lmcompress_core import sweep

    table = sweep.with_original(result["table"])
    note = sweep.latency_frontier_note(table)
    return [f"<h2>Trade-offs: {len(result['table'])} configurations on {html.escape(str(result['model']))}</h2>",
            *[chart(fig) for fig in plots.sweep_figures(table, note)],
            frame_html(sweep.readable_table(table).drop(columns=[sweep.READABLE["config"]]))]


def _sensitivity_html(result: Mapping | None, chart: _Charts) -> list[str]:
    if not result:
        return []
    return [f"<h2>Per-layer sensitivity on {html.escape(str(result['model']))}</h2>",
            chart(plots.sensitivity_heatmap(result["frame"])),
            "<p class='how'>Each layer quantized alone at each bit-width: SQNR = 10·log10(‖W‖² / ‖W − Ŵ‖²) of its "
            "weights; darker = more damaged.</p>"]


def _distillation_html(result: Mapping | None, chart: _Charts) -> list[str]:
    if not result:
        return []
    return [f"<h2>Distillation: {html.escape(plots.describe_config(result.get('config')))}</h2>",
            chart(plots.stages_perplexity_figure(result, result.get("before"))),
            f"<p class='how'>{html.escape(plots.report_how(result).get('perplexity', ''))}</p>",
            chart(plots.loss_curve_figure(result.get("history") or []))]


def _details_html(data: Mapping, machine: Mapping[str, str]) -> list[str]:
    parts = ["<details><summary>Engine details (settings as stored, protocol, every number, machine)</summary>"]
    if data:
        parts += ["<h2>Settings</h2>", _table(flatten("", data.get("config") or {}) or [("config", "none")]),
                  "<h2>Protocol</h2>", _table(flatten("", data.get("protocol") or {}) or [("protocol", "none")]),
                  "<h2>Results</h2>", _table(results_rows(data))]
    return parts + ["<h2>Machine and library versions</h2>", _table(list(machine.items())), "</details>"]
