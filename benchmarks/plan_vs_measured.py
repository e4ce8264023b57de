"""The planner's pick against the fastest configuration found by measuring them all, for the demo GPT on 2 and 4
processes; and the planner's own time on 64 and 1,024 GPUs.

    python benchmarks/plan_vs_measured.py [--repeats 5] [--quick]

For each process count the benchmark
1. measures this machine with ``layerpipe calibrate`` in that layout (2
   processes: the default pipeline of 2; 4: pipeline 2 × data 2) and keeps
   the cost file in ``benchmarks/results/cost-N.toml``;
2. asks ``layerpipe.plan`` for the best configuration of the demo GPT at
   the demo's batch of 32 sequences;
3. trains every configuration of the planner's search space without
   recomputation, extra reduce portions or the grouped schedule (none of
   which can pay on this machine, where memory is no constraint), with at
   most 2 stages per rank, plus the pick: eight configurations per launch
   (a process holding a hundred pipelines, each with its own process
   groups, runs each of them up to four times slower), repetitions
   alternating between them (A B C A B C ...), medians reported;
4. measures the pick and the six fastest of that pass again, side by side
   in one launch, and reports the pick's step against the fastest of them,
   and the simulated against the measured step of every configuration.

Results go to ``benchmarks/results/plan_vs_measured.{json,md}``.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from results_files import gloo_machine, repeated_benchmark_arguments, write_results
from timing import time_alternately

import layerpipe
from layerpipe.plan import PlanRequest, candidates, describe, evaluate, hardware_of, model_shape, plan
from layerpipe.train.config import TrainConfig
from layerpipe.train.loop import make_pipeline
from layerpipe.train.tasks import task_for

BATCH = 32
PART = 8
"""Configurations measured in one launch."""
FINALISTS = 6
"""The fastest configurations of the first pass measured again beside the pick."""
LAYOUTS = {2: [], 4: ["--data-parallel", "2"]}
"""Calibration options per process count (the demo has 6 layers: 2 ranks × 2 stages, doubled by data parallelism)."""


def calibrate(processes: int, folder: str) -> str:
    """Run ``layerpipe calibrate`` in the layout for ``processes``; return the cost file's path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"cost-{processes}.toml")
    subprocess.run(
        [sys.executable, "-m", "layerpipe", "calibrate", "--cost-file", path, *LAYOUTS[processes]],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return path


def measured_space(request: PlanRequest, pick) -> list:
    """Return the candidates to measure: the search space without recomputation, extra portions or grouped, and
    the pick."""
    space = [
        c
        for c in candidates(request, model_shape(request.model))
        if c.schedule.recompute == "none"
        and c.schedule.reduce_portions == 1
        and c.schedule.schedule != "grouped"
        and c.schedule.stages_per_rank <= 2
    ]
    return space if pick in space else space + [pick]


def worker(space: list, repeats: int) -> dict | None:
    torch.set_num_threads(1)
    pipes, batches = {}, {}
    for number, candidate in enumerate(space):
        config = TrainConfig(pipeline=candidate.schedule, batch_size=BATCH, output="unused")
        task = task_for(config)
        pipes[number] = make_pipeline(config, task)
        batches[number] = task.batch(torch.Generator().manual_seed(0))
    inputs, targets = batches[0]
    times = time_alternately(pipes, repeats, inputs, targets)
    return (
        {number: statistics.median(samples) for number, samples in times.items()}
        if torch.distributed.get_rank() == 0
        else None
    )


def measure_in_parts(space: list, processes: int, repeats: int) -> dict[int, float]:
    """Return each configuration's median step, measured ``PART`` configurations per launch."""
    measured = {}
    for first in range(0, len(space), PART):
        part = layerpipe.launch(worker, processes, (space[first : first + PART], repeats), timeout=3600)[0]
        measured.update({first + number: value for number, value in part.items()})
        print(
            f"{processes} processes: {min(first + PART, len(space))} of {len(space)} configurations measured",
            file=sys.stderr,
            flush=True,
        )
    return measured


def compare(processes: int, repeats: int, folder: str) -> dict:
    """Calibrate, plan and measure for ``processes``; return the record."""
    cost_file = calibrate(processes, folder)
    request = PlanRequest(
        model="demo",
        gpus=processes,
        gpu_memory=4.0,
        global_batch=BATCH,
        cost_file=cost_file,
        top=1,
        max_stages_per_rank=2,
    )
    pick = plan(request).best[0].candidate
    space = measured_space(request, pick)
    measured = measure_in_parts(space, processes, repeats)
    finalists = sorted(measured, key=measured.get)[:FINALISTS]
    finalists += [] if space.index(pick) in finalists else [space.index(pick)]
    final = layerpipe.launch(worker, processes, ([space[number] for number in finalists], repeats), timeout=3600)[0]
    final = {finalists[position]: value for position, value in final.items()}
    shape, hardware = model_shape("demo"), hardware_of(request)
    rows = [
        {
            "configuration": describe(entry),
            "measured": measured[number],
            "final": final.get(number),
            "simulated": entry.step_time,
            "pick": candidate == pick,
        }
        for number, candidate in enumerate(space)
        for entry in [evaluate(candidate, shape, hardware, float("inf"))]
    ]
    rows.sort(key=lambda row: row["measured"])
    finals = sorted((row for row in rows if row["final"] is not None), key=lambda row: row["final"])
    return {
        "processes": processes,
        "configurations": len(space),
        "rows": rows,
        "pick": next(row for row in rows if row["pick"]),
        "fastest": finals[0],
        "finals": finals,
    }


def planning_times() -> list[dict]:
    """Return how long planning the 52B GPT takes on 64 and 1,024 GPUs at a small and a large global batch."""
    rows = []
    for gpus in (64, 1024):
        for batch in (64 if gpus == 64 else 512, 1024 if gpus == 64 else 4096):
            start = time.perf_counter()
            result = plan(PlanRequest(model="gpt-52b", gpus=gpus, gpu_memory=80, global_batch=batch))
            rows.append(
                {
                    "gpus": gpus,
                    "global_batch": batch,
                    "seconds": time.perf_counter() - start,
                    "candidates": result.candidates,
                    "simulated": result.simulated,
                    "pick": describe(result.best[0]),
                }
            )
    return rows


def report(records: list[dict], planning: list[dict], repeats: int) -> list[str]:
    today = datetime.date.today().isoformat()
    machine = gloo_machine()
    lines = [
        f"# The planner's pick against every configuration measured ({today})",
        "",
        f"Machine: {machine}. The demo GPT, batch {BATCH}; {repeats} alternating repetitions, medians. Every "
        f"configuration is measured in a first pass, {PART} per launch; the pick and the {FINALISTS} fastest of "
        "that pass are measured again side by side in one launch, and those times are compared.",
        "",
        "| processes | configurations measured | pick | pick measured (ms) | fastest measured | fastest (ms) | "
        "pick / fastest |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for record in records:
        pick, fastest = record["pick"], record["fastest"]
        lines.append(
            f"| {record['processes']} | {record['configurations']} | {pick['configuration']} | "
            f"{1e3 * pick['final']:.1f} | {fastest['configuration']} | {1e3 * fastest['final']:.1f} | "
            f"{pick['final'] / fastest['final']:.2f} |"
        )
    for record in records:
        lines += [
            "",
            f"## {record['processes']} processes: the pick and the fastest, measured side by side",
            "",
            "| configuration | measured (ms) | simulated (ms) | simulated / measured |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {row['configuration']}{' (pick)' if row['pick'] else ''} | {1e3 * row['final']:.1f} | "
            f"{1e3 * row['simulated']:.1f} | {row['simulated'] / row['final']:.2f} |"
            for row in record["finals"]
        ]
    for record in records:
        lines += [
            "",
            f"## {record['processes']} processes: the ten fastest of the first pass ({PART} per launch)",
            "",
            "| configuration | measured (ms) | simulated (ms) | simulated / measured |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {row['configuration']}{' (pick)' if row['pick'] else ''} | {1e3 * row['measured']:.1f} | "
            f"{1e3 * row['simulated']:.1f} | {row['simulated'] / row['measured']:.2f} |"
            for row in record["rows"][:10]
        ]
    lines += [
        "",
        "## Planning time of the 52B GPT on H100s",
        "",
        "| GPUs | global batch | configurations | simulated | seconds | pick |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {row['gpus']} | {row['global_batch']} | {row['candidates']} | {row['simulated']} | "
        f"{row['seconds']:.1f} | {row['pick']} |"
        for row in planning
    ]
    return lines


def main() -> None:
    args = repeated_benchmark_arguments(__doc__, "2 processes only, 3 repetitions", repeats=5)
    repeats = 3 if args.quick else args.repeats
    records = [compare(processes, repeats, args.output) for processes in ((2,) if args.quick else (2, 4))]
    planning = planning_times()
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.node(),
        "repeats": repeats,
        "records": records,
        "planning": planning,
    }
    print(write_results(args.output, "plan_vs_measured", record, report(records, planning, repeats)))


if __name__ == "__main__":
    main()
