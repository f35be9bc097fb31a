"""Pure plotly figure builders for the app and the HTML report (no streamlit here).

Every builder takes plain data - a measure.Report, its ``to_dict()`` form, a list of those (the
session trail), or a pandas DataFrame from the sweep - and returns a ``plotly.graph_objects.Figure``.
Working from the dict form lets an imported runs history (JSON) be drawn exactly like a fresh run.
Captions saying how each number was obtained live next to the builders (``*_how``).
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

MB = 1e6
# Colour-blind-safe pair (Okabe-Ito) that stays distinct on a washed-out projector.
BASE_COLOR = "#0072B2"
COMPRESSED_COLOR = "#D55E00"
ACCENT_COLOR = "#009E73"
MUTED_COLOR = "#999999"
FONT_SIZE = 16


def as_dict(report: Any) -> dict:
    """A Report (dataclass with ``to_dict``) or an already-plain dict, as a plain dict."""
    if report is None:
        return {}
    if isinstance(report, Mapping):
        return dict(report)
    return report.to_dict()


def _section(report: Any, name: str) -> dict:
    value = as_dict(report).get(name) or {}
    return value if isinstance(value, Mapping) else {"value": value}


def _layout(fig: go.Figure, title: str, height: int = 360) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.0, "xanchor": "left"},
        template="plotly_white",
        font={"size": FONT_SIZE},
        height=height,
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
        showlegend=False,
    )
    return fig


def config_label(config: Mapping | None) -> str:
    """A short human label for a CompressionConfig dict, e.g. ``4-bit g128 RTN · 50% magnitude``."""
    config = config or {}
    parts = []
    q = config.get("quantization")
    if q:
        bits = q.get("bits")
        if bits == 16:
            parts.append(q.get("dtype16", "bf16"))
        else:
            gran = q.get("granularity", "group")
            gran_txt = f"g{q.get('group_size')}" if gran == "group" else gran
            sym = "sym" if q.get("symmetric") else ("minmax" if q.get("grid") == "minmax" else "asym")
            mixed = f" +{len(q['layer_bits'])} per-layer" if q.get("layer_bits") else ""
            parts.append(f"{bits}-bit {gran_txt} {sym} {str(q.get('method', 'rtn')).upper()}{mixed}")
    p = config.get("pruning")
    if p:
        pattern = p.get("pattern", "unstructured")
        amount = pattern if pattern != "unstructured" else f"{round(100 * float(p.get('sparsity', 0)))}%"
        parts.append(f"{amount} {p.get('method', 'magnitude')}")
    d = config.get("distillation")
    if d:
        parts.append(f"KD {d.get('mode', 'recovery')} T={d.get('temperature')} {d.get('steps')} steps")
    return " · ".join(parts) if parts else "fp32 (uncompressed)"


_METHOD_WORDS = {"rtn": "round-to-nearest", "gptq": "GPTQ (error-compensating)", "hqq": "HQQ (fitted zero-points)",
                 "mse": "MSE grid (searched, activation-weighted)"}


def describe_config(config: Mapping | None) -> str:
    """The same setting in plain words for a heading: '4-bit, groups of 128, round-to-nearest · 50% of weights
    removed (magnitude)'; config_label gives the compact notation shown on hover."""
    config = config or {}
    parts = []
    q = config.get("quantization")
    if q:
        if q.get("bits") == 16:
            parts.append(f"16-bit floats ({q.get('dtype16', 'bf16')})")
        else:
            gran = q.get("granularity", "group")
            where = {"group": f"groups of {q.get('group_size')}", "channel": "one scale per output channel",
                     "tensor": "one scale per matrix"}.get(gran, gran)
            method = _METHOD_WORDS.get(str(q.get("method", "rtn")), str(q.get("method")))
            grid = ", min-max grid" if q.get("grid") == "minmax" and not q.get("symmetric") else ""
            mixed = f", {len(q['layer_bits'])} per-layer override(s)" if q.get("layer_bits") else ""
            parts.append(f"{q.get('bits')}-bit, {where}, {method}{grid}{mixed}")
    p = config.get("pruning")
    if p:
        pattern = p.get("pattern", "unstructured")
        amount = (f"{pattern} pattern" if pattern != "unstructured"
                  else f"{round(100 * float(p.get('sparsity', 0)))}% of weights")
        parts.append(f"{amount} removed ({p.get('method', 'magnitude')})")
    d = config.get("distillation")
    if d:
        who = "a smaller student" if d.get("mode") == "student" else "recovery"
        moved = ", codes move" if q and d.get("trains") == "codes" else ""
        parts.append(f"distillation ({who}, temperature {d.get('temperature')}, {d.get('steps')} steps{moved})")
    return " · ".join(parts) if parts else "uncompressed (fp32)"


