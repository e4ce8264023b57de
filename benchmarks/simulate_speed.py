"""How long layerpipe takes to build, validate and simulate a large schedule.

Run: python benchmarks/simulate_speed.py [--repeats 5]
Writes benchmarks/results/simulate_speed.json and .md (machine and date included).
DESIGN.md asks for p = 64, v = 4, m = 512 to lower and simulate in well under a second.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date

from layerpipe.schedule.build import build_schedule
from layerpipe.schedule.config import ScheduleConfig
from layerpipe.schedule.validation import validate
from layerpipe.sim.simulator import simulate

from results_files import write_results

CASES = [
    ("breadth-first", ScheduleConfig("breadth-first", 64, 512, 4)),
    ("interleaved", ScheduleConfig("interleaved", 64, 512, 4)),
    ("breadth-first, dp 8, ZeRO-3", ScheduleConfig("breadth-first", 64, 512, 4, data_parallel=8, zero=3)),
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
    return {"generate_and_lower": built - start, "simulate": simulated - built,
            "lower_and_simulate": simulated - start, "validate": validated - simulated,
            "actions": sum(map(len, schedule.programs)), "step_time": result.step_time}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name, _ in CASES}
    for _ in range(args.repeats):  # cases interleaved: A B C A B C ...
        for name, config in CASES:
            runs[name].append(measure(config))
    rows = []
    for name, _ in CASES:
        median = {key: statistics.median(run[key] for run in runs[name]) for key in runs[name][0]}
        rows.append({"case": name, **median})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    report = {"date": date.today().isoformat(), "machine": machine, "repeats": args.repeats,
              "ranks": 64, "stages_per_rank": 4, "microbatches": 512, "rows": rows}
    lines = [f"# Build and simulate speed, p = 64, v = 4, m = 512 ({report['date']}, {machine}, median of {args.repeats})", "",
             "| case | actions | generate + lower (s) | simulate (s) | lower + simulate (s) | validate (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['case']} | {int(row['actions']):,} | {row['generate_and_lower']:.3f} | {row['simulate']:.3f} "
                     f"| {row['lower_and_simulate']:.3f} | {row['validate']:.3f} |")
    print(write_results(args.output, "simulate_speed", report, lines))


if __name__ == "__main__":
    main()
