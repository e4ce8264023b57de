"""Measured: do prioritised reduce portions or early optimizer steps shorten consecutive steps? (gloo, 2 × 2 ZeRO-3)

    python benchmarks/reduce_order_gloo.py [--repeats 15] [--width 768]

The measured counterpart of ``reduce_order.py``'s simulation, on the model
of ``data_parallel_gloo.py`` (four stages of two ``width × width`` linear
layers, where communication matters), pipeline × data = 2 × 2, breadth-first
at ZeRO-3, m = 4.  Variants: one reduce per stage or 4 prioritised
portions, each with the optimizer steps at the end or early.  Each
repetition runs 3 consecutive steps of every variant in turn (A B C D A B C
D ...), bracketed by barriers, so that a step's update may overlap the next
step's start; the table gives the median time per step and the ratio to
the default.  Results go to ``benchmarks/results/reduce_order_gloo.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist
from data_parallel_gloo import wide_layers
from results_files import gloo_machine, write_results
from torch import nn

import layerpipe

VARIANTS = {
    "one reduce per stage, steps at the end (default)": dict(reduce_portions=1, step_placement="end"),
    "4 prioritised portions, steps at the end": dict(reduce_portions=4, step_placement="end"),
    "one reduce per stage, early steps": dict(reduce_portions=1, step_placement="early"),
    "4 prioritised portions, early steps": dict(reduce_portions=4, step_placement="early"),
}
STEPS = 3


def worker(repeats: int, width: int) -> dict | None:
    torch.set_num_threads(1)
    pipes = {
        name: layerpipe.Pipeline(
            wide_layers(width),
            nn.functional.mse_loss,
            schedule="breadth-first",
            microbatches=4,
            stages_per_rank=2,
            data_parallel=2,
            zero=3,
            timeout=300,
            optimizer=lambda params: torch.optim.SGD(params, lr=1e-3),
            **options,
        )
        for name, options in VARIANTS.items()
    }
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(16, width, generator=generator), torch.randn(16, width, generator=generator)
    for pipe in pipes.values():
        pipe.train_step(inputs, targets)
    times = {name: [] for name in pipes}
    for _ in range(repeats):
        for name, pipe in pipes.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(STEPS):
                pipe.train_step(inputs, targets)
            dist.barrier()
            times[name].append((time.perf_counter() - start) / STEPS)
    return times if dist.get_rank() == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    times = layerpipe.launch(worker, 4, (args.repeats, args.width), timeout=1800)[0]
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    base = medians[next(iter(VARIANTS))]
    today = datetime.date.today().isoformat()
    machine = gloo_machine()
    lines = [
        f"# Prioritised portions and early steps, measured over consecutive steps ({today})",
        "",
        f"Machine: {machine}. Breadth-first, pipeline × data = 2 × 2, ZeRO-3, 4 stages of 2 × Linear({args.width}), "
        f"m = 4, batch 16; {args.repeats} alternating repetitions of {STEPS} consecutive steps, medians.",
        "",
        "| variant | time per step (ms) | ratio to the default |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {1e3 * value:.1f} | {value / base:.3f} |" for name, value in medians.items()]
    record = {"date": today, "machine": machine, "arguments": vars(args), "times": times, "medians": medians}
    print(write_results(args.output, "reduce_order_gloo", record, lines))


if __name__ == "__main__":
    main()