def _base_ppl(report: Any) -> dict:
    base = as_dict(report).get("base_perplexity")
    if isinstance(base, Mapping):
        return dict(base)
    return {"value": base, "stderr": None} if base is not None else {}


def size_figure(report: Any) -> go.Figure:
    """Bars: base float size vs the compressed model counted three ways (theoretical/packed/runtime)."""
    size = _section(report, "size")
    # short names that fit a third of a 1024 px page without turning (turned labels collide); the hover and the
    # caption's details say what each counts
    names = ["base", "theory", "packed", "in RAM"]
    full = ["the original, fp32", "theoretical: codes + scales", "packed: the files written", "runtime: in memory"]
    keys = ["base_bytes", "theoretical_bytes", "packed_bytes", "runtime_bytes"]
    values = [(size.get(k) or 0) / MB for k in keys]
    colors = [BASE_COLOR] + [COMPRESSED_COLOR] * 3
    base = values[0] or 1.0
    text = [f"{v:.3g}" + ("" if i == 0 else f"<br>{v / base:.0%}") for i, v in enumerate(values)]
    fig = go.Figure(go.Bar(x=names, y=values, marker_color=colors, text=text, textposition="outside",
                           textangle=0, cliponaxis=False, customdata=full, constraintext="none",
                           textfont={"size": 12},
                           hovertemplate="%{customdata}: %{y:.3f} MB<extra></extra>"))
    fig.update_yaxes(title_text="MB", range=[0, max(values + [1e-9]) * 1.3])
    fig.update_xaxes(tickangle=0, tickfont={"size": 12})
    return _layout(fig, "Model size").update_layout(margin={"l": 45, "r": 10})


def _speed_bar(fig: go.Figure, name: str, color: str, values: tuple[float, float], labels: tuple[str, str]) -> None:
    """One model's prefill and decode bars (left and right panels), labels above the bars at full size."""
    for col, (value, label) in enumerate(zip(values, labels), start=1):
        fig.add_trace(go.Bar(x=[name], y=[value], marker_color=color, text=[label], textposition="outside",
                             textangle=0, cliponaxis=False, name=name, showlegend=False), row=1, col=col)


def latency_figure(report: Any) -> go.Figure:
    """Prefill time (ms, lower is better) and decode throughput (tokens/s, higher is better), base beside
    compressed (timed alternately in one call); the speed ratio the measurement supports is written on the bar.
    The title names the kind of kernel in a few words (``kernel_kind``); the whole kernel text is in the caption's
    details, so no title length can run into the panel titles."""
    lat, base, speed = _section(report, "latency"), _section(report, "base_latency"), _section(report, "speed")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("prefill ms ↓", "decode tok/s ↑"),
                        horizontal_spacing=0.25)
    prefill, decode = lat.get("prefill_ms") or 0, lat.get("decode_tokens_per_s") or 0
    if base:
        base_prefill, base_decode = base.get("prefill_ms") or 0, base.get("decode_tokens_per_s") or 0
        _speed_bar(fig, "base", BASE_COLOR, (base_prefill, base_decode), (_short(base_prefill), _short(base_decode)))
    labels = [_short(prefill), _short(decode)]
    if speed:
        labels[0] += f"<br>{short_ratio(speed.get('prefill_text'))}"
        labels[1] += f"<br>{short_ratio(speed.get('decode_text'))}"
    _speed_bar(fig, "compressed", COMPRESSED_COLOR, (prefill, decode), tuple(labels))
    fig = _layout(fig, f"Latency<br><sup>{kernel_kind(lat.get('kernel'))}</sup>")
    for col, values in enumerate(((base.get("prefill_ms") or 0, prefill), (base.get("decode_tokens_per_s") or 0,
                                                                            decode)), start=1):
        fig.update_yaxes(range=[0, max(values) * 1.6 or 1], row=1, col=col)   # room for the labels above
    # the panel titles sit below the two-line title: plotly puts them just above the plot area
    fig.update_layout(margin={"t": 100}, uniformtext={"minsize": 11, "mode": "show"})
    return fig


def _short(value: float) -> str:
    """A bar label that fits a narrow bar: '413', '54.2', '4.31', '1,456'."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


# What runs the compressed layers, in a few words for a chart title (the whole kernel text goes in the details).
_KERNEL_KINDS = (("int4pack", "real int4 kernel"), ("int8pack", "real int8 kernel"), ("dynamic", "torch dynamic int8"),
                 ("simulat", "simulated: dense float weights"), ("fp32", "dense fp32"), ("bf16", "dense bf16"),
                 ("fp16", "dense fp16"))


def kernel_kind(kernel: str | None) -> str:
    """'real int4 kernel', 'real int8 kernel', 'simulated: dense float weights', … from a Report's kernel text;
    a mix of kinds reads '<first> + more' (the first named part runs the most layers)."""
    text = (kernel or "").lower()
    if not text:
        return "kernel unknown"
    if "de-quantized once" in text and "int4pack" not in text:
        return "dense bf16: no kernel for these codes"
    if re.match(r"[\d/]+-bit codes in groups as two 4-bit planes", text):   # the planes run every layer
        return "real int4 kernel, two planes"
    kinds = [words for key, words in _KERNEL_KINDS if key in text.split(";")[0]]
    return kinds[0] if kinds else _wrap(kernel or "", 36)[0]


def _wrap(text: str, width: int) -> list[str]:
    """Words of ``text`` in lines of at most ``width`` characters (plotly titles do not wrap themselves)."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def short_ratio(text: str | None) -> str:
    """'≈ 1× (within the noise of the runs)' -> '≈ 1×' on a bar (the caption says why)."""
    return (text or "").split(" (")[0]


