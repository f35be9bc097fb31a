"""Writing a bench run: the headline keys of issue 6, results.json as measured, results.md for people."""
from __future__ import annotations

import json
from pathlib import Path

from bench import targets

HEADLINE_KEYS = ["interactive_s_tiny", "interactive_s_default", "int8_speedup_prefill", "int8_speedup_decode",
                 "bf16_speedup_decode", "ppl_ratio_rtn4_g64_vs_torchao", "ppl_ratio_rtn4_vs_quanto",
                 "ppl_ratio_rtn3_g64_vs_torchao", "ppl_new3_over_rtn3", "autopilot_3p5_over_uniform4",
                 "autopilot_3p5_size_over_uniform4", "autopilot_3p0_over_uniform3",
                 "ppl_gptq3_over_rtn3", "ppl_wanda50_over_magnitude50", "kd_recovery_by_temperature",
                 "eval_fraction_of_matmul_peak"]


def _f(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def collect_headline(results: dict) -> dict:
    headline = {key: None for key in HEADLINE_KEYS}
    for section in results.get("sections", {}).values():
        headline.update({k: v for k, v in (section.get("headline") or {}).items() if k in headline})
    return headline


def busy_sections(results: dict) -> dict[str, float]:
    """Sections that started while other processes loaded the CPU (load average above half the cores)."""
    cores = (results.get("machine") or {}).get("cores") or 1
    return {name: s["load_average_at_start"] for name, s in results.get("sections", {}).items()
            if (s.get("load_average_at_start") or 0) > 0.5 * cores}


def finish(results: dict, out: Path) -> None:
    results["headline"] = collect_headline(results)
    # Sum of the sections, so a run merged from `--only` re-runs still reports what a whole run costs.
    results["total_wall_s"] = sum((sec.get("wall_s") or 0) for sec in results.get("sections", {}).values())
    busy = busy_sections(results)
    results["warning"] = ("timings of these sections were taken beside other work and are pessimistic "
                          "(load average at their start): " + ", ".join(f"{k} {v:.1f}" for k, v in busy.items())
                          ) if busy else None
    results["targets"] = targets.check(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(results))


def headline_table(results: dict) -> str:
    lines = ["key                              value"]
    for key, value in results.get("headline", {}).items():
        if isinstance(value, dict):
            value = ", ".join(f"T={k}: {v:.2f}" for k, v in value.items())
        lines.append(f"{key:<32} {_f(value)}")
    return "\n".join(lines)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return out + [""]


def _machine(results: dict) -> list[str]:
    m, v, s = results.get("machine", {}), results.get("versions", {}), results.get("scale", {})
    return [
        f"Generated {results.get('generated')} by `make bench` (`python -m bench`) in "
        f"{_f(results.get('total_wall_s'), 0)} s.", "",
        f"**Machine**: {m.get('cpu')}, {m.get('cores')} cores, {m.get('torch_threads')} torch threads, "
        f"{m.get('memory_gib')} GiB RAM, ISA {', '.join(m.get('isa', []))}; load average at start "
        f"{m.get('load_average_at_start')}. {m.get('platform')}, Python {m.get('python')}.", "",
        "**Libraries**: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
        f"**Scale** (`{s.get('name')}`): SmolLM2 perplexity on the first {s.get('eval_tokens')} tokens of the "
        f"first half of `web` (tiny model: {s.get('tiny_eval_tokens')} tokens of `tiny-heldout`), windows of "
        f"{s.get('context')} tokens without overlap; calibration {s.get('calibration_samples')} x {s.get('context')} "
        f"tokens from the second half; latency {s.get('prompt_tokens')} prompt + {s.get('new_tokens')} new "
        f"tokens; every timing the median of {s.get('runs')} runs after a warm-up.", "",
    ]


def _targets(results: dict) -> list[str]:
    rows = []
    for t in results.get("targets", []):
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        rows.append([t["key"], _f(t["value"]), t["target"], verdict])
    out = ["## Targets", ""] + _table(["key", "value", "target", "verdict"], rows)
    for t in results.get("targets", []):
        if t["note"]:
            out += [f"- **{t['key']}** — {t['note']}"]
    return out + [""]


def _headline(results: dict) -> list[str]:
    rows = []
    for key, value in results.get("headline", {}).items():
        if isinstance(value, dict):
            value = ", ".join(f"T={k}: {v:.2f}" for k, v in value.items())
        rows.append([f"`{key}`", value])
    return ["## Headline", ""] + _table(["key", "value"], rows)


def markdown(results: dict) -> str:
    from bench import sections_md

    lines = ["# LM Compression Lab — benchmark results", ""]
    if results.get("warning"):
        lines += [f"> **Warning**: {results['warning']}.", ""]
    lines += _machine(results) + _headline(results) + _targets(results)
    lines += sections_md.all_sections(results.get("sections", {}))
    return "\n".join(lines) + "\n"
