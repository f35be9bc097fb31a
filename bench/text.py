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
    """A headline value as text: numbers to 3 decimals, {mean, std} as mean ± std, dicts as key: value pairs."""
    if isinstance(value, dict) and set(value) == {"mean", "std"}:
        return f"{fmt(value['mean'])} ± {fmt(value['std'])}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    return fmt(value)


def md_table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return out + [""]