LOG_AXIS_RATIO = 10   # perplexity on a log axis once compressed/base passes this: the base bar stays visible


def perplexity_figure(report: Any) -> go.Figure:
    """Base vs compressed perplexity with ± standard error, KL and top-1 agreement in the title. Values are
    written under the bars with their names (never inside: a small bar has no room); past a 10× ratio the axis is logarithmic,
    so the base bar does not vanish beside a collapsed model."""
    ppl = _section(report, "perplexity")
    base = _base_ppl(report)
    data = as_dict(report)
    values = [base.get("value") or 0, ppl.get("value") or 0]
    log = min(values) > 0 and max(values) / min(values) > LOG_AXIS_RATIO
    # the values are written under the bars, with the names: above a bar its error bar would cross them
    fig = go.Figure(go.Bar(
        x=[f"base<br><b>{_ppl_text(values[0])}</b>", f"compressed<br><b>{_ppl_text(values[1])}</b>"], y=values,
        error_y={"type": "data", "array": [base.get("stderr") or 0, ppl.get("stderr") or 0], "visible": True},
        marker_color=[BASE_COLOR, COMPRESSED_COLOR], hovertemplate="%{y:.3f}<extra></extra>"))
    extras = []
    if data.get("kl_to_base") is not None:
        extras.append(f"KL {data['kl_to_base']:.3f} nats")
    if data.get("top1_agreement") is not None:
        extras.append(f"top-1 {data['top1_agreement']:.0%}")
    if log:
        fig.update_yaxes(type="log", range=[math.log10(min(values)) - 0.3, math.log10(max(values)) + 0.3],
                         title_text="perplexity, log scale")
    else:
        fig.update_yaxes(range=[0, max(values + [1e-9]) * 1.2], title_text="perplexity (lower is better)")
    # KL and agreement on their own subtitle line: one long title is cut in a third of a page
    fig = _layout(fig, "Perplexity" + (f"<br><sup>{', '.join(extras)}</sup>" if extras else ""))
    fig.update_layout(margin={"t": 80})
    return fig


