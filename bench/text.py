"""How bench values read as text: numbers, {mean, std} summaries and markdown tables.

The leaf of bench/'s imports: results.md (report.py, sections_md.py) and README's table (readme.py) format the
same values the same way from here, and this module imports nothing of bench/.
"""
from __future__ import annotations


def fmt(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def format_value(value) -> str:
    """A headline value as text: numbers to 3 decimals, {mean, std} as mean ± std, an error entry as "failed",
    dicts as key: value pairs."""
    if isinstance(value, dict) and "error" in value:
        return "failed"
    if isinstance(value, dict) and set(value) == {"mean", "std"}:
        return f"{fmt(value['mean'])} ± {fmt(value['std'])}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    return fmt(value)


def md_table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return out + [""]


def with_spread(value, spread: dict | None) -> str:
    """A value and, for a timing whose runs were kept, their range: "0.500 (0.412–0.561 over 5 runs)"."""
    if not spread:
        return format_value(value)
    return f"{format_value(value)} ({fmt(spread['min'])}–{fmt(spread['max'])} over {spread['runs']} runs)"


VERDICTS = {"met": "met", "missed": "**missed**", "at the limit": "at the limit", "failed": "**failed**",
            "not measured": "not measured"}


def verdict(row: dict) -> str:
    """A target row's verdict as the tables show it (rows written before verdicts existed carry only ``met``)."""
    word = row.get("verdict") or {True: "met", False: "missed", None: "not measured"}[row["met"]]
    return VERDICTS[word]


def target_value(row: dict) -> str:
    """A target row's value as the tables show it: "failed" for no measurement (an error entry, 0, NaN), timings
    with their runs' range."""
    return "failed" if row.get("verdict") == "failed" else with_spread(row["value"], row.get("spread"))

