"""How late a gloo message arrives while its sender computes, with and without a receive posted on the same pair;
and what carrying each pair's messages one way only does to a pipeline's step.

    python benchmarks/gloo_posted_receive.py [--repeats 40]

Two processes.  Process 1 computes 1 ms, sends 8 KiB to process 0, then
computes 3 ms more; process 0 waits for the message and notes when it
arrived.  The lateness is the arrival less the moment the send was issued.
Three ways, repetitions interleaved (A B C A B C ...), medians:

- *nothing posted*: process 1 has no receive posted;
- *posted on the same pair*: process 1 has a receive from process 0 posted
  on the group it sends on (as a pipeline that posts receives ahead has);
- *posted on another group*: the same receive, on a second group of the
  same two processes (what layerpipe does: messages to a lower rank go on a
  group of their own, so each pair carries one way only).

Then the pipeline: the ``Linear(512)`` stack of ``peers.py`` on 2
processes, 1F1B and interleaved, with messages to a lower rank on a group
of their own (layerpipe's default) and on the default group with the
others, beside torch's same schedule, all in one launch with repetitions
interleaved (``--repeats`` steps each), medians.

Results: ``benchmarks/results/gloo_posted_receive.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist
from results_files import gloo_machine, write_results
from timing import time_steps_alternately

import layerpipe

HERE = os.path.dirname(os.path.abspath(__file__))
WAYS = ("nothing posted", "posted on the same pair", "posted on another group")
SIZE = 8192


def compute(milliseconds: float) -> None:
    """Keep this process's core busy with small matrix products for ``milliseconds``."""
    end = time.perf_counter() + milliseconds / 1e3
    matrix = torch.randn(64, 64)
    while time.perf_counter() < end:
        matrix = matrix @ matrix
        matrix = matrix / matrix.norm()


def one_message(way: str, tag: int, other) -> float | None:
    """Return, on process 0, how many milliseconds after its send process 1's message arrived."""
    message, reply = torch.zeros(SIZE // 4), torch.zeros(SIZE // 4)
    posted_group = None if way == WAYS[1] else other
    dist.barrier()
    if dist.get_rank() == 1:
        posted = dist.irecv(reply, 0, tag=tag + 1, group=posted_group) if way != WAYS[0] else None
        compute(1)
        sent = time.perf_counter()
        work = dist.isend(message, 0, tag=tag)
        compute(3)
        work.wait()
        if posted is not None:
            posted.wait()
        dist.send(torch.tensor([sent], dtype=torch.float64), 0, tag=tag + 2)
        return None
    dist.irecv(message, 1, tag=tag).wait()
    arrived = time.perf_counter()
    if way != WAYS[0]:
        dist.send(reply, 1, tag=tag + 1, group=posted_group)
    sent = torch.zeros(1, dtype=torch.float64)
    dist.recv(sent, 1, tag=tag + 2)
    return (arrived - sent.item()) * 1e3


def worker(repeats: int) -> dict | None:
    torch.set_num_threads(1)
    other = dist.new_group([0, 1])
    found = {way: [] for way in WAYS}
    for repeat in range(repeats):
        for number, way in enumerate(WAYS):
            late = one_message(way, 10 * (repeat * len(WAYS) + number), other)
            if late is not None:
                found[way].append(late)
    return {way: statistics.median(values) for way, values in found.items()} if dist.get_rank() == 0 else None


def pipeline_worker(schedule: str, stages_per_rank: int, repeats: int) -> dict | None:
    """Return, on process 0, the median step of the small stack one way per pair, shared, and with torch."""
    import peers

    torch.set_num_threads(1)
    layers, loss, inputs, targets, _ = peers.model_parts("stack-512")
    pipes = {
        way: layerpipe.Pipeline(
            layers,
            loss,
            optimizer=lambda found: torch.optim.SGD(found, lr=0.0),
            timeout=300,
            schedule=schedule,
            microbatches=4,
            stages_per_rank=stages_per_rank,
        )
        for way in ("one way per pair", "both ways on one group")
    }
    shared = pipes["both ways on one group"].executor
    shared.context = dataclasses.replace(shared.context, downward=None)
    steps = {way: (lambda pipe=pipe: pipe.train_step(inputs, targets)) for way, pipe in pipes.items()}
    rank, ranks = dist.get_rank(), dist.get_world_size()
    name = {"1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B"}[schedule]
    torch_schedule, modules, _, _, torch_inputs, torch_targets = peers._torch_pipeline(
        "stack-512", name, stages_per_rank, 4, rank, ranks
    )
    optimizer = torch.optim.SGD([p for module in modules.values() for p in module.parameters()], lr=0.0)
    steps["torch"] = peers._torch_step(
        torch_schedule,
        modules,
        optimizer,
        0 in modules,
        ranks * stages_per_rank - 1 in modules,
        torch_inputs,
        torch_targets,
    )
    times = time_steps_alternately(steps, repeats, warmups=2)
    return {way: statistics.median(found) * 1e3 for way, found in times.items()} if rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    late = layerpipe.launch(worker, 2, (args.repeats,), timeout=600)[0]
    steps = {
        schedule: layerpipe.launch(pipeline_worker, 2, (schedule, v, args.repeats), timeout=900)[0]
        for schedule, v in (("1f1b", 1), ("interleaved", 2))
    }
    today, machine = datetime.date.today().isoformat(), gloo_machine()
    lines = [
        f"# A gloo message while its sender computes ({today})",
        "",
        f"Machine: {machine}. {SIZE} bytes, {args.repeats} interleaved repetitions, medians.",
        "",
        "| receive posted by the sender | message late by (ms) |",
        "| --- | --- |",
    ] + [f"| {way} | {late[way]:.3f} |" for way in WAYS]
    lines += [
        "",
        "## The Linear(512) stack on 2 processes (step, ms)",
        "",
        "| schedule | one way per pair | both ways on one group | torch, same schedule | one way / both |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {schedule} | {found['one way per pair']:.2f} | {found['both ways on one group']:.2f} | "
        f"{found['torch']:.2f} | {found['one way per pair'] / found['both ways on one group']:.2f} |"
        for schedule, found in steps.items()
    ]
    print(
        write_results(
            args.output,
            "gloo_posted_receive",
            {"date": today, "machine": machine, "late_ms": late, "steps_ms": steps},
            lines,
        )
    )


if __name__ == "__main__":
    main()