def _ppl_text(value: float) -> str:
    """'6.08', '10.4', '1,934,211': two decimals below 10, one below 1000, then whole numbers."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def protocol_name(report: Any) -> str:
    """'quick protocol, 512 tokens' or 'full protocol, 2048 tokens': which measurement a number comes from."""
    proto = as_dict(report).get("protocol") or {}
    quick = bool(proto.get("latency_from_generation")) or proto.get("latency_base") is False
    tokens = proto.get("eval_tokens")
    return f"{'quick' if quick else 'full'} protocol" + (f", {tokens} tokens" if tokens else "")


def slower_or_faster(ratio: float | None) -> str:
    """A speed ratio (base time ÷ compressed time) in words: 2.1 -> '2.1× faster', 0.61 -> '1.6× slower'."""
    if not ratio or ratio <= 0:
        return ""
    if 0.95 <= ratio <= 1.05:
        return "about as fast"
    return f"{ratio:.2g}× faster" if ratio > 1 else f"{1 / ratio:.2g}× slower"


def _latency_headline(data: Mapping, lat: Mapping) -> str:
    speed, on = data.get("speed") or {}, kernel_kind(lat.get("kernel"))
    runs = [r for r in lat.get("decode_tokens_per_s_runs") or [] if r]
    spread = f" (runs {_short(min(runs))}–{_short(max(runs))})" if len(runs) > 1 else ""
    busy = (f" Timed while the machine was busy (load {lat['load_average']:.1f} on {os.cpu_count()} cores): slower "
            "than usual, not kept." if lat.get("busy") and lat.get("load_average") is not None else "")
    if speed.get("decode_ratio"):
        return (f"Decoding is {slower_or_faster(speed['decode_ratio'])} than the original, reading the prompt "
                f"{slower_or_faster(speed.get('prefill_ratio'))} ({on}, both timed alternately).{busy}")
    return (f"{_short(lat['decode_tokens_per_s'])} tokens/s decoding{spread}, {_short(lat.get('prefill_ms') or 0)} ms "
            f"to read the prompt ({on}; timed alone, no ratio while exploring).{busy}")


def headlines(report: Any) -> dict[str, str]:
    """One plain sentence per chart (size, latency, perplexity): what it shows and its headline number. The
    details of how each was measured stay in ``report_how``."""
    data, out = as_dict(report), {}
    size = data.get("size") or {}
    if size.get("packed_bytes") and size.get("base_bytes"):
        packed, base = size["packed_bytes"], size["base_bytes"]
        memory = ("it still runs at the original's size (simulated)" if size.get("simulated")
                  else f"{(size.get('runtime_bytes') or 0) / MB:.3g} MB in memory while it runs")
        out["size"] = f"Stored in {packed / MB:.3g} MB, {packed / base:.0%} of the original's {base / MB:.3g} MB; {memory}."
    lat = data.get("latency") or {}
    if lat.get("decode_tokens_per_s"):
        out["latency"] = _latency_headline(data, lat)
    ppl, base_ppl = data.get("perplexity") or {}, _base_ppl(report).get("value")
    if ppl.get("value") and base_ppl:
        out["perplexity"] = (f"Perplexity {_ppl_text(ppl['value'])} against {_ppl_text(base_ppl)} for the original "
                             f"(×{_ppl_text(ppl['value'] / base_ppl)}; {protocol_name(report)}).")
    return out


def report_how(report: Any) -> dict[str, str]:
    """Captions per figure, as measure.how_labels wrote them into the Report (the one place they come from).

    A perplexity caption also carries KL and top-1 agreement; an imported run without captions gets none.
    """
    own = as_dict(report).get("how") or {}
    how = {k: v for k, v in own.items() if v} if isinstance(own, Mapping) else {}
    extra = "; ".join(f"{label}: {how[k]}" for k, label in (("kl_to_base", "KL"), ("top1_agreement", "top-1"))
                      if how.get(k))
    if how.get("perplexity") and extra:
        how["perplexity"] = f"{how['perplexity']}. {extra}."
    if how.get("latency") and how.get("roofline"):
        how["latency"] = f"{how['latency']}. Roofline: {how['roofline']}."
    return how


def stages_perplexity_figure(after: Any, before: Any) -> go.Figure:
    """Base → before distillation → after distillation, on the same tokens (the before/after Reports share a
    protocol, so their base perplexities are the same number)."""
    base, pre, post = _base_ppl(after), _section(before, "perplexity"), _section(after, "perplexity")
    names = ["base", "before distillation", "after distillation"]
    values = [base.get("value") or 0, pre.get("value") or 0, post.get("value") or 0]
    errors = [base.get("stderr") or 0, pre.get("stderr") or 0, post.get("stderr") or 0]
    fig = go.Figure(go.Bar(x=names, y=values, error_y={"type": "data", "array": errors, "visible": True},
                           marker_color=[BASE_COLOR, MUTED_COLOR, COMPRESSED_COLOR],
                           text=[f"{v:.2f}" for v in values], textposition="auto",
                           hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    fig.update_yaxes(title_text="perplexity (lower is better)")
    return _layout(fig, "Perplexity: base, before and after distillation")


def pareto_mask(xs: Sequence[float], ys: Sequence[float]) -> list[bool]:
    """True where no other point is at least as good on both axes and strictly better on one (minimise both)."""
    points = list(zip(xs, ys))
    return [not any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for x2, y2 in points)
            for x, y in points]


def trail_points(trail: Iterable[Any]) -> list[dict]:
    """Flatten trail reports into points: size MB, latency, perplexity, label."""
    points = []
    for i, item in enumerate(trail):
        data = as_dict(item)
        size = data.get("size") or {}
        ppl = data.get("perplexity") or {}
        lat = data.get("latency") or {}
        points.append({
            "run": i + 1,
            "model": data.get("model", ""),
            "label": config_label(data.get("config")),
            "size_mb": (size.get("packed_bytes") or size.get("theoretical_bytes") or 0) / MB,
            "perplexity": ppl.get("value"),
            "stderr": ppl.get("stderr") or 0,
            "decode_tokens_per_s": lat.get("decode_tokens_per_s"),
        })
    return points


def trail_figure(trail: Iterable[Any], current: int | None = None) -> go.Figure:
    """Size vs perplexity for every configuration tried in the session; the frontier is drawn as a line."""
    points = [p for p in trail_points(trail) if p["perplexity"] is not None]
    fig = go.Figure()
    if points:
        xs = [p["size_mb"] for p in points]
        ys = [p["perplexity"] for p in points]
        frontier = sorted((x, y) for x, y, keep in zip(xs, ys, pareto_mask(xs, ys)) if keep)
        # open rings as well as the dotted line: a frontier of one point has no line to see
        fig.add_trace(go.Scatter(x=[f[0] for f in frontier], y=[f[1] for f in frontier], mode="lines+markers",
                                 line={"color": ACCENT_COLOR, "dash": "dot", "width": 3},
                                 marker={"size": 22, "symbol": "circle-open", "color": ACCENT_COLOR,
                                         "line": {"width": 3}},
                                 name="frontier", hoverinfo="skip"))
        colors = [COMPRESSED_COLOR if current is not None and p["run"] - 1 == current else BASE_COLOR
                  for p in points]
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name="runs",
            error_y={"type": "data", "array": [p["stderr"] for p in points], "visible": True},
            marker={"size": 12, "color": colors, "line": {"width": 1, "color": "white"}},
            customdata=[[p["run"], p["label"], p["model"]] for p in points],
            hovertemplate="run %{customdata[0]} · %{customdata[2]}<br>%{customdata[1]}"
                          "<br>%{x:.2f} MB · ppl %{y:.2f}<extra></extra>"))
    fig.update_xaxes(title_text="packed size (MB)")
    fig.update_yaxes(title_text="perplexity")
    return _layout(fig, "Trail: every run (lower-left is better)")


def pareto_figure(df, x: str, y: str, title: str, x_title: str, y_title: str,
                  frontier: str | None = None, hover: str = "label", text: str | None = None,
                  note: str = "") -> go.Figure:
    """Sweep scatter with the Pareto frontier highlighted and joined by a line.

    ``frontier`` names a boolean column that marks it (sweep.with_pareto); without one, x and y are
    both minimised here. ``text`` names a column of short labels printed beside the points (placed so that
    they overlap as little as the plot allows); a row with ``is_original`` is drawn as a blue diamond. ``note``
    replaces the frontier: it is printed under the title and no frontier is drawn (say why there is none).
    """
    fig = go.Figure()
    df = df[df[y].notna() & df[x].notna()]
    if len(df):
        mask = [False] * len(df) if note else (list(df[frontier]) if frontier else
                                                 pareto_mask(list(df[x]), list(df[y])))
        original = list(df["is_original"]) if "is_original" in df else [False] * len(df)
        groups = (("dominated", [not m and not o for m, o in zip(mask, original)], MUTED_COLOR, "circle"),
                  ("Pareto frontier", [m and not o for m, o in zip(mask, original)], COMPRESSED_COLOR, "circle"),
                  ("original", original, BASE_COLOR, "diamond"))
        positions = label_positions(list(df[x]), list(df[y]), list(df[text])) if text else None
        for name, keep, color, symbol in groups:
            _pareto_trace(fig, df, keep, x, y, hover, text, positions, name, color, symbol)
        _frontier_line(fig, df[mask], x, y)
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title)
    full_title = title + (f"<br><sup>{'<br>'.join(_wrap(note, 70))}</sup>" if note else "")
    fig = _layout(fig, full_title, height=460 if note else 420)
    fig.update_layout(showlegend=True, legend={"orientation": "h", "y": -0.2},
                      margin={"t": 110 if note else 60})
    return fig


def _pareto_trace(fig, df, keep, x, y, hover, text, positions, name, color, symbol) -> None:
    part = df[keep]
    if not len(part) and name != "Pareto frontier":
        return
    shown = [p for p, k in zip(positions, keep) if k] if positions else None
    fig.add_trace(go.Scatter(
        x=part[x], y=part[y], mode="markers+text" if text else "markers", name=name,
        text=list(part[text]) if text else None, textposition=shown, textfont={"size": 13, "color": "#333"},
        cliponaxis=False, marker={"size": 14 if symbol == "diamond" else 11, "color": color, "symbol": symbol},
        customdata=part[[hover]], hovertemplate="%{customdata[0]}<br>%{x:.3g}, ppl %{y:.2f}<extra></extra>"))


def _frontier_line(fig, on, x: str, y: str) -> None:
    if len(on) > 1:
        on = on.sort_values(x)
        fig.add_trace(go.Scatter(x=on[x], y=on[y], mode="lines", line={"color": COMPRESSED_COLOR, "dash": "dot"},
                                 hoverinfo="skip", showlegend=False))


def sweep_figures(table, latency_note: str = "") -> tuple[go.Figure, go.Figure]:
    """(size vs perplexity, latency vs perplexity) of a sweep table (sweep.with_original), points labelled; the
    latency chart draws no frontier when ``latency_note`` says why there is none."""
    size = pareto_figure(table, "size_mb", "perplexity", "Size vs perplexity", "size (MB)", "perplexity",
                         frontier="pareto_size", text="short_label")
    latency = pareto_figure(table, "decode_ms_per_token", "perplexity", "Latency vs perplexity",
                            "decode time per token (ms)", "perplexity", frontier="pareto_latency",
                            text="short_label", note=latency_note)
    return size, latency


LABEL_SPOTS = ("top center", "bottom center", "middle right", "middle left", "top right", "bottom left",
               "top left", "bottom right")


def label_positions(xs: Sequence[float], ys: Sequence[float], texts: Sequence[str],
                    width_px: float = 560, height_px: float = 300, font_px: float = 13) -> list[str]:
    """A textposition per point chosen greedily so that labels overlap each other and the markers as little as
    possible; boxes are estimated in pixels of a plot ``width_px`` × ``height_px`` (plotly places no labels itself).
    """
    def scale(values, size):
        low, high = min(values), max(values)
        return [(v - low) / (high - low) * size if high > low else size / 2 for v in values]

    px, py = scale(xs, width_px), scale(ys, height_px)
    taken = [(a - 6, b - 6, a + 6, b + 6) for a, b in zip(px, py)]   # the markers themselves
    chosen = []
    for a, b, label in zip(px, py, texts):
        w, h = 0.6 * font_px * len(str(label)), font_px + 2
        boxes = {spot: _label_box(spot, a, b, w, h) for spot in LABEL_SPOTS}
        spot = min(LABEL_SPOTS, key=lambda s: (sum(_overlap(boxes[s], t) for t in taken), LABEL_SPOTS.index(s)))
        taken.append(boxes[spot])
        chosen.append(spot)
    return chosen


def _label_box(spot: str, a: float, b: float, w: float, h: float) -> tuple[float, float, float, float]:
    vertical, horizontal = spot.split()
    y0 = {"top": b + 8, "middle": b - h / 2, "bottom": b - 8 - h}[vertical]
    x0 = {"center": a - w / 2, "right": a + 8, "left": a - 8 - w}[horizontal]
    return x0, y0, x0 + w, y0 + h


def _overlap(one: tuple, two: tuple) -> float:
    dx = min(one[2], two[2]) - max(one[0], two[0])
    dy = min(one[3], two[3]) - max(one[1], two[1])
    return dx * dy if dx > 0 and dy > 0 else 0.0


def sensitivity_heatmap(df, value: str = "sqnr_db") -> go.Figure:
    """Layers × bit-widths heatmap of a sensitivity DataFrame (columns layer, bits, rel_mse, sqnr_db)."""
    table = df.pivot_table(index="layer", columns="bits", values=value, sort=False)
    colorscale = "Viridis" if value == "sqnr_db" else "Viridis_r"
    fig = go.Figure(go.Heatmap(
        z=table.values, x=[f"{b}-bit" for b in table.columns], y=list(table.index), colorscale=colorscale,
        colorbar={"title": {"text": "SQNR dB" if value == "sqnr_db" else value}},
        hovertemplate="%{y}<br>%{x}: %{z:.3g}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    height = max(360, 22 * len(table.index) + 120)
    return _layout(fig, "Per-layer sensitivity (higher SQNR = more robust)", height=height)


def _visible_token(token: str) -> str:
    """A token piece with its spaces and newlines made visible (␣, ↵), so ' the' and 'the' differ on screen."""
    return token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def topk_figure(view: Mapping[str, Any]) -> go.Figure:
    """The teacher's next-token probabilities at T = 1 and at T on the same tokens (the top k at T = 1), then all
    other tokens together, grouped bars on a log axis so that both temperatures stay visible.

    ``view`` is a ``distill.TemperatureView`` as a dict: tokens, at_one, at_t, rest (T = 1, T), vocab, temperature.
    """
    temperature, tokens = view["temperature"], list(view["tokens"])
    shown = [_visible_token(t) for t in tokens] + [f"other {view['vocab'] - len(tokens):,} tokens"]
    at_one, at_t = list(view["at_one"]) + [view["rest"][0]], list(view["at_t"]) + [view["rest"][1]]
    fig = go.Figure([
        go.Bar(x=shown, y=at_one, name="T = 1", marker_color=BASE_COLOR,
               hovertemplate="%{x}: %{y:.3%}<extra>T = 1</extra>"),
        go.Bar(x=shown, y=at_t, name=f"T = {temperature:g}", marker_color=COMPRESSED_COLOR,
               hovertemplate=f"%{{x}}: %{{y:.3%}}<extra>T = {temperature:g}</extra>"),
    ])
    # the axis starts at least a third of a decade below the smallest bar, so that bar still has a height
    bottom = math.floor(math.log10(min(p for p in at_one + at_t + [1.0] if p > 0)) - 0.3)
    decades = range(bottom, 1)
    fig.update_yaxes(title_text="probability (log scale)", type="log", range=[bottom, 0.05],
                     tickvals=[10.0 ** d for d in decades], ticktext=[f"{100 * 10.0 ** d:g}%" for d in decades])
    fig = _layout(fig, f"Teacher's next-token distribution at T = 1 vs T = {temperature:g}")
    fig.update_layout(barmode="group", showlegend=True, legend={"orientation": "h", "y": 1.12, "x": 1,
                                                                  "xanchor": "right"})
    return fig


def loss_curve_figure(history: Sequence[Mapping]) -> go.Figure:
    """Distillation curve: loss per step, and perplexity on a second axis when recorded."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    steps = [h.get("step") for h in history]
    fig.add_trace(go.Scatter(x=steps, y=[h.get("loss") for h in history], mode="lines+markers",
                             name="KD loss", line={"color": COMPRESSED_COLOR}), secondary_y=False)
    ppl = [(h.get("step"), h.get("ppl")) for h in history if h.get("ppl") is not None]
    if ppl:
        fig.add_trace(go.Scatter(x=[s for s, _ in ppl], y=[v for _, v in ppl], mode="lines+markers",
                                 name="perplexity", line={"color": BASE_COLOR, "dash": "dot"}),
                      secondary_y=True)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="loss", secondary_y=False)
    fig.update_yaxes(title_text="perplexity", secondary_y=True)
    fig = _layout(fig, "Distillation: loss and perplexity per step")
    fig.update_layout(showlegend=True, legend={"orientation": "h", "y": 1.12, "x": 1, "xanchor": "right"})
    return fig


