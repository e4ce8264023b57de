"""Step time of layerpipe's executor beside torch.distributed.pipelining, same model, same sizes, one run.

    python benchmarks/runtime_vs_torch.py [--repeats 15] [--ranks 2] [--microbatches 8]

Pairs: gpipe / ScheduleGPipe, 1f1b / Schedule1F1B (one stage per rank),
interleaved / ScheduleInterleaved1F1B and breadth-first / ScheduleLoopedBFS
(two stages per rank).  Both sides get the same layers, cut at the same
boundaries, and run forward and backward of the whole batch (no optimizer).
Repetitions alternate A B A B; every step is bracketed by barriers and timed
on rank 0; the table gives medians and the ratio layerpipe / torch (below 1
is faster).  One intra-op thread per process.  Results go to
``benchmarks/results/runtime_vs_torch.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
from results_files import write_results
from torch import nn

import layerpipe
from layerpipe.models.gpt import GPTConfig, gpt_layers, next_token_loss
from layerpipe.runtime.partition import partition

PAIRS = (
    ("gpipe", "ScheduleGPipe", 1),
    ("1f1b", "Schedule1F1B", 1),
    ("interleaved", "ScheduleInterleaved1F1B", 2),
    ("breadth-first", "ScheduleLoopedBFS", 2),
)
MODEL = GPTConfig(vocab_size=80, block_size=64, width=128, heads=4, blocks=6)
BATCH = 32


def _layerpipe_step(schedule: str, v: int, microbatches: int):
    pipe = layerpipe.Pipeline(
        gpt_layers(MODEL), next_token_loss, schedule=schedule, microbatches=microbatches, stages_per_rank=v, timeout=120
    )

    return pipe.train_step


def _torch_step(schedule_name: str, v: int, microbatches: int):
    from torch.distributed import pipelining

    rank, ranks = dist.get_rank(), dist.get_world_size()
    layers = gpt_layers(MODEL)
    stages = ranks * v
    boundaries = partition(layers, stages)
    indices = [rank + ranks * k for k in range(v)]
    pipeline_stages = [
        pipelining.PipelineStage(nn.Sequential(*layers[a:b]), index, stages, torch.device("cpu"))
        for index, (a, b) in ((i, boundaries[i]) for i in indices)
    ]
    schedule_class = getattr(pipelining, schedule_name)
    schedule = schedule_class(pipeline_stages if v > 1 else pipeline_stages[0], microbatches, loss_fn=next_token_loss)
    first, last = 0 in indices, stages - 1 in indices

    def step(inputs, targets):
        for stage in pipeline_stages:
            for parameter in stage.submod.parameters():
                parameter.grad = None
        arguments = (inputs,) if first else ()
        keywords = {"target": targets, "losses": []} if last else {}
        schedule.step(*arguments, **keywords)

    return step


def _timed(step, inputs, targets) -> float:
    dist.barrier()
    start = time.perf_counter()
    step(inputs, targets)
    dist.barrier()
    return time.perf_counter() - start


def worker(repeats: int, microbatches: int) -> dict:
    """Run every pair, alternating layerpipe and torch steps; return medians (rank 0's clock)."""
    torch.manual_seed(0)
    inputs = torch.randint(0, MODEL.vocab_size, (BATCH, MODEL.block_size))
    targets = torch.randint(0, MODEL.vocab_size, (BATCH, MODEL.block_size))
    results = {}
    for ours, theirs, v in PAIRS:
        steps = {"layerpipe": _layerpipe_step(ours, v, microbatches), "torch": _torch_step(theirs, v, microbatches)}
        for step in steps.values():  # warm-up: shape agreement, allocator, first-call costs
            _timed(step, inputs, targets)
            _timed(step, inputs, targets)
        times = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():
                times[name].append(_timed(step, inputs, targets))
        results[ours] = {
            "torch_schedule": theirs,
            "stages_per_rank": v,
            "layerpipe": statistics.median(times["layerpipe"]),
            "torch": statistics.median(times["torch"]),
            "layerpipe_samples": times["layerpipe"],
            "torch_samples": times["torch"],
        }
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    args = parser.parse_args(argv)
    results = layerpipe.launch(worker, args.ranks, (args.repeats, args.microbatches), timeout=300)[0]
    machine = f"{platform.node()}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    date = datetime.date.today().isoformat()
    lines = [
        "# layerpipe executor vs torch.distributed.pipelining",
        "",
        f"{date}, {machine}; {args.ranks} ranks (gloo, one thread each), {args.microbatches} micro-batches, "
        f"GPT {MODEL.blocks} blocks × width {MODEL.width}, batch {BATCH} × {MODEL.block_size} tokens, "
        f"forward+backward per step, median of {args.repeats} alternating repetitions.",
        "",
        "| layerpipe | torch | v | layerpipe ms | torch ms | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for ours, row in results.items():
        lines.append(
            f"| {ours} | {row['torch_schedule']} | {row['stages_per_rank']} | {1000 * row['layerpipe']:.1f} "
            f"| {1000 * row['torch']:.1f} | {row['layerpipe'] / row['torch']:.3f} |"
        )
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    record = {
        "date": date,
        "machine": machine,
        "ranks": args.ranks,
        "microbatches": args.microbatches,
        "repeats": args.repeats,
        "model": MODEL.to_json(),
        "batch": BATCH,
        "results": results,
    }
    print(write_results(folder, "runtime_vs_torch", record, lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
