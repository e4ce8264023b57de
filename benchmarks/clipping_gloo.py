"""Measured: what global gradient-norm clipping costs a step (gloo), beside the guard it carries.

    python benchmarks/clipping_gloo.py [--repeats 15] [--quick]

The model of ``data_parallel_gloo.py`` (four stages of two ``width × width``
linear layers), breadth-first with two stages per rank, m = 4, SGD, on
pipeline × data = 2 × 1 and 2 × 2 at ZeRO-1.  Variants: no clipping (the
default), the guard alone (``skip_nonfinite``), clipping
(``clip_grad_norm``, a limit every step exceeds), and clipping with the
guard (one fused all-reduce).  The variants' steps are interleaved (A B C D
A B C D ...), each bracketed by barriers; the table gives the median step
time and the ratio to no clipping.  Results go to
``benchmarks/results/clipping_gloo.{json,md}``.
"""

from __future__ import annotations

import datetime
import os
import statistics

import torch
from data_parallel_gloo import wide_layers
from results_files import gloo_machine, repeated_benchmark_arguments, write_results
from timing import time_alternately
from torch import nn

import layerpipe
from layerpipe.schedule.actions import Kind

VARIANTS = {
    "no clipping (default)": {},
    "guard only (skip_nonfinite)": dict(skip_nonfinite=True),
    "clipping (clip_grad_norm)": dict(clip_grad_norm=1e-3),
    "clipping and guard, one all-reduce": dict(clip_grad_norm=1e-3, skip_nonfinite=True),
}
LAYOUTS = {"2 x 1": (2, {}), "2 x 2, ZeRO-1": (4, dict(data_parallel=2, zero=1))}


def worker(repeats: int, width: int, layout: dict) -> dict | None:
    """Time every variant's steps, interleaved; return the times on process 0."""
    torch.set_num_threads(1)
    pipes = {
        name: layerpipe.Pipeline(
            wide_layers(width), nn.functional.mse_loss, schedule="breadth-first", microbatches=4, stages_per_rank=2,
            timeout=300, optimizer=lambda params: torch.optim.SGD(params, lr=1e-3), **layout, **options,
        )
        for name, options in VARIANTS.items()
    }  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(16, width, generator=generator), torch.randn(16, width, generator=generator)
    barriers: dict[str, list[float]] = {name: [] for name in pipes}
    times = time_alternately(pipes, repeats, inputs, targets, after=lambda name, pipe: _note(barriers[name], pipe))
    return times, {name: statistics.median(found) for name, found in barriers.items() if found}


def _note(barriers: list, pipe) -> None:
    """Add the time of the last step's GUARD or CLIP on this process (its wait for the others included)."""
    kinds = (Kind.GUARD, Kind.CLIP)
    barriers += [end - start for _, _, action, start, end in pipe.last_result.events if action.kind in kinds]


def main() -> None:
    args = repeated_benchmark_arguments(__doc__, "width 64 and 3 repetitions (for a test of the script)")
    width, repeats = (64, 3) if args.quick else (512, args.repeats)
    today, machine = datetime.date.today().isoformat(), gloo_machine()
    lines = [
        f"# The cost of global gradient-norm clipping, measured ({today})",
        "",
        f"Machine: {machine}. Breadth-first, v = 2, 4 stages of 2 × Linear({width}), m = 4, batch 16, SGD; "
        f"{repeats} interleaved repetitions, medians.",
        "",
        "| layout | variant | step (ms) | ratio to no clipping | GUARD or CLIP on the last to arrive (ms) |",
        "| --- | --- | --- | --- | --- |",
    ]
    record = {"date": today, "machine": machine, "width": width, "repeats": repeats, "times": {}, "barrier_medians": {}}
    for layout, (processes, options) in LAYOUTS.items():
        per_process = layerpipe.launch(worker, processes, (repeats, width, options), timeout=1800)
        times = per_process[0][0]
        medians = {name: statistics.median(samples) for name, samples in times.items()}
        own = {name: min(found[1].get(name, 0.0) for found in per_process) for name in VARIANTS}
        base = medians[next(iter(VARIANTS))]
        lines += [
            f"| {layout} | {name} | {1e3 * value:.1f} | {value / base:.3f} | {1e3 * own[name]:.2f} |"
            for name, value in medians.items()
        ]
        record["times"][layout], record["barrier_medians"][layout] = times, own
    record["load_average"] = os.getloadavg()
    lines += [
        "",
        f"Load average (1, 5, 15 minutes) at the end: {', '.join(f'{load:.1f}' for load in os.getloadavg())}.",
    ]
    print(write_results(args.output, "clipping_gloo", record, lines))


if __name__ == "__main__":
    main()