def recovery_by_temperature_figure(by_temperature: Mapping[str, Mapping], best: float | None = None) -> go.Figure:
    """Recovered fraction of the lost perplexity vs distillation temperature: mean ± std over seeds, best T marked.

    ``by_temperature`` is the bench's ``kd_recovered_fraction_by_temperature``: {"T": {"mean", "std"}}.
    """
    points = sorted((float(t), v["mean"], v.get("std") or 0.0) for t, v in by_temperature.items()
                    if v.get("mean") is not None)
    fig = go.Figure(go.Scatter(x=[t for t, _, _ in points], y=[m for _, m, _ in points], mode="lines+markers",
                               error_y={"type": "data", "array": [s for _, _, s in points], "visible": True},
                               name="mean ± std over seeds", line={"color": COMPRESSED_COLOR}))
    fig.add_hline(y=0, line={"color": MUTED_COLOR, "dash": "dot"})
    fig.add_hline(y=1, line={"color": BASE_COLOR, "dash": "dot"}, annotation_text="all of the loss recovered")
    if best is not None:
        fig.add_vline(x=best, line={"color": ACCENT_COLOR, "dash": "dash"}, annotation_text=f"best T = {best:g}")
    fig.update_xaxes(title_text="temperature T", type="log", tickvals=[t for t, _, _ in points],
                     ticktext=[f"{t:g}" for t, _, _ in points])
    fig.update_yaxes(title_text="recovered fraction of lost perplexity")
    return _layout(fig, "Recovery distillation: recovered fraction vs temperature")


