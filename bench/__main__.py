"""`python -m bench`: run every benchmark section and write bench/results.json and bench/results.md.

    python -m bench                      # the full run behind `make bench`: writes bench/results.json and .md
    python -m bench --smoke              # the harness at tiny scale, written to /tmp/lmcompress-bench-smoke
    python -m bench --only speed --out /tmp/x   # some sections, to another folder (marked partial)
    python -m bench --render             # headline/targets, results.md, docs/benchmarks.md's table again (no measuring)

The committed results are one whole run of the committed code: nothing is merged into them, `--only` never
writes into bench/, and each section's result must carry exactly the keys its module declares (KEYS).
A section that fails is recorded with its error and the others still run; the exit status is 1 then.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

from bench import browser, distillation, interactivity, llamacpp, pruning, quality, report, speed, sweep, throughput
from bench.common import FULL, SMOKE, machine, setup_torch, versions
from bench.context import Context

HERE = Path(__file__).resolve().parent
SECTIONS = {  # run order: cheap and most-quoted first, so a partial run still has the headline numbers
    "interactivity": interactivity.run,
    "browser": browser.run,
    "speed": speed.run,
    "throughput": throughput.run,
    "pruning": pruning.run,
    "distillation": distillation.run,
    "quality": quality.run,
    "sweep": sweep.run,
    "llamacpp": llamacpp.run,
}


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny scale, tiny model only, quick")
    parser.add_argument("--only", default="", help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json / results.md")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite results.md (and the targets) from the existing results.json")
    return parser.parse_args(argv)


def _run_section(name: str, ctx: Context) -> dict:
    busy = os.getloadavg()[0]
    print(f"[bench] {name} ... (load average {busy:.2f})", flush=True)
    start = time.perf_counter()
    try:
        result = SECTIONS[name](ctx)
        check_keys(name, result)
    except Exception as exc:  # record and go on: one broken section must not hide the others
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["wall_s"] = time.perf_counter() - start
    result["load_average_at_start"] = round(busy, 2)   # timings beside other work are flagged in results.md
    print(f"[bench] {name} done in {result['wall_s']:.1f} s", flush=True)
    return result


def check_keys(name: str, result: dict) -> None:
    """A section returns exactly the keys its module declares, so results.json's shape is the code's."""
    declared = set(sys.modules[SECTIONS[name].__module__].KEYS)
    if set(result) != declared:
        raise ValueError(f"section {name} returned keys {sorted(result)}; its module declares {sorted(declared)}")


def main(argv=None) -> int:
    args = _parse(argv)
    setup_torch()
    scale = SMOKE if args.smoke else FULL
    out = args.out or (Path("/tmp/lmcompress-bench-smoke") if args.smoke else HERE)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        if not (out / "results.json").exists():
            print(f"error: no {out / 'results.json'} to render; run `python -m bench` first", file=sys.stderr)
            return 2
        results = json.loads((out / "results.json").read_text())
        report.finish(results, out)   # derived fields (headline, warning, targets) again; measurements untouched
        print(report.headline_table(results))
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.only and out.resolve() == HERE.resolve():
        print("error: --only measures part of a run; write it elsewhere with --out (bench/results.* are one "
              "whole run)", file=sys.stderr)
        return 2
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results = {"schema": 2, "generated": now, "partial": bool(args.only), "scale": scale.to_dict(),
               "machine": machine(), "versions": versions(), "sections": {}}
    sections = results["sections"]
    ctx = Context(scale)
    for name in names:
        sections[name] = _run_section(name, ctx)
        report.finish(results, out)  # write after every section: an interrupted run keeps what it measured
    report.finish(results, out)
    print(report.headline_table(results))
    print(f"[bench] wrote {out / 'results.json'} and {out / 'results.md'}")
    return 1 if any("error" in s for s in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
