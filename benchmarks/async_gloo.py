"""Measured: the async stream against the flushed schedules on gloo, at the same sub-minibatch size.

    python benchmarks/async_gloo.py [--repeats 9] [--width 1024] [--microbatches 8] [--samples 32]

For 2 and 4 pipeline ranks (one process each, one thread each): a stack of
``width × width`` linear layers, two per rank, trained with GPipe, 1F1B,
interleaved and breadth-first (two stages per rank), and with ``async``
(pipelined backpropagation, ``update_every = microbatches``: one update per
call per stage, as often as the flushed schedules update).  Every call feeds
``microbatches`` micro-batches of the same size.  Every pipeline is built
once and warmed up; repetitions alternate between them (A B C A B C ...),
each call bracketed by barriers and timed on process 0; the table gives
medians and the ratio of each to the fastest flushed schedule.  An async
call is a slice of the stream: it neither fills nor drains the pipeline.

Beside it, the simulator's steady-state bubble of each schedule with a
cost model calibrated from the measured timeline, and one picture per rank
count with the measured timelines of async and the fastest flushed
schedule on one time axis.  With 4 processes on fewer than 4 cores the
processes share cores and the times say more about that than about the
schedules; the machine line says how many cores there were.  Results go to
``benchmarks/results/async_gloo.{json,md}`` and ``async_gloo_<P>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics

import torch
import torch.distributed as dist
from results_files import gloo_machine, write_results
from timing import time_alternately
from torch import nn

import layerpipe
from layerpipe.schedule.build import build_schedule
from layerpipe.sim.calibrate import calibrated_cost
from layerpipe.sim.cost import at_means
from layerpipe.sim.simulator import simulate
from layerpipe.viz.gantt import plot_timelines

FLUSHED = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("breadth-first", 2))


def layers_for(ranks: int, width: int) -> list[nn.Module]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(2 * ranks):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return layers


def build(ranks: int, width: int, microbatches: int) -> dict:
    """Return every pipeline of the comparison, by name."""

    def optimizer(params):
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    pipes = {
        name: layerpipe.Pipeline(
            layers_for(ranks, width),
            nn.functional.mse_loss,
            schedule=name,
            microbatches=microbatches,
            stages_per_rank=v,
            optimizer=optimizer,
            timeout=300,
        )
        for name, v in FLUSHED
    }
    pipes["async"] = layerpipe.Pipeline(
        layers_for(ranks, width),
        nn.functional.mse_loss,
        schedule="async",
        microbatches=microbatches,
        update_every=microbatches,
        optimizer=optimizer,
        timeout=300,
    )
    return pipes


def worker(repeats: int, width: int, microbatches: int, samples: int, picture: str) -> dict | None:
    ranks = dist.get_world_size()
    pipes = build(ranks, width, microbatches)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(samples * microbatches, width, generator=generator)
    targets = torch.randn(samples * microbatches, width, generator=generator)
    times = time_alternately(pipes, repeats, inputs, targets)
    timelines = {name: pipe.timeline(name) for name, pipe in pipes.items()}
    pipes["async"].flush()
    if dist.get_rank() != 0:
        return None
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    fastest = min((name for name, _ in FLUSHED), key=medians.get)
    rows = []
    for name, pipe in pipes.items():
        calls = 4 if name == "async" else 1
        cost = at_means(calibrated_cost(timelines[name], pipe.schedule.placement.stages))
        simulated = simulate(build_schedule(pipe.schedule.config, calls=calls), cost)
        rows.append(
            {
                "schedule": name,
                "step_time": medians[name],
                "ratio_to_fastest_flushed": medians[name] / medians[fastest],
                "simulated_steady_bubble": simulated.steady_bubble,
                "simulated_bubble": simulated.bubble_fraction,
                "samples": times[name],
            }
        )
    plot_timelines(
        [timelines["async"], timelines[fastest]],
        picture,
        [
            f"async (one call of the stream), {ranks} ranks, measured",
            f"{fastest} (fastest flushed), {ranks} ranks, measured",
        ],
    )
    return {"ranks": ranks, "fastest_flushed": fastest, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--samples", type=int, default=32, help="samples per micro-batch")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    today = datetime.date.today().isoformat()
    machine = gloo_machine()
    lines = [
        f"# Async stream vs flushed schedules, measured on gloo ({today})",
        "",
        f"Machine: {machine}. Model: 2 × P pairs of Linear({args.width}, {args.width}) + Tanh, float32; "
        f"{args.microbatches} micro-batches of {args.samples} samples per call; async updates every "
        f"{args.microbatches} sub-minibatches; {args.repeats} alternating repetitions, medians.",
        "",
    ]
    results = []
    os.makedirs(args.output, exist_ok=True)
    for ranks in (2, 4):
        picture = os.path.join(args.output, f"async_gloo_{ranks}.png")
        result = layerpipe.launch(
            worker, ranks, (args.repeats, args.width, args.microbatches, args.samples, picture), timeout=1800
        )[0]
        results.append(result)
        lines += [
            f"## {ranks} pipeline ranks (fastest flushed: {result['fastest_flushed']})",
            "",
            f"![measured timelines](async_gloo_{ranks}.png)",
            "",
            "| schedule | step time (ms) | ratio to fastest flushed | simulated steady-state bubble |",
            "| --- | --- | --- | --- |",
        ]
        for row in result["rows"]:
            bubble = row["simulated_steady_bubble"]
            lines.append(
                f"| {row['schedule']} | {1e3 * row['step_time']:.1f} | "
                f"{row['ratio_to_fastest_flushed']:.2f} | "
                f"{'—' if bubble is None else f'{100 * bubble:.1f} %'} |"
            )
        lines.append("")
    record = {"date": today, "machine": machine, "arguments": vars(args), "results": results}
    print(write_results(args.output, "async_gloo", record, lines))


if __name__ == "__main__":
    main()