def weight_histogram_figure(weights: Sequence[float], levels: Sequence[float], bits: int,
                            layer: str) -> go.Figure:
    """Histogram of one layer's weights with the 2**bits quantization levels drawn over it."""
    fig = go.Figure(go.Histogram(x=list(weights), nbinsx=120, marker_color=BASE_COLOR, opacity=0.8,
                                 name="weights"))
    shown_levels = list(levels) if len(levels) <= 64 else []
    for level in shown_levels:
        fig.add_vline(x=float(level), line={"color": COMPRESSED_COLOR, "width": 1.5})
    title = f"{layer}: {2 ** bits if bits < 16 else 'fp16'} levels ({bits}-bit)"
    if not shown_levels:
        title += " (too many levels to draw)"
    fig.update_xaxes(title_text="weight value")
    fig.update_yaxes(title_text="count")
    return _layout(fig, title)


def quant_error_figure(bits: Sequence[int], rel_mse: Sequence[float], chosen: int | None = None) -> go.Figure:
    """Relative mean-squared quantization error of one layer against the bit-width (log scale), with the textbook
    4×-per-bit line through the widest integer width for comparison."""
    fig = go.Figure(go.Scatter(x=list(bits), y=list(rel_mse), mode="lines+markers",
                               marker={"size": 10, "color": BASE_COLOR}, name="error",
                               hovertemplate="%{x}-bit: %{y:.2e}<extra></extra>"))
    if chosen in bits:
        i = list(bits).index(chosen)
        fig.add_trace(go.Scatter(x=[chosen], y=[rel_mse[i]], mode="markers", name="chosen",
                                 marker={"size": 18, "color": COMPRESSED_COLOR}))
    integer = [(b, e) for b, e in zip(bits, rel_mse) if b < 16]
    if integer:   # the textbook rule drawn through the widest integer width: the error falls 4× per bit
        last_bits, last_error = integer[-1]
        fig.add_trace(go.Scatter(x=[b for b, _ in integer], y=[last_error * 4.0 ** (last_bits - b) for b, _ in integer],
                                 mode="lines", name="textbook: ÷4 per bit",
                                 line={"color": MUTED_COLOR, "dash": "dot"}))
    fig.update_xaxes(title_text="bits", tickvals=list(bits))
    fig.update_yaxes(title_text="relative MSE ‖W−Ŵ‖²/‖W‖²", type="log")
    fig = _layout(fig, "Quantization error vs bit-width")
    fig.update_layout(showlegend=True, legend={"orientation": "h", "y": 1.12, "x": 1, "xanchor": "right"})
    return fig


