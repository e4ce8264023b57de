"""What ``broadcast_buffers`` costs a training step: a small BatchNorm CNN on 2 data-parallel replicas, on and off.

    python benchmarks/buffer_broadcast.py [--repeats 30] [--quick]

Two processes: 1 pipeline rank × 2 data-parallel replicas (gloo), a CNN of
four convolutions each followed by ``BatchNorm2d`` (``--quick``: two), 4
micro-batches of 8 images 16×16 per replica.  Two pipelines built alike,
one with ``broadcast_buffers=True`` (the default: replica 0's buffers go to
the other replica after every step, one broadcast of all the buffers'
bytes) and one with ``False`` (what every step did before), their steps
interleaved (A B A B ...), each bracketed by barriers; medians, fastest
steps (less disturbed by other jobs on a shared machine) and the ratios
on / off.  Two widths: 16 and 128 channels.

Results: ``benchmarks/results/buffer_broadcast.{json,md}``.
"""

from __future__ import annotations

import datetime
import statistics

import torch
from results_files import gloo_machine, repeated_benchmark_arguments, write_results
from timing import time_alternately
from torch import nn

import layerpipe

WIDTHS = (16, 128)
WAYS = ("broadcast_buffers=True", "broadcast_buffers=False")


def cnn_layers(width: int, blocks: int) -> list[nn.Module]:
    """Return ``blocks`` convolutions of ``width`` channels, each with BatchNorm and ReLU, then a linear head."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    channels = 3
    for _ in range(blocks):
        layers += [nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())]
        channels = width
    return [*layers, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))]


def worker(width: int, blocks: int, repeats: int) -> dict:
    """Return the step times of both ways (on process 0; every process times the same steps)."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 3, 16, 16, generator=generator)
    targets = torch.randint(0, 10, (64,), generator=generator)
    pipes = {
        way: layerpipe.Pipeline(
            cnn_layers(width, blocks),
            nn.functional.cross_entropy,
            "gpipe",
            microbatches=4,
            data_parallel=2,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.01),
            broadcast_buffers=way == WAYS[0],
            timeout=300,
        )
        for way in WAYS
    }
    buffer_bytes = sum(
        b.numel() * b.element_size() for stage in pipes[WAYS[0]].stages.values() for b in stage.buffers()
    )
    times = time_alternately(pipes, repeats, inputs, targets)
    return {"times": times, "buffer_bytes": buffer_bytes}


def main() -> None:
    arguments = repeated_benchmark_arguments(__doc__, "two convolutions instead of four, 10 repetitions", repeats=30)
    blocks, repeats = (2, 10) if arguments.quick else (4, arguments.repeats)
    rows, record = [], {"machine": gloo_machine(), "repeats": repeats, "blocks": blocks, "widths": {}}
    for width in WIDTHS:
        found = layerpipe.launch(worker, 2, (width, blocks, repeats), timeout=900)[0]
        times = {way: [t * 1e3 for t in found["times"][way]] for way in WAYS}
        medians = {way: statistics.median(values) for way, values in times.items()}
        fastest = {way: min(values) for way, values in times.items()}
        ratio, fastest_ratio = medians[WAYS[0]] / medians[WAYS[1]], fastest[WAYS[0]] / fastest[WAYS[1]]
        record["widths"][width] = {
            "times_ms": times,
            "median_ms": medians,
            "ratio": ratio,
            "fastest_ratio": fastest_ratio,
            "buffer_bytes": found["buffer_bytes"],
        }
        on, off = WAYS
        rows.append(
            f"| {width} | {found['buffer_bytes']} | {medians[on]:.2f} | {medians[off]:.2f} | {ratio:.3f} | "
            f"{fastest[on]:.2f} | {fastest[off]:.2f} | {fastest_ratio:.3f} |"
        )
    lines = [
        f"# What broadcast_buffers costs a step ({datetime.date.today()})",
        "",
        f"Machine: {record['machine']}, shared with other jobs while it ran (medians of {repeats} interleaved "
        f"repetitions). 1 pipeline rank × 2 data-parallel replicas, {blocks} Conv2d+BatchNorm2d blocks, "
        "4 micro-batches of 8 images 16×16 per replica, gpipe.",
        "",
        "| channels | buffer bytes per replica | median step, on (ms) | off (ms) | on / off | fastest step, on (ms) "
        "| off (ms) | on / off |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Broadcast on, each step ends with one gloo broadcast of all the stage's buffers as bytes (float32 "
        "statistics and int64 counts together, a few KiB): what it can add is one collective's latency. On a "
        "shared machine the noise between repetitions (several percent) is larger than that: read ratios near 1 "
        "as no measurable cost. Off is what every step did before the broadcast existed.",
    ]
    print(write_results(arguments.output, "buffer_broadcast", record, lines))


if __name__ == "__main__":
    main()
