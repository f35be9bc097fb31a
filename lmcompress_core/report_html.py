"""A self-contained HTML report of a session: settings, tables, interactive charts, generations, machine.

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

from . import plots

LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "streamlit", "plotly", "pandas", "numpy")

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;
     padding:0 1em;color:#1a1a1a;line-height:1.45}
h1{font-size:2em;margin-bottom:.2em} h2{border-bottom:2px solid #0072B2;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.95em} th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:left;vertical-align:top} th{background:#f0f4f8}
.gen{display:grid;grid-template-columns:1fr 1fr;gap:1em} .gen pre{white-space:pre-wrap;background:#f7f7f7;
padding:.8em;border-radius:6px;margin:0;font-size:1em} mark{background:#ffd27f} .how{color:#555;font-size:.9em;margin-top:.4em}
.muted{color:#666}
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


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        out = []
        for k, v in value.items():
            out += _flatten(f"{prefix}.{k}" if prefix else str(k), v)
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


def build_report(report: Any, trail: Sequence[Any] = (), title: str = "LM Compression Lab report",
                 machine: Mapping[str, str] | None = None, notes: str = "") -> str:
    """One HTML document for the current report and the session trail; opens offline in any browser."""
    data = plots.as_dict(report)
    machine = machine or machine_info()
    how = plots.report_how(data) if data else {}
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='muted'>Generated {_dt.datetime.now().isoformat(timespec='seconds')} "
             "by LM Compression Lab.</p>"]
    if notes:
        parts.append(f"<p>{html.escape(notes)}</p>")
    first = True
    if data:
        parts += ["<h2>Settings</h2>", _table(_flatten("", data.get("config") or {}) or [("config", "none")]),
                  "<h2>Results</h2>", _table(results_rows(data)), "<h2>Charts</h2>"]
        for name, builder in (("size", plots.size_figure), ("latency", plots.latency_figure),
                              ("perplexity", plots.perplexity_figure)):
            parts.append(_figure_html(builder(data), first))
            parts.append(f"<p class='how'>{html.escape(how.get(name, ''))}</p>")
            first = False
        if data.get("history"):
            parts += ["<h3>Distillation curve</h3>", _figure_html(plots.loss_curve_figure(data["history"]), first)]
        parts += ["<h2>Generations</h2>", generations_html(data.get("generation"))]
    else:
        parts.append("<p class='muted'>No run yet in this session.</p>")
    if trail:
        parts += ["<h2>Every configuration tried</h2>", _figure_html(plots.trail_figure(trail), first),
                  trail_table_html(trail)]
    parts += ["<h2>Machine and library versions</h2>", _table(list(machine.items())), "</body></html>"]
    return "\n".join(parts)
