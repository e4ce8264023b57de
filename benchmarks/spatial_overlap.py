"""Two ways to pay for the overlap of spatially partitioned convolutions, measured side by side on gloo.

    python benchmarks/spatial_overlap.py [--repeats 15] [--quick]

A stack of 6 × [Conv2d(32, 32, 3, padding=1) + ReLU] on 4 images of
128 × 128, split into bands of rows over 2 and 4 processes:

- per layer: every convolution exchanges its own one-row overlap (``SpatialConv2d``);
- blocks of 2, of 3 and one block of 6 (``SpatialBlock``): each block exchanges
  once an overlap as deep as the block and recomputes it locally;
- the whole image on one process (the others wait), for reference.

Each step is forward + backward, bracketed by barriers; the variants are
interleaved over the repetitions; medians.  Beside the times: messages
and bytes exchanged per step (forward and backward) and the rows
computed beyond the image's own (the recomputed overlap).  Results go to
``benchmarks/results/spatial_overlap.{json,md}``.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics

import torch
import torch.distributed as dist
from results_files import repeated_benchmark_arguments, write_results
from timing import time_steps_alternately
from torch import nn

import layerpipe
from layerpipe.ops.spatial import SpatialBlock, SpatialConv2d
from layerpipe.ops.spatial_rows import RowMap, plan_exchange, split_rows

LAYERS, CHANNELS = 6, 32


def plain_stack() -> list[nn.Module]:
    torch.manual_seed(0)
    return [module for _ in range(LAYERS) for module in (nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), nn.ReLU())]


def variants(size: int) -> dict[str, nn.Module]:
    """Return the ways to run the stack on chunks (and the whole image), with the same weights."""
    plain = plain_stack()
    per_layer = nn.Sequential(
        *[SpatialConv2d(CHANNELS, CHANNELS, 3, padding=1) if isinstance(m, nn.Conv2d) else nn.ReLU() for m in plain]
    )
    per_layer.load_state_dict(nn.Sequential(*plain).state_dict())
    built = {"per layer": per_layer}
    for depth in (2, 3, 6):
        blocks = [SpatialBlock(*plain[2 * first : 2 * (first + depth)]) for first in range(0, LAYERS, depth)]
        built[f"blocks of {depth}" if depth < LAYERS else "one block of 6"] = nn.Sequential(*blocks)
    built["whole image, one process"] = nn.Sequential(*plain)
    return built


def traffic(depth: int, bounds, height: int, width: int, batch: int) -> tuple[int, int, int]:
    """Return (messages, bytes, extra rows computed) per step for blocks of ``depth`` layers (forward + backward).

    A block of ``depth`` same-size 3 × 3 convolutions needs ``depth`` rows on
    each side; its layer ``l`` computes ``depth - l`` rows on each side beyond
    the rank's own (clipped to the image), which the neighbours compute too.
    """
    layer, messages, volume, extra = RowMap("conv", 3, 1, 1, 1), 0, 0, 0
    for _ in range(LAYERS // depth):
        wants = list(bounds)
        for remaining in range(depth):  # from the block's output back to its input
            if remaining:
                extra += sum(
                    min(end, height) - max(first, 0) - (own[1] - own[0]) for (first, end), own in zip(wants, bounds)
                )
            wants = [layer.needed_rows(first, end, height) for first, end in wants]
        for index in range(len(bounds)):
            plan = plan_exchange(bounds, tuple(wants), height, index)
            messages += 2 * len(plan.sends)  # the rows forward, their gradients backward
            volume += 2 * sum(piece.end - piece.first for piece in plan.sends) * width * CHANNELS * batch * 4
    return messages, volume, extra * batch


def measure(size: int, batch: int, repeats: int) -> dict:
    """Time every variant on this process group; return the medians (seconds) on rank 0's clock."""
    ranks, index = dist.get_world_size(), dist.get_rank()
    bounds = split_rows(size, ranks)
    image = torch.randn(batch, CHANNELS, size, size, generator=torch.Generator().manual_seed(1))
    chunk = image[:, :, bounds[index][0] : bounds[index][1]].contiguous()
    steps = {}
    for name, model in variants(size).items():
        alone = name.startswith("whole")
        source = (image if alone else chunk).clone().requires_grad_()

        def step(model=model, source=source, alone=alone):
            if alone and index != 0:
                return
            model.zero_grad(set_to_none=True)
            model(source).square().mean().backward()

        steps[name] = step
    times = time_steps_alternately(steps, repeats)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    args = repeated_benchmark_arguments(__doc__, "a small image and 2 processes (to test the script)")
    size, batch = (32, 2) if args.quick else (128, 4)
    today = datetime.date.today().isoformat()
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores), gloo, one thread per process"
    lines = [
        f"# Spatial convolution: paying for the overlap per layer or per block ({today})",
        "",
        f"Machine: {machine}. {LAYERS} × [Conv2d({CHANNELS}, {CHANNELS}, 3, padding=1) + ReLU], {batch} images "
        f"of {size} × {size}, forward + backward, median of {args.repeats} interleaved repetitions.",
        "",
        "| processes | variant | step (ms) | ÷ per layer | messages per step | KiB exchanged per step | "
        "extra rows computed per step (all images) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    record = {"date": today, "machine": machine, "size": size, "batch": batch, "runs": {}}
    depths = {"per layer": 1, "blocks of 2": 2, "blocks of 3": 3, "one block of 6": 6}
    for ranks in (2,) if args.quick else (2, 4):
        medians = layerpipe.launch(measure, ranks, (size, batch, args.repeats))[0]
        record["runs"][ranks] = medians
        for name, seconds in medians.items():
            messages, volume, extra = (
                traffic(depths[name], split_rows(size, ranks), size, size, batch) if name in depths else (0, 0, 0)
            )
            lines.append(
                f"| {ranks} | {name} | {1e3 * seconds:.1f} | {seconds / medians['per layer']:.2f} | "
                f"{messages} | {volume / 1024:.0f} | {extra} |"
            )
    print(write_results(args.output, "spatial_overlap", record, lines))


if __name__ == "__main__":
    main()
