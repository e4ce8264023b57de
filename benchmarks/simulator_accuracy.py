"""The calibrated simulator against the measured step, for every schedule.

    python benchmarks/simulator_accuracy.py [--steps 40] [--rounds 3] [--quick]

For each configuration of the demo GPT, ``layerpipe calibrate`` trains a
few steps on this machine in that layout and writes a cost file
(``benchmarks/results/simulator-costs/NAME.toml``); the simulator then runs
the same programs against those costs.  Compared: the median measured step
of back-to-back steps against what one more step adds when consecutive
steps are simulated (both the step the training loop runs at).  Configurations: every
schedule on 2 processes (p = 2, v = 2 for the looping ones), the looping
schedules on 4 processes (p = 4, v = 2, a GPT of 6 blocks so that the 8
stages have a layer each), and pipeline × data = 2 × 2 at ZeRO-3.

The measured and simulated timelines of one run (breadth-first, p = 2) are
drawn stacked in ``docs/simulator/measured-vs-simulated.png``.  Results:
``benchmarks/results/simulator_accuracy.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import tomllib

from results_files import gloo_machine, write_results

from layerpipe.schedule.build import build_schedule
from layerpipe.schedule.config import ScheduleConfig
from layerpipe.sim.cost_file import read_cost_file
from layerpipe.sim.simulator import simulate, steady_step
from layerpipe.sim.timeline import Timeline
from layerpipe.viz.gantt import plot_timelines

HERE = os.path.dirname(os.path.abspath(__file__))
TWO = [
    ("gpipe", {}),
    ("1f1b", {}),
    ("interleaved", {"stages_per_rank": 2}),
    ("breadth-first", {"stages_per_rank": 2}),
    ("grouped", {"stages_per_rank": 2, "group_size": 4}),
    ("zero-bubble", {"stages_per_rank": 2}),
]
FOUR = [
    ("interleaved", {"stages_per_rank": 2}),
    ("breadth-first", {"stages_per_rank": 2}),
    ("zero-bubble", {"stages_per_rank": 2}),
]


def configurations(quick: bool) -> list[tuple[str, dict, list[str]]]:
    """Return ``(label, ScheduleConfig knobs, extra train options)`` for every compared configuration."""
    found = [(f"{name}, p=2", {"schedule": name, "ranks": 2, "microbatches": 8, **knobs}, []) for name, knobs in TWO]
    if quick:
        return found[3:4]
    found += [
        (
            f"{name}, p=4 (4 processes on {os.cpu_count()} cores)",
            {"schedule": name, "ranks": 4, "microbatches": 8, **knobs},
            ["--blocks", "6"],
        )
        for name, knobs in FOUR
    ]
    found.append(
        (
            "breadth-first, 2 x 2 ZeRO-3",
            {
                "schedule": "breadth-first",
                "ranks": 2,
                "microbatches": 8,
                "stages_per_rank": 2,
                "data_parallel": 2,
                "zero": 3,
            },
            [],
        )
    )
    return found


def _options(knobs: dict) -> list[str]:
    return [text for name, value in knobs.items() for text in (f"--{name.replace('_', '-')}", str(value))]


def calibrate(label: str, knobs: dict, extra: list[str], steps: int, folder: str) -> dict:
    """Run ``layerpipe calibrate`` for one configuration; return its measured and simulated step."""
    path = os.path.join(folder, re.sub(r"[^a-z0-9]+", "-", label.split(" (")[0].lower()).strip("-") + ".toml")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "layerpipe",
            "calibrate",
            "--cost-file",
            path,
            "--steps",
            str(steps),
            *_options(knobs),
            *extra,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with open(path, "rb") as handle:
        about = tomllib.load(handle)["about"]
    cost = read_cost_file(path)
    simulated = steady_step(ScheduleConfig(**knobs), cost)
    return {
        "configuration": label,
        "measured": about["measured_step"],
        "simulated": simulated,
        "ratio": simulated / about["measured_step"],
        "core_sharing": about["core_sharing"],
        "variation": cost.variation,
        "hold_variation": cost.hold_variation,
        "cost_file": path,
    }


def _summary(found: list[dict]) -> dict:
    """Return one configuration's rounds as medians, with every round's ratio."""
    return {
        "configuration": found[0]["configuration"],
        "measured": statistics.median(f["measured"] for f in found),
        "simulated": statistics.median(f["simulated"] for f in found),
        "ratio": statistics.median(f["ratio"] for f in found),
        "ratios": [f["ratio"] for f in found],
        "core_sharing": statistics.median(f["core_sharing"] for f in found),
        "variation": statistics.median(f["variation"] for f in found),
        "hold_variation": statistics.median(f["hold_variation"] for f in found),
        "cost_file": found[-1]["cost_file"],
    }


def stacked_picture(steps: int, cost_file: str, path: str) -> None:
    """Train breadth-first p = 2 for ``steps`` steps, then draw its measured last step over the simulated one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as run:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "layerpipe",
                "train",
                "--steps",
                str(steps),
                "--output",
                run,
                "--sample-length",
                "0",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with open(os.path.join(run, "timeline-data.json")) as handle:
            measured = Timeline.from_json(json.load(handle))
    config = ScheduleConfig(schedule="breadth-first", ranks=2, microbatches=8, stages_per_rank=2)
    simulated = simulate(build_schedule(config), read_cost_file(cost_file)).timeline
    plot_timelines(
        [measured, simulated], path, [f"measured (last step of a {steps}-step run)", "simulated (calibrated costs)"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps per configuration (half measured)")
    parser.add_argument("--rounds", type=int, default=3, help="times every configuration is measured, interleaved")
    parser.add_argument("--quick", action="store_true", help="breadth-first on 2 processes only")
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    folder = os.path.join(args.output, "simulator-costs")
    os.makedirs(folder, exist_ok=True)
    chosen = configurations(args.quick)
    runs = [
        [calibrate(label, knobs, extra, args.steps, folder) for label, knobs, extra in chosen]
        for _ in range(args.rounds)
    ]
    rows = [_summary([found[index] for found in runs]) for index in range(len(chosen))]
    picture = os.path.join(HERE, "..", "docs", "simulator", "measured-vs-simulated.png")
    stacked_picture(20, rows[3 if not args.quick else 0]["cost_file"], os.path.normpath(picture))
    today = datetime.date.today().isoformat()
    machine = gloo_machine()
    lines = [
        f"# The calibrated simulator against the measured step ({today})",
        "",
        f"Machine: {machine}. The demo GPT, "
        f"batch 32, 8 micro-batches, {args.steps} steps each, {args.rounds} interleaved rounds (medians). Measured: the median time between back-to-back "
        "steps; simulated: what one more step adds when consecutive steps are simulated, each compute time and "
        "each hold of a send or receive drawn with its calibrated spread (replicas wait for the slowest).",
        "",
        "| configuration | measured (ms) | simulated (ms) | simulated / measured | each round | a forward beside "
        "others / alone | compute spread | hold spread |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {row['configuration']} | {1e3 * row['measured']:.1f} | {1e3 * row['simulated']:.1f} | "
        f"{row['ratio']:.2f} | {', '.join(f'{ratio:.2f}' for ratio in row['ratios'])} | "
        f"{row['core_sharing']:.2f} | {100 * row['variation']:.0f} % | {100 * row['hold_variation']:.0f} % |"
        for row in rows
    ]
    record = {"date": today, "machine": machine, "rows": rows}
    print(write_results(args.output, "simulator_accuracy", record, lines))


if __name__ == "__main__":
    main()
