"""Measured: breadth-first vs interleaved at ZeRO-3 on gloo, pipeline × data = 2 × 2, with the simulator beside.

    python benchmarks/data_parallel_gloo.py [--repeats 11] [--width 768] [--microbatches 4]

Communication is made to matter by the model's shape: four stages of two
``width × width`` linear layers (about 4.7 MB of float32 weights each at the
default width) trained on a small batch, so gathering and reducing a stage
costs several times its compute — the regime of a small batch per GPU on a
slow network.  Every configuration is built once; repetitions alternate
between them (A B C A B C ...), each step is bracketed by barriers and timed
on process 0, and the table gives medians and ratios to breadth-first.
Exposed communication is the time a process's compute waited for
collectives, the largest over the four processes.

Beside each measurement, the simulator runs the same lowered programs with
a cost model calibrated in this run: compute from the measured timeline's
medians, and all-gather / reduce-scatter bandwidth and latency from timing
the data-parallel group's collectives at two sizes.  Results go to
``benchmarks/results/data_parallel_gloo.{json,md}``.
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
from timing import time_alternately
from torch import nn

import layerpipe
from layerpipe.runtime.sharding import all_gather_into
from layerpipe.sim.calibrate import calibrated_cost
from layerpipe.sim.cost import at_means
from layerpipe.sim.simulator import simulate

CONFIGURATIONS = (
    ("breadth-first", "breadth-first", None),
    ("interleaved", "interleaved", None),
    ("interleaved, 1 weight buffer", "interleaved", 1),
)
PIPELINE, DATA, STAGES_PER_RANK = 2, 2, 2


def wide_layers(width: int) -> list[nn.Module]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(PIPELINE * STAGES_PER_RANK):
        layers += [nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()]
    return layers


def collective_costs(group, size: int, repeats: int = 5) -> tuple[float, float]:
    """Return (latency, bandwidth) of the data-parallel group's all-gather, fitted from two sizes."""
    times = []
    for elements in (size // 16, size):
        shard = torch.zeros(elements // DATA)
        full = torch.zeros(elements)
        samples = []
        for _ in range(repeats):
            dist.barrier(group)
            start = time.perf_counter()
            all_gather_into(full, shard, group).wait()
            samples.append(time.perf_counter() - start)
        times.append((elements * 4, statistics.median(samples)))
    (small_bytes, small_time), (large_bytes, large_time) = times
    moved = (DATA - 1) / DATA
    bandwidth = moved * (large_bytes - small_bytes) / max(large_time - small_time, 1e-9)
    latency = max(0.0, small_time - moved * small_bytes / bandwidth)
    return latency, bandwidth


def worker(repeats: int, width: int, microbatches: int) -> dict | None:
    pipes = {}
    for name, schedule, buffers in CONFIGURATIONS:
        pipes[name] = layerpipe.Pipeline(
            wide_layers(width),
            nn.functional.mse_loss,
            schedule=schedule,
            microbatches=microbatches,
            stages_per_rank=STAGES_PER_RANK,
            data_parallel=DATA,
            zero=3,
            weight_buffers=buffers,
            timeout=300,
            optimizer=lambda params: torch.optim.SGD(params, lr=1e-3),
        )
    generator = torch.Generator().manual_seed(0)
    samples = 2 * microbatches * DATA
    inputs = torch.randn(samples, width, generator=generator)
    targets = torch.randn(samples, width, generator=generator)
    exposed = {name: [] for name in pipes}

    def note_exposed(name, pipe):
        worst = torch.tensor([pipe.last_exposed_communication])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        exposed[name].append(float(worst))

    times = time_alternately(pipes, repeats, inputs, targets, note_exposed)
    any_pipe = next(iter(pipes.values()))
    latency, bandwidth = collective_costs(any_pipe.groups.data, any_pipe.shards[min(any_pipe.shards)].flat.numel())
    rows = []
    for name, pipe in pipes.items():
        measured = pipe.timeline(name)
        cost = dataclasses.replace(
            calibrated_cost(measured, pipe.schedule.placement.stages),
            weight_bytes=pipe.shards[min(pipe.shards)].weight_bytes,
            data_parallel_latency=latency,
            data_parallel_bandwidth=bandwidth,
        )
        predicted = simulate(pipe.schedule, at_means(cost))
        rows.append(
            {
                "configuration": name,
                "step_time": statistics.median(times[name]),
                "exposed_communication": statistics.median(exposed[name]),
                "simulated_step_time": predicted.step_time,
                "simulated_exposed_communication": predicted.to_json()["exposed_communication"],
                "gathers_per_step": sum(a.kind.value == "GATHER" for a in pipe.schedule.programs[pipe.rank]),
                "samples": times[name],
            }
        )
    if dist.get_rank() != 0:
        return None
    return {"rows": rows, "data_parallel_latency": latency, "data_parallel_bandwidth": bandwidth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    result = layerpipe.launch(worker, PIPELINE * DATA, (args.repeats, args.width, args.microbatches), timeout=1800)[0]
    base = next(row for row in result["rows"] if row["configuration"] == "breadth-first")
    today = datetime.date.today().isoformat()
    machine = gloo_machine()
    lines = [
        f"# Breadth-first vs interleaved at ZeRO-3, gloo, pipeline × data = 2 × 2 ({today})",
        "",
        f"Machine: {machine}. Model: 4 stages of 2 × Linear({args.width}, {args.width}), float32; "
        f"m = {args.microbatches}, micro-batch of 2 samples; {args.repeats} alternating repetitions, medians. "
        f"Collectives measured at {result['data_parallel_bandwidth'] / 1e9:.2f} GB/s after {1e3 * result['data_parallel_latency']:.2f} ms.",
        "",
        "| configuration | gathers / step | step time (ms) | ratio | exposed comm. (ms) | ratio | "
        "simulated step (ms) | simulated exposed (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['configuration']} | {row['gathers_per_step']} | {1e3 * row['step_time']:.1f} | "
            f"{row['step_time'] / base['step_time']:.2f} | {1e3 * row['exposed_communication']:.1f} | "
            f"{row['exposed_communication'] / max(base['exposed_communication'], 1e-9):.2f} | "
            f"{1e3 * row['simulated_step_time']:.1f} | {1e3 * row['simulated_exposed_communication']:.1f} |"
        )
    record = {"date": today, "machine": machine, "arguments": vars(args), **result}
    print(write_results(args.output, "data_parallel_gloo", record, lines))


if __name__ == "__main__":
    main()