def mask_figure(masks: Mapping[str, Any]) -> go.Figure:
    """Side-by-side kept/removed pictures of one weight block, one panel per pruning pattern."""
    names = list(masks)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.06)
    for i, name in enumerate(names, start=1):
        grid = [[1 if v else 0 for v in row] for row in masks[name]]
        fig.add_trace(go.Heatmap(z=grid, zmin=0, zmax=1, showscale=False,
                                 colorscale=[[0, "#EEEEEE"], [1, BASE_COLOR]],
                                 hovertemplate="row %{y}, col %{x}: %{z}<extra></extra>"), row=1, col=i)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{i if i > 1 else ''}", row=1, col=i)
    return _layout(fig, "Pruning masks on one weight block (blue = kept, grey = removed)", height=420)


def allocation_heatmap(damage: Mapping[str, Mapping[int, float]], chosen: Mapping[str, int]) -> go.Figure:
    """Layers × bit-widths: colour = log10 of the predicted KL a layer adds at that width, ● = the chosen width."""
    import math

    layers = list(damage)
    widths = sorted({b for row in damage.values() for b in row})
    z = [[math.log10(max(damage[n][b], 1e-12)) for b in widths] for n in layers]
    fig = go.Figure(go.Heatmap(
        z=z, x=[_width_label(b) for b in widths], y=layers, colorscale="Viridis_r",
        colorbar={"title": {"text": "log10 KL"}}, hovertemplate="%{y}<br>%{x}: log10 KL %{z:.2f}<extra></extra>"))
    fig.add_trace(go.Scatter(
        x=[_width_label(chosen[n]) for n in layers], y=layers, mode="markers",
        marker={"symbol": "circle", "size": 9, "color": "white", "line": {"color": "black", "width": 1}},
        name="chosen", hovertemplate="%{y}: %{x} (chosen)<extra></extra>"))
    # one invisible square per cell: plotly reports clicks on scatter points, not on heatmap cells
    cells = [(n, b) for n in layers for b in widths]
    fig.add_trace(go.Scatter(
        x=[_width_label(b) for _, b in cells], y=[n for n, _ in cells], mode="markers", name="cells",
        marker={"symbol": "square", "size": 12, "color": "rgba(0,0,0,0)"}, showlegend=False,
        hovertemplate="%{y}: click to set %{x}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig = _layout(fig, "Bits per layer (● chosen; colour = predicted damage; click a cell to set that width)",
                  height=max(360, 14 * len(layers) + 120))
    fig.update_layout(clickmode="event+select")
    return fig


def _width_label(bits: int) -> str:
    return "float" if bits == 16 else f"{bits}-bit"


def clicked_widths(selection: Mapping | None) -> dict[str, int]:
    """{layer: bits} for the heatmap cells a selection event names (Streamlit's ``on_select`` state:
    {"selection": {"points": [{"x": "3-bit", "y": layer, ...}]}}); points off the grid are ignored."""
    points = ((selection or {}).get("selection") or {}).get("points") or []
    chosen = {}
    for point in points:
        label, layer = point.get("x"), point.get("y")
        if label == "float":
            chosen[layer] = 16
        elif isinstance(label, str) and label.endswith("-bit") and label[:-4].isdigit() and isinstance(layer, str):
            chosen[layer] = int(label[:-4])
    return chosen


def budget_figure(points: Sequence[Mapping]) -> go.Figure:
    """Perplexity against packed bits per weight: uniform settings as a line, allocations as stars, the rule mix
    (same budget, no measurement) as a diamond.

    Each point: {"label", "bits_per_weight", "perplexity", "kind": "uniform" | "autopilot" | "rule mix"}."""
    fig = go.Figure()
    for kind, style in (("uniform", {"mode": "lines+markers+text", "marker": {"size": 9}}),
                        ("autopilot", {"mode": "markers+text", "marker": {"size": 16, "symbol": "star"}}),
                        ("rule mix", {"mode": "markers+text", "marker": {"size": 13, "symbol": "diamond"}})):
        chosen = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["bits_per_weight"])
        if chosen:
            fig.add_trace(go.Scatter(
                x=[p["bits_per_weight"] for p in chosen], y=[p["perplexity"] for p in chosen],
                text=[p["label"] for p in chosen], textposition="top center", name=kind, **style))
    fig.update_xaxes(title="packed bits per weight of the quantized layers (scales and zeros included)")
    fig.update_yaxes(title="perplexity", type="log")
    fig = _layout(fig, "Allocation beside uniform settings")
    fig.update_layout(showlegend=True)
    return fig
