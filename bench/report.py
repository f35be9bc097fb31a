"""Writing a bench run: the headline keys of issue 6, results.json as measured, results.md for people."""
from __future__ import annotations

import json
from pathlib import Path

from bench import readme, sections_md, targets, values
from bench.text import fmt, md_table, target_value, verdict, with_spread

# Keys the issues ask a full run for (tests check the committed run has them); sections may add more.
HEADLINE_KEYS = ["interactive_s_tiny", "interactive_s_default", "int8_speedup_prefill", "int8_speedup_decode",
                 "bf16_speedup_decode", "ppl_ratio_rtn4_g64_vs_torchao", "ppl_ratio_rtn4_vs_quanto",
                 "ppl_ratio_rtn3_g64_vs_torchao", "ppl_new3_over_rtn3", "ppl_new4_g128_over_rtn4",
                 "autopilot_over_uniform_same_quantizer_3bit", "autopilot_over_uniform_same_quantizer_4bit",
                 "autopilot_over_rule_mix_3p5", "autopilot_s_default", "autopilot_cached_s_default",
                 "ppl_gptq3_over_rtn3", "ppl_wanda50_over_magnitude50", "kd_recovered_fraction_by_temperature",
                 "kd_recovered_fraction_smollm2", "kd_recovered_fraction_2bit_smollm2",
                 "kd_recovered_fraction_2bit_codes_smollm2", "kd_student_over_ce_only",
                 "tiny_ppl_ratio_2bit", "tiny_ppl_ratio_4bit",
                 "eval_fraction_of_matmul_peak", "sweep_ray_over_serial_s", "llamacpp_ppl_ratio_q4",
                 "decode_ratio_vs_llamacpp_q4", "decode_ratio_vs_llamacpp_q8",
                 "browser_first_chart_s_default", "browser_all_charts_s_default", "browser_complete_s_default",
                 "browser_budget_controls_s_default",
                 "browser_cold_s_default", "browser_first_chart_s_tiny", "browser_all_charts_s_tiny",
                 "browser_complete_s_tiny", "browser_cold_s_tiny"]


def collect_headline(results: dict) -> dict:
    """Every section's headline values, as the sections wrote them (None for a required key nobody measured)."""
    headline = {key: None for key in HEADLINE_KEYS}
    for section in results.get("sections", {}).values():
        headline.update(section.get("headline") or {})
    return headline


def busy_sections(results: dict) -> dict[str, float]:
    """Sections that started while other processes loaded the CPU: a 1-minute load average above what the bench's
    own torch threads explain (the previous section keeps it near their count) by more than half a core."""
    machine = results.get("machine") or {}
    own = machine.get("torch_threads") or machine.get("cores") or 1
    return {name: s["load_average_at_start"] for name, s in results.get("sections", {}).items()
            if (s.get("load_average_at_start") or 0) > own + 0.5}


def finish(results: dict, out: Path) -> None:
    """Derive the headline, warning and targets of a run in progress, then write results.json and results.md."""
    results["headline"] = collect_headline(results)
    results["total_wall_s"] = sum((sec.get("wall_s") or 0) for sec in results.get("sections", {}).values())
    results["warning"] = warning(results)
    results["spreads"] = values.spreads(results)   # min, median, max of the runs behind each timing key
    results["targets"] = targets.check(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    render(results, out)


def render(results: dict, out: Path) -> None:
    """results.md (and, for the committed run, docs/benchmarks.md's table) from a run's results; nothing measured."""
    (out / "results.md").write_text(markdown(results))
    if out.resolve() == Path(__file__).resolve().parent and not results.get("partial"):
        readme.write(results)


def warning(results: dict) -> str | None:
    """What a reader must know before trusting the numbers: failed or missing sections, timings under load."""
    sections = results.get("sections", {})
    parts = []
    failed = [name for name, s in sections.items() if "error" in s]
    missing = [name for name in sections_md.RENDERERS if name not in sections]
    if failed:
        parts.append("these sections failed and their numbers are missing: " + ", ".join(failed))
    if missing:
        parts.append("these sections were not run: " + ", ".join(missing))
    busy = busy_sections(results)
    if busy:
        parts.append("timings of these sections were taken beside other work and are pessimistic (load average at "
                     "their start): " + ", ".join(f"{k} {v:.1f}" for k, v in busy.items()))
    return "; ".join(parts) or None


def headline_table(results: dict) -> str:
    lines = ["key                                      value"]
    spreads = results.get("spreads") or {}
    for key, value in results.get("headline", {}).items():
        lines.append(f"{key:<40} {with_spread(value, spreads.get(key))}")
    return "\n".join(lines)


def _machine(results: dict) -> list[str]:
    m, v, s = results.get("machine", {}), results.get("versions", {}), results.get("scale", {})
    return [
        f"Generated {results.get('generated')} by `make bench` (`python -m bench`) in "
        f"{fmt(results.get('total_wall_s'), 0)} s.", "",
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
        rows.append([t["key"], target_value(t), t["target"], verdict(t)])
    out = ["## Targets", ""] + md_table(["key", "value", "target", "verdict"], rows)
    for t in results.get("targets", []):
        if t["note"]:
            out += [f"- **{t['key']}** — {t['note']}"]
    return out + [""]


def _headline(results: dict) -> list[str]:
    spreads = results.get("spreads") or {}
    rows = [[f"`{key}`", with_spread(value, spreads.get(key))] for key, value in results.get("headline", {}).items()]
    return ["## Headline", ""] + md_table(["key", "value"], rows)


def markdown(results: dict) -> str:
    lines = ["# LM Compression Lab — benchmark results", ""]
    if results.get("warning"):
        lines += [f"> **Warning**: {results['warning']}.", ""]
    lines += _machine(results) + _headline(results) + _targets(results)
    lines += sections_md.all_sections(results.get("sections", {}))
    return "\n".join(lines) + "\n"
