"""How long layerpipe takes to build, validate and simulate a large schedule.

Run: python benchmarks/simulate_speed.py [--repeats 5] [--baseline DIR]
Writes benchmarks/results/simulate_speed.json and .md (machine and date included).
The design asks for p = 64, v = 4, m = 512 to lower and simulate in well under a second.

``--baseline DIR`` also times the layerpipe of another checkout (e.g. ``git
worktree add /tmp/base HEAD~5``) in the same run: each repetition runs both,
one after the other, each in a fresh process, and the table shows the medians
side by side with their ratio (this checkout / baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date

from results_files import write_results

from layerpipe.schedule.build import build_schedule
from layerpipe.schedule.config import ScheduleConfig
from layerpipe.schedule.validation import validate
from layerpipe.sim.simulator import simulate

CASES = [
    ("breadth-first", ScheduleConfig("breadth-first", 64, 512, 4)),
    ("interleaved", ScheduleConfig("interleaved", 64, 512, 4)),
    ("breadth-first, data_parallel 8, ZeRO-3", ScheduleConfig("breadth-first", 64, 512, 4, data_parallel=8, zero=3)),
]


def measure(config: ScheduleConfig) -> dict[str, float]:
    """Return seconds for generate+lower, validate and simulate of one configuration."""
    start = time.perf_counter()
    schedule = build_schedule(config, check=False)
    built = time.perf_counter()
    result = simulate(schedule)
    simulated = time.perf_counter()
    validate(schedule.programs, schedule.placement, config.microbatches)
    validated = time.perf_counter()
    return {
        "generate_and_lower": built - start,
        "simulate": simulated - built,
        "lower_and_simulate": simulated - start,
        "validate": validated - simulated,
        "actions": sum(map(len, schedule.programs)),
        "step_time": result.step_time,
    }


def run_once(library: str) -> dict[str, dict[str, float]]:
    """Return one repetition of every case, timed in a fresh process importing layerpipe from ``library``."""
    environment = {**os.environ, "PYTHONPATH": library}
    output = subprocess.run(
        [sys.executable, __file__, "--worker"],
        capture_output=True,
        text=True,
        check=True,
        env=environment,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    ).stdout
    return json.loads(output)


def _commit(folder: str) -> str:
    """Return the short commit of the checkout in ``folder`` (or the folder when it is not a git checkout)."""
    found = subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or folder


def _medians(runs: list[dict]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _table(rows: list[dict], baseline: bool) -> list[str]:
    if not baseline:
        lines = [
            "| case | actions | generate + lower (s) | simulate (s) | lower + simulate (s) | validate (s) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in rows:
            lines.append(
                f"| {row['case']} | {int(row['actions']):,} | {row['generate_and_lower']:.3f} | "
                f"{row['simulate']:.3f} | {row['lower_and_simulate']:.3f} | {row['validate']:.3f} |"
            )
        return lines
    lines = [
        "| case | lower + simulate (s) | baseline (s) | ratio | validate (s) | baseline (s) | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        base = row["baseline"]
        lines.append(
            f"| {row['case']} | {row['lower_and_simulate']:.3f} | {base['lower_and_simulate']:.3f} | "
            f"{row['lower_and_simulate'] / base['lower_and_simulate']:.2f} | {row['validate']:.3f} | "
            f"{base['validate']:.3f} | {row['validate'] / base['validate']:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", metavar="DIR", help="a checkout whose layerpipe is timed beside this one")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({name: measure(config) for name, config in CASES}))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"current": here, **({"baseline": os.path.abspath(args.baseline)} if args.baseline else {})}
    runs: dict[str, dict[str, list[dict]]] = {tree: {name: [] for name, _ in CASES} for tree in trees}
    for _ in range(args.repeats):  # interleaved: current, baseline, current, baseline, ...
        for tree, library in trees.items():
            for name, timings in run_once(library).items():
                runs[tree][name].append(timings)
    rows = [
        {
            "case": name,
            **_medians(runs["current"][name]),
            **({"baseline": _medians(runs["baseline"][name])} if args.baseline else {}),
        }
        for name, _ in CASES
    ]
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    report = {
        "date": date.today().isoformat(),
        "machine": machine,
        "repeats": args.repeats,
        "baseline": _commit(args.baseline) if args.baseline else None,
        "ranks": 64,
        "stages_per_rank": 4,
        "microbatches": 512,
        "rows": rows,
    }
    against = f", beside the baseline at commit {_commit(args.baseline)}" if args.baseline else ""
    lines = [
        f"# Build and simulate speed, p = 64, v = 4, m = 512 ({report['date']}, {machine}, median of "
        f"{args.repeats}{against})",
        "",
        *_table(rows, bool(args.baseline)),
    ]
    print(write_results(args.output, "simulate_speed", report, lines))


if __name__ == "__main__":
    main()
